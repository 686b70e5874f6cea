"""What a measurement ran on: versions, device, CPU, threads, dtype, model config, call shapes, machine load, git.

    header = environment(device, dtype, module=unet, template=template, model="sd15", batch=2)
    log.info("%s", format_header(header))

Machine load: :func:`cpu_busy_s` / :func:`other_cpu_share` give the cores other processes kept busy over a span
(from ``/proc/stat`` minus this process), :func:`loadavg` the 1/5/15-minute load average.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

#: package versions recorded where installed (distribution names)
PACKAGES = ("diffusers", "tomesd", "DeepCache", "onnx", "onnxruntime", "onnxscript")


def cpu_busy_s() -> tuple[float, float] | None:
    """(seconds of CPU time used by all processes, by this process) so far; None where /proc/stat is missing."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    mine = os.times()
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), mine.user + mine.system


def other_cpu_share(before: tuple[float, float] | None, after: tuple[float, float] | None, wall: float) -> float | None:
    """Average number of CPU cores kept busy by *other* processes over ``wall`` seconds (contention check)."""
    if before is None or after is None or wall <= 0:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall)


def loadavg() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def git_dirty() -> list[str] | None:
    """Uncommitted changes under graphprune/ at start (another engineer may be editing the package)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "graphprune"], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[2]).stdout
        return [line.strip() for line in out.splitlines()]
    except Exception:  # noqa: BLE001
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Class, parameter count and the config keys that set the cost (JSON-ready)."""
    cfg = dict(getattr(model, "config", {}) or {})
    keys = ("block_out_channels", "layers_per_block", "attention_head_dim", "num_attention_heads",
            "cross_attention_dim", "transformer_layers_per_block", "down_block_types", "num_layers", "patch_size",
            "in_channels", "sample_size")
    return {"class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
            **{k: cfg[k] for k in keys if k in cfg}}


def call_shapes(template: tuple[tuple[Any, ...], dict[str, Any]]) -> dict[str, list[int]]:
    """Shapes of the tensors of one call template: ``{"args[0]": [2, 4, 64, 64], "encoder_hidden_states": ...}``."""
    args, kwargs = template
    shapes = {f"args[{i}]": list(a.shape) for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            shapes[k] = list(v.shape)
        elif isinstance(v, dict):
            shapes.update({f"{k}.{kk}": list(vv.shape) for kk, vv in v.items() if isinstance(vv, torch.Tensor)})
    return shapes


def device_name(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


#: environment variables that change CPU timings (allocator, OpenMP): recorded in every header when set
TIMING_ENV = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
              "MALLOC_MMAP_THRESHOLD_", "OMP_NUM_THREADS", "KMP_AFFINITY", "TORCHINDUCTOR_FREEZING")


def timing_env() -> dict[str, str]:
    """The :data:`TIMING_ENV` variables set in this process (e.g. the glibc allocator tunables of the README's CPU
    tip: without them every large tensor is a fresh mmap, page-faulted on each call)."""
    return {k: os.environ[k] for k in TIMING_ENV if k in os.environ}


def environment(device: torch.device | str, dtype: torch.dtype | str, module: torch.nn.Module | None = None,
                template: tuple[tuple[Any, ...], dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    """The header of a benchmark's result: versions, device, CPU, threads, dtype, the config of ``module`` and the
    call shapes of ``template`` (when given), machine load at start, git commit, the command line; ``extra`` (the benchmark's own facts) last.
    """
    from .. import __version__

    device = torch.device(device)
    header: dict[str, Any] = {
        "torch": torch.__version__, "graphprune": __version__, "python": platform.python_version(),
        **{name.lower(): package_version(name) for name in PACKAGES},
        "device": device_name(device), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
        "loadavg_start": loadavg(), "git_commit": git_commit(), "graphprune_uncommitted": git_dirty(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "env": timing_env(),
    }
    if module is not None:
        header["model_config"] = model_summary(module)
    if template is not None:
        header["call_shapes"] = call_shapes(template)
    header.update(extra)
    return header


def format_header(h: dict[str, Any]) -> str:
    """The header as a few lines of text (what a reader needs to judge a number)."""
    versions = " | ".join(f"{k} {h[k]}" for k in ("torch", "diffusers", "graphprune", "tomesd", "deepcache",
                                                  "onnxruntime", "python") if h.get(k))
    lines = [f"{versions} | git {(h.get('git_commit') or '?')[:12]}"
             + (" (uncommitted changes)" if h.get("graphprune_uncommitted") else ""),
             f"device {h.get('device')} ({h.get('cpu')}, {h.get('cpu_count')} CPUs, {h.get('threads')} threads) | "
             f"dtype {h.get('dtype')} | load average at start {h.get('loadavg_start')}"]
    if h.get("env"):
        lines.append("environment " + " ".join(f"{k}={v}" for k, v in h["env"].items()))
    if h.get("model_config"):
        lines.append(f"model {h.get('model', '')}: {json.dumps(h['model_config'])}")
    if h.get("call_shapes"):
        lines.append(f"call shapes {h['call_shapes']}")
    if h.get("protocol"):
        lines.append(f"protocol: {h['protocol']}")
    lines += [str(h[k]) for k in ("loop", "note") if h.get(k)]
    return "\n".join(lines)


__all__ = ["environment", "timing_env", "format_header", "cpu_busy_s", "other_cpu_share", "loadavg", "git_commit",
           "git_dirty", "cpu_model", "model_summary", "call_shapes"]

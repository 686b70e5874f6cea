"""Measurement helpers shared by the benchmarks (``benchmarks/speed.py``, :mod:`graphprune.bench.pareto`).

Timing hygiene (device sync, Dynamo recompile counters, CPU contention from ``/proc/stat``), provenance (git commit,
CPU model) and FLOP counting (:func:`flop_counter`, :func:`flop_analysis`: Amdahl and FLOP bounds of a pruning
config, counted on the rewritten graphs).
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timestep_schedule(n: int) -> list[int]:
    """n distinct timesteps 999, 980, 960, ..., 20, then 990, 970, ... (all distinct for n <= 99)."""
    out = [999] + [980 - 20 * i for i in range(49)] + [990 - 20 * i for i in range(49)]
    if n > len(out):
        raise ValueError(f"at most {len(out)} calls per variant")
    return out[:n]


def dynamo_stats() -> dict[str, int]:
    """Dynamo counters that grow when a graph is (re)compiled or a frame is (re)converted."""
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "frames_ok": int(counters["frames"].get("ok", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


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


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def rel_error(out: Any, ref: Any) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def unet_out(result: Any) -> Any:
    return result.sample if hasattr(result, "sample") else result[0]


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


# ----------------------------------------------------------------------------------------------------------------
# FLOP analysis

def flop_counter():
    """A FlopCounterMode that also counts the CPU flash-attention op (missing from torch's registry)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    custom = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        custom[op] = cpu_sdpa_flop
    return FlopCounterMode(display=False, custom_mapping=custom)


def module_flops(counts: dict[str, dict[Any, int]], model: Any, path: str) -> tuple[str, int]:
    """FLOPs of the module at ``path`` from FlopCounterMode.get_flop_counts(); returns (key used, flops)."""
    for key in (f"{type(model).__name__}.{path}", path):
        if key in counts:
            return key, int(sum(counts[key].values()))
    raise KeyError(f"no FlopCounterMode entry for module {path!r} (tried '{type(model).__name__}.{path}' and "
                   f"'{path}'); keys look like {list(counts)[:4]}")


class GraphFlops:
    """A backend wrapping graphprune's (with compiler="eager") that can count the FLOPs of the rewritten graphs.

    FlopCounterMode entered *around* a compiled module makes Dynamo fall back to the original Python code, so the
    counting mode is entered inside the compiled callable instead, once per graph call.
    """

    def __init__(self, options: dict[str, Any]):
        self.options = {**options, "compiler": "eager"}
        self.reports: list[Any] = []
        self.graphs = 0
        self.counting = False
        self.flops = 0

    def backend(self, gm: Any, example_inputs: list[Any]) -> Callable[..., Any]:
        from graphprune.backend import graphprune_backend

        fn = graphprune_backend(gm, example_inputs, options=self.options, reports=self.reports)
        self.graphs += 1

        def call(*args: Any) -> Any:
            if not self.counting:
                return fn(*args)
            with flop_counter() as fc:
                out = fn(*args)
            self.flops += fc.get_total_flops()
            return out

        return call


def flop_analysis(unet: Any, inputs: tuple[tuple[Any, ...], dict[str, Any]], configs: dict[str, dict[str, Any]],
                  tomesd_ratio: float | None = None, tomesd_proxy: str | None = None) -> dict[str, Any]:
    """FLOPs of the unpruned model and, per graphprune config, of the rewritten graphs (run with compiler="eager").

    ``inputs``: ``(args, kwargs)`` of one model call. ``configs``: name -> graphprune options. Returns the total,
    a ratio-0 coverage check, and per config the pruned sites' FLOP share ``f``, the Amdahl bound ``1/(1-f)`` and
    the FLOP bound (unpruned / rewritten FLOPs). With ``tomesd_ratio`` also tomesd's FLOPs measured on a patched
    eager copy (compared with the config named ``tomesd_proxy``).
    """
    import torch

    args, kwargs = inputs
    with torch.no_grad(), flop_counter() as fc:
        unet(*args, **kwargs)
    total = int(fc.get_total_flops())
    counts = fc.get_flop_counts()
    key_format = next((k for k in counts if k.endswith("conv_in")), None)
    log.info("unpruned eager FLOPs: %.4g (FlopCounterMode key example: %r)", total, key_format)
    result: dict[str, Any] = {"total_unpruned": total, "key_example": key_format, "configs": {}}

    def run_captured(options: dict[str, Any]) -> GraphFlops:
        torch._dynamo.reset()
        cap = GraphFlops(options)
        compiled = torch.compile(unet, backend=cap.backend)
        with torch.no_grad():
            compiled(*args, **kwargs)  # trace + rewrite
            cap.counting = True
            compiled(*args, **kwargs)
            cap.counting = False
        torch._dynamo.reset()
        return cap

    # coverage check: the same capture path with ratio 0 must see all of the model's FLOPs
    check = run_captured({"method": "tome", "ratio": 0.0})
    result["capture_check"] = {"flops_ratio0": check.flops, "graphs": check.graphs,
                               "covers_model": check.flops == total}
    if check.flops != total:
        log.warning("FLOP capture covers %d of %d FLOPs (%d graphs): FLOP bounds are approximate",
                    check.flops, total, check.graphs)

    for name, options in configs.items():
        cap = run_captured(options)
        sites = [s for r in cap.reports for s in r.sites]
        pruned = [s for s in sites if s.status == "pruned"]
        site_flops = {}
        for s in pruned:
            key, fl = module_flops(counts, unet, s.module_path)
            site_flops[s.module_path] = {"key": key, "flops": fl, "N": s.N, "K": s.K}
        pruned_share = sum(v["flops"] for v in site_flops.values()) / total
        total_pruned = cap.flops + (total - check.flops)  # ops outside the graphs (if any) count as unpruned
        result["configs"][name] = {
            "options": options, "graphs": cap.graphs, "pruned_sites": site_flops,
            "site_summary": [f"{s.module_path} {s.kind} N={s.N} K={s.K} {s.status}" for s in sites],
            "f": pruned_share, "ideal_bound": 1.0 / (1.0 - pruned_share) if pruned_share < 1 else float("inf"),
            "total_pruned": total_pruned, "flop_bound": total / total_pruned,
        }
        log.info("%s: %d pruned sites, f=%.3f, ideal 1/(1-f)=%.2f, FLOPs %.4g -> %.4g (bound %.2fx)", name,
                 len(pruned), pruned_share, result["configs"][name]["ideal_bound"], total, total_pruned,
                 total / total_pruned)

    if tomesd_ratio is not None:
        import tomesd

        patched = copy.deepcopy(unet)
        tomesd.apply_patch(patched, ratio=tomesd_ratio)
        torch.manual_seed(0)
        with torch.no_grad(), flop_counter() as fc2:
            patched(*args, **kwargs)
        tflops = int(fc2.get_total_flops())
        # tomesd swaps the class of every transformer block; it merges only where downsample <= max_downsample
        patched_blocks = sorted(n for n, m in patched.named_modules() if type(m).__name__.startswith("ToMe"))
        result["tomesd_measured"] = {"total_pruned": tflops, "flop_bound": total / tflops,
                                     "blocks_with_patched_class": patched_blocks}
        proxy = result["configs"].get(tomesd_proxy) if tomesd_proxy else None
        if proxy is not None:
            result["tomesd_measured"]["same_flops_as_" + tomesd_proxy] = tflops == proxy["total_pruned"]
        log.info("tomesd eager (measured directly): FLOPs %.4g -> %.4g (bound %.2fx)", total, tflops, total / tflops)
        del patched
        gc.collect()
    return result

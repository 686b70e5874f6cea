#!/usr/bin/env python
"""Deployment latency: onnxruntime pruned vs unpruned (CPU), and TensorRT vs Inductor on CUDA when available.

    python benchmarks/export.py --latents 32 --out results/export_cpu.json          # SD1.5 architecture, batch 2
    python benchmarks/export.py --arch tiny --latents 16 --runs 3                    # smoke test (~1 min)
    python benchmarks/export.py --tensorrt                                           # + TensorRT/Inductor (CUDA)

Per latent size, everything in one process: the UNet (random weights, ``graphprune.archs.build_unet``) is exported
unpruned (``ratio=0``) and with each pruning variant (``graphprune.export.to_onnx``, fp32, static shapes, random
inputs fixed), then each pruned session is timed *interleaved* with the unpruned session (ABAB... rounds, so load
from other processes hits both alike): warm-up calls, then the median of ``--runs`` timed calls each. Only two
sessions are held at a time (an SD1.5 fp32 ONNX model is 3.4 GB). The speedup is unpruned median / pruned median;
the error is ||pruned - unpruned|| / ||unpruned|| of the same inputs (structured latents from photos).

``--tensorrt`` (CUDA + torch-tensorrt only): ``torch.compile`` (Inductor) vs ``to_tensorrt``, pruned and unpruned,
timed the same way with ``torch.cuda.synchronize``; otherwise the reason it cannot run is printed and recorded.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("export-bench")

#: variant key -> graphprune options
VARIANTS: dict[str, dict[str, Any]] = {
    "sito0.5": {"method": "sito", "ratio": 0.5},
    "sito0.7": {"method": "sito", "ratio": 0.7},
    "tome0.5": {"method": "tome", "ratio": 0.5},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="onnxruntime (and TensorRT) latency of pruned vs unpruned UNets, "
                                            "in one process.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="sd15", help="built-in architecture (sd15, sd2, sdxl, tiny)")
    p.add_argument("--latents", default="32", help="comma-separated latent sizes")
    p.add_argument("--batch", type=int, default=2, help="batch size (2 = classifier-free guidance)")
    p.add_argument("--variants", default="sito0.5,tome0.5", help=f"comma-separated subset of {list(VARIANTS)}")
    p.add_argument("--runs", type=int, default=5, help="timed calls per session and variant (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per session first")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: ORT's)")
    p.add_argument("--tensorrt", action="store_true", help="also time TensorRT vs Inductor (CUDA + torch-tensorrt)")
    p.add_argument("--workdir", default=None, help="where the ONNX files go (default: a temporary folder)")
    p.add_argument("--out", default="results/export.json", help="JSON output path")
    return p.parse_args(argv)


def environment() -> dict[str, Any]:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for name in ("onnx", "onnxruntime", "onnxscript", "diffusers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    try:
        env["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        root = Path(__file__).resolve().parent.parent
        env["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip()
        env["dirty"] = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "graphprune"],
                                           capture_output=True, text=True).stdout.strip())
    except OSError:
        pass
    return env


def timed_rounds(fns: dict[str, Callable[[], Any]], runs: int, warmup: int,
                 sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Warm each callable up, then time them interleaved (round-robin) ``runs`` times. Returns seconds per call."""
    from tqdm import tqdm

    for fn in fns.values():
        for _ in range(warmup):
            fn()
        sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in tqdm(range(runs), desc="timed rounds", leave=False):
        for key, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - t0)
    return times


def rel_err(a: Any, b: Any) -> float:
    return float((a - b).norm() / b.norm())


def bench_onnx(args: argparse.Namespace, latent: int, workdir: Path) -> dict[str, Any]:
    import torch

    from graphprune.archs import build_unet, example_inputs
    from graphprune.export import check_onnx, export_info, export_program, to_onnx
    from graphprune.export.deploy import OnnxRunner

    unet = build_unet(args.arch)
    call_args, kwargs = example_inputs(unet, latent=latent, batch=args.batch, structured=True)
    if kwargs:
        raise SystemExit("this benchmark takes SD1.x/2.x-style UNets (no added_cond_kwargs)")
    result: dict[str, Any] = {"latent": latent, "shapes": {"sample": list(call_args[0].shape),
                                                            "encoder_hidden_states": list(call_args[2].shape)},
                              "dtype": "float32", "device": "cpu (onnxruntime CPUExecutionProvider)", "rows": []}
    files: dict[str, Path] = {}
    keys = ["unpruned"] + [v for v in args.variants.split(",") if v]
    for key in keys:
        options = {"method": "sito", "ratio": 0.0} if key == "unpruned" else VARIANTS[key]
        t0 = time.perf_counter()
        ep = export_program(unet, call_args, options=options)
        path = to_onnx(ep, call_args, workdir / f"{args.arch}_{latent}_{key}.onnx")
        check = check_onnx(path)
        info = export_info(ep)
        result["rows"].append({"variant": key, "options": options, "export_s": time.perf_counter() - t0,
                               "pruned_sites": info.report.count("pruned", "self"),
                               "K": sorted({s.K for s in info.report.pruned}), "topk_k": sorted(set(check.topk_ks)),
                               "trt_checks": "ok" if check.ok else check.problems})
        files[key] = path
        log.info("exported %s in %.1f s (%s)", key, time.perf_counter() - t0, info.report.summary())
        del ep
        gc.collect()
    del unet
    gc.collect()
    feed = [a.numpy() if isinstance(a, torch.Tensor) else a for a in call_args]
    base = OnnxRunner(files["unpruned"], threads=args.threads)
    base_out = base(*call_args)
    rows = {r["variant"]: r for r in result["rows"]}
    for key in keys[1:]:
        runner = OnnxRunner(files[key], threads=args.threads)
        out = runner(*call_args)
        times = timed_rounds({"unpruned": lambda: base(*call_args), key: lambda: runner(*call_args)},
                             args.runs, args.warmup)
        row = rows[key]
        row.update({"median_s": statistics.median(times[key]), "times_s": times[key],
                    "unpruned_median_s": statistics.median(times["unpruned"]), "unpruned_times_s": times["unpruned"],
                    "rel_err": rel_err(out, base_out)})
        row["speedup"] = row["unpruned_median_s"] / row["median_s"]
        log.info("%s: %.3f s vs unpruned %.3f s -> %.3fx (rel. error %.4f)", key, row["median_s"],
                 row["unpruned_median_s"], row["speedup"], row["rel_err"])
        del runner
        gc.collect()
    del feed
    return result


def bench_tensorrt(args: argparse.Namespace, latent: int) -> dict[str, Any]:
    """Inductor vs TensorRT, unpruned and pruned, on CUDA (fp16)."""
    import torch

    from graphprune.archs import build_unet, example_inputs
    from graphprune.export import tensorrt_unavailable, to_tensorrt

    reason = tensorrt_unavailable()
    if reason is not None:
        log.warning("TensorRT comparison skipped: %s", reason)
        return {"latent": latent, "skipped": reason}
    unet = build_unet(args.arch, dtype=torch.float16).cuda()
    call_args, _ = example_inputs(unet, latent=latent, batch=args.batch, structured=True)
    fns: dict[str, Callable[[], Any]] = {}
    with torch.no_grad():
        fns["inductor"] = (lambda f: lambda: f(*call_args))(torch.compile(unet))
        for key in ["unpruned"] + [v for v in args.variants.split(",") if v]:
            options = {"method": "sito", "ratio": 0.0} if key == "unpruned" else VARIANTS[key]
            engine = to_tensorrt(unet, call_args, options=options)
            fns[f"tensorrt {key}"] = (lambda e: lambda: e(*call_args))(engine)
            if key != "unpruned":
                fast = torch.compile(unet, backend="graphprune", options=options)
                fns[f"inductor {key}"] = (lambda f: lambda: f(*call_args))(fast)
        times = timed_rounds(fns, args.runs, args.warmup, sync=torch.cuda.synchronize)
    base = statistics.median(times["inductor"])
    return {"latent": latent, "dtype": "float16", "device": torch.cuda.get_device_name(0),
            "rows": [{"variant": k, "median_s": statistics.median(v), "times_s": v,
                      "vs_inductor": base / statistics.median(v)} for k, v in times.items()]}


def table(result: dict[str, Any]) -> str:
    lines = [f"| latent {result['latent']}x{result['latent']} | median s | unpruned median s (same rounds) | "
             "speedup | rel. error | pruned sites, K | TopK k | TRT checks | export s |", "|---" * 9 + "|"]
    for r in result["rows"]:
        if r["variant"] == "unpruned":
            lines.append(f"| unpruned (ratio 0) | - | - | 1 | 0 | 0 | - | {r['trt_checks']} | {r['export_s']:.0f} |")
            continue
        lines.append(f"| {r['variant']} | {r['median_s']:.3f} | {r['unpruned_median_s']:.3f} | {r['speedup']:.3f} | "
                     f"{r['rel_err']:.3g} | {r['pruned_sites']}, {r['K']} | {r['topk_k']} | "
                     f"{r['trt_checks'] if isinstance(r['trt_checks'], str) else 'FAIL'} | {r['export_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("torch", "onnxscript", "onnx_ir", "graphprune"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    from graphprune.archs import unet_config

    torch.set_grad_enabled(False)
    env = environment()
    report: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
                              "arch": args.arch, "batch": args.batch, "runs": args.runs, "warmup": args.warmup,
                              "threads": args.threads, "environment": env, "onnx": [], "tensorrt": []}
    cfg = unet_config(args.arch)
    print(f"model: {args.arch} UNet (random weights), block_out_channels={cfg.get('block_out_channels')}, "
          f"cross_attention_dim={cfg.get('cross_attention_dim')}; batch {args.batch}; fp32 ONNX on CPU")
    print("environment:", json.dumps(env))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for latent in [int(x) for x in args.latents.split(",") if x]:
            result = bench_onnx(args, latent, Path(tmp))
            report["onnx"].append(result)
            print(f"\nshapes: {result['shapes']}, dtype {result['dtype']}, device {result['device']}")
            print(table(result))
            for f in Path(tmp).iterdir():
                f.unlink()
            if args.tensorrt:
                report["tensorrt"].append(bench_tensorrt(args, latent))
                print(json.dumps(report["tensorrt"][-1], indent=1))
            write(report, Path(args.out))  # after every latent size: a long run that is stopped keeps its results
    print(f"\nwrote {args.out}")
    return 0


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())

"""Deployment latency: onnxruntime pruned vs unpruned (CPU), and TensorRT vs Inductor on CUDA when available.

    graphprune bench export --latents 32 --out results/export_cpu.json      # SD1.5 architecture, batch 2
    python benchmarks/export.py --quick                                     # tiny UNet, latent 16
    graphprune bench export --tensorrt                                      # + TensorRT/Inductor (CUDA)

Per latent size, in one process: the UNet (random weights) is exported unpruned (``ratio=0``) and with each pruning
variant (:func:`graphprune.export.to_onnx`, fp32, static shapes, random inputs fixed). The unpruned session is the
baseline, timed alone; each pruned session is timed by the paired timer (:mod:`graphprune.bench.timing`): every
timed call paired with a call of the unpruned session, speedup = the median of the per-pair ratios. Only two
sessions are held at a time (an SD1.5 fp32 ONNX model is 3.4 GB). The error is ||pruned - unpruned|| /
||unpruned|| of the same inputs (structured latents from photos).

``tensorrt`` (CUDA + torch-tensorrt only): ``torch.compile`` (Inductor, the baseline) vs ``to_tensorrt``, pruned
and unpruned, paired the same way with ``torch.cuda.synchronize``; otherwise the reason it cannot run is recorded.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .env import environment, format_header
from .options import ExportOptions
from .output import render_table, write_json
from .timing import PairedTimer
from .variants import Variant, variant, variants

log = logging.getLogger(__name__)

UNPRUNED = {"method": "sito", "ratio": 0.0}


def run(opts: ExportOptions) -> dict[str, Any]:
    """Export and time every variant at every latent; JSON in ``opts.out``; ``table`` and ``failed``."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ..archs import unet_config

    opts.check()
    chosen = pruned_variants(opts.variants)
    cfg = unet_config(opts.arch)
    header = environment("cpu", "float32", model=opts.arch, batch=opts.batch, block_out_channels=cfg.get(
        "block_out_channels"), cross_attention_dim=cfg.get("cross_attention_dim"), ort_threads=opts.threads,
        protocol=opts.protocol().describe(), options=opts.as_dict(),
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        note=f"model: {opts.arch} UNet (random weights); batch {opts.batch}; fp32 ONNX on CPU (onnxruntime "
             "CPUExecutionProvider)")
    log.info("%s", format_header(header))
    report: dict[str, Any] = {"header": header, "onnx": [], "tensorrt": []}
    texts = [format_header(header)]
    with torch.no_grad(), logging_redirect_tqdm(), tempfile.TemporaryDirectory(dir=opts.workdir) as tmp:
        for latent in opts.latents:
            result = bench_onnx(opts, chosen, latent, Path(tmp))
            report["onnx"].append(result)
            texts.append(f"shapes: {result['shapes']}, dtype {result['dtype']}, device {result['device']}\n"
                         + table(result))
            for f in Path(tmp).iterdir():
                f.unlink()
            if opts.tensorrt:
                report["tensorrt"].append(bench_tensorrt(opts, chosen, latent))
            write_json(report, opts.out)  # after every latent size: a long run that is stopped keeps its results
    report["table"] = "\n\n".join(texts)
    report["failed"] = []
    write_json(report, opts.out)
    return report


def pruned_variants(names: tuple[str, ...]) -> list[Variant]:
    chosen = variants(names)
    bad = [v.key for v in chosen if v.kind != "graphprune"]
    if bad:
        raise ValueError(f"export variants must be graphprune configs, not {bad}")
    return chosen


def bench_onnx(opts: ExportOptions, chosen: list[Variant], latent: int, workdir: Path) -> dict[str, Any]:
    from ..archs import build_model, example_inputs
    from ..export import check_onnx, export_info, export_program, to_onnx
    from ..export.deploy import OnnxRunner

    unet = build_model(opts.arch)
    call_args, kwargs = example_inputs(unet, latent=latent, batch=opts.batch, structured=True)
    if kwargs:
        raise ValueError("this benchmark takes SD1.x/2.x-style UNets (no added_cond_kwargs)")
    result: dict[str, Any] = {"latent": latent, "shapes": {"sample": list(call_args[0].shape),
                                                            "encoder_hidden_states": list(call_args[2].shape)},
                              "dtype": "float32", "device": "cpu (onnxruntime CPUExecutionProvider)", "rows": []}
    files: dict[str, Path] = {}
    for key, options in [("unpruned", UNPRUNED)] + [(v.key, v.options) for v in chosen]:
        t0 = time.perf_counter()
        ep = export_program(unet, call_args, options=options)
        path = to_onnx(ep, call_args, workdir / f"{opts.arch}_{latent}_{key}.onnx")
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
    base = OnnxRunner(files["unpruned"], threads=opts.threads)
    base_out = base(*call_args)
    timer = PairedTimer(opts.protocol(), lambda i: base(*call_args), desc="unpruned session (baseline)")
    rows = {r["variant"]: r for r in result["rows"]}
    rows["unpruned"].update(median_s=timer.median_s, timing=timer.baseline)
    for v in chosen:
        runner = OnnxRunner(files[v.key], threads=opts.threads)
        out = runner(*call_args)
        res = timer.time(lambda i, session=runner: session(*call_args), v.key)
        row = rows[v.key]
        row.update(median_s=res["median_s"], times_s=res["times_s"], unpruned_median_s=res["baseline_median_s"],
                   unpruned_times_s=res["baseline_times_s"], speedup=res["speedup"], timing=res,
                   rel_err=float((out - base_out).norm() / base_out.norm()))
        log.info("%s: %.3f s vs unpruned %.3f s (paired) -> %.3fx (rel. error %.4f)", v.key, row["median_s"],
                 row["unpruned_median_s"], row["speedup"], row["rel_err"])
        del runner
        gc.collect()
    return result


def bench_tensorrt(opts: ExportOptions, chosen: list[Variant], latent: int) -> dict[str, Any]:
    """Inductor (the baseline) vs TensorRT, unpruned and pruned, on CUDA (fp16)."""
    from ..archs import build_model, example_inputs
    from ..export import tensorrt_unavailable, to_tensorrt

    reason = tensorrt_unavailable()
    if reason is not None:
        log.warning("TensorRT comparison skipped: %s", reason)
        return {"latent": latent, "skipped": reason}
    unet = build_model(opts.arch, dtype=torch.float16).cuda()
    call_args, _ = example_inputs(unet, latent=latent, batch=opts.batch, structured=True)
    device = torch.device("cuda")
    base = variant("inductor").build(unet).fn
    timer = PairedTimer(opts.protocol(), lambda i: base(*call_args), desc="inductor (baseline)", device=device)
    fns: dict[str, Callable[[int], Any]] = {}
    for key, options in [("unpruned", UNPRUNED)] + [(v.key, v.options) for v in chosen]:
        engine = to_tensorrt(unet, call_args, options=options)
        fns[f"tensorrt {key}"] = (lambda e: lambda i: e(*call_args))(engine)
        if key != "unpruned":
            fast = torch.compile(unet, backend="graphprune", options=options)
            fns[f"inductor {key}"] = (lambda f: lambda i: f(*call_args))(fast)
    rows = [{"variant": "inductor", "median_s": timer.median_s, "vs_inductor": 1.0, "timing": timer.baseline}]
    for key, fn in fns.items():
        res = timer.time(fn, key)
        rows.append({"variant": key, "median_s": res["median_s"], "times_s": res["times_s"],
                     "vs_inductor": res["speedup"], "timing": res})
    return {"latent": latent, "dtype": "float16", "device": torch.cuda.get_device_name(0), "rows": rows}


def table(result: dict[str, Any]) -> str:
    rows = []
    for r in result["rows"]:
        if r["variant"] == "unpruned":
            rows.append(["unpruned (ratio 0)", f"{r['median_s']:.3f}", "-", "1", "0", "0", "-", r["trt_checks"],
                         f"{r['export_s']:.0f}"])
            continue
        rows.append([r["variant"], f"{r['median_s']:.3f}", f"{r['unpruned_median_s']:.3f}", f"{r['speedup']:.3f}",
                     f"{r['rel_err']:.3g}", f"{r['pruned_sites']}, {r['K']}", str(r["topk_k"]),
                     r["trt_checks"] if isinstance(r["trt_checks"], str) else "FAIL", f"{r['export_s']:.0f}"])
    return render_table([f"latent {result['latent']}x{result['latent']}", "median s", "unpruned median s (paired)",
                         "speedup (paired)", "rel. error", "pruned sites, K", "TopK k", "TRT checks", "export s"],
                        rows, markdown=True)


__all__ = ["run", "table", "ExportOptions"]

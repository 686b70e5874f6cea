"""The ``graphprune`` command. ``graphprune inspect --arch sd15 --latent 64`` prints the attention sites;
``graphprune export --arch sd15 --latent 64 --method sito --ratio 0.5 --format onnx -o out.onnx`` exports;
``graphprune bench pareto ...`` runs the speed-quality sweep (:mod:`graphprune.bench.pareto`);
``graphprune calibrate --arch sd15 --latent 64 --steps 50 -o calib.json`` writes a MagCache calibration."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch


def _add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="sito", help="pruning method (default: sito)")
    p.add_argument("--ratio", type=float, default=None,
                   help="fraction of tokens removed (default: the method's, 0.5 for tome/sito, 0.4 for dato)")
    p.add_argument("--scope", default=None, help="self | self+cross | self+cross+ff | block (default: the method's)")
    p.add_argument("--max-downsample", type=int, default=None,
                   help="prune levels up to this downsample (default: the method's, 1; atedm: every level)")
    p.add_argument("--cache-interval", type=int, default=None,
                   help="deepcache/dato: a full step every N calls (default 3)")
    p.add_argument("--schedule", default=None,
                   help="deepcache/dato: uniform | deepcache-nonuniform | dato-imagenet | dato-coco")
    p.add_argument("--cache-branch", type=int, default=None, help="deepcache/dato: where the UNet is cut (default 0)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other method option, VALUE parsed as JSON when it can be (repeatable), e.g. "
                        "--option threshold=0.7 --option refresh=config3 (catome)")


def _options(args: argparse.Namespace) -> dict:
    """The method options given on the command line (unset ones keep the method's defaults)."""
    options = {"method": args.method}
    for key in ("scope", "max_downsample", "ratio", "cache_interval", "schedule", "cache_branch"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    for item in getattr(args, "option", []):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option takes KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value  # a bare string, e.g. refresh=config3
    return options


def _model_and_inputs(args: argparse.Namespace):
    from .archs import build_model, example_inputs, load_unet

    unet = load_unet(args.model) if args.model else build_model(args.arch)
    call_args, kwargs = example_inputs(unet, latent=args.latent, batch=args.batch, structured=False)
    return unet, call_args, kwargs


def cmd_inspect(args: argparse.Namespace) -> int:
    import graphprune

    unet, call_args, kwargs = _model_and_inputs(args)
    options = _options(args)
    report = graphprune.inspect(unet, *call_args, options=options, **kwargs)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report.to_dict(), fh, indent=1)
    print(report)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Prune and export a UNet: a torch.export program (.pt2), an ONNX file, or a TensorRT program (.ep)."""
    from .export import check_onnx, export_program, to_onnx, to_tensorrt

    unet, call_args, kwargs = _model_and_inputs(args)
    options = _options(args)
    if args.format == "onnx":
        path = to_onnx(unet, call_args, args.output, kwargs, options=options, random=args.random)
        print(check_onnx(path))
    elif args.format == "program":
        ep = export_program(unet, call_args, kwargs, options=options, random=args.random)
        torch.export.save(ep, args.output)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("--format tensorrt needs a CUDA device and torch-tensorrt (pip install "
                             "'graphprune[tensorrt]')")
        unet = unet.cuda()
        call_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in call_args)
        to_tensorrt(unet, call_args, kwargs, options=options, random=args.random, path=args.output)
    print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .archs import ARCHS

    parser = argparse.ArgumentParser(prog="graphprune", description="Token pruning for diffusion models as a "
                                     "torch.compile pass.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every matched and skipped site")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="list the attention sites of a UNet and what a method would do to them")
    p.add_argument("--arch", choices=ARCHS, default="sd15", help="built-in architecture (random weights)")
    p.add_argument("--model", help="local diffusers folder (UNet or pipeline) instead of --arch")
    p.add_argument("--latent", type=int, default=64, help="latent height and width (default 64)")
    p.add_argument("--batch", type=int, default=2, help="batch size (2 = classifier-free guidance)")
    p.add_argument("--json", help="also write the report as JSON to this path")
    _add_method_args(p)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("export", help="prune a UNet and export it (ONNX file, torch.export program, TensorRT)")
    p.add_argument("--arch", choices=ARCHS, default="sd15", help="built-in architecture (random weights)")
    p.add_argument("--model", help="local diffusers folder (UNet or pipeline) instead of --arch")
    p.add_argument("--latent", type=int, default=64, help="latent height and width (default 64); static")
    p.add_argument("--batch", type=int, default=2, help="batch size (2 = classifier-free guidance); static")
    p.add_argument("--format", choices=("onnx", "program", "tensorrt"), default="onnx",
                   help="onnx (.onnx, checked against TensorRT's parser), program (torch.export .pt2), "
                        "tensorrt (torch-tensorrt .ep; needs CUDA)")
    p.add_argument("--random", choices=("fixed", "inputs"), default="fixed",
                   help="random inputs stored (the backend's first draw for the seed) or as extra model inputs")
    p.add_argument("-o", "--output", required=True, help="output file")
    _add_method_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("calibrate", help="MagCache: record a model's per-step magnitude ratios of the cached feature "
                       "(JSON + plot) for policy='magcache'", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", choices=ARCHS, default="sd15", help="built-in architecture (random weights)")
    p.add_argument("--model", help="local diffusers folder (UNet or pipeline) instead of --arch")
    p.add_argument("--latent", type=int, default=64, help="latent height and width")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the calibration generation")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--cache-branch", type=int, default=0, help="where the UNet is cut (as the runtime that uses it)")
    p.add_argument("--cfg", choices=("batch", "split"), default="batch",
                   help="batch: one [uncond; cond] call per step; split: one call per half (two cache contexts)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and the random text embeddings")
    p.add_argument("--compiler", default="eager", help="inner compiler of the calibration run (eager: no compile)")
    p.add_argument("-o", "--output", required=True, help="calibration JSON to write")
    p.add_argument("--plot", help="ratio plot (PNG) to write (default: the output path with .png)")
    p.set_defaults(func=cmd_calibrate)

    bench = sub.add_parser("bench", help="benchmarks: speed-quality Pareto sweep")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    p = bench_sub.add_parser("pareto", help="every registered method x ratios: speed vs Inductor, quality of a "
                             "seeded DDIM loop (or of images with --model); JSON, table, pareto.png",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from .bench.pareto import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench_pareto)
    return parser


def cmd_bench_pareto(args: argparse.Namespace) -> int:
    from .bench.pareto import run_from_args

    logging.getLogger("graphprune.bench").setLevel(getattr(logging, args.log_level.upper()))
    try:
        table, code = run_from_args(args)
    except ValueError as exc:  # a bad option: the reason, exit code 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n" + table, flush=True)  # the command's output; the library only logs
    return code


def cmd_calibrate(args: argparse.Namespace) -> int:
    """One seeded CFG DDIM generation from noise with every step in full; the cut feature's ratios per call."""
    from pathlib import Path

    from .archs import build_model, example_inputs, load_unet
    from .bench.ddim import LoopSpec, ddim_loop, loop_start
    from .calibrate import calibrate

    unet = load_unet(args.model) if args.model else build_model(args.arch)
    template = example_inputs(unet, latent=args.latent, batch=2, seed=args.seed)
    start = loop_start(unet, args.latent, images=1, seed=args.seed)
    spec = LoopSpec(steps=args.steps, guidance=args.guidance, strength=1.0, seed=args.seed)
    if args.cfg == "batch":
        def run(fn):
            return ddim_loop(fn, template, start, spec, progress="calibrate")
    else:
        def run(fn):
            return _split_cfg_loop(fn, template, start, spec)
    loop = {"num_steps": args.steps, "scheduler": "DDIM", "guidance": args.guidance, "latent": args.latent,
            "batch": 2 if args.cfg == "batch" else 1, "seed": args.seed,
            "model": args.model or f"--arch {args.arch} (random weights)"}
    try:
        calibration = calibrate(unet, run, cache_branch=args.cache_branch, cfg=args.cfg, compiler=args.compiler,
                                loop=loop)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = calibration.save(args.output)
    plot = calibration.plot(args.plot or Path(args.output).with_suffix(".png"))
    for context, ratios in calibration.ratios.items():
        print(f"{context}: {len(ratios)} calls, ratio min {min(ratios):.4f} max {max(ratios):.4f}")
    print(f"wrote {path} and {plot}")
    return 0


def _split_cfg_loop(fn, template, start, spec):
    """The DDIM loop of :func:`graphprune.bench.ddim.ddim_loop`, calling the UNet once per CFG half (uncond, then
    cond) at every step, as pipelines without batched CFG do."""
    from tqdm import tqdm

    from .bench.ddim import loop_timesteps, make_scheduler, model_output, with_sample_and_timestep

    args, kwargs = template
    halves = []
    for i in range(2):
        def row(v, i=i):
            if isinstance(v, dict):
                return {k: row(x) for k, x in v.items()}
            return v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 2 else v
        halves.append((tuple(row(a) for a in args), row(kwargs)))
    scheduler = make_scheduler()
    timesteps = loop_timesteps(scheduler, spec)
    x = scheduler.add_noise(start.x0[:1], start.noise[:1], timesteps[:1]).to(args[0].device, args[0].dtype)
    for t in tqdm(timesteps, desc="calibrate (split cfg)", unit="step"):
        eps_u, eps_c = (model_output(fn(*a, **k), x.shape[1])
                        for a, k in (with_sample_and_timestep(h, x, t) for h in halves))
        x = scheduler.step(eps_u + spec.guidance * (eps_c - eps_u), t, x, eta=0.0).prev_sample
    return x


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    torch.set_grad_enabled(False)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

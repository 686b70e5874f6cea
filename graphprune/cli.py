"""The ``graphprune`` command. ``graphprune inspect --arch sd15 --latent 64`` prints the attention sites;
``graphprune generate --arch tiny --method tome --prompt "a red rocket" -o out/`` writes images and timings;
``graphprune export --arch sd15 --latent 64 --method sito --ratio 0.5 --format onnx -o out.onnx`` exports;
``graphprune bench pareto|speed|steps|policies|atedm|compile|export|profile ...`` runs a benchmark (:mod:`graphprune.bench`: each command's
flags are the fields of its options dataclass, the command prints the table its ``run`` returns);
``graphprune calibrate --arch sd15 --latent 64 --steps 50 -o calib.json`` writes a MagCache calibration."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch


def _add_method_args(p: argparse.ArgumentParser) -> None:
    from .methods import DEFAULT_OPTIONS, method_names

    p.add_argument("--method", default=None, choices=method_names(),
                   help=f"pruning method (default: the default configuration {DEFAULT_OPTIONS}, as options={{}} "
                        "and graphprune.apply(pipe))")
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
    p.add_argument("--compiler", default=None, choices=("inductor", "eager", "aot_eager", "tensorrt"),
                   help="inner compiler of the rewritten graph (default: inductor; eager skips the compile)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other method option, VALUE parsed as JSON when it can be (repeatable), e.g. "
                        "--option threshold=0.7 --option refresh=config3 (catome)")


def _options(args: argparse.Namespace) -> dict:
    """The method options given on the command line (unset ones keep the method's defaults)."""
    options = {"method": args.method} if args.method else {}
    for key in ("scope", "max_downsample", "ratio", "cache_interval", "schedule", "cache_branch", "compiler"):
        if getattr(args, key, None) is not None:
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


def _model_and_inputs(args: argparse.Namespace, weights: bool = True):
    """The model and example inputs of a command; ``weights=False`` builds it on the meta device (inspect)."""
    from .archs import build_model, example_inputs, load_unet

    if args.model:
        unet = load_unet(args.model, weights=weights)
    else:
        unet = build_model(args.arch, device=None if weights else "meta")
    call_args, kwargs = example_inputs(unet, latent=args.latent, batch=args.batch, structured=False)
    return unet, call_args, kwargs


def cmd_inspect(args: argparse.Namespace) -> int:
    import graphprune

    unet, call_args, kwargs = _model_and_inputs(args, weights=False)  # inspect needs no weights
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


def cmd_generate(args: argparse.Namespace) -> int:
    """Build or load a pipeline, apply the method, write one PNG per prompt and print a timing line per image."""
    from .generate import GenerateOptions, generate

    opts = GenerateOptions(arch=None if args.model else args.arch, model=args.model, options=_options(args),
                           prompts=args.prompt or ["a photo of an astronaut riding a horse"],
                           negative_prompt=args.negative_prompt, steps=args.steps, seed=args.seed, height=args.height,
                           width=args.width, guidance=args.guidance, out=args.output, compare=args.compare)
    for result in generate(opts):
        print(result.line(), flush=True)
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

    p = sub.add_parser("generate", help="generate images end to end with a method applied: PNGs and a timing line each",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", choices=("tiny", "sd15", "sd2", "sdxl"), default="tiny",
                   help="built-in pipeline (random weights, no text encoder: the prompt seeds its embeddings)")
    p.add_argument("--model", help="local diffusers pipeline folder (real weights) instead of --arch")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable; one image each)")
    p.add_argument("--negative-prompt", default="", help="negative prompt")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--seed", type=int, default=0, help="generator seed (the same for every image)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the pipeline's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--compare", action="store_true",
                   help="also generate each image unpruned (the UNet under the same inner compiler), alternately, "
                        "and report the paired speed ratio and the PSNR between the two")
    p.add_argument("-o", "--output", default="out", help="output folder for the PNGs")
    _add_method_args(p)
    p.set_defaults(func=cmd_generate)

    _add_bench_commands(sub)
    return parser


# ------------------------------------------------------------------------------------------------------------------
# graphprune bench <name>: each command's flags are the fields of its options dataclass (graphprune/bench/options.py)

#: name -> (options class in graphprune.bench.options, help)
BENCHMARKS = {
    "pareto": ("ParetoOptions", "every registered method x ratios: speed vs Inductor, quality of a seeded DDIM loop "
               "(or of images with --model); JSON, table, pareto.png"),
    "speed": ("SpeedOptions", "per-call speed of eager, Inductor, graphprune and tomesd on one UNet, each timed "
              "call paired with a baseline call; error and Amdahl/FLOP bounds"),
    "steps": ("StepsOptions", "whole denoising loops: step caching (deepcache, dato, catome) and pruning vs full "
              "steps, each timed generation paired with a baseline generation"),
    "policies": ("PoliciesOptions", "step policies' speed-vs-error front: fixed intervals, DaTo presets, first-block "
                 "and magcache at equal call counts, x Taylor forecast, x DaTo pruning; generations bracketed by "
                 "full-step ones (front.json, front.md, front.png)"),
    "atedm": ("AtedmOptions", "AT-EDM vs ToMe and SiTo at equal FLOPs (scope=block) on the SDXL architecture"),
    "profile": ("ProfileOptions", "where the time of one call goes: self time per op of each variant "
                "(torch.profiler, categories) and eager time per module with each config's time bound"),
    "compile": ("CompileOptions", "compile time as a user sees it: cold and warm (fresh processes sharing the "
                "on-disk Inductor caches) per variant, graphs compiled, cache hits and misses"),
    "gpu": ("GpuOptions", "the one-command GPU run: per-call and 50-step times of SD1.5 (512x512) and SDXL "
            "(1024x1024) in fp16, Inductor (and CUDA graphs) vs graphprune, tomesd, ToDo, deepcache; JSON + table"),
    "export": ("ExportOptions", "deployment latency: onnxruntime pruned vs unpruned sessions (paired), TensorRT vs "
               "Inductor on CUDA"),
}


def _add_bench_commands(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHMARKS) + " (graphprune bench NAME --help)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from .bench import options

    for name, (cls_name, text) in BENCHMARKS.items():
        p = bench_sub.add_parser(name, help=text, description=text,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _add_option_fields(p, getattr(options, cls_name))
        if name == "pareto":
            p.add_argument("--replot", default=None, metavar="JSON[,JSON...]",
                           help="measure nothing: recompute the front, table and plot of pareto.json files (also "
                                "partial ones from an interrupted run; several are joined) into -o")
            p.add_argument("--speeds", default=None, metavar="JSON",
                           help="with --replot: fill the points' speedups from a 'graphprune bench speed' JSON "
                                "(paired, one process; matched by options)")
        p.add_argument("--log-level", default="INFO", help="logging level of graphprune.bench")
        p.set_defaults(func=cmd_bench, options_class=getattr(options, cls_name))
    p = bench_sub.add_parser("variants", help="list the named variants the benchmarks' --variants take")
    p.set_defaults(func=cmd_bench_variants)


def _add_option_fields(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of an options dataclass (help, group, choices from the field's metadata)."""
    import dataclasses
    import types
    import typing

    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        target = groups.setdefault(meta["group"], p.add_argument_group(meta["group"])) if meta["group"] else p
        name = meta["flag"] or "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        kwargs: dict = {"dest": f.name, "help": meta["help"]}
        if kind is bool:
            flag = meta["flag"] or ("--no-" if f.default else "--") + f.name.replace("_", "-")
            target.add_argument(flag, action="store_false" if f.default else "store_true", **kwargs)
            continue
        if typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            kwargs.update(type=lambda text, item=item: tuple(item(x.strip()) for x in split_list(text) if x.strip()),
                          default=",".join(str(x) for x in f.default) if f.default is not None else None,
                          metavar=meta["metavar"] or f.name.upper().rstrip("S") + ",...")
        else:
            kwargs.update(type=kind, default=f.default, metavar=meta["metavar"])
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
            kwargs.pop("metavar", None)
        target.add_argument(*([meta["short"]] if meta["short"] else []), name, **kwargs)


def split_list(text: str) -> list[str]:
    """``text`` split at the commas outside brackets, braces and quotes: ``a,b:x={"p": 1, "q": 2}`` -> 2 items."""
    items, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "[{(":
            depth += 1
        elif not quoted and ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0 and not quoted:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def cmd_bench(args: argparse.Namespace) -> int:
    """Run one benchmark: options from the flags, ``graphprune.bench.<name>.run(options)``, print its table."""
    import dataclasses
    import importlib

    logging.getLogger("graphprune.bench").setLevel(getattr(logging, args.log_level.upper()))
    cls = args.options_class
    try:
        opts = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
        if getattr(args, "speeds", None) and not args.replot:
            raise ValueError("--speeds fills the points of --replot JSON; give --replot")
        if getattr(args, "replot", None):
            from .bench.frontier import replot

            result = replot(args.replot.split(","), opts.out, speeds=args.speeds)
        else:
            opts.check()
            result = importlib.import_module(f".bench.{args.bench}", __package__).run(opts)
    except ValueError as exc:  # a bad option: the reason, exit code 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n" + result["table"], flush=True)  # the command's output; the library only logs
    return 1 if result.get("failed") else 0


def cmd_bench_variants(args: argparse.Namespace) -> int:
    from .bench.variants import CATALOGUE

    for key, v in CATALOGUE.items():
        detail = v.options if v.kind == "graphprune" else {k: x for k, x in (("ratio", v.ratio), ("cache_interval",
                                                           v.interval), ("inductor", v.inductor)) if x}
        print(f"{key:24s} {v.label:40s} {v.kind:12s} {detail or ''}")
    print("\nevery graphprune entry also as NAME-fx (compiler='eager': the rewritten graph without Inductor); "
          "tomesd<ratio>, DeepCache<N> (+inductor); METHOD:key=value:... for any graphprune options")
    return 0


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
    if args.command in ("export", "generate", "inspect"):  # long work: show its stages (graphprune.progress)
        logging.getLogger("graphprune.progress").setLevel(logging.INFO)
    torch.set_grad_enabled(False)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

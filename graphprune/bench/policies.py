"""The step policies' speed-vs-error front: which rule decides a generation's full and cached steps best.

    graphprune bench policies --latent 32 --out docs/steps_policies_sd15_latent32_cpu
    graphprune bench policies --out docs/steps_policies_sd15_latent32_cpu --resume --select taylor   # add a family
    graphprune bench policies --out docs/steps_policies_sd15_latent32_cpu --report-only              # redo md/png
    result = run(PoliciesOptions(quick=True, out="/tmp/front"))

A seeded ``steps``-step CFG DDIM loop (:func:`~graphprune.bench.ddim.ddim_loop`, strength 1, batch 2 = [uncond;
cond]) on a built-in architecture with random weights. The variants (:func:`front_variants`): fixed intervals
2..6, DaTo's two 50-step presets, first-block at thresholds and magcache at error budgets placed at the fixed
intervals' call counts, each with and without the Taylor forecast (order 1), each for ``deepcache`` and for
``dato`` (its pruning at r = 0.4 in the full and shallow graphs). The knobs are found on a *calibration*
generation (other noise, other text): MagCache's ratios from :func:`graphprune.calibrate`, and the first down
stage's output of every call (the first-block probe's tensor), so that a rule makes the same number of full calls
as interval N; the measured generation may then make a few more or fewer (the counts are reported).

Timing: every variant runs its rewritten FX graphs (``compiler="eager"``: the rules, not Inductor, are compared);
one warm-up call, then one timed generation; after every ``pair_every`` variants a generation of the full-step
baseline (the same graphs, every call full, called directly so no Dynamo cache is shared), and each variant's
speedup divides the mean of the baseline generations just before and just after it by its own time. Time is this
single-threaded process's CPU seconds (``time.process_time``, insensitive to other jobs on a shared machine); wall
seconds are reported beside. Error: the final latent's relative error against the baseline's (random weights: the
errors rank the rules, they say nothing of image quality). FLOP bound: the unpruned FLOPs of all calls over the
FLOPs the variant ran (probe calls included).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .calls import Template, rel_error, with_sample_and_timestep
from .ddim import LoopStart, ddim_loop, loop_start, loop_timesteps, make_scheduler, psnr
from .env import environment, format_header, loadavg
from .flops import flops_per_kind
from .options import LoopSpec, PoliciesOptions
from .timing import torch_setup
from .variants import build_model

log = logging.getLogger(__name__)

FRONT_INTERVALS = (2, 3, 4, 5, 6)
FRONT_SKIPS = 5  # first-block and magcache: at most 5 cached calls in a row, so interval 6's call count is reachable
MAGCACHE_RETENTION = 0.0  # as the fixed rules: with MagCache's 0.2 (or FLUX's 0.1) and K = 5 the calibrated rule
# could not come down to the call counts of intervals 5 and 6 (warm-up calls are full calls)
DATO_PRESETS = (("dato-imagenet", "S_A"), ("dato-coco", "S_B"))


class DirectBaseline:
    """The full-step baseline: the traced model's graph through graphprune with every call full (``deepcache``,
    ``cache_interval=1``, the FX graph run as is, as the variants' graphs), called directly with the graph's flat
    argument list, so no Dynamo cache is shared with the variants (they reset Dynamo between them).

    Called as the model: ``baseline(*args, **kwargs)`` with the template's conditioning; only the sample
    (``args[0]``) and the timestep change between calls."""

    def __init__(self, unet: torch.nn.Module, template: Template, timestep: Any):
        from ..backend import graphprune_backend

        captured: dict[str, Any] = {}

        def backend(gm: Any, example_inputs: Any) -> Any:
            runtime = graphprune_backend(gm, example_inputs, register_runtime=False,
                                         options={"method": "deepcache", "cache_interval": 1, "compiler": "eager"})
            captured["runtime"] = runtime

            def spy(*args: Any) -> Any:
                captured.setdefault("args", args)
                return runtime(*args)
            return spy

        args, kwargs = with_sample_and_timestep(template, template[0][0], timestep)
        torch._dynamo.reset()
        torch.compile(unet, backend=backend)(*args, **kwargs)
        flat = list(captured["args"])
        self.runtime = captured["runtime"]
        self.sample_at = next(i for i, a in enumerate(flat) if a is args[0])
        self.timestep_at = next(i for i, a in enumerate(flat) if a is args[1])
        self.flat = flat
        self.runtime.reset()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = list(self.flat)
        flat[self.sample_at], flat[self.timestep_at] = args[0], args[1]
        return self.runtime(*flat)


def full_calls(steps: int, interval: int) -> int:
    """Full calls of a fixed interval over ``steps`` calls (the first call is full)."""
    return -(-steps // interval)


def first_stage_outputs(unet: torch.nn.Module, samples: list[torch.Tensor], timesteps: Any, template: Template
                        ) -> list[torch.Tensor]:
    """The first down stage's output of each call (the first-block probe's tensor), eagerly: the model runs until
    ``down_blocks[0]`` returns (a hook stops it there). samples: each call's (B, C, H, W) input."""
    class _Stop(Exception):
        pass

    seen: list[torch.Tensor] = []

    def hook(module: Any, args: Any, out: Any) -> None:
        seen.append(out[0].detach().clone())
        raise _Stop

    handle = unet.down_blocks[0].register_forward_hook(hook)
    try:
        for x, t in zip(samples, timesteps):
            args, kwargs = with_sample_and_timestep(template, x, t)
            try:
                unet(*args, **kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()
    return seen


def simulate_first_block(probes: list[torch.Tensor], threshold: float, max_skips: int) -> list[str]:
    """graphprune's FirstBlockPolicy over recorded probe outputs (every call's output known: a calibration run)."""
    from ..policy import FirstBlockPolicy

    policy, kinds, ref = FirstBlockPolicy(threshold, max_skips), [], None
    for i, p in enumerate(probes):
        signal = None if ref is None else float((p - ref).abs().mean() / ref.abs().mean())
        kind = policy.decide(i, frozenset(["full", "shallow"]) if i else frozenset(["full"]), signal).kind
        ref = p if kind == "full" else ref
        kinds.append(kind)
    return kinds


def pick_knob(count_full: Callable[[float], int], target: int, lo: float = 1e-5, hi: float = 10.0) -> float:
    """The knob (threshold, error budget) whose schedule makes ``target`` full calls (the count falls as the knob
    rises); bisection in log space; the closest count when none is exact."""
    import math

    best = (abs(count_full(hi) - target), hi)
    for _ in range(48):
        mid = math.sqrt(lo * hi)
        n = count_full(mid)
        best = min(best, (abs(n - target), mid))
        if n == target:
            return mid
        lo, hi = (mid, hi) if n > target else (lo, mid)
    return best[1]


def front_variants(steps: int, thresholds: dict[int, float], budgets: dict[int, float], calibration: str,
                   intervals: tuple[int, ...] = FRONT_INTERVALS) -> list[dict[str, Any]]:
    """Every variant of the front: (rule, knob) x forecast {none, taylor order 1} x {deepcache, dato r=0.4}.
    thresholds, budgets: full-call count -> the first-block threshold / magcache budget that reaches it."""
    rules: list[tuple[str, str, dict[str, Any]]] = []
    for n in intervals:
        rules.append(("fixed", f"N={n}", {"cache_interval": n}))
    if steps == 50:
        for preset, label in DATO_PRESETS:
            rules.append(("dato-preset", label, {"schedule": preset, "num_steps": steps}))
    for n in intervals:
        target = full_calls(steps, n)
        rules.append(("first-block", f"T={thresholds[target]:.3g}", {"policy": "first-block",
                                                                     "threshold": thresholds[target],
                                                                     "max_skips": FRONT_SKIPS}))
        rules.append(("magcache", f"B={budgets[target]:.3g}", {"policy": "magcache", "calibration": calibration,
                                                               "error_budget": budgets[target],
                                                               "max_skips": FRONT_SKIPS,
                                                               "retention_ratio": MAGCACHE_RETENTION}))
    out = []
    for method in ("deepcache", "dato"):
        for forecast in ("none", "taylor"):
            for rule, knob, options in rules:
                extra = {"forecast": "taylor", "order": 1} if forecast == "taylor" else {}
                name = f"{method} {rule} {knob}" + (" +taylor" if forecast == "taylor" else "")
                out.append({"name": name, "rule": rule, "knob": knob, "method": method, "forecast": forecast,
                            "options": {"method": method, **options, **extra}})
    return out


def family_flops(unet: torch.nn.Module, method: str, forecast: str, probe: bool, template: Template,
                 timesteps: Any) -> dict[str, float]:
    """FLOPs of one call per graph (full, shallow, probe) of a family of variants (FlopCounterMode on the rewritten
    graphs run eagerly; the schedule does not change them)."""
    options: dict[str, Any] = {"method": method}
    options.update({"forecast": "taylor", "order": 1} if forecast == "taylor" else {})
    options.update({"policy": "first-block", "threshold": 1e9, "max_skips": 1} if probe else {"cache_interval": 2})
    return flops_per_kind(unet, options, template, timesteps)


def time_variant(unet: torch.nn.Module, options: dict[str, Any], generate: Callable[[Any], torch.Tensor],
                 first_call: Callable[[Any], Any]) -> dict[str, Any]:
    """Warm up (one call: Dynamo traces, every graph is built), then one timed generation: CPU and wall seconds, the
    final latent, the step kinds, the policy's records, the probe calls."""
    from ..backend import graphprune_backend

    made: list[Any] = []

    def backend(gm: Any, example_inputs: Any) -> Any:
        runtime = graphprune_backend(gm, example_inputs, options={**options, "compiler": "eager"},
                                     register_runtime=False)
        made.append(runtime)
        return runtime

    torch._dynamo.reset()
    fast = torch.compile(unet, backend=backend)
    first_call(fast)
    runtime = made[-1]
    runtime.build_variants()
    runtime.reset()
    probe = runtime.variants.get(("probe", runtime.config.ratio))
    probe_before = probe.calls if probe is not None else 0
    t0, c0 = time.perf_counter(), time.process_time()
    final = generate(fast)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    kinds = list(runtime.kinds)
    records = [{"kind": r.kind, "signal": r.signal, "accumulated": r.accumulated} for r in runtime.records]
    probe_calls = probe.calls - probe_before if probe is not None else 0
    del fast, made
    torch._dynamo.reset()
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "final": final, "kinds": kinds, "records": records,
            "probe_calls": probe_calls}


def run(opts: PoliciesOptions) -> dict[str, Any]:
    """The front (see the module docstring): writes ``front.json`` into ``opts.out`` after every variant (a long run
    keeps what it measured), then ``front.md`` and ``front.png``; returns the result with ``table`` (the summary and
    the equal-calls comparison, markdown)."""
    opts.check()
    out = Path(opts.out)
    if opts.report_only:
        results = json.loads((out / "front.json").read_text())
        write_front_report(results, out)
        return {**results, "table": summary_table(results) + "\n\n" + equal_calls_table(results)}
    from tqdm import tqdm

    from ..archs import example_inputs
    from ..calibrate import calibrate
    from ..policy import magcache_schedule

    previous: dict[str, Any] = {}
    if opts.resume and (out / "front.json").exists():
        previous = json.loads((out / "front.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    with torch_setup(opts.threads, opts.keep_inductor_cache, prefix="policies"):
        unet = build_model(opts.arch)
        template = example_inputs(unet, opts.latent, batch=2, seed=0, structured=True)
        spec = LoopSpec(steps=opts.steps, guidance=opts.guidance, strength=1.0, seed=1)
        start = loop_start(unet, opts.latent, images=1, seed=1)
        timesteps = loop_timesteps(make_scheduler(), spec)
        header = environment("cpu", torch.float32, module=unet, template=template, arch=opts.arch,
                             latent=opts.latent, batch=2, steps=opts.steps, guidance=opts.guidance, scheduler="DDIM",
                             pair_every=opts.pair_every, compiler="eager (FX graphs, no Inductor)",
                             options=opts.as_dict())
        log.info("%s", format_header(header))
        results: dict[str, Any] = {"header": header, "variants": {}, "baselines": []}
        if previous:
            results["previous_headers"] = previous.get("previous_headers", []) + [previous["header"]]
            results["baselines"] = previous.get("baselines", [])
            results["variants"] = {k: v for k, v in previous["variants"].items() if v.get("speedup")}
        baseline = DirectBaseline(unet, template, timesteps[0])

        def generate(fn: Callable[..., Any], loop_from: LoopStart = start, conditioning: Template = template
                     ) -> torch.Tensor:
            return ddim_loop(fn, conditioning, loop_from, spec)

        def run_baseline() -> torch.Tensor:
            t0, c0 = time.perf_counter(), time.process_time()
            final = generate(baseline)
            results["baselines"].append({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                                         "loadavg": loadavg()})
            log.info("baseline generation: %.1f s (%.1f s CPU)", results["baselines"][-1]["seconds"],
                     results["baselines"][-1]["cpu_seconds"])
            return final

        base_final = run_baseline()
        # calibration on another generation (other noise, other text): MagCache's ratios, and the probe outputs
        # that place the first-block thresholds at the fixed intervals' call counts
        g = torch.Generator().manual_seed(11)
        (args, kwargs) = template
        cal_template: Template = ((args[0], args[1], torch.randn(args[2].shape, generator=g).to(args[2]), *args[3:]),
                                  kwargs)
        noised = make_scheduler().add_noise(start.x0, start.noise, timesteps[:1])
        cal_start = LoopStart(x0=noised, noise=torch.randn(noised.shape, generator=g).to(noised))
        seen: list[torch.Tensor] = []

        def recording(fn: Callable[..., Any]) -> Callable[..., Any]:
            def call(*call_args: Any, **call_kwargs: Any) -> Any:
                seen.append(call_args[0].clone())
                return fn(*call_args, **call_kwargs)
            return call

        calibration = calibrate(unet, lambda fast: generate(recording(fast), cal_start, cal_template),
                                loop={"num_steps": opts.steps, "scheduler": "DDIM", "guidance": opts.guidance,
                                      "latent": opts.latent, "seed": 11, "arch": opts.arch})
        cal_path = calibration.save(out / "calibration.json")
        calibration.plot(out / "calibration.png")
        probes = first_stage_outputs(unet, seen, timesteps, cal_template)
        ratios = calibration.ratios["batch"]
        warmup = int(MAGCACHE_RETENTION * opts.steps + 0.5)
        intervals = FRONT_INTERVALS if opts.steps >= 30 else (2, 3)
        thresholds, budgets = {}, {}
        for n in intervals:
            target = full_calls(opts.steps, n)
            thresholds[target] = pick_knob(lambda th: simulate_first_block(probes, th, FRONT_SKIPS).count("full"),
                                           target)
            budgets[target] = pick_knob(lambda b: [r.kind for r in magcache_schedule(ratios, b, FRONT_SKIPS, warmup)]
                                        .count("full"), target)
        results["calibration"] = {"path": str(cal_path), "thresholds": thresholds, "budgets": budgets,
                                  "max_skips": FRONT_SKIPS, "magcache_retention": MAGCACHE_RETENTION}
        log.info("thresholds (first-block) %s, budgets (magcache) %s", thresholds, budgets)
        if previous:
            _check_same_knobs(previous.get("calibration", {}), thresholds, budgets)
        flops_base = flops_per_kind(unet, None, template, timesteps)["full"]
        variants = [v for v in front_variants(opts.steps, thresholds, budgets, str(cal_path), intervals)
                    if v["name"] not in results["variants"]
                    and (opts.select is None or re.search(opts.select, v["name"]))]
        families = {}  # FLOPs per graph of the (method, forecast, probe) families the chosen variants belong to
        for key in dict.fromkeys((v["method"], v["forecast"], v["rule"] == "first-block") for v in variants):
            families[key] = family_flops(unet, *key, template, timesteps)
        results["flops"] = {**results.get("flops", {}), "full_unpruned": flops_base,
                            **{f"{m}/{f}/{'probe' if p else 'cut'}": v for (m, f, p), v in families.items()}}
        if not variants:
            log.warning("no variant to measure (--select %r, --resume kept %d)", opts.select, len(results["variants"]))

        def first_call(fast: Any) -> Any:
            call_args, call_kwargs = with_sample_and_timestep(template, torch.cat([noised] * 2), timesteps[0])
            return fast(*call_args, **call_kwargs)

        chunk: list[str] = []
        before = results["baselines"][-1]
        for i, variant in enumerate(tqdm(variants, desc="front", unit="variant")):
            r = time_variant(unet, variant["options"], generate, first_call)
            kinds = r.pop("kinds")
            fl = families[(variant["method"], variant["forecast"], variant["rule"] == "first-block")]
            run_flops = sum(fl.get(k, 0.0) for k in kinds if k != "reuse") + r["probe_calls"] * fl.get("probe", 0.0)
            final = r.pop("final")
            results["variants"][variant["name"]] = {
                **variant, **r, "counts": {k: kinds.count(k) for k in ("full", "shallow", "reuse")},
                "kinds": kinds, "flops_per_kind": fl, "flop_bound": flops_base * opts.steps / run_flops,
                "error": rel_error(final, base_final), "psnr": psnr(final, base_final), "baseline_before": before}
            chunk.append(variant["name"])
            log.info("%s: %.1f s, full/shallow/reuse %s, error %.3g", variant["name"], r["seconds"],
                     results["variants"][variant["name"]]["counts"], results["variants"][variant["name"]]["error"])
            if len(chunk) == opts.pair_every or i == len(variants) - 1:
                final_b = run_baseline()
                if not torch.equal(final_b, base_final):
                    log.warning("the baseline generation is not reproducible")
                after = results["baselines"][-1]
                for name in chunk:  # bracketed: the baseline generations just before and just after
                    v = results["variants"][name]
                    b = v.pop("baseline_before")
                    v["baseline_seconds"] = (b["seconds"] + after["seconds"]) / 2
                    v["baseline_cpu_seconds"] = (b["cpu_seconds"] + after["cpu_seconds"]) / 2
                    v["wall_speedup"] = v["baseline_seconds"] / v["seconds"]
                    v["speedup"] = v["baseline_cpu_seconds"] / v["cpu_seconds"]  # CPU time: robust to other jobs
                chunk, before = [], after
            (out / "front.json").write_text(json.dumps(results, indent=1, default=str))
        header["loadavg_end"] = loadavg()
    (out / "front.json").write_text(json.dumps(results, indent=1, default=str))
    results = json.loads((out / "front.json").read_text())  # the report reads what the file holds (string keys)
    write_front_report(results, out)
    return {**results, "table": summary_table(results) + "\n\n" + equal_calls_table(results)}


def _check_same_knobs(stored: dict[str, Any], thresholds: dict[int, float], budgets: dict[int, float]) -> None:
    """--resume: the kept variants were placed with the stored knobs; the recomputed ones must be the same."""
    for name, now in (("thresholds", thresholds), ("budgets", budgets)):
        then = {int(k): float(v) for k, v in stored.get(name, {}).items()}
        if then and any(abs(then.get(k, float("nan")) - v) > 1e-9 * max(1.0, abs(v)) for k, v in now.items()):
            raise RuntimeError(f"--resume: the calibration gives other {name} ({now}) than the stored front's "
                               f"({then}); the kept variants would not be comparable: rerun without --resume into a "
                               f"new --out folder")


def write_front_report(results: dict[str, Any], out: Path) -> None:
    """front.md (the summary, the equal-calls comparison, every variant) and front.png."""
    text = [f"```\n{format_header(results['header'])}\n```" if "graphprune" in results["header"] else "",
            "## Summary (speedup from paired CPU seconds; error of the final latent vs the full-step run)", "",
            summary_table(results), "", "## At the call count of each fixed interval", "", equal_calls_table(results),
            "", "## Every variant", "", front_table(results), ""]
    (out / "front.md").write_text("\n".join(text))
    front_plot(results, out / "front.png")


def summary_table(results: dict[str, Any]) -> str:
    """One row per (family, fixed interval's call count): each rule's error and paired speedup at that count (the
    adaptive rules' points placed at it by their knob; their actual counts in brackets when they differ)."""
    rows = ["| family | full calls (interval) | fixed: error, speedup | first-block: error, speedup | "
            "magcache: error, speedup | FLOP bound fixed / first-block |", "|---|---|---|---|---|---|"]
    variants = list(results["variants"].values())
    targets = sorted({int(k) for k in results["calibration"]["thresholds"]}, reverse=True)

    def cell(v: dict[str, Any] | None, target: int) -> str:
        if v is None:
            return "-"
        n = v["counts"]["full"]
        speed = f"{v['speedup']:.2f}x" if v.get("speedup") else "-"
        return f"{v['error']:.4f}, {speed}" + (f" ({n} calls)" if n != target else "")

    for method in ("deepcache", "dato"):
        for forecast in ("none", "taylor"):
            fam = [v for v in variants if v["method"] == method and v["forecast"] == forecast]
            label = f"{method}{' +taylor' if forecast == 'taylor' else ''}"
            for target in targets:
                by_rule = {}
                for rule in ("fixed", "first-block", "magcache"):
                    knob = {"fixed": None, "first-block": results["calibration"]["thresholds"],
                            "magcache": results["calibration"]["budgets"]}[rule]
                    match = [v for v in fam if v["rule"] == rule and (
                        v["counts"]["full"] == target if rule == "fixed" else
                        abs(float(v["knob"].split("=")[1]) - float(f"{knob[str(target)]:.3g}")) < 1e-12)]
                    by_rule[rule] = match[0] if match else None
                fixed = by_rule["fixed"]
                interval = fixed["knob"] if fixed else "-"
                bounds = " / ".join(f"{by_rule[r]['flop_bound']:.2f}x" if by_rule[r] else "-"
                                    for r in ("fixed", "first-block"))
                rows.append(f"| {label} | {target} ({interval}) | {cell(fixed, target)} | "
                            f"{cell(by_rule['first-block'], target)} | {cell(by_rule['magcache'], target)} | {bounds} |")
            for v in sorted((v for v in fam if v["rule"] == "dato-preset"), key=lambda v: v["knob"]):
                c = v["counts"]
                rows.append(f"| {label} | {c['full']} / {c['shallow']} / {c['reuse']} full/shallow/reuse ({v['knob']}) | "
                            f"{cell(v, v['counts']['full'])} | - | - | {v['flop_bound']:.2f}x / - |")
    return "\n".join(rows)


def front_table(results: dict[str, Any]) -> str:
    """Every variant: calls by kind, seconds, paired speedup, FLOP bound, error, PSNR."""
    rows = ["| variant | full / shallow / reuse (+probe) | CPU s / generation | baseline CPU s (paired) | speedup "
            "(CPU s) | speedup (wall s) | FLOP bound | final-latent rel. err | PSNR dB |",
            "|---|---|---|---|---|---|---|---|---|"]
    on_front = {v["name"] for v in pareto_front(list(results["variants"].values()))}
    for v in sorted(results["variants"].values(), key=lambda v: (v["method"], v["forecast"], v["rule"],
                                                                -v["counts"]["full"])):
        c = v["counts"]
        probe = f" (+{v['probe_calls']})" if v["probe_calls"] else ""
        name = f"**{v['name']}** (front)" if v["name"] in on_front else v["name"]
        rows.append(f"| {name} | {c['full']} / {c['shallow']} / {c['reuse']}{probe} | {v['cpu_seconds']:.1f} | "
                    f"{v.get('baseline_cpu_seconds', float('nan')):.1f} | {v.get('speedup', float('nan')):.2f}x | "
                    f"{v.get('wall_speedup', float('nan')):.2f}x | {v['flop_bound']:.2f}x | {v['error']:.4f} | "
                    f"{v['psnr']:.1f} |")
    return "\n".join(rows)


def equal_calls_table(results: dict[str, Any]) -> str:
    """At each fixed interval's number of full calls: the fixed rule's error and the adaptive rules' errors at the
    same count (their own point when the count matches, else interpolated in log error between their two nearest
    counts), per family (method x forecast)."""
    import math

    def at(points: list[tuple[int, float]], calls: int) -> float | None:
        exact = [e for n, e in points if n == calls]
        if exact:
            return exact[0]
        below = max((p for p in points if p[0] < calls), default=None)
        above = min((p for p in points if p[0] > calls), default=None)
        if below is None or above is None:
            return None
        w = (calls - below[0]) / (above[0] - below[0])
        return math.exp((1 - w) * math.log(below[1]) + w * math.log(above[1]))

    rows = ["| family | fixed interval | full calls | fixed error | first-block error (ratio) | "
            "magcache error (ratio) |", "|---|---|---|---|---|---|"]
    variants = list(results["variants"].values())
    for method in ("deepcache", "dato"):
        for forecast in ("none", "taylor"):
            fam = [v for v in variants if v["method"] == method and v["forecast"] == forecast]
            curves = {rule: sorted((v["counts"]["full"], v["error"]) for v in fam if v["rule"] == rule)
                      for rule in ("first-block", "magcache")}
            for v in sorted((v for v in fam if v["rule"] == "fixed"), key=lambda v: -v["counts"]["full"]):
                n = v["counts"]["full"]
                cells = []
                for rule in ("first-block", "magcache"):
                    e = at(curves[rule], n)
                    cells.append("-" if e is None else f"{e:.4f} ({e / v['error']:.2f})")
                rows.append(f"| {method}{' +taylor' if forecast == 'taylor' else ''} | {v['knob']} | {n} | "
                            f"{v['error']:.4f} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def pareto_front(variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The variants no other variant beats on both speedup and error, by rising error."""
    timed = sorted((v for v in variants if v.get("speedup")), key=lambda v: (v["error"], -v["speedup"]))
    front: list[dict[str, Any]] = []
    for v in timed:
        if not front or v["speedup"] > front[-1]["speedup"]:
            front.append(v)
    return front


def front_plot(results: dict[str, Any], path: Path) -> None:
    """Left: paired speedup vs final-latent error (the front); right: error vs full calls (the equal-calls view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"fixed": "tab:blue", "dato-preset": "tab:purple", "first-block": "tab:orange", "magcache": "tab:green"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    variants = list(results["variants"].values())
    for v in variants:
        marker = "^" if v["forecast"] == "taylor" else "o"
        face = colors[v["rule"]] if v["method"] == "dato" else "none"
        kw = dict(marker=marker, s=42, edgecolors=colors[v["rule"]], facecolors=face, linewidths=1.3)
        if v.get("speedup"):
            ax.scatter(v["error"], v["speedup"], **kw)
        ax2.scatter(v["counts"]["full"], v["error"], **kw)
    for method, style in (("deepcache", "-"), ("dato", "--")):
        for forecast in ("none", "taylor"):
            for rule in ("fixed", "first-block", "magcache"):
                pts = sorted((v["counts"]["full"], v["error"]) for v in variants if v["rule"] == rule
                             and v["method"] == method and v["forecast"] == forecast)
                if pts:
                    ax2.plot(*zip(*pts), style, color=colors[rule], alpha=0.5 if forecast == "taylor" else 0.9, lw=1)
    front = pareto_front(variants)
    if front:
        ax.plot([v["error"] for v in front], [v["speedup"] for v in front], ls=":", color="gray", lw=1,
                label="front", zorder=0)
    for ax_ in (ax, ax2):
        ax_.set_yscale("log" if ax_ is ax2 else "linear")
        ax_.grid(alpha=0.3)
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax2.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("final-latent relative error vs the full-step run")
    ax.set_ylabel("speedup: full-step CPU s / variant CPU s (paired)")
    ax2.set_xlabel("full UNet calls per generation")
    ax2.set_ylabel("final-latent relative error")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", ls="", color=c, label=r) for r, c in colors.items()]
    handles += [Line2D([], [], marker="o", ls="", mfc="none", color="gray", label="deepcache (hollow)"),
                Line2D([], [], marker="o", ls="", color="gray", label="+ DaTo pruning (filled)"),
                Line2D([], [], marker="^", ls="", color="gray", label="+ Taylor forecast (triangle)")]
    ax.legend(handles=handles, fontsize=7, loc="upper left")
    h = results["header"]
    fig.suptitle(f"{h['arch']} {h['latent']}x{h['latent']}, {h['steps']} DDIM steps, CFG {h['guidance']}, CPU "
                 f"{h['threads']} thread(s), random weights (errors rank the rules only)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["run", "front_variants", "summary_table", "equal_calls_table", "front_table", "front_plot", "PoliciesOptions"]

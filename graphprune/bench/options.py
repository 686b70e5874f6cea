"""The options of every benchmark, in one place: plain dataclasses that ``run(options)`` takes and the command line
is built from (``graphprune bench <name> --help`` lists exactly these fields, with their help text).

    opts = SpeedOptions(latents=(32,), variants=("inductor", "sito0.5"), runs=5)
    opts.check()                      # ValueError naming the valid choices
    opts.protocol()                   # the paired timer's Protocol(runs=5, warmup=2, retries=2, ...)

Every field carries its help, its argument group and (where needed) its choices in ``dataclasses.field``
metadata (see :func:`opt`); ``graphprune.cli`` turns fields into flags generically: ``retry_wait`` ->
``--retry-wait``, a ``bool`` defaulting to True -> ``--no-<name>``, one defaulting to False -> ``--<name>``,
``tuple[float, ...]`` -> a comma-separated list. ``--quick`` presets are applied in ``__post_init__`` (so the
library and the command agree) and are idempotent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

PROTOCOL = "speed protocol (the paired timer)"
#: calls at distinct timesteps one variant can make (graphprune.bench.calls.timestep_schedule)
DISTINCT_TIMESTEPS = 99


def opt(default: Any, help: str, *, group: str | None = None, choices: Sequence[Any] | None = None,
        flag: str | None = None, short: str | None = None, metavar: str | None = None) -> Any:
    """A dataclass field with its command-line description (``flag`` overrides the name derived from the field)."""
    meta = {"help": help, "group": group, "choices": tuple(choices) if choices else None, "flag": flag,
            "short": short, "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults")
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Protocol:
    """How the paired timer times one variant (:func:`graphprune.bench.timing.time_calls`).

    The first call (compile) is timed alone, then ``warmup`` calls, then ``runs`` timed calls, each paired with a
    call of the baseline in alternating order. Timed calls during which other processes kept more than
    ``contention`` cores busy are timed again after ``retry_wait`` seconds, up to ``retries`` times; the least
    contended set is kept.
    """

    runs: int = 3
    warmup: int = 2
    retries: int = 1
    retry_wait: float = 10.0
    contention: float = 0.25

    def calls(self) -> int:
        """The most calls one variant can make (first + warm-up + every attempt's timed calls)."""
        return 1 + self.warmup + self.runs * (1 + self.retries)

    def check(self, min_warmup: int = 0, max_calls: int | None = None) -> None:
        """ValueError for a protocol that cannot run; ``max_calls``: the most calls a variant may make (e.g. the
        99 distinct timesteps of :func:`~graphprune.bench.calls.timestep_schedule`)."""
        if self.runs < 1 or self.warmup < min_warmup or self.retries < 0:
            raise ValueError(f"need --runs >= 1, --warmup >= {min_warmup}, --retries >= 0")
        if self.contention < 0 or self.retry_wait < 0:
            raise ValueError("need --contention >= 0 and --retry-wait >= 0")
        if max_calls is not None and self.calls() > max_calls:
            raise ValueError(f"too many calls per variant (1 + warmup + runs * (1 + retries) must be <= {max_calls})")

    def describe(self) -> str:
        return (f"first call alone, {self.warmup} warm-up, median of {self.runs} timed calls each paired with a "
                f"baseline call (alternating order); contended (> {self.contention:g} other cores) sets repeated up "
                f"to {self.retries}x")


@dataclass(frozen=True)
class LoopSpec:
    """A denoising loop: ``steps`` DDIM steps (eta 0), guidance scale, img2img strength, seed of the noise."""

    steps: int = 20
    guidance: float = 7.5
    strength: float = 0.7
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")


def arch_names() -> tuple[str, ...]:
    from ..archs import ARCHS

    return tuple(ARCHS)


def resolve_methods(names: Sequence[str] | None) -> tuple[str, ...]:
    """Validate method names against the registry; None -> every registered method. Raises ValueError."""
    from ..methods import method_names

    registered = method_names()
    if names is None:
        return registered
    names = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in names if n not in registered]
    if unknown or not names:
        raise ValueError(f"method(s) {unknown or list(names)} are not registered; registered methods are "
                         f"{list(registered)} (graphprune.method_names())")
    return names


def _check_arch(arch: str, extra: Sequence[str] = ()) -> None:
    if arch not in (*arch_names(), *extra):
        raise ValueError(f"unknown --arch {arch!r}; built-in architectures are {(*arch_names(), *extra)}")


@dataclass
class BenchOptions:
    """What every benchmark shares: the timing protocol, threads, the Inductor cache, the output, ``--quick``."""

    runs: int = opt(3, "timed calls per variant, each paired with a baseline call (median of the per-pair ratios)",
                    group=PROTOCOL)
    warmup: int = opt(2, "warm-up calls after the first (compiling) call", group=PROTOCOL)
    retries: int = opt(1, "repeat contended timed calls up to this often (the least contended set is kept)",
                       group=PROTOCOL)
    retry_wait: float = opt(10.0, "seconds before a repeat", group=PROTOCOL)
    contention: float = opt(0.25, "cores used by other processes (average over the timed calls) above which the "
                            "timed calls count as contended", group=PROTOCOL)
    threads: int | None = opt(None, "torch.set_num_threads (None: leave as is)", group=PROTOCOL)
    keep_inductor_cache: bool = opt(False, "use the usual on-disk Inductor cache (else a fresh temporary one: "
                                    "compile times are cold)", group=PROTOCOL)
    quick: bool = opt(False, "smoke run on a tiny model")
    out: str = opt("results", "output")

    def protocol(self) -> Protocol:
        return Protocol(runs=self.runs, warmup=self.warmup, retries=self.retries, retry_wait=self.retry_wait,
                        contention=self.contention)

    def check(self) -> None:
        """Validate before any model is built (ValueError naming the valid choices)."""
        self.protocol().check()

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def baseline_of(baseline: str | None, variants: Sequence[str]) -> str:
    """The unpruned variant every speedup divides: the one asked for, else ``inductor`` where listed (or where
    ``eager`` is not), else ``eager``."""
    if baseline:
        return baseline
    return "eager" if "eager" in variants and "inductor" not in variants else "inductor"


# ------------------------------------------------------------------------------------------------------------------
# graphprune bench pareto

@dataclass
class ParetoOptions(BenchOptions):
    """The speed-quality sweep (:mod:`graphprune.bench.pareto`): every method x ratios, next to tomesd."""

    arch: str = opt("sd15", "built-in architecture, random weights (graphprune.archs.ARCHS)", group="what to sweep")
    model: str | None = opt(None, "local diffusers pipeline folder (real weights; no hub access): images from "
                            "--prompts, PSNR/SSIM vs the unpruned images", group="what to sweep")
    methods: tuple[str, ...] | None = opt(None, "comma-separated registered methods (None: all registered)",
                                          group="what to sweep")
    ratios: tuple[float, ...] = opt((0.3, 0.5, 0.7), "comma-separated ratios (fraction of tokens removed)",
                                    group="what to sweep")
    variants: tuple[str, ...] | None = opt(None, "comma-separated variants measured instead of --methods x "
                                           "--ratios (graphprune bench variants lists them; METHOD:key=value:... "
                                           "for any graphprune options, e.g. tome:ratio=0.5:scope=block; "
                                           "tomesd<ratio> for tomesd)", group="what to sweep")
    tomesd: bool = opt(True, "leave out the tomesd curve", group="what to sweep")
    tomesd_inductor: bool = opt(False, "also time tomesd's copy under torch.compile", group="what to sweep")
    latent: int = opt(64, "latent height and width", group="the loop")
    steps: int = opt(20, "DDIM steps run", group="the loop")
    guidance: float = opt(7.5, "classifier-free guidance scale", group="the loop")
    strength: float = opt(0.7, "img2img strength: the photo latents are noised to t ~ strength * 1000",
                          group="the loop")
    images: int = opt(1, "photo latents (one loop each)", group="the loop")
    seed: int = opt(0, "seed of the weights, noise and text embeddings", group="the loop")
    quality_compiler: str = opt("eager", "inner compiler of graphprune for the quality loop (same rewritten graph)",
                                group="the loop", choices=("eager", "inductor"))
    speed_compiler: str = opt("inductor", "compiler of the speed part: inductor (the protocol), or eager for smoke "
                              "tests (the baseline is then the eager model and graphprune runs its graph with "
                              "compiler=eager)", group=PROTOCOL, choices=("inductor", "eager"))
    interleave: bool = opt(True, "time each variant alone (speedup = baseline median / variant median) instead of "
                           "pairing every timed call with a call of the compiled baseline", group=PROTOCOL)
    flops: bool = opt(True, "skip the Amdahl / FLOP bounds", group=PROTOCOL)
    prompts: str | None = opt(None, "text file, one prompt per line", group="real weights (--model)")
    prompt_embeds: str | None = opt(None, "torch file instead of --prompts: a tensor (P, T, D) or a dict with "
                                    "'prompt_embeds' and optionally 'negative_prompt_embeds'",
                                    group="real weights (--model)")
    inception: str | None = opt(None, "local Inception weights (torch-fidelity's inception-v3-compat .pth) for FID "
                                "between pruned and unpruned images", group="real weights (--model)")
    clip: str | None = opt(None, "local CLIP ViT-B/32 weights (torch-fidelity) for the Frechet distance in CLIP "
                           "feature space", group="real weights (--model)")
    speed: bool = opt(True, "skip the UNet timing (quality only; speedups then come from elsewhere, e.g. bench speed)",
                      group=PROTOCOL)
    out: str = opt("results", "output folder (pareto.json, pareto.txt, pareto.png)", short="-o")
    quick: bool = opt(False, "smoke run: --arch tiny --latent 16 --steps 3 --ratios 0.3,0.5 --runs 2 --warmup 1 "
                      "--retries 0 --threads 1 (with --model: 2 steps, 1 ratio)")

    def __post_init__(self) -> None:
        self.ratios = tuple(float(r) for r in self.ratios)
        if self.quick:
            self.runs, self.warmup, self.retries = 2, 1, 0
            self.threads = self.threads or 1  # tiny calls are dominated by thread contention on a shared machine
            default = ParetoOptions.__dataclass_fields__["ratios"].default
            if self.model:
                self.steps = 2
                self.ratios = self.ratios[:1] if self.ratios != default else (0.5,)
            else:
                self.arch, self.latent, self.steps = "tiny", 16, 3
                self.ratios = self.ratios if self.ratios != default else (0.3, 0.5)

    def loop_spec(self) -> LoopSpec:
        return LoopSpec(steps=self.steps, guidance=self.guidance, strength=self.strength, seed=self.seed)

    def check(self) -> None:
        resolve_methods(self.methods)
        if self.variants is not None:
            if not self.variants:
                raise ValueError("--variants is empty")
            if self.model:
                raise ValueError("--variants sweeps a built-in architecture (--arch); with --model use --methods "
                                 "and --ratios")
        if not self.ratios:
            raise ValueError("--ratios is empty")
        self.protocol().check(min_warmup=1, max_calls=DISTINCT_TIMESTEPS)
        if self.model is None:
            _check_arch(self.arch)
        if self.model is not None and not (self.prompts or self.prompt_embeds):
            raise ValueError("--model needs --prompts FILE (one prompt per line) or --prompt-embeds FILE")
        self.loop_spec()


# ------------------------------------------------------------------------------------------------------------------
# graphprune bench speed

SPEED_VARIANTS = ("eager", "inductor", "sito0.5", "sito0.7", "tome0.5", "tomesd", "tomesd+inductor")


@dataclass
class SpeedOptions(BenchOptions):
    """Per-call speed (:mod:`graphprune.bench.speed`): eager, Inductor, graphprune and tomesd on one UNet."""

    arch: str = opt("sd15", "built-in architecture (graphprune.archs)")
    latents: tuple[int, ...] = opt((64, 32), "comma-separated latent sizes (latent x latent)")
    batch: int = opt(2, "batch size (2 = classifier-free guidance)")
    variants: tuple[str, ...] = opt(SPEED_VARIANTS, "comma-separated variants (graphprune bench variants lists "
                                    "them; METHOD:key=value:... for any graphprune options)")
    baseline: str | None = opt(None, "the variant every timed call is paired with (None: inductor, or eager when "
                               "only eager is listed); any variant name, e.g. tomesd to pair every call against the "
                               "peer (the Amdahl/FLOP bounds are then not reported)", group=PROTOCOL)
    error_timestep: int = opt(500, "timestep of the call compared with the unpruned eager output")
    seed: int = opt(0, "seed of the model weights")
    runs: int = opt(5, "timed calls per variant, each paired with a baseline call (median of the per-pair ratios)",
                    group=PROTOCOL)
    warmup: int = opt(2, "warm-up calls after the first (compiling) call, >= 2", group=PROTOCOL)
    retries: int = opt(2, "repeat contended timed calls up to this often (the least contended set is kept)",
                       group=PROTOCOL)
    retry_wait: float = opt(20.0, "seconds before a repeat", group=PROTOCOL)
    out: str = opt("results/speed.json", "JSON output path")
    quick: bool = opt(False, "smoke test: --arch tiny --latents 16 --runs 2 --retries 0 --threads 1")

    def __post_init__(self) -> None:
        self.latents, self.variants = tuple(self.latents), tuple(self.variants)
        if self.quick:
            self.arch, self.latents, self.runs, self.retries = "tiny", (16,), 2, 0
            self.threads = self.threads or 1  # tiny calls are dominated by thread contention on a shared machine

    def check(self) -> None:
        _check_arch(self.arch)
        self.protocol().check(min_warmup=2, max_calls=DISTINCT_TIMESTEPS)
        if not self.latents or not self.variants:
            raise ValueError("--latents and --variants must not be empty")


# ------------------------------------------------------------------------------------------------------------------
# graphprune bench steps

STEPS_VARIANTS = ("inductor", "deepcache3", "deepcache5", "dato-imagenet", "dato-coco", "sito0.5", "eager",
                  "DeepCache3")
STEPS_QUICK_VARIANTS = ("inductor", "deepcache3", "dato3", "DeepCache3")


@dataclass
class StepsOptions(BenchOptions):
    """Whole denoising loops (:mod:`graphprune.bench.steps`): step caching vs full steps, per generation."""

    arch: str = opt("sd15", "built-in architecture: sd15, sd2, sdxl, tiny")
    latent: int = opt(32, "latent height and width")
    steps: int = opt(50, "DDIM steps (the DaTo presets need 50)")
    guidance: float = opt(7.5, "classifier-free guidance scale")
    variants: tuple[str, ...] = opt(STEPS_VARIANTS, "comma-separated variants (graphprune bench variants lists "
                                    "them)")
    baseline: str | None = opt(None, "the unpruned variant every timed generation is paired with (None: "
                               "inductor, or eager when only eager is listed; e.g. inductor-nolayout, the best "
                               "compiled baseline on CPU)", group=PROTOCOL)
    runs: int = opt(1, "timed generations per variant, each paired with a baseline generation", group=PROTOCOL)
    warmup: int = opt(0, "warm-up generations after the first (compiling) one", group=PROTOCOL)
    retries: int = opt(0, "repeat contended timed generations up to this often", group=PROTOCOL)
    device: str | None = opt(None, "cpu or cuda (None: cuda if available)")
    out: str | None = opt(None, "write the results as JSON here")
    plot: str | None = opt(None, "write a speedup-vs-error plot (PNG) here")
    quick: bool = opt(False, "tiny UNet, latent 16, 10 steps, few variants, --threads 1 (smoke)")

    def __post_init__(self) -> None:
        self.variants = tuple(self.variants)
        if self.quick:
            self.arch, self.latent, self.steps = "tiny", 16, 10
            self.threads = self.threads or 1
            if self.variants == STEPS_VARIANTS:
                self.variants = STEPS_QUICK_VARIANTS

    def check(self) -> None:
        _check_arch(self.arch)
        self.protocol().check()
        if not self.variants:
            raise ValueError("--variants is empty")
        if self.steps != 50 and any(v.startswith("dato-") for v in self.variants):
            raise ValueError("the DaTo presets (dato-imagenet, dato-coco) are defined for 50 steps; use --steps 50 "
                             "or dato3")


# ------------------------------------------------------------------------------------------------------------------
# graphprune bench policies

POLICIES_OUT = "results/steps_policies"


@dataclass
class PoliciesOptions(BenchOptions):
    """The step policies' speed-vs-error front (:mod:`graphprune.bench.policies`): fixed intervals, DaTo's presets,
    first-block and magcache, x the Taylor forecast, x DaTo's pruning; generations bracketed by baseline ones."""

    arch: str = opt("sd15", "built-in architecture: sd15, sd2, sdxl, tiny")
    latent: int = opt(32, "latent height and width")
    steps: int = opt(50, "DDIM steps (the DaTo presets need 50)")
    guidance: float = opt(7.5, "classifier-free guidance scale")
    threads: int | None = opt(1, "torch.set_num_threads (the CPU-seconds speedup assumes one thread)", group=PROTOCOL)
    pair_every: int = opt(3, "variants between two full-step baseline generations", group=PROTOCOL)
    select: str | None = opt(None, "only the variants whose name matches this regular expression; names are "
                             "'<deepcache|dato> <fixed|dato-preset|first-block|magcache> <knob>[ +taylor]', e.g. "
                             "'taylor' or '^dato fixed N=[23]$'")
    resume: bool = opt(False, "keep the timed variants of the front.json already in --out and measure the others "
                       "(the calibration is recomputed and must give the same knobs)")
    report_only: bool = opt(False, "measure nothing: rewrite front.md and front.png from the front.json in --out")
    out: str = opt(POLICIES_OUT, "output folder: front.json, front.md, front.png, calibration.json/.png")

    def __post_init__(self) -> None:
        if self.quick:
            self.arch, self.latent, self.steps = "tiny", 16, 12
            self.threads = self.threads or 1

    def check(self) -> None:
        _check_arch(self.arch)
        if self.pair_every < 1:
            raise ValueError("--pair-every must be >= 1")
        if self.select is not None:
            import re

            try:
                re.compile(self.select)
            except re.error as exc:
                raise ValueError(f"--select {self.select!r} is not a regular expression: {exc}") from None


# ------------------------------------------------------------------------------------------------------------------
# graphprune bench atedm

ATEDM_METHODS = ("atedm", "atedm-dagger", "tome", "sito")


@dataclass
class AtedmOptions(BenchOptions):
    """AT-EDM vs ToMe and SiTo at equal FLOPs (:mod:`graphprune.bench.atedm`), SDXL architecture."""

    arch: str = opt("sdxl", "built-in architecture (graphprune.archs), or 'sdxl-tiny'")
    latent: int = opt(64, "latent size (latent x latent)")
    batch: int = opt(2, "batch (2 = classifier-free guidance)")
    ratio: float = opt(0.63, "AT-EDM ratio")
    dsap_steps: int = opt(10, "AT-EDM tau (early calls of a generation)")
    num_steps: int = opt(50, "UNet calls per generation for the DSAP-weighted time")
    methods: tuple[str, ...] = opt(ATEDM_METHODS, "comma-separated subset of " + ",".join(ATEDM_METHODS))
    inductor: bool = opt(False, "compile with Inductor (slow on CPU for SDXL) instead of running the rewritten "
                         "graphs eagerly (-fx)")
    runs: int = opt(3, "timed calls per variant, each paired with a baseline call (median of the per-pair ratios)",
                    group=PROTOCOL)
    warmup: int = opt(1, "untimed calls after the first (compiling) call", group=PROTOCOL)
    retries: int = opt(0, "repeat contended timed calls up to this often", group=PROTOCOL)
    out: str = opt("results/atedm.json", "JSON output")
    quick: bool = opt(False, "tiny SDXL-style UNet, latent 16, 2 runs, --threads 1 (smoke test)")
    flops_only: bool = opt(False, "only the FLOP table of the AT-EDM variants (meta device: no weights allocated; "
                           "e.g. --arch sdxl --latent 128 --batch 1, the paper's setting)")

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        if self.quick:
            self.arch, self.latent, self.runs, self.warmup = "sdxl-tiny", 16, 2, 1
            self.threads = self.threads or 1

    def check(self) -> None:
        _check_arch(self.arch, extra=("sdxl-tiny",))
        self.protocol().check(max_calls=DISTINCT_TIMESTEPS)
        bad = [m for m in self.methods if m not in ATEDM_METHODS]
        if bad:
            raise ValueError(f"unknown --methods {bad}; choose from {list(ATEDM_METHODS)}")
        if self.flops_only and self.arch == "sdxl-tiny":
            raise ValueError("--flops-only needs a built-in architecture (--arch sdxl)")


# ------------------------------------------------------------------------------------------------------------------
# graphprune bench export

EXPORT_VARIANTS = ("sito0.5", "tome0.5")


@dataclass
class ExportOptions(BenchOptions):
    """Deployment latency (:mod:`graphprune.bench.export`): onnxruntime pruned vs unpruned, TensorRT on CUDA."""

    arch: str = opt("sd15", "built-in architecture (sd15, sd2, sdxl, tiny)")
    latents: tuple[int, ...] = opt((32,), "comma-separated latent sizes")
    batch: int = opt(2, "batch size (2 = classifier-free guidance)")
    variants: tuple[str, ...] = opt(EXPORT_VARIANTS, "comma-separated pruned variants (graphprune options; "
                                    "graphprune bench variants lists them)")
    runs: int = opt(5, "timed calls per session and variant, each paired with a call of the unpruned session",
                    group=PROTOCOL)
    retries: int = opt(0, "repeat contended timed calls up to this often", group=PROTOCOL)
    threads: int | None = opt(None, "onnxruntime intra-op threads (None: ORT's)", group=PROTOCOL)
    tensorrt: bool = opt(False, "also time TensorRT vs Inductor (CUDA + torch-tensorrt)")
    workdir: str | None = opt(None, "where the ONNX files go (None: a temporary folder)")
    out: str = opt("results/export.json", "JSON output path")
    quick: bool = opt(False, "smoke test: --arch tiny --latents 16 --runs 2 --warmup 1 --threads 1")

    def __post_init__(self) -> None:
        self.latents, self.variants = tuple(self.latents), tuple(self.variants)
        if self.quick:
            self.arch, self.latents, self.runs, self.warmup = "tiny", (16,), 2, 1
            self.threads = self.threads or 1

    def check(self) -> None:
        _check_arch(self.arch)
        self.protocol().check()
        if not self.latents:
            raise ValueError("--latents is empty")


# ------------------------------------------------------------------------------------------------------------------
# graphprune bench gpu

GPU_CALL_VARIANTS = ("inductor", "inductor-cudagraphs", "tome0.5", "tome:ratio=0.5:scope=block", "todo:factor=2",
                     "tomesd")
GPU_STEP_VARIANTS = ("inductor", "inductor-cudagraphs", "deepcache3", "deepcache3+tome0.5", "dato-coco", "DeepCache3",
                     "todo2")


@dataclass
class GpuOptions(BenchOptions):
    """The one-command GPU run (:mod:`graphprune.bench.gpu`): per-call speed (``bench speed``) and whole loops
    (``bench steps``) of each model, paired against Inductor, in fp16 on CUDA; JSON + a markdown table."""

    models: tuple[str, ...] = opt(("sd15:64", "sdxl:128"), "comma-separated ARCH:LATENT (sd15:64 = 512x512 "
                                  "images, sdxl:128 = 1024x1024)")
    variants: tuple[str, ...] = opt(GPU_CALL_VARIANTS, "per-call variants (graphprune bench variants lists them; "
                                    "METHOD:key=value:... for any graphprune options)")
    step_variants: tuple[str, ...] = opt(GPU_STEP_VARIANTS, "variants of the whole-loop part (empty: skip it)")
    steps: int = opt(50, "DDIM steps of a whole loop")
    compiler: str = opt("inductor", "inductor (the protocol), or eager for a dry run on CPU: the baseline is then "
                        "eager, inductor variants run Dynamo's eager backend, graphprune its graph without "
                        "Inductor, peers' +inductor copies are left out", choices=("inductor", "eager"))
    runs: int = opt(3, "timed calls per variant, each paired with a baseline call (median of the per-pair ratios)",
                    group=PROTOCOL)
    retries: int = opt(0, "repeat contended timed calls up to this often", group=PROTOCOL)
    keep_inductor_cache: bool = opt(True, "use a fresh temporary Inductor cache (cold compiles; by default the "
                                    "usual on-disk cache lets the loop part reuse the per-call part's kernels)",
                                    group=PROTOCOL)
    out: str = opt("results/gpu", "output folder (gpu.json, gpu.md, and each part's JSON)", short="-o")
    quick: bool = opt(False, "dry run on CPU: --models tiny:16 --steps 2 --compiler eager --runs 1 --threads 1")

    def __post_init__(self) -> None:
        self.models, self.variants, self.step_variants = (tuple(self.models), tuple(self.variants),
                                                          tuple(self.step_variants))
        if self.quick:
            self.models, self.steps, self.compiler, self.runs, self.retries = ("tiny:16",), 2, "eager", 1, 0
            self.threads = self.threads or 1
            # DaTo's presets are 50-step schedules: the dry run takes their uniform form
            self.step_variants = tuple("dato3" if v.startswith("dato-") else v for v in self.step_variants)

    def model_specs(self) -> list[tuple[str, int]]:
        """``[(arch, latent), ...]`` from ``models``; ValueError naming the form."""
        out = []
        for spec in self.models:
            arch, sep, latent = spec.partition(":")
            if not sep or not latent.isdigit():
                raise ValueError(f"--models: expected ARCH:LATENT (e.g. sd15:64), got {spec!r}")
            out.append((arch, int(latent)))
        return out

    def check(self) -> None:
        for arch, _ in self.model_specs():
            _check_arch(arch)
        if not self.models or not self.variants:
            raise ValueError("--models and --variants must not be empty")
        self.protocol().check(min_warmup=2, max_calls=DISTINCT_TIMESTEPS)


# ------------------------------------------------------------------------------------------------------------------
# graphprune bench profile

PROFILE_VARIANTS = ("inductor", "tome0.5", "sito0.5", "tomesd")


@dataclass
class ProfileOptions(BenchOptions):
    """Where the time goes (:mod:`graphprune.bench.profile`): self time per op of each variant (torch.profiler) and
    eager time per module of the unpruned model, with each config's time bound."""

    arch: str = opt("sd15", "built-in architecture (graphprune.archs)")
    latent: int = opt(64, "latent height and width")
    batch: int = opt(2, "batch size (2 = classifier-free guidance)")
    variants: tuple[str, ...] = opt(PROFILE_VARIANTS, "comma-separated variants (graphprune bench variants lists "
                                    "them; METHOD:key=value:... for any graphprune options)")
    calls: int = opt(2, "profiled calls per variant (self times are per call)")
    warmup: int = opt(1, "untimed calls after the first (compiling) call")
    kernel_profile: bool = opt(True, "leave Inductor's C++ kernels unrecorded (they are then summed in the graph's "
                               "'## Call CompiledFxGraph' entry; the compiles then share the usual cache)")
    modules: bool = opt(True, "skip the eager per-module times and the time bounds")
    rows: int = opt(20, "top ops listed per variant in the table")
    keep_ops: int = opt(200, "ops kept per variant in the JSON")
    seed: int = opt(0, "seed of the model weights")
    out: str = opt("results/profile.json", "JSON output path")
    quick: bool = opt(False, "smoke test: --arch tiny --latent 16 --calls 1 --threads 1")

    def __post_init__(self) -> None:
        self.variants = tuple(self.variants)
        if self.quick:
            self.arch, self.latent, self.calls = "tiny", 16, 1
            self.threads = self.threads or 1

    def check(self) -> None:
        _check_arch(self.arch)
        if self.calls < 1 or self.warmup < 0 or not self.variants:
            raise ValueError("need --calls >= 1, --warmup >= 0 and at least one variant")
        if 1 + self.warmup + self.calls > DISTINCT_TIMESTEPS:
            raise ValueError(f"1 + warmup + calls must be <= {DISTINCT_TIMESTEPS}")


# ------------------------------------------------------------------------------------------------------------------
# graphprune bench compile

COMPILE_VARIANTS = ("inductor", "tome0.5")
COMPILE_QUICK_VARIANTS = ("inductor", "tome0.5", "deepcache3")


@dataclass
class CompileOptions(BenchOptions):
    """Compile time as a user sees it (:mod:`graphprune.bench.compile`): per variant, fresh processes against one
    fresh on-disk Inductor cache (the first cold, the others warm)."""

    arch: str = opt("sd15", "built-in architecture (graphprune.archs)")
    latent: int = opt(32, "latent height and width")
    steps: int = opt(4, "DDIM steps of the generation each process runs (every compiled step kind must run at "
                     "least twice for its compile to be separated; the DaTo presets need 50)")
    guidance: float = opt(7.5, "classifier-free guidance scale")
    variants: tuple[str, ...] = opt(COMPILE_VARIANTS, "comma-separated variants, the first is the baseline of the "
                                    "'warm vs' column (graphprune bench variants lists them)")
    processes: int = opt(2, "fresh processes per variant against its cache folder (1 cold, then warm ones)")
    timeout: float = opt(3600.0, "seconds one process may take")
    threads: int | None = opt(1, "torch threads in each process (OMP_NUM_THREADS too)", group=PROTOCOL)
    out: str | None = opt("results/compile.json", "JSON output path")
    quick: bool = opt(False, "smoke run: --arch tiny --latent 16 --steps 6, inductor, tome0.5, deepcache3")

    def __post_init__(self) -> None:
        self.variants = tuple(self.variants)
        if self.quick:
            self.arch, self.latent, self.steps = "tiny", 16, 6
            if self.variants == COMPILE_VARIANTS:
                self.variants = COMPILE_QUICK_VARIANTS

    def check(self) -> None:
        _check_arch(self.arch)
        if not self.variants or self.processes < 1 or self.steps < 1:
            raise ValueError("need at least one variant, --processes >= 1 and --steps >= 1")
        if self.steps != 50 and any("dato-" in v for v in self.variants):
            raise ValueError("the DaTo presets (dato-imagenet, dato-coco) are defined for 50 steps; use --steps 50 "
                             "or dato3")


__all__ = ["opt", "Protocol", "LoopSpec", "BenchOptions", "ParetoOptions", "SpeedOptions", "StepsOptions",
           "PoliciesOptions", "AtedmOptions", "ExportOptions", "ProfileOptions", "CompileOptions", "GpuOptions",
           "resolve_methods", "arch_names", "baseline_of"]

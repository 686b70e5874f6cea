"""The benchmark package (graphprune.bench): the one paired timer, the variant catalogue, the options behind every
``graphprune bench`` command, and a tiny CPU smoke run of each benchmark (speed, steps, atedm, export; pareto's is in
test_pareto.py). No timing claim is tested: the timer's arithmetic runs on a fake clock."""

import dataclasses
import json
import runpy
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from graphprune.bench import options, timing, variants
from graphprune.bench.options import (AtedmOptions, CompileOptions, ExportOptions, GpuOptions, ParetoOptions,
                                      Protocol, SpeedOptions, StepsOptions)
from graphprune.cli import build_parser
from graphprune.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------------------------
# the paired timer, on a fake clock: each call returns its own duration and the timer reads it back

@pytest.fixture
def fake_clock(monkeypatch):
    monkeypatch.setattr(timing, "_timed", lambda call, i, device: call(i))


def _recorder(log, tag, durations):
    def call(i):
        log.append((tag, i))
        return durations(i) if callable(durations) else durations
    return call


def test_every_timed_call_is_paired_with_a_baseline_call_in_alternating_order(fake_clock):
    log = []
    protocol = Protocol(runs=4, warmup=1, retries=0)
    timer = timing.PairedTimer(protocol, _recorder(log, "b", 2.0))
    # the baseline alone: its first call, warm-up, timed calls
    assert log == [("b", 0), ("b", 1), ("b", 2), ("b", 3), ("b", 4), ("b", 5)]
    assert timer.baseline["speedup"] == 1.0 and timer.median_s == 2.0
    log.clear()
    variant_times = {2: 1.0, 3: 2.0, 4: 4.0, 5: 1.0}
    res = timer.time(_recorder(log, "v", lambda i: variant_times.get(i, 9.0)), "v")
    assert log == [("v", 0), ("v", 1),  # first call and warm-up: not paired
                   ("b", 2), ("v", 2), ("v", 3), ("b", 3), ("b", 4), ("v", 4), ("v", 5), ("b", 5)]
    assert res["times_s"] == [1.0, 2.0, 4.0, 1.0] and res["baseline_times_s"] == [2.0] * 4
    assert res["pair_ratios"] == [2.0, 1.0, 0.5, 2.0]
    # the median of the per-pair ratios (1.5), not the ratio of medians (2 / 1.5)
    assert res["speedup"] == res["speedup_paired"] == 1.5 and res["paired"]
    assert res["compile_s"] == 9.0 and res["warmup_s"] == [9.0]


def test_unpaired_mode_divides_medians(fake_clock):
    log = []
    timer = timing.PairedTimer(Protocol(runs=3, warmup=0, retries=0), _recorder(log, "b", 3.0), paired=False)
    log.clear()
    res = timer.time(_recorder(log, "v", 2.0), "v")
    assert all(tag == "v" for tag, _ in log) and "baseline_times_s" not in res
    assert res["speedup"] == 1.5 and not res["paired"]


def test_contended_sets_are_timed_again_and_the_least_contended_is_kept(fake_clock, monkeypatch):
    shares = iter([1.5, 0.1])
    monkeypatch.setattr(timing, "other_cpu_share", lambda *a: next(shares))
    log = []
    res = timing.time_calls(_recorder(log, "v", lambda i: float(i)), Protocol(runs=2, warmup=1, retries=2,
                                                                             retry_wait=0.0),
                            baseline=_recorder(log, "b", 1.0))
    assert [a["other_cpu_cores"] for a in res["attempts"]] == [1.5, 0.1] and res["timed_attempt_used"] == 2
    assert res["times_s"] == [4.0, 5.0]  # the second attempt's calls 4 and 5: every call index is new
    assert all("loadavg" in a for a in res["attempts"])
    # every attempt contended: the least contended one is reported
    shares = iter([0.9, 0.5, 0.7])
    monkeypatch.setattr(timing, "other_cpu_share", lambda *a: next(shares))
    res = timing.time_calls(_recorder([], "v", 1.0), Protocol(runs=1, warmup=0, retries=2, retry_wait=0.0))
    assert res["timed_attempt_used"] == 2 and res["other_cpu_cores"] == 0.5


def test_the_timer_sees_recompiles():
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="eager", dynamic=False)
    shapes = [1, 2, 3, 4, 5, 6]  # a new input shape on every call: recompiles during warm-up and timed calls
    torch._dynamo.reset()
    res = timing.time_calls(lambda i: compiled(torch.randn(shapes[i], 4)), Protocol(runs=2, warmup=1, retries=0))
    assert res["graphs"] >= 1 and not res["no_recompiles_timed"]
    torch._dynamo.reset()


def test_a_baseline_that_recompiles_during_the_pairs_is_reported(caplog):
    base = torch.compile(torch.nn.Linear(4, 4), backend="eager", dynamic=False)
    torch._dynamo.reset()
    res = timing.time_calls(lambda i: None, Protocol(runs=3, warmup=0, retries=0),
                            baseline=lambda i: base(torch.randn(i + 1, 4)))  # a new shape per call
    assert res["baseline_recompiles"]["unique_graphs"] == 3 and "the baseline recompiled" in caplog.text
    torch._dynamo.reset()


def test_a_peer_compiled_by_dynamo_neither_degrades_the_baseline_nor_the_variants_after_it():
    """tomesd's patched copy under torch.compile breaks the graph inside the UNet's loops, and Dynamo then runs the
    UNet's forward uncompiled for every instance: the baseline compiles its own function (untouched), and the
    timer's reset() lets a graphprune variant timed after the peer see the whole graph again."""
    from graphprune.archs import build_model, example_inputs
    from graphprune.backend import REPORTS
    from graphprune.bench.calls import timestep_calls

    model = build_model("tiny")
    template = example_inputs(model, latent=16, batch=2)
    torch._dynamo.reset()
    protocol = Protocol(runs=2, warmup=1, retries=0)
    n = protocol.calls()
    timer = timing.PairedTimer(protocol, timestep_calls(variants.variant("dynamo-eager").build(model).fn, template, n))
    peer = variants.variant("tomesd").build(model).patched
    res = timer.time(timestep_calls(torch.compile(peer, backend="eager"), template, n), "tomesd + dynamo")
    assert res["graph_breaks"] > 0
    assert res["baseline_recompiles"] == {"unique_graphs": 0, "frames_ok": 0, "graph_breaks": 0}
    assert variants.variant("tomesd+inductor").poisons_dynamo and not variants.variant("tomesd").poisons_dynamo
    timer.reset()
    assert len(timer.baseline["rewarm_s"]) == 1
    mark = len(REPORTS)
    res = timer.time(timestep_calls(variants.variant("tome0.5-fx").build(model).fn, template, n), "tome")
    assert res["graphs"] == 1 and res["graph_breaks"] == 0
    assert sum(r.count("pruned", "self") for r in list(REPORTS)[mark:]) > 0
    assert res["baseline_recompiles"] == {"unique_graphs": 0, "frames_ok": 0, "graph_breaks": 0}
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------------------------
# variants and options

def test_catalogue_names_fx_forms_peers_and_specs():
    v = variants.variant("sito0.5")
    assert v.kind == "graphprune" and v.options == {"method": "sito", "ratio": 0.5} and not v.stateful
    fx = variants.variant("sito0.5-fx")
    assert fx.options["compiler"] == "eager" and fx.label.endswith("(fx)")
    assert "compiler" not in variants.CATALOGUE["sito0.5"].options  # the catalogue itself is never changed
    assert variants.variant("deepcache3").stateful and variants.variant("DeepCache3").stateful
    t = variants.variant("tomesd0.7+inductor")
    assert (t.kind, t.ratio, t.inductor) == ("tomesd", 0.7, True)
    assert (variants.variant("DeepCache5").interval, variants.variant("DeepCache5").kind) == (5, "deepcache")
    spec = variants.variant("todo:factor=3:downsample_method=avg_pool")
    assert spec.options == {"method": "todo", "factor": 3, "downsample_method": "avg_pool"}
    combined = variants.variant('deepcache:cache_interval=3:prune={"method": "tome", "ratio": 0.5}')  # ':' in JSON
    assert combined.options == {"method": "deepcache", "cache_interval": 3, "prune": {"method": "tome", "ratio": 0.5}}
    assert combined.options == variants.variant("deepcache3+tome0.5").options
    # a ',' inside a JSON value does not split the --variants list
    from graphprune.cli import build_parser
    args = build_parser().parse_args(["bench", "speed", "--variants",
                                      'eager,todo:inductor_config={"freezing": true, "layout_optimization": true}'])
    assert args.variants == ("eager", 'todo:inductor_config={"freezing": true, "layout_optimization": true}')
    with pytest.raises(ValueError, match="choose from .*sito0.5"):
        variants.variant("fancy0.5")
    with pytest.raises(ValueError, match="registered methods"):
        variants.variant("fancy:ratio=0.5")
    with pytest.raises(ValueError):
        variants.variant("sito:ratio=2")
    assert [v.key for v in variants.variants(["eager", "sito0.5", "eager"])] == ["eager", "sito0.5"]
    # every catalogue name resolves (the README's commands use them)
    for name in variants.catalogue_names():
        assert variants.variant(name).key == name


def test_variants_build_their_callables():
    model = torch.nn.Linear(3, 3)
    assert variants.variant("eager").build(model).fn is model
    x = torch.randn(2, 3)
    assert torch.equal(variants.variant("dynamo-eager").build(model).fn(x), model(x))  # a compiled function
    assert callable(variants.variant("inductor").build(model).fn)
    with pytest.raises(ValueError, match="scheduler"):
        variants.variant("DeepCache3").build(model)
    bad = variants.grid(["tome"], [0.9], with_tomesd=False)[0]
    with pytest.raises(ValueError, match="cannot run"):
        bad.build(model)


def test_options_quick_presets_are_idempotent_and_checked():
    for cls in (ParetoOptions, SpeedOptions, StepsOptions, AtedmOptions, ExportOptions, CompileOptions, GpuOptions):
        quick = cls(quick=True)
        assert dataclasses.replace(quick) == quick, cls.__name__
        quick.check()
    assert ParetoOptions(quick=True).ratios == (0.3, 0.5) and ParetoOptions(quick=True, ratios=(0.6,)).ratios == (0.6,)
    with pytest.raises(ValueError, match="--warmup >= 2"):
        SpeedOptions(warmup=1).check()
    with pytest.raises(ValueError, match="50 steps"):
        StepsOptions(steps=20, variants=("dato-coco",)).check()
    with pytest.raises(ValueError, match="unknown --arch"):
        ExportOptions(arch="sd99").check()
    with pytest.raises(ValueError, match="choose from"):
        AtedmOptions(methods=("atedm", "fancy")).check()
    assert options.baseline_of(None, ["eager", "sito0.5"]) == "eager"
    assert options.baseline_of(None, ["eager", "inductor"]) == "inductor"
    assert options.baseline_of("eager", ["inductor"]) == "eager"


#: the flags each benchmark script documented before the package took them over (README, benchmarks/README.md)
DOCUMENTED_FLAGS = {
    "pareto": ["--arch", "--model", "--methods", "--ratios", "--no-tomesd", "--tomesd-inductor", "--latent",
               "--steps", "--guidance", "--strength", "--images", "--seed", "--quality-compiler", "--runs", "--warmup",
               "--retries", "--retry-wait", "--contention", "--speed-compiler", "--no-interleave", "--no-flops",
               "--keep-inductor-cache", "--threads", "--prompts", "--prompt-embeds", "--inception", "--clip",
               "--no-speed", "-o", "--out", "--quick", "--replot", "--log-level"],
    "speed": ["--arch", "--latents", "--batch", "--runs", "--warmup", "--variants", "--error-timestep", "--seed",
              "--threads", "--contention", "--retries", "--retry-wait", "--out", "--keep-inductor-cache", "--quick",
              "--log-level"],
    "steps": ["--arch", "--latent", "--steps", "--guidance", "--runs", "--variants", "--out", "--plot", "--quick",
              "--device", "--threads"],
    "policies": ["--arch", "--latent", "--steps", "--guidance", "--threads", "--pair-every", "--select", "--resume",
                 "--report-only", "--out", "--quick"],
    "atedm": ["--arch", "--latent", "--batch", "--runs", "--warmup", "--ratio", "--dsap-steps", "--num-steps",
              "--methods", "--inductor", "--threads", "--out", "--quick", "--flops-only"],
    "compile": ["--arch", "--latent", "--steps", "--variants", "--processes", "--threads", "--out", "--quick"],
    "export": ["--arch", "--latents", "--batch", "--variants", "--runs", "--warmup", "--threads", "--tensorrt",
               "--workdir", "--out"],
    "gpu": ["--models", "--variants", "--step-variants", "--steps", "--compiler", "--runs", "--warmup", "-o", "--out",
            "--quick", "--no-keep-inductor-cache"],
}


def test_every_bench_command_has_help_with_its_documented_flags_and_every_option():
    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    commands = bench._subparsers._group_actions[0].choices
    assert set(DOCUMENTED_FLAGS) <= set(commands) and "variants" in commands
    for name, flags in DOCUMENTED_FLAGS.items():
        p = commands[name]
        known = {s for a in p._actions for s in a.option_strings}
        assert set(flags) <= known, (name, set(flags) - known)
        dests = {a.dest for a in p._actions}
        fields = {f.name for f in dataclasses.fields(p.get_default("options_class"))}
        assert fields <= dests, (name, fields - dests)  # every option is reachable from the command line
        assert p.format_help()


def test_the_scripts_are_the_commands(monkeypatch, capsys):
    for name in DOCUMENTED_FLAGS:
        monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(ROOT / "benchmarks" / f"{name}.py"), run_name="__main__")
        assert done.value.code == 0 and f"graphprune bench {name}" in capsys.readouterr().out
    res = subprocess.run([sys.executable, "-m", "graphprune.cli", "bench", "speed", "--variants", "sito0.5,nope"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "unknown variant 'nope'" in res.stderr


def test_flags_reach_the_options(monkeypatch):
    seen = {}
    from graphprune.bench import speed

    monkeypatch.setattr(speed, "run", lambda opts: seen.setdefault("opts", opts) and {"table": "", "failed": []})
    assert cli_main(["bench", "speed", "--latents", "32,16", "--variants", "eager,sito0.5-fx", "--runs", "4",
                     "--retry-wait", "1.5", "--baseline", "eager"]) == 0
    o = seen["opts"]
    assert (o.latents, o.variants, o.runs, o.retry_wait, o.baseline) == ((32, 16), ("eager", "sito0.5-fx"), 4, 1.5,
                                                                         "eager")


# ------------------------------------------------------------------------------------------------------------------
# smoke runs: each benchmark end to end on a tiny model (seconds), speed and errors checked for shape, not value

def _check_paired(res, runs):
    assert len(res["times_s"]) == runs == len(res["baseline_times_s"])
    assert res["speedup"] == statistics.median(b / v for b, v in zip(res["baseline_times_s"], res["times_s"]))


def test_speed_smoke(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert cli_main(["bench", "speed", "--quick", "--variants", "eager,tome0.5-fx,tomesd", "--out", str(out),
                     "--log-level", "WARNING"]) == 0
    printed = capsys.readouterr().out
    assert "eager (baseline)" in printed and "graphprune tome r=0.5 (fx)" in printed and "threads 1" in printed
    result = json.loads(out.read_text())
    lat = result["latents"]["16"]
    assert list(lat["variants"]) == ["eager", "tome0.5-fx", "tomesd"] and lat["baseline"] == "eager"
    assert lat["variants"]["eager"]["rel_error"] == 0 and lat["variants"]["eager"]["speedup"] == 1.0
    for key in ("tome0.5-fx", "tomesd"):
        r = lat["variants"][key]
        _check_paired(r, 2)
        assert 0 < r["rel_error"] < 0.2 and r["flop_bound"] > 1 and r["no_recompiles"]
    assert lat["variants"]["tome0.5-fx"]["sites_match_analysis"]
    for key in ("torch", "device", "threads", "dtype", "model_config", "loadavg_start", "git_commit", "protocol"):
        assert key in result["header"], key


def test_speed_pairs_against_the_peer_when_asked(tmp_path, capsys):
    """--baseline tomesd: every timed call of the other variants is paired with a tomesd call (the direct ratio over
    the peer); the bounds, speedups over the unpruned model, are not reported."""
    out = tmp_path / "speed.json"
    assert cli_main(["bench", "speed", "--quick", "--baseline", "tomesd", "--variants", "tome0.5-fx,eager",
                     "--out", str(out), "--log-level", "WARNING"]) == 0
    assert "speedup vs tomesd" in capsys.readouterr().out
    lat = json.loads(out.read_text())["latents"]["16"]
    assert list(lat["variants"]) == ["tomesd", "tome0.5-fx", "eager"] and lat["baseline"] == "tomesd"
    for key in ("tome0.5-fx", "eager"):
        _check_paired(lat["variants"][key], 2)
        assert "flop_bound" not in lat["variants"][key]


def test_steps_smoke(tmp_path):
    out, png = tmp_path / "steps.json", tmp_path / "steps.png"
    assert cli_main(["bench", "steps", "--quick", "--variants", "eager,deepcache3-fx,DeepCache3", "--out", str(out),
                     "--plot", str(png), "--log-level", "WARNING"]) == 0
    result = json.loads(out.read_text())
    rows = result["variants"]
    assert result["header"]["baseline"] == "eager" and list(rows) == ["eager", "deepcache3-fx", "DeepCache3"]
    for key in ("deepcache3-fx", "DeepCache3"):
        _check_paired(rows[key]["timing"], 1)
        assert rows[key]["kinds"] == {"full": 4, "shallow": 6, "reuse": 0}
        assert 1.5 < rows[key]["flop_bound"] < 3
    assert rows["deepcache3-fx"]["compiled_variants"] == ["full", "shallow"]
    # graphprune's deepcache and the DeepCache package compute the same loop
    assert rows["eager"]["rel_error"] == 0 and 0 < rows["deepcache3-fx"]["rel_error"] < 0.5
    assert abs(rows["deepcache3-fx"]["rel_error"] - rows["DeepCache3"]["rel_error"]) < 1e-4
    assert png.stat().st_size > 10_000


def test_compile_time_is_what_the_first_call_of_each_kind_added():
    from graphprune.bench.compile import split_compile

    kinds = ["full", "shallow", "shallow", "full", "shallow", "reuse", "reuse"]
    times = [9.0, 4.0, 1.0, 2.0, 1.2, 0.0, 0.0]
    got = split_compile(times, kinds)
    assert got["steady_call_seconds"] == {"full": 2.0, "shallow": 1.1, "reuse": 0.0}
    assert got["compile_seconds"] == pytest.approx(sum(times) - 2 * 2.0 - 3 * 1.1)  # 7 + 2.9
    once = split_compile([5.0, 1.0, 1.0], ["full", "shallow", "shallow"])
    assert once["compile_seconds"] is None and once["kinds_called_once"] == ["full"]


def test_generation_kinds_of_plain_and_step_aware_runtimes():
    built = variants.Built(lambda *a: None)
    assert variants.generation_kinds(built, SimpleNamespace(), 3) == ["full"] * 3  # a plain graph's runtime
    rt = SimpleNamespace(previous_kinds=["full", "shallow", "reuse"], kinds=["full"])
    assert variants.generation_kinds(built, rt, 3) == ["full", "shallow", "reuse"]
    assert variants.generation_kinds(built, None, 2) == ["full", "full"]


@pytest.mark.slow
def test_compile_smoke_a_second_process_loads_every_graph_from_the_caches(tmp_path):
    out = tmp_path / "compile.json"
    assert cli_main(["bench", "compile", "--quick", "--variants", "deepcache3", "--out", str(out),
                     "--log-level", "WARNING"]) == 0
    row = json.loads(out.read_text())["variants"]["deepcache3"]
    cold, warm = row["processes"]
    assert cold["compiled_variants"] == warm["compiled_variants"] == ["full", "shallow"]
    assert cold["kinds"].count("full") == 2 and cold["compile_seconds"] > 0 and warm["compile_seconds"] is not None
    assert cold["counters"]["aot_autograd"]["autograd_cache_miss"] == 2
    assert cold["counters"]["inductor"]["fxgraph_cache_miss"] == 2
    # the warm process: both step graphs load from AOTAutograd's cache (no re-trace), nothing bypasses it
    assert warm["counters"]["aot_autograd"]["autograd_cache_hit"] == 2
    assert warm["counters"]["aot_autograd"]["autograd_cache_miss"] == 0
    assert cold["counters"]["aot_autograd"]["autograd_cache_bypass"] == warm["counters"]["aot_autograd"][
        "autograd_cache_bypass"] == 0
    assert row["warm_over_cold"] is not None and row["warm_vs_baseline_warm"] == 1.0


def test_atedm_smoke(tmp_path):
    out = tmp_path / "atedm.json"
    assert cli_main(["bench", "atedm", "--arch", "sdxl-tiny", "--latent", "16", "--threads", "1", "--methods", "atedm",
                     "--runs", "1", "--warmup", "0",
                     "--out", str(out), "--log-level", "WARNING"]) == 0
    result = json.loads(out.read_text())["results"]
    assert set(result) == {"unpruned", "atedm late", "atedm early", "atedm DSAP generation"}
    for key in ("atedm late", "atedm early"):
        _check_paired(result[key], 1)
        assert result[key]["flop_bound"] > 1 and 0 < result[key]["plan_time_share"] < 1 and result[key]["rel_err"] > 0
    assert result["atedm late"]["flops"]["total"] < result["atedm early"]["flops"]["total"]


def test_export_smoke(tmp_path):
    out = tmp_path / "export.json"
    assert cli_main(["bench", "export", "--quick", "--variants", "tome0.5", "--workdir", str(tmp_path),
                     "--out", str(out), "--log-level", "WARNING"]) == 0
    (onnx,) = json.loads(out.read_text())["onnx"]
    unpruned, tome = onnx["rows"]
    assert unpruned["variant"] == "unpruned" and unpruned["trt_checks"] == "ok"
    assert tome["variant"] == "tome0.5" and tome["pruned_sites"] > 0 and 0 < tome["rel_err"] < 0.2
    _check_paired(tome["timing"], 2)


def test_policies_front_measures_the_selected_variants_resumes_and_rewrites_its_report(tmp_path):
    """The policy front on the tiny UNet (12 steps): a fixed interval measured between two baseline generations,
    --resume keeps it and adds the first-block variants (knobs placed at the intervals' call counts),
    --report-only redoes front.md from front.json."""
    import json

    from graphprune.bench import policies
    from graphprune.bench.options import PoliciesOptions

    out = tmp_path / "front"
    first = policies.run(PoliciesOptions(quick=True, out=str(out), select="^deepcache fixed N=2$"))
    front = json.loads((out / "front.json").read_text())
    assert set(front["variants"]) == {"deepcache fixed N=2"}
    fixed = front["variants"]["deepcache fixed N=2"]
    assert fixed["counts"] == {"full": 6, "shallow": 6, "reuse": 0} and fixed["probe_calls"] == 0
    assert fixed["kinds"] == ["full", "shallow"] * 6
    assert len(front["baselines"]) == 2  # one generation before the variant, one after
    assert fixed["speedup"] == fixed["baseline_cpu_seconds"] / fixed["cpu_seconds"]
    assert (out / "front.md").exists() and (out / "front.png").exists() and (out / "calibration.json").exists()
    assert "| deepcache | 6 (N=2) | " in first["table"]

    again = policies.run(PoliciesOptions(quick=True, out=str(out), resume=True, select="^deepcache first-block [^ ]+$"))
    thresholds = again["calibration"]["thresholds"]
    added = {f"deepcache first-block T={thresholds[n]:.3g}" for n in ("6", "4")}
    assert set(again["variants"]) == {"deepcache fixed N=2"} | added
    assert again["variants"]["deepcache fixed N=2"]["cpu_seconds"] == fixed["cpu_seconds"]  # kept, not re-measured
    for name in added:
        v = again["variants"][name]
        assert v["probe_calls"] == 12 and v["counts"]["full"] + v["counts"]["shallow"] == 12
        assert v["speedup"] > 0 and 0 < v["error"] < 1 and v["flop_bound"] > 1
    (out / "front.md").unlink()
    policies.run(PoliciesOptions(quick=True, out=str(out), report_only=True))
    assert all(name in (out / "front.md").read_text() for name in added)


def test_gpu_run_defaults_resolve_and_the_dry_run_maps_every_variant():
    from graphprune.bench import gpu

    opts = GpuOptions()
    opts.check()  # every default name parses (a renamed catalogue entry or option would fail here, not on the GPU)
    assert opts.model_specs() == [("sd15", 64), ("sdxl", 128)] and opts.steps == 50
    assert variants.variant("inductor-cudagraphs").mode == "reduce-overhead"
    for names in (opts.variants, opts.step_variants):
        assert gpu.resolved(names, "inductor") == list(names)
        dry = gpu.resolved(names, "eager")
        assert dry[0] == "eager" and "inductor" not in dry and all(variants.variant(n).kind != "inductor" for n in dry)
        for n in dry:
            v = variants.variant(n)
            assert v.kind != "graphprune" or v.options["compiler"] == "eager"
    assert gpu.resolved(["inductor", "tomesd+inductor", "tomesd"], "eager") == ["eager", "tomesd"]
    with pytest.raises(ValueError, match="ARCH:LATENT"):
        GpuOptions(models=("sd15",)).check()


def test_gpu_dry_run(tmp_path):
    """benchmarks/gpu.py end to end on CPU (tiny UNet, latent 16, 2 steps, no Inductor): both parts, JSON + table."""
    out = tmp_path / "gpu"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick", "-o", str(out),
                          "--variants", "inductor,inductor-cudagraphs,tome0.5,tomesd",
                          "--step-variants", "inductor,inductor-cudagraphs,deepcache3,tome0.5",
                          "--log-level", "WARNING"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((out / "gpu.json").read_text())
    assert result["failed"] == [] and list(result["models"]) == ["tiny:16"]
    part = result["models"]["tiny:16"]
    assert list(part["speed"]["latents"]["16"]["variants"]) == ["eager", "dynamo-eager", "tome0.5-fx", "tomesd"]
    for key in ("tome0.5-fx", "tomesd"):
        _check_paired(part["speed"]["latents"]["16"]["variants"][key], 1)
    steps = part["steps"]["variants"]
    assert list(steps) == ["eager", "dynamo-eager", "deepcache3-fx", "tome0.5-fx"]
    assert steps["deepcache3-fx"]["kinds"]["shallow"] == 1 and steps["tome0.5-fx"]["kinds"]["full"] == 2
    table = (out / "gpu.md").read_text()
    assert "## tiny, latent 16" in table and "whole 2-step" in table and "graphprune deepcache N=3" in table
    assert (out / "speed_tiny.json").exists() and (out / "steps_tiny.json").exists()


@pytest.mark.slow
def test_inductor_without_layout_optimization_is_its_own_compiled_baseline():
    """``inductor-nolayout`` (graphprune's CPU setting, as a plain-Inductor baseline) compiles its own graph next to
    ``inductor`` in one process (Dynamo's backend guard keeps the two apart) and computes the same output."""
    from torch._dynamo.utils import counters

    from graphprune.archs import example_inputs

    torch._dynamo.reset()
    model = variants.build_model("tiny").eval()
    args, kwargs = example_inputs(model, latent=16, batch=2)
    assert variants.variant("inductor-nolayout").inductor_config == {"layout_optimization": False}
    with torch.no_grad():
        default = variants.variant("inductor").build(model).fn
        nolayout = variants.variant("inductor-nolayout").build(model).fn
        before = counters["stats"]["unique_graphs"]
        a, b = default(*args, **kwargs).sample, nolayout(*args, **kwargs).sample
        assert counters["stats"]["unique_graphs"] - before == 2
        default(*args, **kwargs), nolayout(*args, **kwargs)
        assert counters["stats"]["unique_graphs"] - before == 2  # no recompile either way
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_headers_record_the_allocator_and_thread_environment(monkeypatch):
    """CPU timings move 1.15x with the glibc allocator tunables (README, "CPU: keep freed memory"): every header
    records them, and the printed header shows them."""
    from graphprune.bench.env import environment, format_header

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    header = environment("cpu", torch.float32)
    assert header["env"]["GLIBC_TUNABLES"] == "glibc.malloc.mmap_max=0" and "LD_PRELOAD" not in header["env"]
    assert "environment GLIBC_TUNABLES=glibc.malloc.mmap_max=0" in format_header(header)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_diagnostic_scripts_run_and_have_help():
    """benchmarks/cpu_allocator.py (tiny eager UNet, 2 pairs: glibc defaults vs freed memory kept, in a child process
    since it switches the allocator) and benchmarks/inductor_layout.py --help."""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "benchmarks/cpu_allocator.py"), "--arch", "tiny", "--latent",
                          "16", "--model", "eager", "--runs", "2", "--threads", "1"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    assert "freed memory kept: minor page faults per call" in run.stdout and "paired ratios" in run.stdout
    for script in ("cpu_allocator.py", "inductor_layout.py"):
        helped = subprocess.run([sys.executable, str(root / "benchmarks" / script), "--help"], capture_output=True,
                                text=True, timeout=300)
        assert helped.returncode == 0 and "usage:" in helped.stdout, helped.stderr

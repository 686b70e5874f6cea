"""The speed-quality Pareto harness (graphprune.bench): front, method registry, the --quick sweep end to end, the
DDIM quality loop, and the real-weights path on a tiny StableDiffusionPipeline saved by the test."""

import json
import math
import subprocess
import sys

import pytest
import torch

import graphprune
import models
from graphprune.archs import build_unet, example_inputs
from graphprune.bench import variants
from graphprune.bench.frontier import pareto_front
from graphprune.bench.options import ParetoOptions, resolve_methods
from graphprune.cli import main as cli_main
from graphprune.bench.ddim import (LoopSpec, ddim_loop, loop_start, loop_timesteps, make_scheduler, model_output,
                                   rel_error, with_sample_and_timestep)


def test_front_on_a_hand_made_example():
    # (speedup, error): higher speedup and lower error are better
    pts = [(1.0, 0.0),   # baseline: on the front (nothing has error <= 0 and more speed)
           (1.2, 0.01),  # on
           (1.1, 0.02),  # dominated by (1.2, 0.01)
           (1.5, 0.05),  # on
           (1.5, 0.06),  # dominated by (1.5, 0.05): same speed, more error
           (0.9, 0.001),  # dominated by the baseline
           (1.2, 0.01),  # equal to a front point: also on
           (math.nan, 0.0)]  # failed: never on
    assert pareto_front(pts) == [True, True, False, True, False, False, True, False]
    assert pareto_front([]) == []


def test_methods_come_from_the_registry_and_unknown_ones_error():
    assert resolve_methods(None) == graphprune.method_names()
    assert set(graphprune.registered_methods()) <= set(resolve_methods(None))  # + config-only (deepcache)
    assert resolve_methods(["tome", "sito", "tome"]) == ("tome", "sito")
    with pytest.raises(ValueError, match=r"registered methods are \[.*'sito'.*'tome'.*\]") as err:
        resolve_methods(["tome", "fancy"])
    assert "fancy" in str(err.value)
    res = subprocess.run([sys.executable, "-m", "graphprune.cli", "bench", "pareto", "--methods", "sito,fancy"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "registered methods are" in res.stderr and "fancy" in res.stderr


def test_cli_help_lists_bench_pareto():
    res = subprocess.run([sys.executable, "-m", "graphprune.cli", "bench", "pareto", "--help"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0
    for flag in ("--methods", "--ratios", "--model", "--prompts", "--inception", "--quick", "--steps"):
        assert flag in res.stdout


def test_a_ratio_above_a_methods_cap_is_skipped_not_fatal():
    vs = variants.grid(["tome"], [0.5, 0.9], with_tomesd=True)
    assert [v.label for v in vs] == ["tome r=0.5", "tome r=0.9", "tomesd r=0.5", "tomesd r=0.9"]
    assert vs[0].error is None and "0.75" in vs[1].error


def test_generic_model_builder_is_used_when_present(monkeypatch):
    import graphprune.archs as archs

    calls = []
    monkeypatch.setattr(archs, "build_model", lambda arch, dtype, seed: calls.append((arch, seed)) or "model",
                        raising=False)
    assert variants.build_model("pixart-tiny", torch.float32, 3) == "model" and calls == [("pixart-tiny", 3)]
    monkeypatch.undo()
    assert type(variants.build_model("tiny", torch.float32, 0)).__name__ == "UNet2DConditionModel"


def test_templates_unet_and_dit_style():
    x = torch.zeros(2, 4, 8, 8)
    (a, t, c), kw = with_sample_and_timestep(((torch.ones(2, 4, 8, 8), torch.tensor(500), "ctx"), {}), x, 321)
    assert a is x and t.item() == 321 and t.dtype == torch.int64 and t.ndim == 0 and c == "ctx"
    (a,), kw = with_sample_and_timestep(((torch.ones(2, 4, 8, 8),), {"timestep": torch.tensor([500, 500]),
                                                                     "encoder_hidden_states": "ctx"}), x, 7)
    assert a is x and kw["timestep"].tolist() == [7, 7] and kw["encoder_hidden_states"] == "ctx"
    # learned-sigma models (PixArt, DiT) predict 2C channels: keep the noise half
    assert model_output(torch.randn(2, 8, 4, 4), channels=4).shape == (2, 4, 4, 4)
    assert model_output((torch.randn(2, 4, 4, 4),), channels=4).shape == (2, 4, 4, 4)


def test_ddim_loop_is_seeded_and_ratio_zero_is_the_unpruned_loop():
    model = build_unet("tiny")
    template = example_inputs(model, latent=16, batch=2)
    spec = LoopSpec(steps=3)
    assert loop_timesteps(make_scheduler(), LoopSpec(steps=20, strength=0.7))[0] < 700  # img2img start
    start = loop_start(model, latent=16, images=2, seed=0)
    assert start.x0.shape == (2, 4, 16, 16) and abs(float(start.x0[0].std()) - 1) < 0.05  # standardized photos
    ref = ddim_loop(model, template, start, spec)
    assert torch.equal(ref, ddim_loop(model, template, start, spec))
    zero = torch.compile(model, backend="graphprune", options={"method": "tome", "ratio": 0.0, "compiler": "eager"})
    assert rel_error(ddim_loop(zero, template, start, spec), ref) < 1e-5
    torch._dynamo.reset()
    pruned = torch.compile(model, backend="graphprune", options={"method": "sito", "ratio": 0.5, "compiler": "eager"})
    assert 1e-4 < rel_error(ddim_loop(pruned, template, start, spec), ref) < 0.2


def _check_schema(result, methods, ratios, tomesd):
    h = result["header"]
    for key in ("torch", "diffusers", "device", "dtype", "model_config", "call_shapes", "methods", "quality_compiler",
                "speed_compiler", "git_commit"):
        assert key in h, key
    labels = [p["label"] for p in result["points"]]
    want = [f"{m} r={r:g}" for m in methods for r in ratios] + ([f"tomesd r={r:g}" for r in ratios] if tomesd else [])
    assert labels == want
    for p in result["points"]:
        assert "error" not in p, p.get("error")
        assert p["speed"]["median_s"] > 0 and p["speedup"] > 0 and isinstance(p["front"], bool)
        # every timed call is paired with a call of the compiled baseline, which never recompiles
        assert p["speedup"] == p["speed"]["speedup_paired"] and len(p["speed"]["baseline_times_s"]) == len(
            p["speed"]["times_s"]) and p["speed"]["no_recompiles_timed"]
        assert 0 < p["quality"]["rel_error"] < 1 and p["quality"]["psnr_db"] > 10
    # the front in the JSON is the front of the stored numbers
    xy = [(1.0, 0.0)] + [(p["speedup"], p["quality"]["rel_error"]) for p in result["points"]]
    assert [result["baseline_on_front"]] + [p["front"] for p in result["points"]] == pareto_front(xy)
    assert {r["method"] for r in result["at_ratio_0.5"]} == set(methods) | ({"tomesd"} if tomesd else set())


def test_quick_sweep_end_to_end(tmp_path, capsys):
    """--quick with every step of the harness; the speed part uses compiler=eager here to keep the suite fast
    (test_quick_sweep_under_inductor covers the Inductor speed path)."""
    out = tmp_path / "res"
    rc = cli_main(["bench", "pareto", "--quick", "--methods", "tome,sito", "--speed-compiler", "eager", "-o", str(out),
                      "--log-level", "WARNING"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "variant" in printed and "speedup" in printed and "tomesd r=0.5 (eager)" in printed
    result = json.loads((out / "pareto.json").read_text())
    _check_schema(result, ["tome", "sito"], [0.3, 0.5], tomesd=True)
    assert result["header"]["model_config"]["class"] == "UNet2DConditionModel"
    assert result["flops"]["capture_check"]["covers_model"]
    assert all(p["bounds"]["flop"] > 1 for p in result["points"])
    assert (out / "pareto.png").stat().st_size > 10_000 and (out / "pareto.txt").read_text() == result["table"] + "\n"
    # --replot rebuilds front, table and plot from the JSON alone
    assert cli_main(["bench", "pareto", "--replot", str(out / "pareto.json"), "-o", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "pareto.json").read_text())
    assert again["table"] == result["table"] and again["front"] == result["front"]
    assert (tmp_path / "again" / "pareto.png").exists()


def test_sweep_of_an_explicit_variant_list(tmp_path):
    """--variants: configs beyond method x ratio (scope, ToDo's factor) next to tomesd, each point its own curve."""
    out = tmp_path / "res"
    names = "tome:ratio=0.5:scope=block,todo:factor=2,tomesd0.5"
    assert cli_main(["bench", "pareto", "--quick", "--variants", names, "--speed-compiler", "eager", "--no-flops",
                     "-o", str(out), "--log-level", "WARNING"]) == 0
    result = json.loads((out / "pareto.json").read_text())
    pts = result["points"]
    assert [p["label"] for p in pts] == ["graphprune tome:ratio=0.5:scope=block", "graphprune todo:factor=2",
                                         "tomesd r=0.5 eager"]
    assert pts[0]["options"] == {"method": "tome", "ratio": 0.5, "scope": "block"} and pts[1]["ratio"] is None
    assert all(p["curve"] == p["label"] and p["quality"]["rel_error"] > 0 and p["speedup"] > 0 for p in pts)
    assert [r["method"] for r in result["at_ratio_0.5"]] == ["tome", "tomesd"]  # ToDo's ratio is its factor's
    assert (out / "pareto.png").stat().st_size > 10_000
    # --no-speed: errors only, no timer (the same error as the timed run: the loop is seeded)
    assert cli_main(["bench", "pareto", "--quick", "--variants", "todo:factor=2", "--no-speed", "--no-flops",
                     "-o", str(tmp_path / "q"), "--log-level", "WARNING"]) == 0
    (q,) = json.loads((tmp_path / "q" / "pareto.json").read_text())["points"]
    assert q["speedup"] is None and "speed" not in q and q["quality"]["rel_error"] == pts[1]["quality"]["rel_error"]
    from graphprune.bench import pareto

    with pytest.raises(ValueError, match="unknown variant"):
        pareto.run(ParetoOptions(variants=("tome:ratio=0.5", "fancy0.5")))
    with pytest.raises(ValueError, match="--model"):
        ParetoOptions(variants=("tome0.5",), model="somewhere", prompts="p.txt").check()


@pytest.mark.slow
def test_quick_sweep_under_inductor(tmp_path):
    out = tmp_path / "res"
    rc = cli_main(["bench", "pareto", "--quick", "--methods", "tome", "--ratios", "0.5", "--no-tomesd", "--no-flops",
                      "--keep-inductor-cache", "-o", str(out), "--log-level", "WARNING"])
    assert rc == 0
    result = json.loads((out / "pareto.json").read_text())
    _check_schema(result, ["tome"], [0.5], tomesd=False)
    assert result["header"]["speed_compiler"] == "inductor" and "inductor" in result["baseline"]
    speed = result["points"][0]["speed"]
    assert speed["graphs"] >= 1 and speed["no_recompiles_timed"]


# ------------------------------------------------------------------------------------------------------------------
# real weights: a tiny StableDiffusionPipeline saved by the test (tokenizer built offline from a byte-level vocab)

def _byte_vocab() -> dict:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    return {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from graphprune.bench.ddim import SD_SCHEDULER

    vocab = _byte_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)  # characters only, no merges
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1,
        pad_token_id=len(vocab) - 1)).eval()
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=models.unet(models.SD15_TINY), scheduler=DDIMScheduler(**SD_SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    path = tmp_path_factory.mktemp("pipe") / "tiny-sd"
    pipe.save_pretrained(path)
    return path


def test_model_path_with_prompts(tiny_pipeline, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of an astronaut\n# a comment\n\na red rocket on a launch pad\n")
    out = tmp_path / "res"
    rc = cli_main(["bench", "pareto", "--model", str(tiny_pipeline), "--prompts", str(prompts), "--latent", "16", "--quick",
                      "--methods", "tome", "--speed-compiler", "eager", "--no-flops", "--inception",
                      str(tmp_path / "missing.pth"), "-o", str(out), "--log-level", "WARNING"])
    assert rc == 0
    result = json.loads((out / "pareto.json").read_text())
    assert result["header"]["pipeline"] == "StableDiffusionPipeline"
    assert [p["label"] for p in result["points"]] == ["tome r=0.5", "tomesd r=0.5"]
    for p in result["points"]:
        q = p["quality"]
        assert len(q["psnr_per_image"]) == 2 and len(q["ssim_per_image"]) == 2  # the comment and blank line skipped
        assert 10 < q["psnr_mean"] < math.inf and 0 < q["ssim_mean"] < 1 and p["speedup"] > 0
        assert len(list((out / "images" / p["label"].replace(" ", "_").replace("=", "_")).glob("*.png"))) == 2
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            assert "torch-fidelity is not importable" in q["skipped"]
    assert len(list((out / "images" / "unpruned").glob("*.png"))) == 2
    printed = capsys.readouterr().out
    assert "1-SSIM" in printed and "FID" in printed
    assert (out / "pareto.png").exists()


def test_model_path_with_precomputed_embeddings(tiny_pipeline, tmp_path):
    emb = tmp_path / "emb.pt"
    g = torch.Generator().manual_seed(0)
    torch.save({"prompt_embeds": torch.randn(3, 77, 32, generator=g)}, emb)
    out = tmp_path / "res"
    rc = cli_main(["bench", "pareto", "--model", str(tiny_pipeline), "--prompt-embeds", str(emb), "--latent", "16", "--quick",
                      "--methods", "sito", "--no-tomesd", "--no-speed", "-o", str(out), "--log-level", "WARNING"])
    assert rc == 0
    result = json.loads((out / "pareto.json").read_text())
    (p,) = result["points"]
    assert len(p["quality"]["ssim_per_image"]) == 3 and "speed" not in p
    assert "no --inception/--clip weights given" in result["fidelity_note"]


def test_model_path_errors(tmp_path):
    from graphprune.bench.realweights import load_pipeline

    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path)
    with pytest.raises(ValueError, match="--prompts"):
        ParetoOptions(model=str(tmp_path)).check()


def test_replot_joins_sweeps_and_fills_speedups_from_a_speed_run(tmp_path):
    """--replot A,B --speeds S: the points of both sweeps, each speedup from the paired speed run's variant with the
    same options (tomesd by ratio), the front over what was timed; an untimed point stays untimed."""
    header = {"schema": 1, "model": "sd15", "device": "cpu", "dtype": "float32", "options": {"latent": 64},
              "call_shapes": {"args[0]": [2, 4, 64, 64]}, "quality_compiler": "eager", "speed_compiler": "inductor"}

    def point(label, method, options, err, ratio=None):
        return {"label": label, "method": method, "ratio": ratio, "options": options, "curve": label,
                "speedup": None, "quality": {"rel_error": err, "psnr_db": 50.0}}

    a = {"header": header, "baseline": {}, "points": [
        point("tomesd r=0.5 eager", "tomesd", None, 0.0126, ratio=0.5),
        point("graphprune tome:ratio=0.5", "tome", {"method": "tome", "ratio": 0.5}, 0.0129, ratio=0.5)]}
    b = {"header": header, "baseline": {}, "points": [
        point("graphprune todo:factor=2", "todo", {"method": "todo", "factor": 2}, 0.0036),
        point("graphprune tome:ratio=0.5", "tome", {"method": "tome", "ratio": 0.5}, 0.0129, ratio=0.5),  # repeated
        point("graphprune todo:factor=3", "todo", {"method": "todo", "factor": 3}, 0.0071)]}
    speed = {"latents": {"64": {"baseline": "inductor", "variants": {
        "inductor": {"speedup": 1.0}, "tome0.5": {"speedup": 1.12, "median_s": 18.0},
        "todo2": {"speedup": 1.19}, "tomesd": {"speedup": 1.18}, "tomesd+inductor": {"speedup": 0.9},
        "todo:factor=3": {"error": "Traceback ..."}}}}}
    paths = []
    for name, data in (("a.json", a), ("b.json", b), ("speed.json", speed)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(data))
    assert cli_main(["bench", "pareto", "--replot", f"{paths[0]},{paths[1]}", "--speeds", str(paths[2]),
                     "-o", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "pareto.json").read_text())
    got = {p["label"]: p["speedup"] for p in result["points"]}
    assert got == {"tomesd r=0.5 eager": 1.18, "graphprune tome:ratio=0.5": 1.12, "graphprune todo:factor=2": 1.19,
                   "graphprune todo:factor=3": None}
    assert [p["label"] for p in result["points"] if p["front"]] == ["graphprune todo:factor=2"]
    assert (tmp_path / "out" / "pareto.png").exists()
    assert cli_main(["bench", "pareto", "--speeds", str(paths[2]), "-o", str(tmp_path / "x")]) == 2  # needs --replot

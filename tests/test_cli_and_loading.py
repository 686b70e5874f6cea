"""The command line, the inspect API, loading a local diffusers folder, and a full-size architecture."""

import subprocess
import sys

import pytest

import graphprune
import models
from graphprune.archs import build_unet, example_inputs, load_unet


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "graphprune.cli", *argv], capture_output=True, text=True,
                          timeout=600)


def test_cli_help():
    res = run_cli("--help")
    assert res.returncode == 0 and "inspect" in res.stdout
    res = run_cli("inspect", "--help")
    assert res.returncode == 0 and "--arch" in res.stdout and "--model" in res.stdout


def test_cli_inspect_tiny(tmp_path):
    res = run_cli("inspect", "--arch", "tiny", "--latent", "16", "--method", "tome", "--json",
                  str(tmp_path / "r.json"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("pruned") >= 3 and "down_blocks.0.attentions.0.transformer_blocks.0.attn1" in res.stdout
    assert (tmp_path / "r.json").exists()


def test_cli_inspect_catome_with_generic_options():
    res = run_cli("inspect", "--arch", "tiny", "--latent", "16", "--method", "catome", "--option", "threshold=-1",
                  "--option", "refresh=config3", "--option", "use_rand=false")
    assert res.returncode == 0, res.stderr
    assert "runtime[catome]" in res.stdout and "variant refresh" in res.stdout
    res = run_cli("inspect", "--arch", "tiny", "--latent", "16", "--method", "catome", "--option", "refresh=config9")
    assert res.returncode != 0 and "unknown refresh preset" in res.stderr


def test_cli_rejects_unknown_method():
    res = run_cli("inspect", "--arch", "tiny", "--latent", "16", "--method", "fancy")
    assert res.returncode != 0 and "invalid choice" in res.stderr and "tome" in res.stderr and "sito" in res.stderr


def test_inspect_on_a_locally_saved_model(tmp_path):
    model = models.unet(models.SD15_TINY)
    model.save_pretrained(tmp_path / "unet")
    loaded = load_unet(tmp_path)  # a pipeline-style folder with unet/ inside
    args, kwargs = example_inputs(loaded, latent=16, batch=2)
    report = graphprune.inspect(loaded, *args, options={"method": "sito", "ratio": 0.5}, **kwargs)
    assert report.count("pruned", "self") == 3 and report.count("kept", "cross") == 7
    text = str(report)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1" in text and "3/7 self pruned" in text
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_unet(tmp_path / "nothing")


@pytest.mark.slow
def test_sd15_architecture_at_small_latent():
    unet = build_unet("sd15")
    args, kwargs = example_inputs(unet, latent=16, batch=2)
    report = graphprune.inspect(unet, *args, options={"method": "sito", "ratio": 0.5}, **kwargs)
    pruned = [s for s in report.sites if s.status == "pruned"]
    assert len(pruned) == 5 and {(s.N, s.K, s.C, s.heads) for s in pruned} == {(256, 128, 320, 8)}
    assert report.count("kept", "self") == 11 and report.count("unmatched") == 0


def test_generate_writes_images_and_timing_lines(tmp_path):
    from graphprune.cli import main

    out = tmp_path / "out"
    assert main(["generate", "--arch", "tiny", "--steps", "2", "--height", "64", "--width", "64", "--compiler",
                 "eager", "--method", "tome", "--prompt", "a red rocket", "--prompt", "a cat", "--compare",
                 "-o", str(out)]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["000_a-red-rocket.png", "001_a-cat.png"]
    from PIL import Image

    assert Image.open(out / pngs[0]).size == (64, 64)


def test_generate_from_a_local_pipeline_folder(tmp_path, capsys):
    from graphprune.archs import build_pipeline
    from graphprune.cli import main

    build_pipeline("tiny").save_pretrained(tmp_path / "pipe")
    assert main(["generate", "--model", str(tmp_path / "pipe"), "--steps", "2", "--height", "64", "--width", "64",
                 "--option", "compiler=eager", "--method", "sito", "-o", str(tmp_path / "out")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.endswith(".png") or "s/it" in line]
    assert len(lines) == 1 and "s/it" in lines[0] and "includes the compile" in lines[0]

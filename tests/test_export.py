"""Export: torch.export programs, ONNX files (onnxruntime + TensorRT parser rules), TensorRT, pipeline wrappers.

References: the unpruned model (ratio=0), tomesd (``use_rand=False``), and the compiled backend (itself tested
against references in test_backend/test_methods) for "same method, ratio and seed". ONNX tolerance: onnxruntime vs
the pruned torch program, rtol=1e-4, atol=1e-4 on fp32 (measured ~1e-6 on the tiny UNet).
"""

from __future__ import annotations

import copy

import pytest
import torch

import models
from graphprune.export import (DeployedUNet, check_onnx, export_info, export_program, random_feed, tensorrt_unavailable,
                               to_onnx, to_tensorrt)
from graphprune.export.deploy import OnnxRunner
from graphprune.export.tensorrt import compile_graph
from graphprune.export.trt_ops import SUPPORTED_OPS, TOPK_MAX_K
from helpers import compile_with

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ORT_TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny():
    return models.unet(models.SD15_TINY)


def fresh_inputs(model, latent=16, batch=2, seed=11):
    """New random inputs (not the export's examples): (sample, t, context)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return (torch.randn(batch, cfg.in_channels, latent, latent, generator=g), torch.tensor(700),
            torch.randn(batch, 7, cfg.cross_attention_dim, generator=g))


@pytest.fixture(scope="module")
def args(tiny):
    """The export's example inputs (latent 16, batch 2)."""
    return models.unet_inputs(tiny, 16)[0]


@pytest.fixture(scope="module")
def new(tiny):
    return fresh_inputs(tiny)


@pytest.fixture(scope="module")
def program(tiny, args):
    """program(**options) -> export_program(tiny, args, **options), cached for the module (exports are slow)."""
    cache = {}

    def get(**options):
        key = tuple(sorted(options.items()))
        if key not in cache:
            cache[key] = export_program(tiny, args, **options)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def backend_calls(tiny, new):
    """backend_calls(method) -> outputs of the compiled backend's first two calls on ``new`` (seed 0)."""
    cache = {}

    def get(method):
        if method not in cache:
            torch._dynamo.reset()
            fast, cap = compile_with(tiny, method=method, ratio=0.5)
            cache[method] = [fast(*new).sample for _ in range(2)]
            assert cap.report.count("pruned", "self") == 3
            torch._dynamo.reset()
        return cache[method]

    return get


@pytest.fixture(scope="module")
def onnx_file(args, program, tmp_path_factory):
    """The ONNX file of program(method="sito", ratio=0.5) (random inputs fixed: the backend's first draw)."""
    return to_onnx(program(method="sito", ratio=0.5), args, tmp_path_factory.mktemp("onnx") / "unet.onnx")


def aten_targets(ep):
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


def _deploy_checks(path):
    res = check_onnx(path)
    assert res.ok, str(res)
    assert set(res.op_counts) <= SUPPORTED_OPS and "NonZero" not in res.op_counts
    m = onnx.load(str(path), load_external_data=False)
    for v in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        assert all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim), v.name
    return res


# -- torch.export programs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sito", "tome"])
def test_program_matches_the_backends_first_call(tiny, new, program, backend_calls, method):
    ep = program(method=method, ratio=0.5)
    info = export_info(ep)
    assert info.report.count("pruned", "self") == 3 and len(info.random_specs) == 3  # the 3 finest-level layers
    assert "aten.topk.default" in aten_targets(ep) and "aten.scaled_dot_product_attention.default" in aten_targets(ep)
    assert len(ep.graph_signature.user_inputs) == 3  # fixed mode: the draws are buffers, not inputs
    out = ep.module()(*new)
    assert type(out).__name__ == "UNet2DConditionOutput"
    # the backend's first call draws RandomFeed(specs, seed=0) once: the same tensors as the fixed program
    torch.testing.assert_close(out.sample, backend_calls(method)[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.sample, tiny(*new).sample, atol=1e-3)  # pruning changed the output


def test_program_with_random_inputs_follows_the_backend_call_by_call(new, program, backend_calls):
    ep = program(method="sito", ratio=0.5, random="inputs")
    assert len(ep.graph_signature.user_inputs) == 3 + 3
    feed, module = random_feed(ep), ep.module()
    outs = [module(*new, graphprune_random=feed.draw()).sample for _ in range(2)]
    for out, ref in zip(outs, backend_calls("sito")):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(outs[0], outs[1])  # fresh noise per call changes the plan


def test_ratio_zero_program_and_onnx_are_the_model(tiny, args, new, program, tmp_path):
    ep = program(method="tome", ratio=0.0)
    assert "aten.topk.default" not in aten_targets(ep) and export_info(ep).report.count("pruned") == 0
    ref = tiny(*new).sample
    assert torch.equal(ep.module()(*new).sample, ref)
    path = to_onnx(ep, args, tmp_path / "unet.onnx")
    assert "TopK" not in _deploy_checks(path).op_counts
    torch.testing.assert_close(OnnxRunner(path)(*new), ref, **ORT_TOL)


# -- ONNX --------------------------------------------------------------------------------------------------------


def test_program_and_onnx_reproduce_tomesd(tmp_path):
    """ToMe without randomness against tomesd (an independent implementation), in torch and in onnxruntime."""
    tomesd = pytest.importorskip("tomesd")
    model = models.unet(models.SD15_TINY, seed=3)
    example, inputs = fresh_inputs(model, seed=4), fresh_inputs(model, seed=5)
    patched = copy.deepcopy(model)
    tomesd.apply_patch(patched, ratio=0.5, use_rand=False)
    ref = patched(*inputs).sample
    ep = export_program(model, example, method="tome", ratio=0.5, use_rand=False)
    assert export_info(ep).random_specs == [] and export_info(ep).report.count("pruned", "self") == 3
    torch.testing.assert_close(ep.module()(*inputs).sample, ref, rtol=1e-5, atol=2e-5)
    res = _deploy_checks(to_onnx(ep, example, tmp_path / "tome.onnx"))
    assert res.op_counts["TopK"] == 3 and "ScatterElements" in res.op_counts  # merge = scatter_add of values/counts
    assert max(res.topk_ks) < TOPK_MAX_K
    torch.testing.assert_close(OnnxRunner(tmp_path / "tome.onnx")(*inputs), ref, **ORT_TOL)


def test_onnx_tiny_matches_the_pruned_program(new, program, onnx_file):
    ep = program(method="sito", ratio=0.5)
    res = _deploy_checks(onnx_file)
    assert res.op_counts["TopK"] == 3 and max(res.topk_ks) < TOPK_MAX_K
    runner = OnnxRunner(onnx_file)
    assert [i.name for i in runner.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert [o.name for o in runner.session.get_outputs()] == ["out_sample"]
    torch.testing.assert_close(runner(*new), ep.module()(*new).sample, **ORT_TOL)


def test_onnx_with_random_inputs_follows_the_backend(args, new, program, backend_calls, tmp_path):
    ep = program(method="sito", ratio=0.5, random="inputs")
    path = to_onnx(ep, args, tmp_path / "unet.onnx")
    runner = OnnxRunner(path, feed=random_feed(ep))  # draws like the backend: the same tensors, call by call
    assert [i.name for i in runner.inputs][3:] == [f"graphprune_random_{i}" for i in range(3)]
    for ref in backend_calls("sito"):
        torch.testing.assert_close(runner(*new), ref, **ORT_TOL)


def test_check_onnx_reports_what_tensorrt_rejects():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5000])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["n", 2])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 4000])
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [1, 4000])
    k = helper.make_tensor("k", TensorProto.INT64, [1], [4000])
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1, sorted=0, name="topk"),
             helper.make_node("NonZero", ["x"], ["nz"], name="nonzero"),
             helper.make_node("Transpose", ["nz"], ["y"], name="t")]
    graph = helper.make_graph(nodes, "g", [x], [v, i, y], initializer=[k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    res = check_onnx(model)
    text = "\n".join(res.problems)
    assert not res.ok and res.topk_ks == [4000]
    assert "k=4000" in text and "sorted=0" in text and "NonZero has a data-dependent" in text
    assert "output y has no static shape" in text


@pytest.mark.slow
def test_onnx_sd15_architecture_at_latent_32(tmp_path):
    """The full SD1.5 UNet (random weights) at 32x32 latents, batch 2: export, TensorRT rules, onnxruntime."""
    from graphprune.archs import build_unet, example_inputs

    unet = build_unet("sd15")
    args, _ = example_inputs(unet, latent=32, batch=2, structured=False)
    ep = export_program(unet, args, method="sito", ratio=0.5)
    assert export_info(ep).report.count("pruned", "self") == 5  # the five full-resolution transformer layers
    path = to_onnx(ep, args, tmp_path / "sd15.onnx")  # > 2 GB: external data next to it
    res = _deploy_checks(path)
    assert res.op_counts["TopK"] == 5 and max(res.topk_ks) <= 1024 // 2
    new = (torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(9)), torch.tensor(300),
           torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(10)))
    ref = ep.module()(*new).sample
    del ep, unet
    out = OnnxRunner(path)(*new)
    torch.testing.assert_close(out, ref, **ORT_TOL)


# -- TensorRT ---------------------------------------------------------------------------------------------------


def _cpu_compile(ep, arg_inputs, kwarg_inputs, **options):
    """A stand-in for torch_tensorrt.dynamo.compile: run the exported program (tests the plumbing on CPU)."""
    _cpu_compile.params = len(ep.graph_signature.parameters)
    _cpu_compile.user_inputs = len(ep.graph_signature.user_inputs)
    return ep.module()


def test_tensorrt_plumbing_with_a_cpu_stand_in(args, new, program, backend_calls):
    engine = to_tensorrt(program(method="sito", ratio=0.5), args, compile_fn=_cpu_compile)
    torch.testing.assert_close(engine(*new).sample, backend_calls("sito")[0], rtol=1e-5, atol=1e-5)


def test_backend_compiler_tensorrt_with_a_cpu_stand_in(tiny, new, backend_calls, monkeypatch):
    """options={"compiler": "tensorrt"} goes through compile_graph: the Dynamo graph's parameters become weights
    again (not runtime inputs) and the random inputs stay graph inputs fed by the backend."""
    import graphprune.inner as inner

    monkeypatch.setattr(inner, "require_tensorrt", lambda: None)
    monkeypatch.setattr(inner, "tensorrt_compile", _cpu_compile)
    fast = torch.compile(tiny, backend="graphprune", options={"method": "sito", "ratio": 0.5, "compiler": "tensorrt"})
    outs = [fast(*new).sample for _ in range(2)]
    for out, ref in zip(outs, backend_calls("sito")):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert _cpu_compile.params > 50 and _cpu_compile.user_inputs == 3 + 3


@pytest.mark.skipif(tensorrt_unavailable() is None, reason="TensorRT is available: the error path is not reachable")
def test_tensorrt_says_what_to_install(tiny):
    args, _ = models.unet_inputs(tiny, 16)
    with pytest.raises(RuntimeError, match="pip install 'graphprune\\[tensorrt\\]'"):
        to_tensorrt(tiny, args, method="sito", ratio=0.5)


@pytest.mark.skipif(tensorrt_unavailable() is not None, reason=str(tensorrt_unavailable()))
def test_tensorrt_engine_matches_and_round_trips(tmp_path):
    from graphprune.export import load_engine

    model = models.unet(models.SD15_TINY).cuda()
    args = tuple(a.cuda() for a in fresh_inputs(model))
    engine = to_tensorrt(model, args, method="sito", ratio=0.5, path=tmp_path / "unet.ep")
    ref = export_program(model, args, method="sito", ratio=0.5).module()(*args).sample
    out = engine(*args)
    out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    loaded = load_engine(tmp_path / "unet.ep")
    again = loaded(*args)
    again = again.sample if hasattr(again, "sample") else again[0] if isinstance(again, (tuple, list)) else again
    torch.testing.assert_close(again, out)


@pytest.mark.skipif(tensorrt_unavailable() is not None, reason=str(tensorrt_unavailable()))
def test_backend_compiler_tensorrt():
    model = models.unet(models.SD15_TINY).cuda()
    args = tuple(a.cuda() for a in fresh_inputs(model))
    fast = torch.compile(model, backend="graphprune", options={"method": "sito", "ratio": 0.5, "compiler": "tensorrt",
                                                               "noise_alpha": 0.0})
    ref, _ = compile_with(model, method="sito", ratio=0.5, noise_alpha=0.0)
    torch.testing.assert_close(fast(*args).sample, ref(*args).sample, rtol=1e-3, atol=1e-3)


# -- pipelines ---------------------------------------------------------------------------------------------------


def tiny_pipeline(unet):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                        sample_size=16).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def generate(pipe, embeds):
    size = 16 * pipe.vae_scale_factor
    return pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=size, width=size,
                num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                output_type="pt").images


def test_pipeline_runs_end_to_end_on_deployed_unets(tiny, program, onnx_file):
    g = torch.Generator().manual_seed(3)
    embeds = (torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g))
    pipe = tiny_pipeline(tiny)
    reference = generate(pipe, embeds)

    pipe.unet = DeployedUNet.from_program(program(method="tome", ratio=0.0), tiny)
    torch.testing.assert_close(generate(pipe, embeds), reference)  # ratio 0: the same images

    # fixed random inputs: the torch program and its ONNX file agree
    pipe.unet = DeployedUNet.from_program(program(method="sito", ratio=0.5), tiny)
    fixed_program = generate(pipe, embeds)
    assert pipe.unet.config.in_channels == 4 and pipe.unet.dtype == torch.float32
    pipe.unet = DeployedUNet.from_onnx(onnx_file, tiny)
    torch.testing.assert_close(generate(pipe, embeds), fixed_program, **ORT_TOL)

    # random inputs drawn per call: the program follows the compiled backend step by step (same seed)
    pipe.unet = DeployedUNet.from_program(program(method="sito", ratio=0.5, random="inputs"), tiny)
    per_call_program = generate(pipe, embeds)
    fast, cap = compile_with(tiny, method="sito", ratio=0.5)
    pipe.unet = DeployedUNet.from_compiled(fast, tiny)
    torch.testing.assert_close(generate(pipe, embeds), per_call_program, rtol=1e-5, atol=1e-5)
    assert cap.report.count("pruned", "self") == 3
    assert fixed_program.shape == reference.shape and not torch.allclose(fixed_program, reference, atol=1e-4)
    assert not torch.allclose(fixed_program, per_call_program, atol=1e-6)  # steps 2 and 3 drew other noise


def test_deployed_unet_rejects_what_a_static_program_cannot_do(tiny, new, program):
    unet = DeployedUNet.from_program(program(method="tome", ratio=0.0), tiny)
    ref = tiny(*new).sample
    assert torch.equal(unet(*new, return_dict=False)[0], ref)
    torch.testing.assert_close(unet(new[0], torch.tensor([700, 700]), new[2]).sample, ref)  # (B,) equal timesteps
    with pytest.raises(NotImplementedError, match="timestep_cond"):
        unet(*new, timestep_cond=torch.zeros(2, 4))
    with pytest.raises(Exception):
        unet(new[0][:1], new[1], new[2][:1])  # another batch size: not the exported shape


# -- command line ------------------------------------------------------------------------------------------------


def test_cli_export(tmp_path):
    from graphprune.cli import main

    assert main(["export", "--arch", "tiny", "--latent", "8", "--method", "tome", "--format", "onnx",
                 "-o", str(tmp_path / "tiny.onnx")]) == 0
    res = check_onnx(tmp_path / "tiny.onnx")
    assert res.ok and res.op_counts["TopK"] == 3


def test_step_aware_methods_are_refused(tiny, args):
    with pytest.raises(NotImplementedError, match="step-aware"):
        export_program(tiny, args, method="deepcache")

"""End-to-end: the backend on tiny UNets against independent references and tomesd; graph-quality checks."""

import copy

import pytest
import tomesd
import torch

import models
from helpers import compile_with, rel_err
from reference import install_reference

TOP_SITES = 3  # SD15_TINY at latent 16: down_blocks.0 (1 layer) + up_blocks.1 (2 layers) at 16x16


@pytest.fixture(scope="module")
def sd15():
    return models.unet(models.SD15_TINY)


@pytest.fixture(scope="module")
def sd15_args(sd15):
    return models.unet_inputs(sd15, latent=16)


@pytest.mark.parametrize("method, extra", [("tome", {"use_rand": False}), ("sito", {"noise_alpha": 0.0}),
                                           ("sito", {"noise_alpha": 0.0, "recover": "base"})])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_matches_independent_reference(sd15, sd15_args, method, extra, ratio):
    args, kwargs = sd15_args
    fast, cap = compile_with(sd15, method=method, ratio=ratio, **extra)
    out = fast(*args, **kwargs).sample
    ref_model = install_reference(copy.deepcopy(sd15), method, ratio,
                                  **({"noise": None, "recover": extra.get("recover", "kept")}
                                     if method == "sito" else {}))
    ref = ref_model(*args, **kwargs).sample
    assert cap.report.count("pruned", "self") == TOP_SITES
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert rel_err(out, sd15(*args, **kwargs).sample) > 1e-4  # the rewrite changed something


@pytest.mark.parametrize("ratio, scope, max_downsample", [(0.3, "self", 1), (0.5, "self", 1), (0.75, "self", 1),
                                                          (0.5, "self+cross+ff", 1), (0.5, "self", 2)])
def test_tome_reproduces_tomesd(sd15, sd15_args, ratio, scope, max_downsample):
    args, kwargs = sd15_args
    patched = copy.deepcopy(sd15)
    tomesd.apply_patch(patched, ratio=ratio, use_rand=False, max_downsample=max_downsample,
                       merge_crossattn="cross" in scope, merge_mlp="ff" in scope)
    ref = patched(*args, **kwargs).sample
    fast, cap = compile_with(sd15, method="tome", ratio=ratio, use_rand=False, scope=scope,
                             max_downsample=max_downsample)
    out = fast(*args, **kwargs).sample
    pruned = cap.report.count("pruned", "self")
    assert pruned == (TOP_SITES if max_downsample == 1 else 7)  # level 2 adds down_blocks.1, mid, up_blocks.0 (4)
    if "cross" in scope:
        assert cap.report.count("pruned", "cross") == pruned and cap.report.count("pruned", "ff") == pruned
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)


def test_ratio_zero_is_the_unpruned_model(sd15, sd15_args):
    args, kwargs = sd15_args
    for method in ("tome", "sito"):
        torch._dynamo.reset()
        fast, cap = compile_with(sd15, method=method, ratio=0.0)
        assert torch.equal(fast(*args, **kwargs).sample, sd15(*args, **kwargs).sample)
        assert cap.report.count("pruned") == 0
        assert "ratio=0" in str(cap.report)


def test_rewrite_fired_with_static_k(sd15, sd15_args):
    args, kwargs = sd15_args
    fast, cap = compile_with(sd15, method="sito", ratio=0.5)
    fast(*args, **kwargs)
    gm = cap.graphs[0]
    attn = cap.nodes_named("graphprune_attention")
    assert len(attn) == TOP_SITES
    for node in attn:  # attention runs on K = 128 of the N = 256 tokens, a static shape
        assert tuple(node.args[0].meta["example_value"].shape) == (2, 128, 32)
    assert len(cap.nodes_named("graphprune_sito_plan")) == TOP_SITES
    sdpa = [n for n in gm.graph.nodes if n.target is torch.nn.functional.scaled_dot_product_attention]
    assert len(sdpa) == 14 - TOP_SITES  # 7 self + 7 cross originally; the pruned ones were replaced
    assert all(s.K == 128 for s in cap.report.pruned)


def test_no_graph_breaks_and_no_recompiles_over_50_timesteps(sd15, sd15_args):
    args, kwargs = sd15_args
    explained = torch._dynamo.explain(sd15)(*args, **kwargs)
    assert explained.graph_break_count == 0
    torch._dynamo.reset()
    fast, cap = compile_with(sd15, method="sito", ratio=0.5)
    for t in torch.linspace(999, 0, 50).long():
        fast(args[0], t, args[2], **kwargs)
    assert len(cap.reports) == explained.graph_count == 1  # one graph, compiled once


@pytest.mark.parametrize("options", [{"method": "sito", "ratio": 0.5}, {"method": "tome", "ratio": 0.5,
                                                                        "use_rand": False}])
def test_cfg_batch_plans_each_element_independently(sd15, sd15_args, options):
    (sample, t, ctx), kwargs = sd15_args
    other = sample.clone()
    other[1] = torch.randn_like(other[1])
    outs = []
    for s in (sample, other):
        torch._dynamo.reset()
        fast, _ = compile_with(sd15, **options)
        outs.append(fast(s, t, ctx).sample)
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    assert not torch.allclose(outs[0][1], outs[1][1])


def test_sito_seed_is_ours_and_user_rng_is_untouched(sd15, sd15_args):
    args, kwargs = sd15_args
    results = {}
    for seed in (0, 0, 1):
        torch._dynamo.reset()
        fast, _ = compile_with(sd15, method="sito", ratio=0.5, seed=seed)
        state = torch.get_rng_state()
        a = fast(*args).sample
        b = fast(*args).sample  # fresh noise on every call
        assert torch.equal(state, torch.get_rng_state())
        assert not torch.equal(a, b)
        results.setdefault(seed, []).append(a)
    assert torch.equal(results[0][0], results[0][1])
    assert not torch.equal(results[0][0], results[1][0])


def test_tome_random_destinations_shared_by_the_batch(sd15, sd15_args):
    args, kwargs = sd15_args
    fast, cap = compile_with(sd15, method="tome", ratio=0.5)
    a, b = fast(*args).sample, fast(*args).sample
    assert cap.report.random_inputs == TOP_SITES and not torch.equal(a, b)
    # odd batches turn randomness off (tomesd's rule)
    torch._dynamo.reset()
    fast, cap = compile_with(sd15, method="tome", ratio=0.5)
    fast(args[0][:1], args[1], args[2][:1])
    assert cap.report.random_inputs == 0


def test_inductor_matches_the_eager_rewrite(sd15, sd15_args):
    args, kwargs = sd15_args
    eager, _ = compile_with(sd15, method="sito", ratio=0.5, seed=3)
    ref = eager(*args).sample
    torch._dynamo.reset()
    fast = torch.compile(sd15, backend="graphprune", options={"method": "sito", "ratio": 0.5, "seed": 3})
    torch.testing.assert_close(fast(*args).sample, ref, rtol=1e-4, atol=1e-4)
    import graphprune

    assert graphprune.last_report().count("pruned", "self") == TOP_SITES


def test_scope_cross_and_ff_run_on_k_tokens(sd15, sd15_args):
    args, kwargs = sd15_args
    fast, cap = compile_with(sd15, method="sito", ratio=0.5, scope="self+cross+ff", noise_alpha=0.0)
    out = fast(*args).sample
    assert cap.report.count("pruned", "cross") == TOP_SITES and cap.report.count("pruned", "ff") == TOP_SITES
    attn = cap.nodes_named("graphprune_attention")
    cross = [n for n in attn if n.args[1] is not n.args[0]]
    assert len(cross) == TOP_SITES and all(n.args[0].meta["example_value"].shape[1] == 128 for n in cross)
    assert 1e-4 < rel_err(out, sd15(*args).sample) < 1.0

"""AT-EDM: G-WPR beside fused attention, the region rewrite (prune -> K-token span -> refill), DSAP, scope='block'.

The references here are written independently of graphprune: each diffusers ``Transformer2DModel`` of a UNet gets a
forward that materializes the full (B, H, N, N) attention map of its ranking layer, ranks tokens by the column mean
of the head-mean map (argsort), runs the later layers on the kept tokens through diffusers' own modules, and refills
the pruned tokens by copying the kept token with the largest head-mean logit (a Python-level scatter).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import models
from graphprune.methods import AtEdmConfig, parse_options
from graphprune.methods.atedm import dsap_blocks
from graphprune.methods.gwpr import copy_sources, gwpr_scores, select_kept
from helpers import compile_with, rel_err
from reference import ref_sito, ref_tome

TIMESTEPS = [int(t) for t in torch.linspace(999, 0, 5).long()]


# ----------------------------------------------------------------------------------------------- eager reference
def _head_split(t, heads):
    B, N, F_ = t.shape
    return t.view(B, N, heads, F_ // heads).transpose(1, 2)


def ref_atedm_plan(block, n, ratio):
    """The ranking layer's self-attention, materialized: (keep (B, K), source slot (B, N))."""
    attn = block.attn1
    q, k = _head_split(attn.to_q(n), attn.heads), _head_split(attn.to_k(n), attn.heads)
    logits = (q @ k.transpose(-1, -2)) * attn.scale  # (B, H, N, N)
    amap = logits.softmax(dim=-1).mean(dim=1)  # head-mean map, rows = queries
    score = amap.mean(dim=1)  # column mean: mean attention each key receives
    B, N = score.shape
    K = N - math.floor(N * ratio)
    keep = score.argsort(dim=1, descending=True, stable=True)[:, :K]
    lmean = logits.mean(dim=1)
    src = torch.empty(B, N, dtype=torch.int64)
    for b in range(B):
        slot_of = {int(j): r for r, j in enumerate(keep[b])}
        for i in range(N):
            src[b, i] = slot_of.get(i, int(lmean[b, i, keep[b]].argmax()))
    return keep, src


def _gather(x, idx):
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _tokens_in(tm, x):
    B, C, H, W = x.shape
    h = tm.norm(x)
    if tm.use_linear_projection:
        return tm.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))
    h = tm.proj_in(h)
    return h.permute(0, 2, 3, 1).reshape(B, H * W, h.shape[1])


def _tokens_out(tm, t, x):
    B, C, H, W = x.shape
    if tm.use_linear_projection:
        return tm.proj_out(t).reshape(B, H, W, -1).permute(0, 3, 1, 2) + x
    return tm.proj_out(t.reshape(B, H, W, -1).permute(0, 3, 1, 2)) + x


def _atedm_forward(tm, ratio):
    def forward(hidden_states, encoder_hidden_states=None, **kwargs):
        ctx = encoder_hidden_states
        t = _tokens_in(tm, hidden_states)
        blocks = list(tm.transformer_blocks)
        first = blocks[0]
        n = first.norm1(t)
        keep, src = ref_atedm_plan(first, n, ratio)
        if len(blocks) > 1:  # layer 1 on all N, its output pruned, layers 2..L on K
            tk = _gather(first(t, encoder_hidden_states=ctx), keep)
            for blk in blocks[1:]:
                tk = blk(tk, encoder_hidden_states=ctx)
        else:  # one layer: pruned right after its self-attention; cross-attention and FF on K
            t = first.attn1(n) + t
            tk = _gather(t, keep)
            tk = first.attn2(first.norm2(tk), encoder_hidden_states=ctx) + tk
            tk = first.ff(first.norm3(tk)) + tk
        return (_tokens_out(tm, _gather(tk, src), hidden_states),)

    return forward


def _stack_forward(tm, plan):
    """Metric methods with scope='block': plan on the stack input, every layer on K tokens, recover at the end."""

    def forward(hidden_states, encoder_hidden_states=None, **kwargs):
        t = _tokens_in(tm, hidden_states)
        H, W = hidden_states.shape[2:]
        reduce, restore = plan(t, H, W)
        tk = reduce(t)
        for blk in tm.transformer_blocks:
            tk = blk(tk, encoder_hidden_states=encoder_hidden_states)
        return (_tokens_out(tm, restore(tk), hidden_states),)

    return forward


def reference_unet(model, make_forward, skip=(), max_tokens=None):
    """Patch (in place) every Transformer2DModel of ``model`` except the module paths in ``skip``."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    for name, mod in model.named_modules():
        if isinstance(mod, Transformer2DModel) and name not in skip:
            mod.forward = make_forward(mod)
    return model


def fresh(config, seed=0):
    return models.unet(config, seed=seed)


# ----------------------------------------------------------------------------------------------- G-WPR
def _reference_power(q, k, scale, T):
    A = ((q @ k.transpose(-1, -2)) * scale).softmax(-1)  # (B, H, N, N)
    B, H, N, _ = A.shape
    s = torch.full((B, H, N), 1.0 / N)
    for _ in range(T):
        s = torch.einsum("bhi,bhij->bhj", s, A)
    mean_map = A.mean(1)
    sm = torch.full((B, N), 1.0 / N)
    for _ in range(T):
        sm = torch.einsum("bi,bij->bj", sm, mean_map)
    return sm, s.square().sum(1).sqrt()


@pytest.mark.parametrize("T", [1, 2, 7])
def test_gwpr_equals_power_iteration_on_the_materialized_map(T):
    g = torch.Generator().manual_seed(T)
    q, k = torch.randn(2, 3, 37, 8, generator=g), torch.randn(2, 3, 37, 8, generator=g)
    want_mean, want_eir = _reference_power(q, k, 0.35, T)
    for chunk in (5, 512):  # ragged last chunk and a single chunk
        torch.testing.assert_close(gwpr_scores(q, k, 0.35, T, "mean", chunk), want_mean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gwpr_scores(q, k, 0.35, T, "eir", chunk), want_eir, rtol=1e-5, atol=1e-7)
    assert torch.allclose(want_mean.sum(-1), torch.ones(2))  # row-stochastic: the scores stay a distribution


def test_query_subsampled_estimate_is_the_column_mean_over_those_queries():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 24, 4, generator=g), torch.randn(1, 2, 24, 4, generator=g)
    index = torch.tensor([0, 2, 4, 12, 14, 16])
    A = ((q @ k.transpose(-1, -2)) * 0.5).softmax(-1).mean(1)  # (1, N, N)
    torch.testing.assert_close(gwpr_scores(q, k, 0.5, 1, "mean", 4, index), A[:, index].mean(1))
    exact = gwpr_scores(q, k, 0.5, 1, "mean", 4)
    assert not torch.allclose(exact, A[:, index].mean(1))


def test_rank_counting_selection_equals_topk_and_copy_sources():
    g = torch.Generator().manual_seed(1)
    score = torch.randn(3, 50, generator=g)
    keep_topk, pruned_topk = select_kept(score, 31)
    keep_rank, pruned_rank = select_kept(score, 31, topk_max=4, chunk=7)  # forces the TopK-free path
    assert torch.equal(keep_topk.sort(1).values, keep_rank.sort(1).values)
    assert torch.equal(pruned_topk.sort(1).values, pruned_rank.sort(1).values)
    assert torch.equal(keep_rank, score.argsort(1, descending=True)[:, :31])
    q, k = torch.randn(3, 2, 50, 4, generator=g), torch.randn(3, 2, 50, 4, generator=g)
    logits = (q @ k.transpose(-1, -2)).mean(1)
    probs = ((q @ k.transpose(-1, -2)) * 0.5).softmax(-1).mean(1)
    for sim, table in (("logits", logits), ("probs", probs)):
        src = copy_sources(q, k, 0.5, keep_rank, pruned_rank, sim, chunk=6)
        want = torch.stack([table[b][pruned_rank[b]][:, keep_rank[b]].argmax(-1) for b in range(3)])
        assert torch.equal(src, want)


# ----------------------------------------------------------------------------------------------- whole UNets
@pytest.fixture(scope="module")
def sdxl():
    model = fresh(models.SDXL_TINY)
    args, kwargs = models.unet_inputs(model, 16)
    return model, args, kwargs


def test_ratio_zero_is_the_unpruned_unet(sdxl):
    model, args, kwargs = sdxl
    fast, cap = compile_with(model, method="atedm", ratio=0.0)
    assert torch.equal(fast(*args, **kwargs).sample, model(*args, **kwargs).sample)
    assert cap.report.count("pruned") == 0


def test_sdxl_style_equals_eager_reference_and_span_runs_on_k(sdxl):
    model, args, kwargs = sdxl
    fast, cap = compile_with(model, method="atedm", dsap_steps=0)
    out = fast(*args, **kwargs).sample
    ref_model = reference_unet(fresh(models.SDXL_TINY), lambda tm: _atedm_forward(tm, 0.63))
    ref = ref_model(*args, **kwargs).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert rel_err(out, model(*args, **kwargs).sample) > 1e-3  # pruning happened
    report = cap.report
    blocks = [s for s in report.sites if s.kind == "block"]
    assert len(blocks) == 7 and all(s.status == "pruned" for s in blocks)
    assert {(s.N, s.K) for s in blocks} == {(64, 64 - 40), (16, 16 - 10)}
    assert "layer 2 (self, cross, ff)" in blocks[0].reason
    # the span is visible in the graph: layer 2's attentions get K tokens; layer 1's fused SDPA still sees N
    gm = cap.graphs[0]
    rebuilt = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "graphprune_attention"]
    assert len(rebuilt) == 2 * 7  # self + cross of the second layer of each 2-layer stack
    assert {tuple(n.args[0].meta["example_value"].shape[:2]) for n in rebuilt} == {(2, 24), (2, 6)}
    sdpa = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "scaled_dot_product_attention"]
    assert len(sdpa) == 2 * 7 and all(n.args[0].meta["example_value"].shape[2] in (64, 16) for n in sdpa)
    plans = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "graphprune_atedm_plan"]
    assert len(plans) == 7
    restores = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "graphprune_atedm_restore"]
    assert all("proj_out" in next(iter(n.users)).meta["nn_module_stack"].__repr__() for n in restores)


def test_sd15_style_one_layer_span_is_cross_attention_and_ff():
    model = fresh(models.SD15_TINY)
    (sample, t, ctx), _ = models.unet_inputs(model, 16)
    fast, cap = compile_with(model, method="atedm", dsap_steps=0, ratio=0.5)
    out = fast(sample, t, ctx).sample
    ref = reference_unet(fresh(models.SD15_TINY), lambda tm: _atedm_forward(tm, 0.5))(sample, t, ctx).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    report = cap.report
    assert report.count("pruned", "block") == 7 and report.count("pruned", "cross") == 7
    assert report.count("pruned", "self") == 0  # the ranking self-attention runs on all N
    assert all("cross-attention and feed-forward" in s.reason for s in report.sites if s.kind == "block")


def test_no_graph_breaks_and_no_recompiles_over_timesteps(sdxl):
    model, args, kwargs = sdxl
    explanation = torch._dynamo.explain(model)(*args, **kwargs)
    assert explanation.graph_break_count == 0
    torch._dynamo.reset()
    fast, cap = compile_with(model, method="atedm", dsap_steps=0)
    torch._dynamo.utils.counters.clear()
    for t in torch.linspace(999, 0, 8).long():
        fast(args[0], t, args[2], **kwargs)
    assert len(cap.reports) == 1 and sum(torch._dynamo.utils.counters["recompiles"].values()) == 0


def test_dsap_switches_variant_at_the_right_step_without_recompiling(sdxl):
    model, args, kwargs = sdxl
    calls = []
    from graphprune.backend import graphprune_backend

    def backend(gm, ex):
        calls.append(graphprune_backend(gm, ex, options={"method": "atedm", "dsap_steps": 2, "compiler": "eager"}))
        return calls[-1]

    fast = torch.compile(model, backend=backend)
    paths = ["down_blocks.1.attentions.0", "down_blocks.2.attentions.0", "mid_block.attentions.0",
             "up_blocks.0.attentions.0", "up_blocks.0.attentions.1", "up_blocks.1.attentions.0",
             "up_blocks.1.attentions.1"]
    exempt = dsap_blocks(AtEdmConfig(), paths)
    assert exempt == {"down_blocks.1.attentions.0", "down_blocks.2.attentions.0", "up_blocks.0.attentions.1",
                      "up_blocks.1.attentions.1"}
    early = reference_unet(fresh(models.SDXL_TINY), lambda tm: _atedm_forward(tm, 0.63), skip=exempt)
    late = reference_unet(fresh(models.SDXL_TINY), lambda tm: _atedm_forward(tm, 0.63))
    torch._dynamo.utils.counters.clear()
    for generation in range(2):
        for i, t in enumerate(TIMESTEPS):
            out = fast(args[0], torch.tensor(t), args[2], **kwargs).sample
            ref = (early if i < 2 else late)(args[0], torch.tensor(t), args[2], **kwargs).sample
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    (rt,) = calls
    assert rt.kinds == ["early", "early", "late", "late", "late"] and rt.generation == 1
    assert sorted(k for k, _ in rt.variants) == ["early", "late"] and rt.cut is None
    assert sum(torch._dynamo.utils.counters["recompiles"].values()) == 0
    early_report = rt.variants[("early", 0.63)].report
    assert early_report.count("pruned", "block") == 3 and rt.variants[("late", 0.63)].report.count(
        "pruned", "block") == 7
    assert all("DSAP" in s.reason for s in early_report.sites if s.kind == "block" and s.status == "kept")


def test_dsap_blocks_of_the_sdxl_architecture():
    paths = [f"down_blocks.{i}.attentions.{j}" for i in (1, 2) for j in (0, 1)] + ["mid_block.attentions.0"] + [
        f"up_blocks.{i}.attentions.{j}" for i in (0, 1) for j in (0, 1, 2)]
    assert dsap_blocks(AtEdmConfig(), paths) == {"down_blocks.1.attentions.0", "down_blocks.2.attentions.0",
                                                 "up_blocks.0.attentions.2", "up_blocks.1.attentions.2"}
    assert dsap_blocks(AtEdmConfig(dsap_blocks=["mid_block.attentions.0"]), paths) == {"mid_block.attentions.0"}


def test_dagger_skips_the_finest_level(sdxl):
    model, args, kwargs = sdxl
    fast, cap = compile_with(model, method="atedm", dsap_steps=0, dagger=True)
    fast(*args, **kwargs)
    blocks = [s for s in cap.report.sites if s.kind == "block"]
    assert {s.N for s in blocks if s.status == "pruned"} == {16}
    assert all("dagger" in s.reason for s in blocks if s.N == 64)


@pytest.mark.parametrize("method", ["sito", "tome"])
def test_block_scope_for_metric_methods_equals_reference(sdxl, method):
    model, args, kwargs = sdxl
    if method == "sito":
        opts = dict(noise_alpha=0.0)

        def plan(t, H, W):
            prune, recover, _ = ref_sito(t, H, W, 0.5)
            return prune, recover
    else:
        opts = dict(use_rand=False)

        def plan(t, H, W):
            return ref_tome(t, H, W, 0.5)
    fast, cap = compile_with(model, method=method, ratio=0.5, scope="block", **opts)
    out = fast(*args, **kwargs).sample
    ref_model = fresh(models.SDXL_TINY)
    for name in ("down_blocks.1.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"):
        tm = ref_model.get_submodule(name)
        tm.forward = _stack_forward(tm, plan)
    torch.testing.assert_close(out, ref_model(*args, **kwargs).sample, rtol=1e-4, atol=1e-5)
    assert cap.report.count("pruned", "block") == 3 and cap.report.count("pruned", "self") == 6


@pytest.mark.parametrize("options,match", [
    ({"method": "atedm", "scope": "self"}, "scope must be 'block'"),
    ({"method": "atedm", "iterations": 0}, "iterations"),
    ({"method": "atedm", "iterations": 3, "query_subsample": 2}, "one-iteration"),
    ({"method": "atedm", "head_aggregation": "max"}, "eir"),
    ({"method": "atedm", "copy_similarity": "cos"}, "logits"),
    ({"method": "atedm", "dsap_phase": "middle"}, "dsap_phase"),
    ({"method": "atedm", "dsap_blocks": 3}, "dsap_blocks"),
    ({"method": "sito", "scope": "block+ff"}, "stands alone"),
])
def test_bad_options_name_the_fix(options, match):
    with pytest.raises(ValueError, match=match):
        parse_options(options)


def test_defaults_are_the_papers_headline_budget():
    cfg = parse_options({"method": "atedm"})
    assert (cfg.ratio, cfg.prune_layer, cfg.iterations, cfg.head_aggregation, cfg.scope) == (
        0.63, 1, 1, "mean", ("block",))
    assert cfg.step_aware and cfg.dsap_steps == 10 and not cfg.dagger
    assert (4096 - cfg.pruned_count(4096), 1024 - cfg.pruned_count(1024)) == (1516, 379)  # research sec. 2


def test_apply_on_a_pipeline_resets_dsap_per_generation():
    import graphprune
    from test_steps import tiny_pipeline

    pipe = tiny_pipeline()
    g = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)

    def generate():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=4, height=16,
                    width=16, generator=torch.Generator().manual_seed(1), output_type="latent").images

    baseline = generate()
    graphprune.apply(pipe, method="atedm", dsap_steps=2, compiler="eager")
    first, second = generate(), generate()
    assert torch.equal(first, second) and rel_err(first, baseline) > 1e-4
    (rt,) = graphprune.runtimes(pipe)
    assert rt.previous_kinds == ["early", "early", "late", "late"] and len(rt.variants) == 2
    graphprune.remove(pipe)
    assert torch.equal(generate(), baseline)

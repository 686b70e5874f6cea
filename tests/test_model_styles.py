"""The UNet code SD users run, style by style (models written in tests/models.py, no third-party code).

Each style is a small two-level U-Net (``models.StyleUNet``: an 8 x 8 level with two attention blocks, a 4 x 4 middle
block) whose attention is written the way one codebase writes it:

* ComfyUI: ``x.movedim(1, 3).flatten(1, 2)`` tokens, ``x += n`` residuals, SDPA (``attention_pytorch``) or
  ``attention_basic`` (unsqueeze/reshape/permute heads, fp32 einsum, softmax, einsum);
* CompVis ldm: einops ``rearrange``, ``einsum('b i d, b j d -> b i j')`` -> softmax -> einsum, conv proj_in/out;
* Stability sgm: einops heads, SDPA inside ``torch.backends.cuda.sdp_kernel(...)``;
* query-chunked attention (sub-quadratic without its memory query): baddbmm -> softmax -> bmm per chunk, cat;
* ADM / guided-diffusion: one fused qkv Conv1d on (B, C, H*W), heads split channel-first, legacy per-head [q|k|v]
  rows or the chunk-first order, einsum('bct,bcs->bts') with sqrt scales on q and k, Conv1d out;
* k-diffusion: fused qkv Conv2d, view/transpose/chunk heads, SDPA, Conv2d out;
* the ldm/VAE AttnBlock: separate q/k/v Conv2d, bmm(q, k), bmm(v, p^T).

Checked here: the proved sites (counts, heads, grids, forms) in Dynamo's and torch.export's graphs; ratio 0 is the
model, exactly; the pruned output equals an eager reference written below (tomesd's merge around each style's own
attention code); every registered method runs on every style (one graph, no recompile) or leaves it unchanged with
a reason; the styles that cannot be proved (ComfyUI's split buffer, sub-quad's memory query, attention Dynamo never
traces) are left unchanged with a reason that names the fix, and ``inspect`` lists their graph breaks.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import graphprune
import models
from graphprune.methods import SiteGeometry, parse_options, registered_methods
from graphprune.passes.match import CHUNKED_BUFFER, find_attention_sites
from graphprune.passes.ops import contraction
from helpers import compile_with, rel_err
from reference import ref_tome
from test_conformance import every_step, impl

pytestmark = pytest.mark.filterwarnings("ignore:.*sdp_kernel.*:FutureWarning")  # sgm's eager calls

#: style -> StyleUNet options; every one of them is proved and pruned
STYLES = {
    "comfy-sdpa": dict(attention="sdpa", layout="movedim", inplace=True),
    "comfy-basic": dict(attention="basic", layout="movedim", inplace=True),
    "ldm-einsum": dict(attention="einsum", layout="einops", use_linear=False),
    "sgm-sdp_kernel": dict(attention="sdp_kernel", layout="einops"),
    "query-chunks": dict(attention="query_chunks", layout="permute"),
    "adm-legacy": dict(conv="adm-legacy"),
    "adm": dict(conv="adm"),
    "kdiff": dict(conv="kdiff"),
    "vae": dict(conv="vae"),
}
CONV = {"adm-legacy", "adm", "kdiff", "vae"}
#: the proved form of each style's self-attention
FORMS = {"comfy-sdpa": "sdpa", "comfy-basic": "einsum-softmax", "ldm-einsum": "einsum-softmax",
         "sgm-sdp_kernel": "sdpa", "query-chunks": "matmul-softmax in 3 query chunks",
         "adm-legacy": "fused-qkv conv1x1 einsum-softmax", "adm": "fused-qkv conv1x1 einsum-softmax",
         "kdiff": "fused-qkv conv1x1 sdpa", "vae": "conv1x1 matmul-softmax"}
STEP_AWARE = {m for m in registered_methods() if parse_options({"method": m}).caches}


def build(style: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.StyleUNet(**STYLES[style]).eval()


def inputs(batch: int = 2, h: int = 8, w: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, h, w, generator=g), torch.tensor(500), torch.randn(batch, 5, 16, generator=g)


# ------------------------------------------------------------------------------------------ the eager reference

def ref_spatial_transformer(st: models.StyleSpatialTransformer, x, ctx, ratio: float):
    """StyleSpatialTransformer.forward with tomesd's merge (no_rand) of each layer's self-attention input, planned on
    the layer's input (its pre-norm residual stream); attn1 runs its own style's code on the merged tokens."""
    b, c, H, W = x.shape
    h = st.norm(x)
    if not st.use_linear:
        h = st.proj_in(h)
    tok = h.permute(0, 2, 3, 1).reshape(b, H * W, c)
    if st.use_linear:
        tok = st.proj_in(tok)
    for blk in st.transformer_blocks:
        n = blk.norm1(tok)
        if ratio:
            merge, unmerge = ref_tome(tok, H, W, ratio)
            tok = tok + unmerge(blk.attn1(merge(n)))
        else:
            tok = tok + blk.attn1(n)
        tok = tok + blk.attn2(blk.norm2(tok), ctx)
        tok = tok + blk.ff(blk.norm3(tok))
    if st.use_linear:
        tok = st.proj_out(tok)
    y = tok.reshape(b, H, W, c).permute(0, 3, 1, 2)
    if not st.use_linear:
        y = st.proj_out(y)
    return y + x


def ref_conv_attention(mod, x, ratio: float):
    """A 1x1-conv attention block with tomesd's merge of the normalized map's tokens (planned on the block input):
    the block's own ``attend`` runs on the K merged tokens laid out as a (B, C, K) or (B, C, 1, K) map."""
    b, c, H, W = x.shape
    flat = isinstance(mod, models.ADMAttentionBlock)
    norm = getattr(mod, "norm", None) or mod.norm_in
    h = norm(x.reshape(b, c, -1) if flat else x)
    if not ratio:
        return x + mod.attend(h).reshape(b, c, H, W)
    merge, unmerge = ref_tome(x.flatten(2).transpose(1, 2), H, W, ratio)
    m = merge(h.flatten(2).transpose(1, 2)).transpose(1, 2)  # (B, C, K)
    y = mod.attend(m if flat else m.unsqueeze(2)).flatten(2).transpose(1, 2)
    return x + unmerge(y).transpose(1, 2).reshape(b, c, H, W)


def ref_unet(model: models.StyleUNet, x, t, ctx, ratio: float):
    """StyleUNet.forward with the reference pruning on the finest level (the two 8 x 8 blocks; middle unchanged)."""
    import math

    half = model.ch // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float().reshape(-1, 1) * freqs
    emb = model.time_embed(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
    block = (lambda m, h, r: ref_conv_attention(m, h, r)) if model.conv_attention else \
        (lambda m, h, r: ref_spatial_transformer(m, h, ctx, r))
    h = model.input_blocks[0](x) + emb[:, :, None, None]
    skip = h = block(model.input_blocks[1], h, ratio)
    h = block(model.middle_block, model.input_blocks[2](h), 0.0)
    h = torch.nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
    h = model.output_blocks[0](torch.cat([h, skip], dim=1))
    return model.out(block(model.output_blocks[1], h, ratio))


def test_the_reference_is_the_model_at_ratio_zero():
    for style in STYLES:
        model, (x, t, ctx) = build(style), inputs()
        torch.testing.assert_close(ref_unet(model, x, t, ctx, 0.0), model(x, t, ctx), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ the matcher

def _graph(model, args, ir: str):
    if ir == "export":
        return torch.export.export(model, args).graph
    graphs = []
    torch.compile(model, backend=lambda gm, ex: graphs.append(gm) or gm.forward, fullgraph=True)(*args)
    return graphs[0].graph


@pytest.mark.parametrize("ir", ["dynamo", "export"])
@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_style_is_proved(style, ir):
    model, args = build(style), inputs()
    sites, unmatched = find_attention_sites(_graph(model, args, ir))
    assert not unmatched, [u.reason for u in unmatched]
    selfs = [s for s in sites if s.kind == "self"]
    assert [s.grid for s in selfs] == [(8, 8), (4, 4), (8, 8)]
    assert {s.form for s in selfs if s.N == 64} == {FORMS[style]}  # (the 4 x 4 middle is one chunk)
    assert all(s.metric_source == "pre-norm block input" and s.B == 2 for s in selfs)
    if style in CONV:
        assert len(sites) == 3 and all(s.channels_first for s in sites)
        assert {s.heads for s in selfs} == ({1} if style == "vae" else {4})
        if style == "adm-legacy":  # per head [q | k | v]: the q columns of head i are 24 i .. 24 i + 7
            assert selfs[0].q.rows[:9] == (0, 1, 2, 3, 4, 5, 6, 7, 24)
        assert selfs[0].scale == pytest.approx(selfs[0].head_dim ** -0.5)
    else:
        crosses = [s for s in sites if s.kind == "cross"]
        assert len(selfs) == len(crosses) == 3 and all(s.L == 5 for s in crosses)
        assert all(s.heads == 4 and s.head_dim == 8 and s.scale == pytest.approx(8 ** -0.5) for s in sites)
        assert [s.module_path for s in selfs][0] == "input_blocks.1.transformer_blocks.0.attn1"


# ------------------------------------------------------------------------------------------ numerics

@pytest.mark.parametrize("style, shape", [(s, (2, 8, 8)) for s in sorted(STYLES)] + [
    (s, (3, 6, 10)) for s in ("comfy-basic", "ldm-einsum", "query-chunks", "adm-legacy", "vae")])
def test_pruned_output_matches_the_reference(style, shape):
    model, (x, t, ctx) = build(style), inputs(*shape, seed=5)
    torch._dynamo.utils.counters.clear()
    fast, cap = compile_with(model, method="tome", ratio=0.5, use_rand=False)
    for step in (999, 1):
        fast(x, torch.tensor(step), ctx)
    out = fast(x, t, ctx)
    assert len(cap.reports) == 1 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert cap.report.count("pruned", "self") == 2
    N = shape[1] * shape[2]
    assert {s.K for s in cap.report.pruned} == {N - int(N * 0.5)}
    torch.testing.assert_close(out, ref_unet(model, x, t, ctx, 0.5), rtol=1e-5, atol=1e-5)
    names = {getattr(n.target, "__name__", "") for g in cap.graphs for n in g.graph.nodes}
    assert "graphprune_attention" in names and ("graphprune_tokens" in names) == (style in CONV)


@pytest.mark.parametrize("style", ["adm-legacy", "kdiff", "ldm-einsum"])
def test_exported_program_matches_the_reference(style):
    from graphprune.export import export_program

    model, (x, t, ctx) = build(style), inputs()
    ep = export_program(model, (x, t, ctx), method="tome", ratio=0.5, use_rand=False)
    torch.testing.assert_close(ep.module()(x, t, ctx), ref_unet(model, x, t, ctx, 0.5), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ every method

@pytest.fixture(scope="module")
def captured():
    """style -> (Dynamo's graph of the model, its example inputs, the position of the timestep among them, the
    model's outputs at timesteps 999 / 500 / 1): traced once per style, rewritten by every method."""
    cache: dict = {}

    def get(style: str):
        if style not in cache:
            model, (x, t, ctx) = build(style), inputs()
            grabbed = []
            torch.compile(model, backend=lambda gm, ex: grabbed.append((gm, ex)) or gm.forward,
                          fullgraph=True)(x, t, ctx)
            gm, ex = grabbed[0]
            at = next(i for i, e in enumerate(ex) if e is t)
            cache[style] = (gm, list(ex), at, {s: model(x, torch.tensor(s), ctx) for s in (999, 500, 1)})
        return cache[style]

    return get


def _run(fn, ex, at, step):
    args = list(ex)
    args[at] = torch.tensor(step)
    out = fn(*args)
    return out[0] if isinstance(out, (list, tuple)) else out


@pytest.mark.parametrize("method", sorted(registered_methods()))
@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_method_on_every_style(style, method, captured):
    """Every registered method through the backend on the style's graph: ratio 0 is the model exactly; at 0.5 it
    prunes the two 8 x 8 blocks with its budget (the same compiled callable at every timestep), or leaves the model
    unchanged with a reason (AT-EDM's stack form on conv blocks); step-aware methods say they need a diffusers
    U-Net's up path. (Dynamo itself, one graph and no recompile per style: the tests around this one.)"""
    from graphprune.backend import graphprune_backend
    from graphprune.passes.cut import copy_graph_module

    gm, ex, at, expected = captured(style)
    if method in STEP_AWARE:
        with pytest.raises(Exception, match="up_blocks"):
            graphprune_backend(copy_graph_module(gm), ex, options=every_step(method, 0.0))
        return
    reports: list = []
    fn = graphprune_backend(copy_graph_module(gm), ex, options=every_step(method, 0.0, compiler="eager"),
                            reports=reports)
    assert torch.equal(_run(fn, ex, at, 500), expected[500]) and reports[0].count("pruned") == 0
    reports = []
    fn = graphprune_backend(copy_graph_module(gm), ex, options=every_step(method, 0.5, compiler="eager"),
                            reports=reports)
    outs = {step: _run(fn, ex, at, step) for step in (999, 500, 1)}
    (report,) = reports
    region = parse_options(every_step(method, 0.5)).scope == ("block",)
    if region and style in CONV:  # no transformer stack: unchanged, and every row says why
        assert report.count("pruned") == 0 and all(torch.equal(outs[s], expected[s]) for s in outs)
        assert all(s.reason for s in report.sites)
        return
    kind = "block" if region else "self"
    assert report.count("pruned", kind) == 2
    cfg = parse_options({"method": method, **report.config["_data"]})
    geo = SiteGeometry(B=2, N=64, C=32, H=8, W=8)
    if impl(method).stateful:
        geo = SiteGeometry(B=2, N=64, C=32, H=8, W=8, bucket=impl(method).fixed_bucket(cfg, geo))
    assert {s.K for s in report.pruned if s.kind == kind} == {impl(method).budget(cfg, geo)}
    for step, out in outs.items():
        assert torch.isfinite(out).all() and 1e-4 < rel_err(out, expected[step]) < (1.0 if region else 0.6)


# ------------------------------------------------------------------------------------------ what is not proved

def test_split_attention_is_left_unchanged_with_the_setting_that_avoids_it():
    torch.manual_seed(0)
    model, (x, t, ctx) = models.StyleUNet(attention="split").eval(), inputs()
    fast, cap = compile_with(model, method="tome", ratio=0.5)
    assert torch.equal(fast(x, t, ctx), model(x, t, ctx))
    rows = cap.report.sites
    assert rows and all(s.status == "unmatched" for s in rows)
    assert all("preallocated buffer" in s.reason and "--use-pytorch-cross-attention" in s.reason for s in rows)
    assert CHUNKED_BUFFER.split("(")[0] in rows[0].reason and not any("0x" in s.reason for s in rows)


def test_memory_query_graph_break_is_reported_with_the_fix():
    """ComfyUI's CPU default (sub-quadratic attention sized by psutil): the projections and the attention land in
    different graphs; nothing is pruned, the output is the model's, and inspect names the break and the fix."""
    torch.manual_seed(0)
    model, (x, t, ctx) = models.StyleUNet(attention="sub_quad").eval(), inputs()
    fast = torch.compile(model, backend="graphprune", options={"method": "tome", "ratio": 0.5, "compiler": "eager"})
    assert torch.equal(fast(x, t, ctx), model(x, t, ctx))
    torch._dynamo.reset()
    report = graphprune.inspect(model, x, t, ctx, options={"method": "tome", "ratio": 0.5})
    assert report.count("pruned") == 0
    assert any("a graph break separates it from the attention" in s.reason for s in report.sites)
    assert not any("0x" in s.reason for s in report.sites) and "0x" not in str(report.coverage)
    cov = report.coverage
    assert cov.breaks and not cov.complete
    assert any("--use-pytorch-cross-attention" in b.hint and "attention_sub_quad" in b.where for b in cov.breaks)
    assert {u.cls for u in cov.uncovered} == {"StyleCrossAttention"}
    assert "graph break" in str(report) and "fix:" in str(report)


class EagerAttention(models.StyleCrossAttention):
    """Attention that Dynamo never traces (a disabled frame), e.g. a custom kernel behind torch._dynamo.disable."""

    @torch._dynamo.disable
    def forward(self, x, context=None):
        return super().forward(x, context)


def test_attention_that_never_reaches_a_graph_is_named():
    torch.manual_seed(0)
    model = models.StyleUNet(attention="sdpa").eval()
    for block in (model.input_blocks[1], model.middle_block, model.output_blocks[1]):
        old = block.transformer_blocks[0].attn1
        new = EagerAttention(32, 4)
        new.load_state_dict(old.state_dict())
        block.transformer_blocks[0].attn1 = new
    x, t, ctx = inputs()
    report = graphprune.inspect(model, x, t, ctx, options={"method": "tome", "ratio": 0.5})
    eager = {u.cls: u for u in report.coverage.uncovered if u.status == "eager"}
    assert set(eager) == {"EagerAttention"} and len(eager["EagerAttention"].paths) == 3
    assert "torch.compiler.disable" in eager["EagerAttention"].hint
    assert report.count("pruned", "self") == 0


def test_supported_styles_have_complete_coverage():
    for style in ("sgm-sdp_kernel", "adm-legacy"):
        torch._dynamo.reset()
        model, (x, t, ctx) = build(style), inputs()
        report = graphprune.inspect(model, x, t, ctx, options={"method": "tome", "ratio": 0.5})
        assert report.coverage.complete, str(report.coverage)
        assert report.count("pruned", "self") == 2 and "coverage" not in str(report)
    torch._dynamo.reset()
    unet = models.unet(models.SD15_TINY)  # diffusers: the Attention modules, not the CrossAttn*Block2D around them
    args, kwargs = models.unet_inputs(unet, 16)
    report = graphprune.inspect(unet, *args, options={"method": "tome", "ratio": 0.5}, **kwargs)
    assert report.coverage.complete and report.coverage.attention_modules == 14


# ------------------------------------------------------------------------------------------ sgm's sdp_kernel

def test_sdp_kernel_stand_in_changes_only_tracing():
    from graphprune import standins
    from torch.backends.cuda import sdp_kernel

    assert standins.STATUS["torch.backends.cuda.sdp_kernel"] == "registered"
    with warnings.catch_warnings(record=True) as caught:  # eager: the original, deprecated context manager
        warnings.simplefilter("always")
        with sdp_kernel(enable_math=True, enable_flash=False):
            pass
    assert any("sdp_kernel" in str(w.message) for w in caught)
    model, args = build("sgm-sdp_kernel"), inputs()
    explained = torch._dynamo.explain(model)(*args)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    fast = torch.compile(model, backend="graphprune", options={"method": "tome", "ratio": 0.5, "compiler": "eager"},
                         fullgraph=True)
    assert not torch.equal(fast(*args), model(*args))  # pruned: the attention is in the graph


def test_no_graph_breaks_and_no_recompiles_in_the_supported_styles():
    for style in ("comfy-sdpa", "ldm-einsum", "query-chunks", "adm", "vae"):
        torch._dynamo.reset()
        model, (x, t, ctx) = build(style), inputs()
        explained = torch._dynamo.explain(model)(x, t, ctx)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, style


# ------------------------------------------------------------------------------------------ proofs, not guesses

class _Attend(torch.nn.Module):
    """One self-attention on a 4 x 4 grid with the score and value products given as einsum equations."""

    def __init__(self, scores: str, values: str, swap: bool = False, heads: int = 2):
        super().__init__()
        self.scores, self.values, self.swap, self.heads = scores, values, swap, heads
        self.norm = torch.nn.LayerNorm(16)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16) for _ in range(4))

    def forward(self, img):
        B = img.shape[0]
        x = img.movedim(1, 3).flatten(1, 2)
        n = self.norm(x)
        split = lambda t: t.view(B, -1, self.heads, 8).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(n)), split(self.k(n)), split(self.v(n))
        s = torch.einsum(self.scores, k, q) if self.swap else torch.einsum(self.scores, q, k)
        o = torch.einsum(self.values, (s * 8 ** -0.5).softmax(dim=-1), v)
        return x + self.o(o.transpose(1, 2).reshape(B, -1, 16))


@pytest.mark.parametrize("scores, values, swap, proved", [
    ("bhid,bhjd->bhij", "bhij,bhjd->bhid", False, True),
    ("...id,...jd->...ij", "...ij,...jd->...id", False, True),
    ("bhjd,bhid->bhij", "bhij,bhjd->bhid", True, True),   # k first: the operand with i is the query
    ("bhid,bhjd->bhji", "bhji,bhjd->bhid", False, False),  # softmax over the queries: not attention
    ("bhid,bhjd->bhij", "bhij,bhid->bhjd", False, False),  # contracts the queries with the values
])
def test_einsum_forms_are_read_from_the_equation(scores, values, swap, proved):
    torch.manual_seed(0)
    block = _Attend(scores, values, swap).eval()
    img = torch.randn(2, 16, 4, 4)
    fast, cap = compile_with(block, method="tome", ratio=0.5, use_rand=False)
    out = fast(img)
    (row,) = cap.report.sites
    if not proved:
        assert row.status == "unmatched" and "einsum" in row.reason and "0x" not in row.reason
        assert torch.equal(out, block(img))
        return
    assert row.status == "pruned" and row.form == "einsum-softmax"
    x = img.movedim(1, 3).flatten(1, 2)
    merge, unmerge = ref_tome(x, 4, 4, 0.5)
    n = merge(block.norm(x))
    h = lambda t: t.view(2, -1, 2, 8).transpose(1, 2)  # noqa: E731
    a = torch.softmax(h(block.q(n)) @ h(block.k(n)).transpose(-1, -2) * 8 ** -0.5, -1) @ h(block.v(n))
    torch.testing.assert_close(out, x + unmerge(block.o(a.transpose(1, 2).reshape(2, -1, 16))), rtol=1e-5, atol=1e-5)


class _ChunkOrder(torch.nn.Module):
    """Query-chunked attention whose chunks are joined in a given order ((0, 1) is attention, (1, 0) is not)."""

    def __init__(self, order):
        super().__init__()
        self.order = order
        self.attn = models.StyleCrossAttention(16, 2, attention="sdpa")

    def forward(self, img):
        x = img.flatten(2).transpose(1, 2)
        a = self.attn
        q, k, v = (t.view(2, -1, 2, 8).transpose(1, 2) for t in (a.to_q(x), a.to_k(x), a.to_v(x)))
        parts = [torch.nn.functional.scaled_dot_product_attention(q[:, :, i:i + 8], k, v) for i in (0, 8)]
        o = torch.cat([parts[i] for i in self.order], dim=2)
        return x + a.to_out(o.transpose(1, 2).reshape(2, -1, 16))


def test_query_chunks_must_rebuild_the_whole_query():
    img = torch.randn(2, 16, 4, 4)
    for order, proved in (((0, 1), True), ((1, 0), False)):
        torch._dynamo.reset()
        torch.manual_seed(0)
        block = _ChunkOrder(order).eval()
        fast, cap = compile_with(block, method="sito", ratio=0.5)
        out = fast(img)
        (row,) = cap.report.sites
        if proved:
            assert row.status == "pruned" and row.form == "sdpa in 2 query chunks"
        else:
            assert row.status == "unmatched" and "do not concatenate back to the whole query" in row.reason
            assert torch.equal(out, block(img))


class _WideConv(torch.nn.Module):
    """A 3x3 conv in the place of q/k/v: attention, but not a per-token projection."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.GroupNorm(4, 16)
        self.qkv = torch.nn.Conv2d(16, 48, 3, padding=1)
        self.out = torch.nn.Conv2d(16, 16, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, 3, c, h * w).transpose(2, 3).unbind(1)
        y = torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.out(y.transpose(1, 2).reshape(b, c, h, w))


def test_wide_conv_is_not_a_projection():
    block = _WideConv().eval()
    img = torch.randn(2, 16, 4, 4)
    fast, cap = compile_with(block, method="tome", ratio=0.5)
    assert torch.equal(fast(img), block(img))
    (row,) = cap.report.sites
    assert row.status == "unmatched" and "kernel (3, 3)" in row.reason


@pytest.mark.parametrize("equation, ranks, expected", [
    ("b i d, b j d -> b i j", (3, 3), (["bid", "bjd"], "bij")),
    ("...id,...jd->...ij", (4, 4), (["ABid", "ABjd"], "ABij")),
    ("bct,bcs->bts", (3, 3), (["bct", "bcs"], "bts")),
    ("ij,jk", (2, 2), (["ij", "jk"], "ik")),  # implicit output
])
def test_contraction_letters(equation, ranks, expected):
    g = torch.fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    for node, rank in zip((a, b), ranks):
        node.meta["val"] = torch.empty((2,) * rank)
    node = g.call_function(torch.einsum, (equation, a, b))
    node.meta["val"] = torch.empty((2,) * len(expected[1]))
    assert contraction(node) == ([a, b], *expected)


@pytest.mark.slow
def test_inductor_compiles_a_conv_site():
    """ADM's legacy fused qkv conv: the rebuilt attention (a 1x1 kernel as a linear, its q/k/v rows picked by a
    constant index) through Inductor equals the eager rewrite."""
    model, (x, t, ctx) = build("adm-legacy"), inputs()
    eager, _ = compile_with(model, method="sito", ratio=0.5, seed=3)
    expected = eager(x, t, ctx)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="graphprune", options={"method": "sito", "ratio": 0.5, "seed": 3})
    torch.testing.assert_close(fast(x, t, ctx), expected, rtol=1e-4, atol=1e-4)


def test_backend_name_alone_registers_the_stand_in():
    """A user who never imports graphprune: choosing the backend by name must be enough for sgm's attention."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, torch, warnings; warnings.simplefilter('ignore'); import models; "
            "assert 'graphprune' not in sys.modules; torch.manual_seed(0); "
            "m = models.StyleUNet(attention='sdp_kernel', layout='einops').eval(); "
            "fast = torch.compile(m, backend='graphprune', fullgraph=True, "
            "options={'method': 'tome', 'ratio': 0.5, 'compiler': 'eager'}); "
            "x, t, c = torch.randn(2, 4, 8, 8), torch.tensor(500), torch.randn(2, 5, 16); "
            "print('pruned' if not torch.equal(fast(x, t, c), m(x, t, c)) else 'unchanged')")
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("pruned")

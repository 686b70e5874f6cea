"""Plan-level numerics: graphprune's static-shape methods against the official-style references."""

import pytest
import torch

from graphprune.methods import SiToConfig, ToMeConfig
from graphprune.methods import SiteGeometry
from graphprune.methods.sito import SiTo
from graphprune.methods.tokens import best_match, cell_split, complement, top_and_rest
from graphprune.methods.tome import ToMe
from reference import ref_sito, ref_tome


def smooth_tokens(B, H, W, C, seed=0):
    """Spatially smooth features (like latents): many near-duplicate tokens."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, C, H // 4 + 1, W // 4 + 1, generator=g)
    x = torch.nn.functional.interpolate(base, size=(H, W), mode="bilinear", align_corners=False)
    x = x + 0.05 * torch.randn(B, C, H, W, generator=g)
    return x.permute(0, 2, 3, 1).reshape(B, H * W, C).double()


@pytest.mark.parametrize("H, W", [(8, 8), (7, 9), (16, 12)])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_tome_equals_tomesd_reference(H, W, ratio):
    B, C = 2, 16
    metric, x = smooth_tokens(B, H, W, C, 1), smooth_tokens(B, H, W, C, 2)
    cfg, geo = ToMeConfig(ratio=ratio, use_rand=False), SiteGeometry(B, H * W, C, H, W)
    m = ToMe()
    plan = m.plan(cfg, geo, metric)
    reduced = m.reduce(cfg, plan, x)
    assert reduced.shape == (B, m.budget(cfg, geo), C)
    merge, unmerge = ref_tome(metric, H, W, ratio)
    f = lambda t: torch.tanh(t) * 2 + 1  # any per-token function: the result is independent of token order
    torch.testing.assert_close(m.restore(cfg, plan, f(reduced)), unmerge(f(merge(x))), rtol=1e-12, atol=1e-12)
    # merged means: the sum over the merged sequence equals the reference's (order-free)
    torch.testing.assert_close(reduced.sum(1), merge(x).sum(1))


@pytest.mark.parametrize("H, W", [(8, 8), (6, 10), (9, 7)])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("recover", ["kept", "base"])
def test_sito_equals_official_reference(H, W, ratio, recover):
    B, C = 2, 16
    metric, x = smooth_tokens(B, H, W, C, 3), smooth_tokens(B, H, W, C, 4)
    noise = torch.randn(B, H * W, generator=torch.Generator().manual_seed(5)).double()
    cfg, geo = SiToConfig(ratio=ratio, recover=recover, noise_alpha=0.1), SiteGeometry(B, H * W, C, H, W)
    m = SiTo()
    keep, slot = m.plan(cfg, geo, metric, noise)
    prune, recover_fn, kept_ref = ref_sito(metric, H, W, ratio, noise=noise, alpha=0.1, recover=recover)
    assert keep.shape == (B, H * W - int(H * W * ratio))
    for b in range(B):  # same kept set per batch element
        assert set(keep[b].tolist()) == set(kept_ref[b].tolist())
    f = lambda t: t * 3 - 1
    torch.testing.assert_close(m.restore(cfg, (keep, slot), f(m.reduce(cfg, (keep, slot), x))),
                               recover_fn(f(prune(x))), rtol=0, atol=0)


def test_sito_noise_changes_the_plan_and_batch_elements_are_independent():
    H = W = 8
    metric = smooth_tokens(2, H, W, 8, 6)
    cfg, geo = SiToConfig(ratio=0.5, noise_alpha=1.0), SiteGeometry(2, 64, 8, H, W)  # noise that matters
    g = torch.Generator().manual_seed(0)  # seeded: the global RNG state depends on which tests ran before
    n1, n2 = torch.randn(2, 64, dtype=torch.float64, generator=g), torch.randn(2, 64, dtype=torch.float64, generator=g)
    k1, _ = SiTo().plan(cfg, geo, metric, n1)
    k2, _ = SiTo().plan(cfg, geo, metric, n2)
    assert not torch.equal(k1.sort(1).values, k2.sort(1).values)
    # element 0's plan does not depend on element 1's tokens
    other = metric.clone()
    other[1] = smooth_tokens(1, H, W, 8, 7)[0]
    k3, _ = SiTo().plan(cfg, geo, other, n1)
    assert torch.equal(k1[0], k3[0])


def test_cell_split_partitions_the_grid():
    H, W, sx, sy = 7, 9, 2, 2
    loc = torch.randint(0, 4, (3, (H // sy) * (W // sx)))
    chosen, others = cell_split(loc, H, W, sx, sy)
    for b in range(3):
        allidx = torch.cat([chosen[b], others[b]]).sort().values
        assert torch.equal(allidx, torch.arange(H * W))
        ys, xs = chosen[b] // W, chosen[b] % W
        cells = (ys // sy) * (W // sx) + xs // sx
        assert torch.equal(cells, torch.arange(chosen.shape[1]))  # one chosen token per cell, in cell order


@pytest.mark.parametrize("k", [0, 3, 10, 17, 20])
def test_top_and_rest(k):
    s = torch.randn(2, 20)
    top, rest = top_and_rest(s, k)
    assert top.shape == (2, k) and rest.shape == (2, 20 - k)
    for b in range(2):
        assert set(top[b].tolist()) == set(s[b].argsort(descending=True)[:k].tolist())
        assert sorted(top[b].tolist() + rest[b].tolist()) == list(range(20))
    assert torch.equal(complement(top, 20), rest.sort(1).values)


def _best_match_reference(a, b):
    """Loops: for every (batch, source) row the largest score a[s] . b[p] and the first p reaching it."""
    B, S, _ = a.shape
    val, idx = torch.empty(B, S, dtype=a.dtype), torch.empty(B, S, dtype=torch.int64)
    for i in range(B):
        for s in range(S):
            scores = [float((a[i, s] * b[i, p]).sum()) for p in range(b.shape[1])]
            val[i, s] = max(scores)
            idx[i, s] = scores.index(max(scores))
    return val, idx


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_best_match_equals_the_full_score_reference_with_ties(compiler):
    # small integers: every score is exact, and many rows tie (repeated destinations, zero rows)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-2, 3, (2, 13, 4), generator=g).float()
    b = torch.randint(-1, 2, (2, 6, 4), generator=g).float()
    b[:, 3] = b[:, 1]  # a tie for every source whose best is destination 1: the first index (1) wins
    a[0, 5] = 0  # all scores 0: index 0
    ref_val, ref_idx = _best_match_reference(a, b)
    assert (ref_idx == 3).sum() == 0 and (ref_idx == 1).any()
    val, idx = best_match(a, b, compiler)  # "inductor" on CPU: the graphprune::best_match custom op
    assert torch.equal(val, ref_val) and torch.equal(idx, ref_idx)


def test_best_match_under_inductor_runs_the_custom_op_with_the_same_result():
    from torch.profiler import profile

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 40, 8, generator=g), torch.randn(2, 10, 8, generator=g)
    ref_val, ref_idx = _best_match_reference(a, b)
    fn = torch.compile(lambda a, b: best_match(a / a.norm(dim=-1, keepdim=True), b, "inductor"), backend="inductor")
    with profile() as prof:
        val, idx = fn(a, b)
    assert "graphprune::best_match" in {e.key for e in prof.key_averages()}  # opaque to Inductor: aten kernels
    ref_val, ref_idx = _best_match_reference(a / a.norm(dim=-1, keepdim=True), b)
    torch.testing.assert_close(val, ref_val, rtol=1e-6, atol=1e-6)
    assert torch.equal(idx, ref_idx)
    # elsewhere it is the plain expression (what export sees): no custom op in the traced graph
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda a, b: best_match(a, b, "eager"))(a, b)
    assert not any("best_match" in str(n.target) for n in gm.graph.nodes)


"""G-WPR scores and the copy source of pruned tokens, computed beside fused attention (AT-EDM's side computation).

The attention output itself stays on SDPA (fused kernels never expose probabilities). What AT-EDM needs from the
probabilities is computed here, from the same q and k, without ever holding a (B, H, N, N) tensor
(research/atedm.md section 7):

* **G-WPR** (section 3): s^(0) = 1/N, s^(t+1) = A^T s^(t) over the row-stochastic self-attention map A (no damping).
  T = 1 is the mean attention each key receives. ``iterations == 1``: query-chunked column sums of the softmax
  (memory B*H*chunk*N per chunk). ``iterations > 1``: the head-mean map (B, N, N) materialized chunk by chunk (a
  map per head, one head at a time, for ``aggregation="eir"``), then T mat-vecs.
* **Heads**: ``"mean"`` = one G-WPR on the head-mean map (1/H) sum_h A_h; ``"eir"`` = G-WPR per head, combined as
  sqrt(sum_h s_h^2) (Zero-TPrune's "emphasizing informative region").
* **Estimate**: ``query_index`` restricts the T = 1 column mean to a subset of m queries (cost x m/N).
* **Copy source** (section 4): for each pruned token, the kept token with the largest head-mean logit q_i.k_j
  (= the argmax of its attention row per head for one head; the head mean of logits is (scale/H) q_i.k_j over the
  concatenated heads, one (R, K) matmul) or the largest head-mean probability.

All math in float32. Static shapes only: chunk boundaries are Python ints fixed at trace time.
"""

from __future__ import annotations

import torch

from .tokens import gather_tokens, top_and_rest


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """x: (B, N, h*d) -> (B, h, N, d)."""
    B, N, F = x.shape
    return x.view(B, N, heads, F // heads).transpose(1, 2)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(c, min(c + size, n)) for c in range(0, n, size)]


def column_sums(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head weighted column sums of softmax(q k^T * scale) without the full map.

    q: (B, H, M, d) queries (M may be a subset), k: (B, H, N, d), weights: (B, M) or None (all 1)
    -> (B, H, N) float32: out[b, h, j] = sum_i w_i softmax_j(q_i . k_j * scale).
    """
    q, k = q.float(), k.float()
    kt = k.transpose(-1, -2)
    acc = None
    for a, b in _chunks(q.shape[2], chunk):
        p = torch.softmax((q[:, :, a:b] @ kt) * scale, dim=-1)  # (B, H, c, N)
        if weights is not None:
            p = p * weights[:, None, a:b, None].float()
        part = p.sum(dim=2)
        acc = part if acc is None else acc + part
    return acc


def attention_map(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int) -> torch.Tensor:
    """The head-mean attention map (1/H) sum_h softmax(q_h k_h^T * scale), built chunk of rows by chunk of rows.

    q, k: (B, H, N, d) -> (B, N, N) float32 (rows: queries, sum to 1). Peak extra memory: B*H*chunk*N.
    """
    q, k = q.float(), k.float()
    kt = k.transpose(-1, -2)
    rows = [torch.softmax((q[:, :, a:b] @ kt) * scale, dim=-1).mean(dim=1) for a, b in _chunks(q.shape[2], chunk)]
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)


def power_iteration(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """a: (B, N, N) row-stochastic -> s^(T): (B, N), s^(0) = 1/N, s^(t+1) = a^T s^(t)."""
    B, N, _ = a.shape
    s = torch.full((B, 1, N), 1.0 / N, dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        s = s @ a
    return s.squeeze(1)


def gwpr_scores(q: torch.Tensor, k: torch.Tensor, scale: float, iterations: int = 1, aggregation: str = "mean",
                chunk: int = 512, query_index: torch.Tensor | None = None) -> torch.Tensor:
    """G-WPR importance of every token.

    q, k: (B, H, N, d) the ranking self-attention's queries and keys; query_index: (M,) int64 queries the T = 1
    estimate averages over (None: all N, exact). Returns (B, N) float32 (for ``"mean"`` it sums to 1).
    """
    B, H, N, _ = q.shape
    if iterations == 1:
        qs = q if query_index is None else q.index_select(2, query_index)
        per_head = column_sums(qs, k, scale, chunk) / qs.shape[2]  # (B, H, N): s_h after one iteration
        return per_head.mean(dim=1) if aggregation == "mean" else per_head.square().sum(dim=1).sqrt()
    if query_index is not None:
        raise ValueError("a query-subsampled estimate is defined for one iteration only")
    if aggregation == "mean":
        return power_iteration(attention_map(q, k, scale, chunk), iterations)
    total = None
    for h in range(H):  # one (B, N, N) map at a time
        s = power_iteration(attention_map(q[:, h:h + 1], k[:, h:h + 1], scale, chunk), iterations)
        total = s.square() if total is None else total + s.square()
    return total.sqrt()


def select_kept(score: torch.Tensor, K: int, topk_max: int = 3840, chunk: int = 1024
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """score: (B, N) -> (keep (B, K): the K highest scores, pruned (B, N - K): the others).

    TopK on the smaller side (k <= N/2) while that is at most ``topk_max`` (TensorRT's cap); otherwise ranks by
    chunked comparison counting (rank_i = #{j: s_j > s_i} + #{j < i: s_j = s_i}, distinct and static), and both
    sets come out by scatter (keep in descending score order).
    """
    B, N = score.shape
    if min(K, N - K) <= topk_max:
        return top_and_rest(score, K)
    idx = torch.arange(N, device=score.device)
    ranks = []
    for a, b in _chunks(N, chunk):
        si = score[:, a:b, None]  # (B, c, 1)
        sj = score[:, None, :]  # (B, 1, N)
        before = (sj > si) | ((sj == si) & (idx[None, None, :] < idx[a:b, None][None]))
        ranks.append(before.sum(dim=-1))
    rank = torch.cat(ranks, dim=1)  # (B, N) a permutation of 0..N-1
    src = idx.expand(B, N)
    keep = torch.zeros(B, K + 1, dtype=torch.int64, device=score.device).scatter(
        1, torch.where(rank < K, rank, torch.full_like(rank, K)), src)[:, :K]
    pruned = torch.zeros(B, N - K + 1, dtype=torch.int64, device=score.device).scatter(
        1, torch.where(rank >= K, rank - K, torch.full_like(rank, N - K)), src)[:, : N - K]
    return keep, pruned


def _halves_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) with B even -> both halves replaced by their mean (CFG-shared plans)."""
    h = x.shape[0] // 2
    m = 0.5 * (x[:h] + x[h:])
    return torch.cat([m, m], dim=0)


def copy_sources(q: torch.Tensor, k: torch.Tensor, scale: float, keep: torch.Tensor, pruned: torch.Tensor,
                 similarity: str = "logits", chunk: int = 512, share_halves: bool = False) -> torch.Tensor:
    """Kept slot each pruned token copies: argmax over kept j of its ranking-map row (first index on ties).

    q, k: (B, H, N, d); keep: (B, K), pruned: (B, R) token indices -> (B, R) int64 in [0, K).
    ``"logits"``: head-mean q_i.k_j (one (B, chunk, K) block per chunk); ``"probs"``: head-mean softmax over all N
    keys, restricted to the kept columns. ``share_halves``: similarities averaged over the two batch halves.
    """
    B, H, N, d = q.shape
    out = []
    if similarity == "logits":
        qf = q.transpose(1, 2).reshape(B, N, H * d).float()
        kf = gather_tokens(k.transpose(1, 2).reshape(B, N, H * d).float(), keep)  # (B, K, H*d)
        qp = gather_tokens(qf, pruned)  # (B, R, H*d)
        for a, b in _chunks(qp.shape[1], chunk):
            sim = qp[:, a:b] @ kf.transpose(1, 2)  # (B, c, K) = H/scale * head-mean logits
            out.append((_halves_mean(sim) if share_halves else sim).argmax(dim=-1))
    else:
        kt = k.float().transpose(-1, -2)
        R = pruned.shape[1]
        for a, b in _chunks(R, chunk):
            idx = pruned[:, None, a:b, None].expand(B, H, b - a, d)
            qc = q.float().gather(2, idx)  # (B, H, c, d)
            p = torch.softmax((qc @ kt) * scale, dim=-1).mean(dim=1)  # (B, c, N)
            p = p.gather(2, keep[:, None, :].expand(B, b - a, keep.shape[1]))  # (B, c, K)
            out.append((_halves_mean(p) if share_halves else p).argmax(dim=-1))
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


__all__ = ["split_heads", "column_sums", "attention_map", "power_iteration", "gwpr_scores", "select_kept",
           "copy_sources"]

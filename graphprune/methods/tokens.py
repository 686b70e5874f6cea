"""Static-shape token helpers shared by the methods: grid cells, top-k splits, batched gathers.

Every helper keeps shapes as trace-time Python ints: no NonZero, no ``.item()``, no sort over more elements than
needed (TopK runs on the smaller side of a split, so k <= n / 2).
"""

from __future__ import annotations

import torch


def cell_split(loc: torch.Tensor, H: int, W: int, sx: int, sy: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an H x W row-major token grid into one chosen token per sy x sx cell and the rest.

    loc: (B, P) int64 in [0, sx*sy), the chosen in-cell position (dy * sx + dx) of each of the
    P = (H // sy) * (W // sx) cells (B may be 1 to share the split across a batch).
    Returns ``chosen: (B, P)`` and ``others: (B, N - P)`` token indices. Leftover rows/columns that do not fill a
    cell are always in ``others`` (as in tomesd and SiTo).
    """
    device = loc.device
    hp, wp, cell = H // sy, W // sx, sx * sy
    cy = torch.arange(hp, device=device).repeat_interleave(wp)
    cx = torch.arange(wp, device=device).repeat(hp)
    origin = cy * (sy * W) + cx * sx  # (P,) top-left token of each cell
    t = torch.arange(cell, device=device)
    offset = (t // sx) * W + t % sx  # (cell,) token offset of each in-cell position
    chosen = origin + offset[loc]  # (B, P)
    rest_pos = (loc[..., None] + 1 + torch.arange(cell - 1, device=device)) % cell  # (B, P, cell - 1)
    others = (origin[:, None] + offset[rest_pos]).flatten(1)  # (B, P * (cell - 1))
    leftover = [y * W + x for y in range(H) for x in range(W) if y >= hp * sy or x >= wp * sx]
    if leftover:  # a trace-time constant: which tokens fall outside every cell
        left_idx = torch.tensor(leftover, dtype=torch.int64, device=device)
        others = torch.cat([others, left_idx.expand(others.shape[0], len(leftover))], dim=1)
    return chosen, others


def cell_argmax(score: torch.Tensor, H: int, W: int, sx: int, sy: int) -> torch.Tensor:
    """score: (B, N) over a row-major H x W grid -> (B, P) in-cell position (dy * sx + dx) of each sy x sx cell's
    maximum (first index on ties); leftover rows/columns outside every cell are ignored."""
    B = score.shape[0]
    hp, wp = H // sy, W // sx
    cells = score.view(B, H, W)[:, : hp * sy, : wp * sx].reshape(B, hp, sy, wp, sx)
    return cells.permute(0, 1, 3, 2, 4).reshape(B, hp * wp, sy * sx).argmax(dim=-1)


def complement(idx: torch.Tensor, n: int) -> torch.Tensor:
    """idx: (B, k) distinct indices in [0, n) -> (B, n - k) the others, ascending. Static count, no NonZero."""
    B, k = idx.shape
    mask = torch.ones(B, n, dtype=torch.int64, device=idx.device).scatter(1, idx, 0)
    pos = torch.cumsum(mask, dim=1) - 1
    dest = torch.where(mask > 0, pos, torch.full_like(pos, n - k))  # dropped entries go to a dummy slot
    src = torch.arange(n, device=idx.device).expand(B, n)
    out = torch.zeros(B, n - k + 1, dtype=torch.int64, device=idx.device).scatter(1, dest, src)
    return out[:, : n - k]


def top_and_rest(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores: (B, n) -> (indices of the k largest (B, k), indices of the other n - k (B, n - k)).

    TopK runs on the smaller side, so its k is at most n / 2 (TensorRT caps TopK at 3840).
    """
    n = scores.shape[1]
    if k <= n - k:
        top = torch.topk(scores, k, dim=1, largest=True, sorted=False).indices
        return top, complement(top, n)
    rest = torch.topk(scores, n - k, dim=1, largest=False, sorted=False).indices
    return complement(rest, n), rest


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: (B, N, C), idx: (B', M) with B' in {1, B} -> (B, M, C)."""
    B, _, C = x.shape
    return x.gather(1, idx.expand(B, -1)[..., None].expand(-1, -1, C))


def scatter_slots(idx: torch.Tensor, slots: torch.Tensor, n: int) -> torch.Tensor:
    """Build a source map (B, n): ``out[b, idx[b, i]] = slots[b, i]``; idx must cover all n positions once."""
    return torch.empty(idx.shape[0], n, dtype=torch.int64, device=idx.device).scatter(1, idx, slots)


@torch.library.custom_op("graphprune::best_match", mutates_args=())
def _best_match_op(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a: (B, S, C), b: (B, P, C) -> ``(a @ b^T).max(dim=-1)`` as aten kernels, opaque to Inductor."""
    return (a @ b.transpose(1, 2)).max(dim=-1)


@_best_match_op.register_fake
def _best_match_fake(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return a.new_empty(a.shape[:2]), a.new_empty(a.shape[:2], dtype=torch.int64)


def best_match(a: torch.Tensor, b: torch.Tensor, compiler: str = "eager") -> tuple[torch.Tensor, torch.Tensor]:
    """a: (B, S, C), b: (B, P, C) -> (best score (B, S), its index in [0, P) (B, S)): the max over P of the
    (B, S, P) scores ``a @ b^T``, first index on ties.

    Under Inductor on CPU the matmul and the max run as one custom op (``graphprune::best_match``) of the same aten
    kernels: Inductor's own lowering of ``max(dim=-1)`` over the score tensor is about 2x slower than aten's on
    CPU (measured at SD1.5's (2, 3072, 1024) scores; benchmarks/README.md, "profile"). The results are the same
    either way (same kernels as eager; max is exact). Elsewhere (eager, export, other compilers, CUDA) it is the
    plain expression, so exported graphs hold only standard ops.
    """
    if compiler == "inductor" and a.device.type == "cpu":
        return _best_match_op(a, b)
    return (a @ b.transpose(1, 2)).max(dim=-1)


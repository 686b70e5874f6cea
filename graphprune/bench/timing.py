"""The one paired timer every benchmark uses.

    timer = PairedTimer(Protocol(runs=5), baseline_call, desc="inductor (unpruned)")   # the baseline, timed alone
    res = timer.time(variant_call, desc="sito r=0.5")     # every timed call paired with a baseline call
    res["speedup"]                                        # median of the per-pair ratios baseline / variant

A *call* is ``call(i)``: the i-th call a variant makes (0 = the first, compiling call); the benchmark decides what
one call is (one UNet call at the i-th of a list of distinct timesteps: :func:`~graphprune.bench.calls.timestep_calls`;
one whole generation; one onnxruntime session run). The baseline is called with the same i.

Protocol (:class:`~graphprune.bench.options.Protocol`): the first call timed alone (compile + one run), ``warmup``
calls, then ``runs`` timed pairs; pair k runs the baseline first when k is even and second when k is odd, so a
drift of the machine's speed hits both sides alike. On a shared machine the load changes over minutes (an unpruned
SD1.5 call drifted from 7.5 s to 17 s during one unpaired sweep); a pair sees the same load, so the median of the
per-pair ratios is robust where a ratio of medians is not. Timed sets during which other processes kept more than
``contention`` cores busy (``/proc/stat``) are timed again after ``retry_wait`` s, up to ``retries`` times, and the
least contended set is kept. Recorded with every result: all times, the other processes' cores and the load
average per attempt, and Dynamo's counters (a recompile during the timed calls would show).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from .env import cpu_busy_s, loadavg, other_cpu_share
from .options import Protocol

log = logging.getLogger(__name__)

Call = Callable[[int], Any]


def sync(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def dynamo_stats() -> dict[str, int]:
    """Dynamo counters that grow when a graph is (re)compiled or a frame is (re)converted."""
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "frames_ok": int(counters["frames"].get("ok", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def reset() -> None:
    """Forget every compiled graph (``torch._dynamo.reset``) and collect garbage."""
    torch._dynamo.reset()
    gc.collect()


@contextmanager
def torch_setup(threads: int | None = None, keep_inductor_cache: bool = True, prefix: str = "bench") -> Iterator[None]:
    """Threads, room for every variant's Dynamo cache entry (they stay alive next to the baseline), gradients off,
    and unless ``keep_inductor_cache`` a fresh temporary Inductor cache (cold compiles), removed afterwards. The
    thread count is restored on exit."""
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    fresh = None
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not keep_inductor_cache:
        fresh = tempfile.mkdtemp(prefix=f"{prefix}_inductor_cache_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(old_threads)
        if fresh:
            if old is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = old
            shutil.rmtree(fresh, ignore_errors=True)


def _timed(call: Call, i: int, device: Any) -> float:
    sync(device)
    start = time.perf_counter()
    call(i)
    sync(device)
    return time.perf_counter() - start


def _timed_baseline(call: Call, i: int, device: Any, recompiles: dict[str, int]) -> float:
    """A baseline call of a pair; Dynamo's counters around it add to ``recompiles`` (must stay 0)."""
    before = dynamo_stats()
    seconds = _timed(call, i, device)
    for k, v in delta(dynamo_stats(), before).items():
        recompiles[k] += v
    return seconds


def time_calls(call: Call, protocol: Protocol, *, baseline: Call | None = None, desc: str = "",
               device: Any = None, before_timed: Callable[[], None] | None = None) -> dict[str, Any]:
    """Time ``call`` under ``protocol``; with ``baseline`` (already compiled and warm) pair every timed call.

    ``before_timed`` runs once after the warm-up (e.g. to snapshot a runtime's counters). Returns (JSON-ready):
    ``compile_s`` (the first call), ``warmup_s``, ``times_s`` / ``median_s`` / ``min_s`` / ``max_s`` of the kept
    attempt, ``attempts`` (every timed set with ``other_cpu_cores`` and ``loadavg``), ``timed_attempt_used``,
    ``other_cpu_cores``, the Dynamo counter deltas (``first_call``, ``recompiles_warmup``, ``recompiles_timed``,
    ``graphs``, ``graph_breaks``, ``no_recompiles_timed``) and with a baseline ``baseline_times_s``,
    ``baseline_median_s``, ``pair_ratios`` (baseline / variant per pair), ``speedup_paired`` (their median) and
    ``baseline_recompiles`` (Dynamo counters grown during the baseline's calls: must be 0, warned otherwise).
    """
    from tqdm import tqdm

    res: dict[str, Any] = {}
    bar = tqdm(total=1 + protocol.warmup + protocol.runs, desc=f"time {desc}", leave=False, unit="call")
    with torch.no_grad():
        s0 = dynamo_stats()
        res["compile_s"] = _timed(call, 0, device)
        bar.update()
        s1 = dynamo_stats()
        res["warmup_s"] = []
        for i in range(1, 1 + protocol.warmup):
            res["warmup_s"].append(_timed(call, i, device))
            bar.update()
        if before_timed is not None:
            before_timed()
        s2 = dynamo_stats()
        attempts: list[dict[str, Any]] = []
        base_recompiles = {"unique_graphs": 0, "frames_ok": 0, "graph_breaks": 0}
        for attempt in range(1 + protocol.retries):
            first = 1 + protocol.warmup + attempt * protocol.runs
            cpu0, wall0 = cpu_busy_s(), time.perf_counter()
            times, base_times = [], []
            for k, i in enumerate(range(first, first + protocol.runs)):
                if baseline is not None and k % 2 == 0:
                    base_times.append(_timed_baseline(baseline, i, device, base_recompiles))
                times.append(_timed(call, i, device))
                if baseline is not None and k % 2 == 1:
                    base_times.append(_timed_baseline(baseline, i, device, base_recompiles))
                bar.update()
            other = other_cpu_share(cpu0, cpu_busy_s(), time.perf_counter() - wall0)
            attempts.append({"times_s": times, "other_cpu_cores": other, "loadavg": loadavg()})
            if baseline is not None:
                attempts[-1]["baseline_times_s"] = base_times
            if other is None or other <= protocol.contention:
                break
            log.warning("%s: other processes used %.2f cores during the timed calls (> %.2f)%s", desc, other,
                        protocol.contention, "; timing again" if attempt < protocol.retries else "; no retries left")
            if attempt < protocol.retries:
                time.sleep(protocol.retry_wait)
                bar.total += protocol.runs
        s3 = dynamo_stats()
    bar.close()
    best = min(attempts, key=lambda a: a["other_cpu_cores"] if a["other_cpu_cores"] is not None else 0.0)
    times = best["times_s"]
    res.update(times_s=times, median_s=statistics.median(times), min_s=min(times), max_s=max(times),
               attempts=attempts, timed_attempt_used=attempts.index(best) + 1,
               other_cpu_cores=best["other_cpu_cores"], loadavg=best["loadavg"], first_call=delta(s1, s0),
               recompiles_warmup=delta(s2, s1), recompiles_timed=delta(s3, s2))
    if baseline is not None:
        bt = best["baseline_times_s"]
        ratios = [b / v for b, v in zip(bt, times)]
        res.update(baseline_times_s=bt, baseline_median_s=statistics.median(bt), pair_ratios=ratios,
                   speedup_paired=statistics.median(ratios), baseline_recompiles=base_recompiles)
        if base_recompiles["unique_graphs"] or base_recompiles["frames_ok"]:
            log.warning("%s: the baseline recompiled during the pairs (%s): its timed calls include compiles, the "
                        "speedups are wrong (a variant's Dynamo cache entry served the baseline?)", desc,
                        base_recompiles)
    res["graphs"] = res["first_call"]["unique_graphs"]
    res["graph_breaks"] = res["first_call"]["graph_breaks"]
    res["no_recompiles_timed"] = not (res["recompiles_timed"]["unique_graphs"] or res["recompiles_timed"]["frames_ok"])
    log.info("%s: first call %.2fs, median %.4fs (%s)%s, graphs %d", desc, res["compile_s"], res["median_s"],
             ", ".join(f"{x:.4f}" for x in times),
             f", paired speedup {res['speedup_paired']:.3f}" if baseline is not None else "", res["graphs"])
    return res


class PairedTimer:
    """A baseline timed once (alone), then every variant timed with each timed call paired with a baseline call.

    ``paired=False`` times variants alone and divides medians (``speedup = baseline median / variant median``):
    kept for comparison with earlier runs; on a shared machine prefer the pairs. The baseline must stay valid for
    the whole benchmark (do not ``torch._dynamo.reset()`` while it is in use: each variant adds its own Dynamo
    cache entry, guarded on its backend, so nothing recompiles; where a reset is needed, :meth:`reset` compiles
    the baseline again before the next pairs).
    """

    def __init__(self, protocol: Protocol, baseline: Call, *, desc: str = "baseline", device: Any = None,
                 paired: bool = True):
        self.protocol, self.call, self.desc, self.device, self.paired = protocol, baseline, desc, device, paired
        self.baseline = time_calls(baseline, protocol, desc=desc, device=device)
        self.baseline["speedup"] = 1.0

    def reset(self) -> None:
        """``torch._dynamo.reset()`` (after a variant that leaves Dynamo unusable for the next ones, e.g. a patched
        peer under ``torch.compile``), then the baseline's first call and warm-up again, untimed by the pairs: the
        next pair's baseline call must not compile. The recompile seconds go to ``baseline["rewarm_s"]``."""
        reset()
        with torch.no_grad():
            start = time.perf_counter()
            for i in range(1 + self.protocol.warmup):
                self.call(i)
            sync(self.device)
        self.baseline.setdefault("rewarm_s", []).append(time.perf_counter() - start)
        log.info("%s: Dynamo reset, baseline compiled again in %.1f s", self.desc, self.baseline["rewarm_s"][-1])

    @property
    def median_s(self) -> float:
        return self.baseline["median_s"]

    def time(self, call: Call, desc: str = "", before_timed: Callable[[], None] | None = None) -> dict[str, Any]:
        """Time one variant; its result has ``speedup`` (paired: the median of the per-pair ratios)."""
        res = time_calls(call, self.protocol, baseline=self.call if self.paired else None, desc=desc,
                         device=self.device, before_timed=before_timed)
        res["paired"] = self.paired
        res["speedup"] = res["speedup_paired"] if self.paired else self.median_s / res["median_s"]
        return res


__all__ = ["PairedTimer", "time_calls", "sync", "dynamo_stats", "delta", "reset", "torch_setup"]

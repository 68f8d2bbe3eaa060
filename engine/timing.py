"""Block-interleaved latency measurement and its summary statistics (used by ``bench`` and by
``build --precision auto``).

On a small CPU the thread pools of ONNX Runtime and PyTorch keep spinning after a call and slow
whatever runs next (measured: eager ``tiny`` 1.8x slower right after an ONNX Runtime block, for
longer than the first calls of the block), so variants are never timed one after the other: each
round runs every variant in a block of consecutive calls after a cool-down pause that lets the
previous block's threads go to sleep, the first calls of each block are dropped, the order of the
variants rotates from round to round, and the statistics are taken over all kept calls.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Mapping, Optional

import numpy as np
import torch


@dataclass(frozen=True)
class Schedule:
    """How many calls are made: ``warmup`` untimed calls per variant, then ``rounds`` rounds of
    ``block`` calls per variant, each block after a pause of ``cooldown_s`` seconds, of which the
    first ``drop`` of each block are discarded."""

    warmup: int = 3
    rounds: int = 5
    block: int = 8
    drop: int = 2
    cooldown_s: float = 0.3  # measured: 0.3 s removes the slow-down left by the previous block

    def __post_init__(self):
        if (self.warmup < 0 or self.rounds < 1 or self.block < 1 or not 0 <= self.drop < self.block
                or not 0 <= self.cooldown_s <= 60):
            raise ValueError(f"bad schedule {self}: need warmup >= 0, rounds >= 1, block >= 1, 0 <= drop < block, "
                             "0 <= cooldown_s <= 60")

    @classmethod
    def for_iters(cls, iters: int, warmup: int = 3, cooldown_s: float = 0.3) -> "Schedule":
        """A schedule that keeps about ``iters`` timed calls per variant (at least one per block)."""
        if iters < 1:
            raise ValueError(f"iters must be >= 1, got {iters}")
        rounds = max(1, min(10, -(-iters // 4)))
        kept = -(-iters // rounds)
        drop = 2 if kept >= 4 else 1
        return cls(warmup=warmup, rounds=rounds, block=kept + drop, drop=drop, cooldown_s=cooldown_s)

    @property
    def kept_per_variant(self) -> int:
        return self.rounds * (self.block - self.drop)

    def as_dict(self) -> dict:
        return {**asdict(self), "kept_per_variant": self.kept_per_variant}


def time_interleaved(variants: Mapping[str, Callable[[], object]], schedule: Schedule = Schedule(),
                     sync: Optional[Callable[[], None]] = None,
                     timer: Callable[[], float] = time.perf_counter,
                     sleep: Callable[[float], None] = time.sleep) -> dict[str, list[float]]:
    """Time every callable in ``variants`` interleaved in blocks; returns kept latencies in ms.

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before starting and before stopping each
    clock, so that asynchronous GPU work is inside the measurement. A single variant gets the same
    schedule (pauses included), so that it can be compared with itself timed among others.
    """
    names = list(variants)
    if not names:
        raise ValueError("nothing to time")
    sync = sync or (lambda: None)
    for name in names:
        for _ in range(schedule.warmup):
            variants[name]()
    sync()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(schedule.rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:  # rotate: no variant always follows the same one
            fn = variants[name]
            if schedule.cooldown_s:
                sleep(schedule.cooldown_s)
            for i in range(schedule.block):
                sync()
                t0 = timer()
                fn()
                sync()
                t1 = timer()
                if i >= schedule.drop:
                    samples[name].append((t1 - t0) * 1e3)
    return samples


def summarize(latencies_ms: list[float], batch: int) -> dict[str, float]:
    """``p50_ms <= p90_ms <= p99_ms``, ``mean_ms`` and ``throughput`` (samples/s at the median)."""
    a = np.asarray(latencies_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no latencies to summarize")
    p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
    return {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(a.mean()),
            "throughput": batch * 1e3 / p50, "samples": int(a.size)}


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (restored afterwards)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)

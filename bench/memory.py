"""Peak memory of one (backend, batch) in a short process of its own, so that backends do not share
one process's peak: peak RSS on a CPU (the whole process: Python, libraries, weights, activations),
and on a GPU also the CUDA caching allocator's peak. With a schedule, the same fresh process then
times the backend alone (the harness check: a backend timed among others must agree with itself
timed alone).

Run as ``python -m stvfm_engine.bench.memory DIR BACKEND BATCH [--precision P] [--threads N]
[--device D] [--schedule WARMUP,ROUNDS,BLOCK,DROP,COOLDOWN_S]``; it prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Optional

from stvfm_engine.engine.timing import Schedule

NOTE = ("peak_mem_mb: peak RSS (CPU) or the CUDA allocator's peak (GPU) of a separate short process "
        "per (backend, batch) that loads the engine and runs 3 calls; RSS includes the Python "
        "interpreter and every imported library")


def measure(engine_dir: str | os.PathLike, backend: str, batch: int, precision: Optional[str] = None,
            threads: Optional[int] = None, device: Optional[str] = None, timeout: float = 600,
            schedule: Optional[Schedule] = None) -> dict:
    """Run the measurement in a child process; returns ``{"peak_rss_mb", "cuda_peak_mb", "peak_mem_mb"}``,
    and with ``schedule`` also ``"alone"``: the summary of the backend timed alone on that schedule."""
    cmd = [sys.executable, "-m", "stvfm_engine.bench.memory", str(engine_dir), backend, str(batch)]
    timing = None if schedule is None else ",".join(
        str(v) for v in (schedule.warmup, schedule.rounds, schedule.block, schedule.drop, schedule.cooldown_s))
    for flag, value in (("--precision", precision), ("--threads", threads), ("--device", device),
                        ("--schedule", timing)):
        if value is not None:
            cmd += [flag, str(value)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"peak-memory process for {backend} batch {batch} failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak resident set: ``VmHWM`` (reset by exec, unlike ``ru_maxrss``, which a
    child started by fork+exec inherits from its parent on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover - not Linux


def _child(args: argparse.Namespace) -> dict:
    import torch

    from stvfm_engine.engine import Engine
    from stvfm_engine.bench.runner import make_inputs
    from stvfm_engine.engine.timing import summarize, time_interleaved

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine.load(args.dir, backend=args.backend, precision=args.precision, device=args.device,
                         threads=args.threads)
    cuda = str(engine.device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    x, tod, dow = make_inputs(engine.config, args.batch)
    for _ in range(3):
        engine.predict(x, tod, dow)
    rss_mb = peak_rss_mb()
    cuda_mb = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None
    out = {"peak_rss_mb": rss_mb, "cuda_peak_mb": cuda_mb, "peak_mem_mb": cuda_mb if cuda else rss_mb}
    if args.schedule:
        w, r, b, d, c = args.schedule.split(",")
        samples = time_interleaved({args.backend: lambda: engine.predict(x, tod, dow)},
                                   Schedule(int(w), int(r), int(b), int(d), float(c)),
                                   sync=torch.cuda.synchronize if cuda else None)
        out["alone"] = summarize(samples[args.backend], args.batch)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stvfm_engine.bench.memory", description=__doc__)
    p.add_argument("dir", type=Path)
    p.add_argument("backend")
    p.add_argument("batch", type=int)
    p.add_argument("--precision")
    p.add_argument("--threads", type=int)
    p.add_argument("--device")
    p.add_argument("--schedule", help="also time the backend alone: WARMUP,ROUNDS,BLOCK,DROP,COOLDOWN_S")
    print(json.dumps(_child(p.parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

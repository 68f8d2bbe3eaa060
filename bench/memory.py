"""Peak memory of one (backend, batch) in a short process of its own, so that backends do not share
one process's peak: peak RSS on a CPU (the whole process: Python, libraries, weights, activations),
and on a GPU also the CUDA caching allocator's peak. With a schedule, the same fresh process then
times the backend alone (the harness check: a backend timed among others must agree with itself
timed alone).

Run as ``python -m stvfm_engine.bench.memory DIR BACKEND BATCH [--precision P] [--threads N]
[--device D] [--schedule WARMUP,ROUNDS,BLOCK,DROP,COOLDOWN_S]``; it prints one JSON object. With
``--added`` it measures instead the resident memory that loading the engine and one predict per model add
to a process that has already imported everything and warmed up ONNX Runtime and PyTorch (:func:`added`).
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

import numpy as np

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


ADDED_NOTE = ("rss_added_mb: VmRSS after Engine.load + one batch-1 predict per model minus VmRSS before, in a "
              "fresh process per engine that has imported everything and run a small ONNX Runtime session and a "
              "torch matmul first (so per-process one-time costs are not counted per engine)")


def added(engine_dir: str | os.PathLike, backend: Optional[str] = None, threads: Optional[int] = None,
          timeout: float = 600) -> dict:
    """RSS added by loading ``engine_dir`` and one predict per model, in a fresh process (:data:`ADDED_NOTE`)."""
    cmd = [sys.executable, "-m", "stvfm_engine.bench.memory", str(engine_dir), backend or "default", "1", "--added"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory process for {engine_dir} failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_mb() -> float:
    """This process's resident set now (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmRSS in /proc/self/status")  # pragma: no cover - not Linux


def _warm_up() -> list:
    """Run what every engine's first call pays once per process: a torch matmul, a tiny ONNX Runtime session."""
    import torch

    torch.ones(64, 64) @ torch.ones(64, 64)
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return []
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], [0.5] * 64)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "warm", [x], [y], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.ones((2, 8), np.float32)})
    return [session]


def _added_child(args: argparse.Namespace) -> dict:
    import gc

    from stvfm_engine.bench.runner import make_inputs
    from stvfm_engine.engine import Engine

    from stvfm_engine.engine.registry import BACKENDS

    keep = _warm_up()
    for spec in BACKENDS.values():  # imports every backend's module: imports are not what is measured
        spec.why_not_run("cpu")
    gc.collect()
    before = rss_mb()
    engine = Engine.load(args.dir, backend=None if args.backend == "default" else args.backend, threads=args.threads)
    for name, config in engine.models.items():
        engine.predict(*make_inputs(config, 1), model=name)
    gc.collect()
    after = rss_mb()
    del keep
    return {"engine": str(args.dir), "backend": engine.backend, "models": list(engine.models),
            "rss_before_mb": before, "rss_after_mb": after, "rss_added_mb": after - before}


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
    p.add_argument("--added", action="store_true", help="RSS added by load + one predict per model (see added())")
    args = p.parse_args(argv)
    print(json.dumps(_added_child(args) if args.added else _child(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The benchmark itself: open the variants (engine backends, or any callables), time them interleaved
per batch, add peak memory, the stage breakdown and the roofline, and return the report dict."""
from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from stvfm_engine.bench import memory, report, roofline, stages
from stvfm_engine.engine.manifest import is_multi, read_manifest
from stvfm_engine.engine.registry import BACKENDS, get_backend, names
from stvfm_engine.engine.resolve import normalize_device
from stvfm_engine.engine.runtime import cuda_status
from stvfm_engine.engine.session import open_session
from stvfm_engine.engine.timing import Schedule, summarize, time_interleaved, torch_threads
from stvfm_engine.errors import BenchError
from stvfm_engine.model.config import STVFMConfig

ALONE_TOLERANCE = 0.15  # interleaved vs alone: the harness check of issue 10 (aim 5%)

Predict = Callable[[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]], object]


@dataclass
class Variant:
    """One thing to time: ``predict(x, tod, dow)``, named by backend and precision.

    ``engine_dir`` lets the peak-memory process reopen it; None skips that measurement.
    """

    backend: str
    precision: str
    predict: Predict
    engine_dir: Optional[Path] = None
    device: str = "cpu"

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.precision}"


def make_inputs(config: STVFMConfig, batch: int, seed: int = 0):
    """Random raw-unit inputs (counts in [0, 20)) and, where the model uses them, ``tod``/``dow``."""
    rng = np.random.default_rng(seed)
    c = config
    x = (rng.random((batch, c.history, c.channels, c.height, c.width)) * 20).astype(np.float32)
    if not c.uses_time:
        return x, None, None
    start = rng.integers(0, 7 * c.steps_per_day, size=(batch, 1))
    steps = start + np.arange(c.history)
    return x, (steps % c.steps_per_day).astype(np.int64), ((c.start_dow + steps // c.steps_per_day) % 7).astype(np.int64)


def parse_list(text: str, kind: type = str) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise BenchError(f"expected a comma-separated list, got {text!r}")
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise BenchError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None


# ----------------------------------------------------------------------------- opening engines
def open_variant(directory: Path, backend: str, precision: Optional[str], threads: Optional[int],
                 device: Optional[str] = None) -> Variant:
    """One backend of the engine in ``directory`` through the runtime's one session path (the input check
    and scheduler ``Engine.predict`` runs): a served backend, or a bench-only baseline (``compile``) from
    the same weights (``precision`` None: the backend's default for the device)."""
    spec = get_backend(backend, bench=True)
    if spec.bench_only and (why := spec.why_not_run(normalize_device(device) or
                                                    ("cuda" if cuda_status() is None else "cpu"))):
        raise BenchError(f"baseline {backend} cannot run on {device or 'this machine'} here: {why}")
    session = open_session(directory, backend, precision, device, threads, bench=True)
    # a baseline is no Engine: no peak-memory process (it reopens engines by backend name)
    return Variant(backend, session.precision, functools.partial(session.predict, None),
                   None if spec.bench_only else Path(directory), session.device)


def engine_variants(directory: Path, backends: Sequence[str], precision: Optional[str], threads: Optional[int],
                    device: Optional[str] = None) -> list[Variant]:
    """Open each backend of the engine in ``directory`` (a weights backend at its default precision for the device)."""
    return [open_variant(directory, b, precision if BACKENDS[b].artifact else None, threads, device) for b in backends]


@contextlib.contextmanager
def open_targets(targets: Sequence[str | os.PathLike], backends: Sequence[str], precisions: Sequence[Optional[str]],
                 threads: Optional[int], device: Optional[str] = None,
                 progress: bool = False) -> Iterator[tuple[list[Variant], Path]]:
    """The variants of every target x precision, and one engine directory (for the reference model).

    A target is an engine directory or a checkpoint; a checkpoint is first built (once per
    precision) into a temporary engine with the requested artifact backends. ``eager`` and
    ``triton`` are opened once, from the first target.
    """
    bad = [b for b in backends if b not in names(bench=True)]
    if bad:
        raise BenchError(f"unknown backend(s) {bad}; expected some of {list(names(bench=True))}")
    with tempfile.TemporaryDirectory(prefix="stvfm-bench-") as tmp:
        dirs: list[tuple[Path, Optional[str]]] = []
        artifacts = [b for b in backends if BACKENDS[b].artifact]
        for i, target in enumerate(targets):
            target = Path(target)
            if target.is_dir():
                if is_multi(read_manifest(target)):
                    raise BenchError(f"{target} is a multi-model engine: bench it with --mix NAME:N[,NAME:N...]")
                dirs += [(target, p) for p in precisions]
                continue
            if not target.is_file():
                raise BenchError(f"{target}: neither an engine directory nor a checkpoint file")
            from stvfm_engine.export.build import build_engine

            for p in precisions:
                out = Path(tmp) / f"engine{i}-{p or 'fp32'}"
                build_engine(target, out, backends=artifacts or None, precision=p or "fp32", device=device or "cpu",
                             progress=progress)
                dirs.append((out, p))
        variants: list[Variant] = []
        seen_torch = False
        for d, p in dirs:
            built = read_manifest(d)["backends"]
            # several engines: each gives the artifacts it holds; eager/triton come from the first
            wanted = [b for b in backends if (b in built if len(dirs) > 1 and BACKENDS[b].artifact
                                              else BACKENDS[b].artifact or not seen_torch)]
            seen_torch = True
            variants += engine_variants(d, wanted, p, threads, device)
        missing = [b for b in backends if b not in {v.backend for v in variants}]
        if missing:
            raise BenchError(f"no engine given holds {missing}")
        configs = {Path(v.engine_dir): None for v in variants}
        _check_same_config([d for d in configs])
        yield variants, dirs[0][0]


def alone_check(results: Sequence[dict], tolerance: float = ALONE_TOLERANCE) -> dict:
    """The harness self-check: every row's interleaved p50 within ``tolerance`` of its p50 timed alone."""
    rows = [r for r in results if r.get("vs_alone") is not None]
    off = [f"{r['backend']}/{r['precision']} batch {r['batch']}: {r['vs_alone']:.2f}x"
           for r in rows if abs(r["vs_alone"] - 1) > tolerance]
    return {"tolerance": tolerance, "rows": len(rows), "outside": off, "ok": not off,
            "method": "interleaved p50 / p50 of the same backend timed alone in a fresh process, same schedule"}


def _check_same_config(dirs: Sequence[Path]) -> None:
    configs = {str(d): read_manifest(d)["config"] for d in dirs}
    if len({repr(sorted(c.items())) for c in configs.values()}) > 1:
        raise BenchError(f"the engines compared do not share one model configuration: {sorted(configs)}")


# ----------------------------------------------------------------------------- the run
def run_bench(variants: Sequence[Variant], config: STVFMConfig, batches: Sequence[int],
              schedule: Schedule = Schedule(), threads: Optional[int] = None, measure_memory: bool = True,
              stage_model: Optional[torch.nn.Module] = None, triton_stage: Optional[Callable] = None,
              stage_iters: int = 10, command: Optional[Sequence[str]] = None,
              log: Callable[[str], None] = lambda s: None, alone: bool = False) -> dict:
    """Time every variant at every batch size, interleaved in blocks, and return the report dict.

    ``stage_model`` (the fp32 reference :class:`STVFM`) adds the eager stage breakdown;
    ``triton_stage(batch) -> list[dict]`` adds the Triton one. ``alone`` also times every engine variant
    alone in a fresh process on the same schedule (``alone_p50_ms``, ``vs_alone``, ``alone_check``).
    """
    if not variants:
        raise BenchError("no backends to benchmark")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise BenchError(f"a backend/precision appears twice: {names}")
    device = variants[0].device
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else None
    head = report.header(device, command)
    shape = roofline.backbone_shape(config)
    results, roof, stage_rows = [], [], []
    with torch_threads(threads):
        for batch in batches:
            x, tod, dow = make_inputs(config, batch)
            calls = {v.name: (lambda v=v: v.predict(x, tod, dow)) for v in variants}
            log(f"timing batch {batch}: {', '.join(calls)}")
            samples = time_interleaved(calls, schedule, sync=sync)
            stats = {n: summarize(s, batch) for n, s in samples.items()}
            eager = next((stats[v.name] for v in variants if v.backend == "eager"), None)
            for v in variants:
                st = stats[v.name]
                results.append({"backend": v.backend, "batch": batch, "precision": v.precision,
                                "p50_ms": st["p50_ms"], "p90_ms": st["p90_ms"], "p99_ms": st["p99_ms"],
                                "mean_ms": st["mean_ms"], "throughput": st["throughput"], "peak_mem_mb": None,
                                "speedup_vs_eager": eager["p50_ms"] / st["p50_ms"] if eager else None,
                                "samples": st["samples"]})
                cost = roofline.model_cost(config, batch, v.precision, shape)
                roof.append({"backend": v.backend, "batch": batch, "precision": v.precision,
                             **roofline.achieved(cost, st["p50_ms"], head["device"]["name"], v.precision)})
            if stage_model is not None:
                log(f"stage breakdown (eager) at batch {batch}")
                dev = next(stage_model.parameters()).device
                t = [None if a is None else torch.from_numpy(a).to(dev) for a in (x, tod, dow)]
                stage_rows += stages.eager_stages(stage_model, *t, iters=stage_iters)
            if triton_stage is not None:
                log(f"stage breakdown (triton) at batch {batch}")
                stage_rows += triton_stage(batch)
    if measure_memory or alone:
        for v, r in zip([v for _ in batches for v in variants], results):
            if v.engine_dir is not None:
                log(f"{'peak memory' if measure_memory else ''}{' and ' if measure_memory and alone else ''}"
                    f"{'timing alone' if alone else ''}: {v.name} batch {r['batch']} (separate process)")
                child = memory.measure(v.engine_dir, v.backend, r["batch"], v.precision, threads, v.device,
                                       schedule=schedule if alone else None)
                if measure_memory:
                    r["peak_mem_mb"] = child["peak_mem_mb"]
                if alone:
                    r["alone_p50_ms"] = child["alone"]["p50_ms"]
                    r["vs_alone"] = r["p50_ms"] / child["alone"]["p50_ms"]
    return {**head, "config": config.to_dict(), "threads": threads or torch.get_num_threads(),
            "schedule": {**schedule.as_dict(),
                         "method": "variants interleaved in blocks per batch size, a cool-down pause before each "
                                   "block, first calls of each block dropped, block order rotated each round; "
                                   "statistics over kept calls"},
            "memory_note": memory.NOTE if measure_memory else "peak memory not measured",
            **({"alone_check": alone_check(results)} if alone else {}),
            "results": results, "stages": stage_rows, "roofline": roof,
            "stage_costs": {str(b): roofline.model_cost(config, b, "fp32", shape)["stages"] for b in batches}}

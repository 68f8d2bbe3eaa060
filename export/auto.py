"""``build --precision auto``: build every (backend, precision) candidate of the registry this machine can
build, gate each (parity, and the task gate with ``--calib-data``), time those that pass block-interleaved
at the build's thread count, keep the fastest passing artifact of each backend and record the fastest of
all as the directory's default (``Engine.load(DIR)`` opens it)."""
from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from stvfm_engine.engine.graph import example_inputs
from stvfm_engine.engine.manifest import artifact_files
from stvfm_engine.engine.precision import get_precision
from stvfm_engine.engine.registry import BACKENDS, BuildContext, MultiBuildContext, names
from stvfm_engine.engine.session import Built, Session, open_session
from stvfm_engine.engine.timing import Schedule, summarize, time_interleaved, torch_threads
from stvfm_engine.errors import BuildError, first_line, STVFMError
from stvfm_engine.export.records import built_engine

AUTO_BATCH = 1  # candidates are timed at batch 1: serving latency
AUTO_SCHEDULE = Schedule(warmup=3, rounds=5, block=6, drop=2)  # 20 kept calls each, 0.3 s pause per block
SCRATCH = ".auto"  # inside the temp build directory: one folder per candidate


@dataclass
class Candidate:
    backend: str
    precision: str
    why: str = ""  # why it is not kept (or, when kept, what it is)
    entry: Optional[dict[str, Any]] = None  # its manifest record once built and gated
    p50_ms: Optional[float] = None
    kept: bool = False  # its artifact is in the directory

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.precision}"

    def row(self) -> dict[str, Any]:
        e = self.entry or {}
        gate = e.get("task_gate") or (e.get("reduced_precision") or {}).get("gate") or {}
        return {"backend": self.backend, "precision": self.precision, "p50_ms": self.p50_ms,
                "max_rel_err": (e.get("parity") or {}).get("max_rel_err"), "mae_loss": gate.get("mae_loss"),
                "kept": self.kept, "why": self.why}


def candidates(backends: Optional[Sequence[str]], device: str) -> list[Candidate]:
    """The registry's ``auto`` precisions of every artifact backend (or of ``backends``), in registry order;
    those this machine cannot build carry the reason."""
    known = [n for n in names(artifact=True) if BACKENDS[n].auto]
    if backends is not None and (bad := [b for b in backends if b not in known]):
        raise BuildError(f"--precision auto: no candidates for {bad}; expected some of {known}")
    out = []
    for name in known:
        if backends is None or name in backends:
            for p in BACKENDS[name].auto:
                why = BACKENDS[name].why_not_build(device, p)
                out.append(Candidate(name, p, f"cannot build here: {why}" if why else ""))
    return out


def build_auto(ctx: BuildContext, chosen: list[Candidate], build_one: Callable[[str, BuildContext], dict],
               threads: Optional[int]) -> tuple[dict[str, dict], dict[str, str], dict[str, Any]]:
    """Build and gate the candidates in ``ctx.directory/.auto``, time those that pass, and move each backend's
    fastest into ``ctx.directory``. Returns the manifest's ``backends``, ``default`` and ``auto``."""
    scratch = ctx.directory / SCRATCH
    built: list[tuple[Candidate, Path]] = []
    for c in chosen:
        if c.why:
            continue
        sub = scratch / f"{c.backend}-{c.precision}"
        sub.mkdir(parents=True)
        try:
            c.entry = build_one(c.backend, dataclasses.replace(ctx, directory=sub, precision=get_precision(c.precision)))
            built.append((c, sub))
        except STVFMError as e:  # a failed build or gate drops the candidate, with the reason
            c.why = first_line(e)
    if not built:
        raise BuildError("--precision auto: no candidate passed its gates ("
                         + "; ".join(f"{c.name}: {c.why}" for c in chosen) + ")")
    _time(ctx, built, threads)
    best: dict[str, Candidate] = {}
    for c, _ in sorted(built, key=lambda cs: cs[0].p50_ms):
        best.setdefault(c.backend, c)
    winner = min(best.values(), key=lambda c: c.p50_ms)
    for c, sub in built:
        if best[c.backend] is not c:
            c.why = f"passed its gates; {best[c.backend].name} is faster (one artifact per backend)"
            continue
        c.kept = True
        c.why = "the default: fastest of all" if c is winner else f"the fastest {c.backend} artifact"
        for name in artifact_files([f.name for f in sub.iterdir()], BACKENDS[c.backend].files):
            os.replace(sub / name, ctx.directory / name)
    shutil.rmtree(scratch)
    entries = {n: best[n].entry for n in names(artifact=True) if n in best}
    auto = {"batch": AUTO_BATCH, "threads": threads or torch.get_num_threads(), "schedule": AUTO_SCHEDULE.as_dict(),
            "metric": "p50 latency, candidates interleaved in blocks in the build's process",
            "candidates": [c.row() for c in chosen]}
    return entries, {"backend": winner.backend, "precision": winner.precision}, auto


def _time(ctx: BuildContext, built: list[tuple[Candidate, Path]], threads: Optional[int]) -> None:
    args = [a.numpy() for a in example_inputs(ctx.model, batch=AUTO_BATCH)]
    with ctx.stage("auto", f"timing {len(built)} candidates at batch {AUTO_BATCH}, interleaved"), torch_threads(threads):
        sessions = {c.name: open_session(built_engine(ctx, {c.backend: c.entry}, sub), c.backend, c.precision, "cpu",
                                         threads) for c, sub in built}
        p50 = time_sessions(sessions, lambda s: [s.check(None, *args)])
        del sessions
    for c, _ in built:
        c.p50_ms = p50[c.name]


def time_sessions(sessions: dict[str, Session], requests: Callable[[Session], list]) -> dict[str, float]:
    """p50 ms of each session serving its ``requests(session)``, interleaved in blocks (:data:`AUTO_SCHEDULE`),
    each call what ``Engine.predict`` does: the session's checks, then its run."""
    samples = time_interleaved({n: (lambda s=s: s.run(requests(s))) for n, s in sessions.items()}, AUTO_SCHEDULE)
    return {n: summarize(samples[n], AUTO_BATCH)["p50_ms"] for n in sessions}


def auto_multi(ctx: MultiBuildContext, manifest: dict[str, Any], backends: Sequence[str], run_device: dict[str, str],
               threads: Optional[int]) -> tuple[dict[str, str], dict[str, Any]]:
    """``--precision auto`` on a multi-model build: every built backend (fp32, all gated) timed on one batch-1
    request per model, interleaved; returns the manifest's ``default`` (the fastest) and ``auto`` records."""
    inputs = {label: [a.numpy() for a in example_inputs(m, batch=AUTO_BATCH)] for label, m in ctx.models.items()}
    with ctx.stage("auto", f"timing {len(backends)} backends, one batch-{AUTO_BATCH} request per model, "
                           "interleaved"), torch_threads(threads):
        sessions = {b: open_session(Built(ctx.directory, manifest, references=lambda: ctx.models), b, "fp32",
                                    run_device[b], threads) for b in backends}
        p50 = time_sessions(sessions, lambda s: [s.check(label, *a) for label, a in inputs.items()])
        del sessions
    best = min(backends, key=lambda b: p50[b])
    rows = [{"backend": b, "precision": "fp32", "p50_ms": p50[b],
             "max_rel_err": max(m["backends"][b]["parity"]["max_rel_err"] for m in manifest["models"].values()),
             "mae_loss": None, "kept": True,
             "why": "the default: fastest of all" if b == best else f"{p50[best]:.2f} ms for {best} is faster"}
            for b in backends]
    auto = {"batch": AUTO_BATCH, "threads": threads or torch.get_num_threads(), "schedule": AUTO_SCHEDULE.as_dict(),
            "metric": f"p50 latency of one batch-{AUTO_BATCH} request per model in one call, interleaved in blocks",
            "candidates": rows}
    return {"backend": best, "precision": "fp32"}, auto


def format_table(auto: dict[str, Any]) -> str:
    """The candidates as a readable table (the CLI prints it)."""
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [f"--precision auto: p50 at batch {auto['batch']}, {auto['threads']} threads, interleaved",
             f"{'backend':<12} {'prec':<5} {'p50 ms':>9} {'rel err':>9} {'MAE loss':>9} {'kept':<5} why"]
    for r in auto["candidates"]:
        mae = None if r["mae_loss"] is None else 100 * r["mae_loss"]
        lines.append(f"{r['backend']:<12} {r['precision']:<5} {fmt(r['p50_ms'], '.2f'):>9} "
                     f"{fmt(r['max_rel_err'], '.1e'):>9} {fmt(mae, '+.2f') + ('%' if mae is not None else ''):>9} "
                     f"{'yes' if r['kept'] else 'no':<5} {r['why']}")
    return "\n".join(lines)

"""Forecast streams offline: N streams each push one frame then ask a forecast, through
:meth:`Streams.serve_batch` (what a server's batcher calls), against the same forecasts sent as whole windows
(the client keeps each window and computes tod/dow, then ``Engine.predict_many``). Forecasts per second,
p50/p99 of the batch call each request waits for, bytes per request; the two paths interleaved by round,
a pause before each block. The through-the-server figure is the serving bench's.

    python -m stvfm_engine.bench.streams bike.engine --streams 1000 --batch 64 --rounds 3 --json streams.json
    python -m stvfm_engine.bench.streams bike.pt ...      # a checkpoint: its eager model, held in memory
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from stvfm_engine.bench import report
from stvfm_engine.engine import Engine
from stvfm_engine.engine.manifest import FORMAT_VERSION
from stvfm_engine.engine.precision import get_precision
from stvfm_engine.engine.session import Built, open_session
from stvfm_engine.engine.streams import Streams
from stvfm_engine.engine.timing import summarize
from stvfm_engine.errors import STVFMError
from stvfm_engine.export.records import manifest_head, model_record
from stvfm_engine.model.calendar import grid_for, iso, parse_time, time_features
from stvfm_engine.model.checkpoint import load_model

DEFAULT_CALENDAR = {"start": "2026-10-31T00:00:00-04:00", "zone": "America/New_York"}


def open_engine(source: str, backend: Optional[str], threads: Optional[int], max_batch: int) -> Engine:
    """An engine directory, or a checkpoint opened as its eager model in memory (no build)."""
    path = Path(source)
    if path.is_file():
        model = load_model(path)
        manifest = {**manifest_head(FORMAT_VERSION, get_precision("fp32"), "cpu", max_batch),
                    **model_record(model, {}, max_batch), "backends": {}}
        built = Built(path.with_suffix(""), manifest, references=lambda: {path.stem: model})
        return Engine(open_session(built, backend or "eager", threads=threads))
    return Engine.load(path, backend=backend, threads=threads)


def request_bytes(c, T: int, name: str, when: str) -> dict[str, int]:
    """Bytes of one request: the tensors alone (binary) and an Open Inference Protocol JSON body."""
    frame = np.zeros((1, c.channels, c.height, c.width), np.float32) + 12.345678
    stream_json = {"inputs": [{"name": "stream", "datatype": "BYTES", "shape": [1, 1], "data": [name]},
                              {"name": "time", "datatype": "BYTES", "shape": [1, 1], "data": [when]},
                              {"name": "frame", "datatype": "FP32", "shape": list(frame.shape),
                               "data": frame.ravel().tolist()}]}
    window = np.zeros((1, T, c.channels, c.height, c.width), np.float32) + 12.345678
    window_json = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(window.shape), "data": window.ravel().tolist()}]}
    if c.uses_time:
        window_json["inputs"] += [{"name": n, "datatype": "INT64", "shape": [1, T], "data": [47] * T} for n in ("tod", "dow")]
    return {"stream_binary": frame.nbytes + len(name.encode()) + len(when.encode()),
            "window_binary": window.nbytes + (2 * T * 8 if c.uses_time else 0),
            "stream_json": len(json.dumps(stream_json)), "window_json": len(json.dumps(window_json))}


def run(source: str, streams: int = 1000, batch: int = 64, rounds: int = 3, backend: Optional[str] = None,
        threads: Optional[int] = None, store: Optional[str] = None, cooldown: float = 0.3,
        calendar: Optional[dict] = None, seed: int = 0, warmup: int = 1) -> dict[str, Any]:
    engine = open_engine(source, backend, threads, max_batch=max(batch, 1))
    model = next(iter(engine.models))
    c = engine.models[model]
    if not 1 <= batch <= engine.max_batch:
        raise STVFMError(f"--batch {batch} is outside the engine's range [1, {engine.max_batch}]")
    calendar = calendar or (None if c.calendar else DEFAULT_CALENDAR)
    interval = 1800.0 if not c.uses_time else None
    grid = grid_for(c.steps_per_day, calendar or c.calendar, interval)
    T, shape = c.history, (c.channels, c.height, c.width)
    rng = np.random.default_rng(seed)
    names = [f"region-{i:05d}" for i in range(streams)]
    with tempfile.TemporaryDirectory() as tmp:
        s = Streams(engine, store or str(Path(tmp) / "streams.db"), calendar=calendar, interval=interval)
        first = grid.step(parse_time("2026-11-01T04:00:00Z"))  # the New York fall-back hour runs through it
        windows = {n: np.zeros((T, *shape), np.float32) for n in names}

        def frames_at() -> dict[str, np.ndarray]:
            return {n: (10 + 3 * rng.standard_normal(shape)).astype(np.float32) for n in names}

        for k in range(first - T + 1, first):  # T - 1 frames held before the first round
            new = frames_at()
            for i in range(0, streams, 500):
                s.serve_batch([(n, iso(grid.time(k)), new[n], None, None) for n in names[i:i + 500]])
            for n in names:
                windows[n] = np.concatenate([windows[n][1:], new[n][None]])
        timings: dict[str, list[float]] = {"streams": [], "windows": []}
        totals = {"streams": 0.0, "windows": 0.0}
        in_engine = {"streams": 0.0, "windows": 0.0}  # seconds inside Session.run: the rest is each path's own
        session_run, current = engine.session.run, ["streams"]

        def timed_run(requests):
            t0 = time.perf_counter()
            try:
                return session_run(requests)
            finally:
                in_engine[current[0]] += time.perf_counter() - t0

        engine.session.run = timed_run
        max_diff = 0.0
        for r in range(-warmup, rounds):  # rounds < 0: warm-up, not counted
            k = first + warmup + r
            when = iso(grid.time(k))
            new = frames_at()
            outputs: dict[str, dict[str, np.ndarray]] = {"streams": {}, "windows": {}}
            for path in (("streams", "windows") if r % 2 == 0 else ("windows", "streams")):
                time.sleep(cooldown)
                current[0] = path
                before, started = in_engine[path], time.perf_counter()
                if path == "streams":
                    for i in range(0, streams, batch):
                        t0 = time.perf_counter()
                        out = s.serve_batch([(n, when, new[n], None, None) for n in names[i:i + batch]])
                        timings[path].append((time.perf_counter() - t0) * 1e3)
                        for n, fc in zip(names[i:i + batch], out):
                            if isinstance(fc, Exception):
                                raise fc
                            outputs[path][n] = fc.y
                else:  # the client keeps the window and computes its calendar features itself
                    times = [grid.time(j) for j in range(k - T + 1, k + 1)]
                    tod, dow = (time_features(times, grid.zone, c.steps_per_day) if c.uses_time else (None, None))
                    for i in range(0, streams, batch):
                        t0 = time.perf_counter()
                        chunk = names[i:i + batch]
                        for n in chunk:
                            windows[n] = np.concatenate([windows[n][1:], new[n][None]])
                        reqs = [(model, windows[n][None], *((tod[None], dow[None]) if c.uses_time else ()))
                                for n in chunk]
                        for n, y in zip(chunk, engine.predict_many(reqs)):
                            outputs[path][n] = y[0]
                        timings[path].append((time.perf_counter() - t0) * 1e3)
                if r >= 0:
                    totals[path] += time.perf_counter() - started
                else:
                    timings[path].clear()
                    in_engine[path] = before
            max_diff = max(max_diff, max(float(np.abs(outputs["streams"][n] - outputs["windows"][n]).max())
                                         for n in names))
        s.close()
    results = []
    for path in ("streams", "windows"):
        stats = summarize(timings[path], batch)
        results.append({"path": path, "forecasts_per_s": streams * rounds / totals[path],
                        "p50_ms": stats["p50_ms"], "p99_ms": stats["p99_ms"], "calls": stats["samples"],
                        "engine_s": in_engine[path], "own_s": totals[path] - in_engine[path],
                        "own_ms_per_forecast": (totals[path] - in_engine[path]) * 1e3 / (streams * rounds)})
    return {**report.header(engine.device, [sys.executable, "-m", "stvfm_engine.bench.streams", *sys.argv[1:]]),
            "engine": str(source), "backend": engine.backend, "model": model, "config": c.to_dict(),
            "streams": streams, "batch": batch, "rounds": rounds, "warmup_rounds": warmup, "store": "postgresql" if store and
            str(store).startswith("postgres") else "sqlite", "results": results,
            "bytes_per_request": request_bytes(c, T, names[-1], iso(grid.time(first))),
            "max_abs_diff_streams_vs_windows": max_diff,
            "note": "per-request latency offline = the batch call it waits for; a push commits before its forecast"}


def format_report(rep: dict) -> str:
    d = rep["device"]
    lines = [f"{rep['streams']} streams, batch {rep['batch']}, {rep['rounds']} rounds, backend {rep['backend']}, "
             f"store {rep['store']}; {d['name']} ({d['cores']} cores, load {d.get('load_avg_1_5_15')})",
             f"{'path':<10} {'forecasts/s':>12} {'p50 ms':>9} {'p99 ms':>9} {'engine s':>9} {'own s':>8} "
             f"{'own ms/forecast':>16}"]
    for r in rep["results"]:
        lines.append(f"{r['path']:<10} {r['forecasts_per_s']:>12.1f} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} "
                     f"{r['engine_s']:>9.2f} {r['own_s']:>8.2f} {r['own_ms_per_forecast']:>16.3f}")
    b = rep["bytes_per_request"]
    lines.append(f"bytes per request: stream {b['stream_binary']} binary / {b['stream_json']} JSON; "
                 f"whole window {b['window_binary']} binary / {b['window_json']} JSON")
    lines.append(f"max |streams - windows| = {rep['max_abs_diff_streams_vs_windows']:.3g}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stvfm_engine.bench.streams", description=__doc__.split("\n\n")[0])
    p.add_argument("engine", help="engine directory, or a checkpoint (its eager model in memory)")
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64, help="requests per serve_batch / predict_many call")
    p.add_argument("--rounds", type=int, default=3, help="timed pushes per stream")
    p.add_argument("--backend")
    p.add_argument("--threads", type=int)
    p.add_argument("--store", help="SQLite file or postgresql:// URL (default: a temp SQLite file)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--cooldown", type=float, default=0.3)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    try:
        rep = run(args.engine, args.streams, args.batch, args.rounds, args.backend, args.threads, args.store,
                  args.cooldown, warmup=args.warmup)
    except STVFMError as e:
        print(f"bench.streams: error: {e}", file=sys.stderr)
        return 2
    print(format_report(rep))
    if args.json:
        report.write_json(rep, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

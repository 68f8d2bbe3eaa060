"""Forecast streams offline: N streams each push one frame then ask a forecast, through
:meth:`Streams.serve_batch` (what a server's batcher calls), against the same forecasts sent as whole windows
(the client keeps each window and computes tod/dow, then ``Engine.predict_many``). Forecasts per second,
p50/p99 of the batch call each request waits for, bytes per request; the two paths interleaved by round,
a pause before each block.

With ``--serve triton|ray`` the same through a server that this bench starts (``serve --state-dir``, the
streams' first ``T - 1`` frames committed before it starts): ``--clients`` keep-alive connections send JSON
bodies, each stream pushing one frame and getting its forecast from ``M_stream`` in one request, against
the same forecasts sent as whole windows (the client's window and tod/dow) to ``M``. Every answer of one
path is compared with the other's.

    python -m stvfm_engine.bench.streams bike.engine --streams 1000 --batch 64 --rounds 3 --json streams.json
    python -m stvfm_engine.bench.streams bike.pt ...      # a checkpoint: its eager model, held in memory
    python -m stvfm_engine.bench.streams bike.engine --serve triton --streams 1000 --clients 16 --rounds 2
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


def run_served(engine_dir: str, server: str = "triton", streams: int = 1000, clients: int = 16, rounds: int = 2,
               threads: Optional[int] = None, cooldown: float = 2.0, seed: int = 0,
               ready_timeout_s: float = 600.0) -> dict[str, Any]:
    """The streams against whole windows through ``serve`` (``server``: ``triton`` or ``ray``): see the module
    docstring. Per path: forecasts/s (streams / the round's wall time), p50/p99 of a request, bytes sent and
    received per request; both paths' answers compared."""
    import queue
    import threading

    from stvfm_engine.bench.faults import ServeProcess
    from stvfm_engine.bench.floor import free_port
    from stvfm_engine.wire import JsonClient

    if server not in ("triton", "ray"):
        raise STVFMError(f"--serve: expected triton or ray, got {server!r}")
    engine = Engine.load(engine_dir, threads=threads)
    if len(engine.models) != 1:
        raise STVFMError("the served streams bench takes a one-model engine directory")
    c = engine.config
    grid = grid_for(c.steps_per_day, c.calendar, None if c.uses_time else 1800.0)
    T, shape = c.history, (c.channels, c.height, c.width)
    rng = np.random.default_rng(seed)
    names = [f"region-{i:05d}" for i in range(streams)]
    windows = {n: np.zeros((T, *shape), np.float32) for n in names}
    first = grid.step(parse_time("2026-11-01T04:00:00Z"))  # the New York fall-back hour runs through it

    def frames_at() -> dict[str, np.ndarray]:
        return {n: (10 + 3 * rng.standard_normal(shape)).astype(np.float32) for n in names}

    with tempfile.TemporaryDirectory(prefix="stvfm-bench-streams-") as tmp:
        with Streams(engine, str(Path(tmp) / "streams.db"), interval=None if c.uses_time else 1800.0) as s:
            for k in range(first - T + 1, first):  # T - 1 frames held before the first timed round
                new = frames_at()
                for i in range(0, streams, 500):
                    s.serve_batch([(n, iso(grid.time(k)), new[n], None, None) for n in names[i:i + 500]])
                for n in names:
                    windows[n] = np.concatenate([windows[n][1:], new[n][None]])
        del engine, s
        ports: list[int] = []
        while len(ports) < 3:  # distinct (each was free when asked)
            ports += [p for p in [free_port()] if p not in ports]
        args = [str(engine_dir), "--name", "m", "--http-port", str(ports[0]), "--state-dir", tmp,
                "--max-queue", str(max(64, 4 * clients))]
        if not c.uses_time:
            args += ["--stream-interval", "1800"]
        args += ["--ray"] if server == "ray" else ["--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
        if threads:
            args += ["--threads", str(threads)]
        proc = ServeProcess(args)
        try:
            proc.wait_ready(ready_timeout_s)
            timings: dict[str, list[float]] = {"streams": [], "windows": []}
            walls = {"streams": 0.0, "windows": 0.0}
            sent = {"streams": 0, "windows": 0}
            received = {"streams": 0, "windows": 0}
            max_diff, errors, lock = 0.0, [], threading.Lock()

            def drive(path: str, bodies: dict[str, bytes], out: dict[str, np.ndarray]) -> float:
                todo: queue.Queue = queue.Queue()
                for n in names:
                    todo.put(n)
                model = "m_stream" if path == "streams" else "m"

                def client() -> None:
                    conn = JsonClient(f"127.0.0.1:{ports[0]}", timeout_s=300)
                    try:
                        while True:
                            try:
                                n = todo.get_nowait()
                            except queue.Empty:
                                return
                            t0 = time.perf_counter()
                            status, answer = conn.post(f"/v2/models/{model}/infer", bodies[n])
                            with lock:
                                timings[path].append((time.perf_counter() - t0) * 1e3)
                                if status != 200:
                                    errors.append(f"{path} {n}: HTTP {status} {answer[:200]!r}")
                                    continue
                                received[path] += len(answer)
                            doc = json.loads(answer)
                            y = next(o for o in doc["outputs"] if o["name"] == "y")
                            out[n] = np.asarray(y["data"], np.float32).reshape(y["shape"])[0]
                    except Exception as e:  # noqa: BLE001 - a connection error fails the bench, named below
                        with lock:
                            errors.append(f"{path}: {type(e).__name__}: {e}")
                    finally:
                        conn.close()

                time.sleep(cooldown)
                started = time.perf_counter()
                workers = [threading.Thread(target=client) for _ in range(clients)]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                return time.perf_counter() - started

            for r in range(rounds):
                k = first + r
                when = iso(grid.time(k))
                new = frames_at()
                for n in names:
                    windows[n] = np.concatenate([windows[n][1:], new[n][None]])
                tod, dow = (grid.features(range(k - T + 1, k + 1)) if c.uses_time else (None, None))
                bodies = {"streams": {n: _stream_body(n, when, new[n]) for n in names},
                          "windows": {n: _window_body(windows[n], tod, dow) for n in names}}
                outputs: dict[str, dict[str, np.ndarray]] = {"streams": {}, "windows": {}}
                for path in (("streams", "windows") if r % 2 == 0 else ("windows", "streams")):
                    walls[path] += drive(path, bodies[path], outputs[path])
                    sent[path] += sum(map(len, bodies[path].values()))
                if errors:
                    raise STVFMError(f"{len(errors)} requests failed, first: {errors[0]}")
                max_diff = max(max_diff, max(float(np.abs(outputs["streams"][n] - outputs["windows"][n]).max())
                                             for n in names))
        finally:
            code, left = proc.stop(60)
    results = []
    for path in ("streams", "windows"):
        stats = summarize(timings[path], 1)
        n = streams * rounds
        results.append({"path": path, "forecasts_per_s": n / walls[path], "p50_ms": stats["p50_ms"],
                        "p99_ms": stats["p99_ms"], "requests": stats["samples"],
                        "request_bytes": sent[path] / n, "response_bytes": received[path] / n})
    return {**report.header("cpu", [sys.executable, "-m", "stvfm_engine.bench.streams", *sys.argv[1:]]),
            "engine": str(engine_dir), "server": server, "config": c.to_dict(), "streams": streams,
            "clients": clients, "rounds": rounds, "results": results, "max_abs_diff_streams_vs_windows": max_diff,
            "serve_exit_code": code, "processes_left": len(left), "peak_rss_mib": proc.peak_rss / 2 ** 20,
            "note": "JSON bodies over keep-alive connections; a stream request pushes its frame and gets its forecast"}


def _stream_body(stream: str, when: str, frame: np.ndarray) -> bytes:
    return json.dumps({"inputs": [
        {"name": "stream", "datatype": "BYTES", "shape": [1, 1], "data": [stream]},
        {"name": "time", "datatype": "BYTES", "shape": [1, 1], "data": [when]},
        {"name": "frame", "datatype": "FP32", "shape": [1, *frame.shape], "data": frame.ravel().tolist()}]}).encode()


def _window_body(window: np.ndarray, tod: Any, dow: Any) -> bytes:
    inputs = [{"name": "x", "datatype": "FP32", "shape": [1, *window.shape], "data": window.ravel().tolist()}]
    if tod is not None:
        inputs += [{"name": n, "datatype": "INT64", "shape": [1, len(v)], "data": v.tolist()}
                   for n, v in (("tod", tod), ("dow", dow))]
    return json.dumps({"inputs": inputs}).encode()


def format_served(rep: dict) -> str:
    d = rep["device"]
    lines = [f"{rep['streams']} streams through serve{' --ray' if rep['server'] == 'ray' else ''}, {rep['clients']} "
             f"clients, {rep['rounds']} rounds, JSON bodies; {d['name']} ({d['cores']} cores, load "
             f"{d.get('load_avg_1_5_15')})",
             f"{'path':<10} {'forecasts/s':>12} {'p50 ms':>9} {'p99 ms':>9} {'bytes sent':>11} {'bytes back':>11}"]
    for r in rep["results"]:
        lines.append(f"{r['path']:<10} {r['forecasts_per_s']:>12.1f} {r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f} "
                     f"{r['request_bytes']:>11.0f} {r['response_bytes']:>11.0f}")
    lines.append(f"max |streams - windows| = {rep['max_abs_diff_streams_vs_windows']:.3g}; serve exit "
                 f"{rep['serve_exit_code']}, {rep['processes_left']} processes left, peak RSS "
                 f"{rep['peak_rss_mib']:.0f} MiB")
    return "\n".join(lines)


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
    p.add_argument("--serve", choices=("triton", "ray"),
                   help="through a server this bench starts (an engine directory): M_stream against whole windows")
    p.add_argument("--clients", type=int, default=16, help="--serve: concurrent keep-alive connections (default 16)")
    args = p.parse_args(argv)
    try:
        if args.serve:
            rep = run_served(args.engine, args.serve, args.streams, args.clients, args.rounds, args.threads,
                             max(args.cooldown, 1.0))
        else:
            rep = run(args.engine, args.streams, args.batch, args.rounds, args.backend, args.threads, args.store,
                      args.cooldown, warmup=args.warmup)
    except STVFMError as e:
        print(f"bench.streams: error: {e}", file=sys.stderr)
        return 2
    print(format_served(rep) if args.serve else format_report(rep))
    if args.json:
        report.write_json(rep, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Load test of a running inference server (``bench --url``) with ``tritonclient`` over HTTP or gRPC, to
this machine only: latency percentiles, throughput, errors and the server's mean batch per concurrency."""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Optional, Sequence

import numpy as np

from stvfm_engine.bench.report import _fmt
from stvfm_engine.engine.timing import Schedule, summarize, time_interleaved
from stvfm_engine.errors import first_line, LoadError
from stvfm_engine.wire import JsonClient, check_loopback, connect, infer, infer_inputs, json_body, json_output, parse_url

_COUNTER = re.compile(r'^(nv_inference_count|nv_inference_exec_count)\{([^}]*)\}\s+([0-9.eE+-]+)')


class _Sender:
    """One client's connection: ``send()`` one request, returning ``y`` (raising on an error answer)."""

    def __init__(self, url: str, model: str, arrays: dict[str, np.ndarray], body_kind: str, timeout_s: float):
        self.kind = body_kind
        if body_kind == "json":
            self.client = JsonClient(parse_url(url)[1], timeout_s)
            self.path, self.body = f"/v2/models/{model}/infer", json_body(arrays)
        else:
            self.module, self.client = connect(url, timeout_s)
            self.model, self.inputs, self.timeout_s = model, infer_inputs(self.module, arrays), timeout_s

    def send(self) -> np.ndarray:
        if self.kind == "json":
            status, data = self.client.post(self.path, self.body)
            if status != 200:
                raise LoadError(f"HTTP {status}: {data[:200].decode('utf-8', 'replace')}")
            return json_output(data)
        return infer(self.module, self.client, self.model, self.inputs, self.timeout_s).as_numpy("y")

    def close(self) -> None:
        self.client.close()


def model_inputs(module, client, model: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid requests for any model, from its metadata: ``x`` uniform in [0, 20), ``tod``/``dow`` 0."""
    grpc = module.__name__.endswith("grpc")
    meta = client.get_model_metadata(model, as_json=True) if grpc else client.get_model_metadata(model)
    rng = np.random.default_rng(seed)
    out = {}
    for t in meta["inputs"]:
        shape = [batch, *(int(s) for s in t["shape"][1:])]
        out[t["name"]] = ((rng.random(shape) * 20).astype(np.float32) if t["datatype"] == "FP32"
                          else np.zeros(shape, dtype=np.int64))
    return out


def read_counters(metrics_url: str, model: str) -> Optional[tuple[float, float]]:
    """``(nv_inference_count, nv_inference_exec_count)`` of ``model`` (summed over versions), or None."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        return None
    counts = {"nv_inference_count": 0.0, "nv_inference_exec_count": 0.0}
    found = False
    for line in text.splitlines():
        m = _COUNTER.match(line)
        if m and f'model="{model}"' in m.group(2):
            counts[m.group(1)] += float(m.group(3))
            found = True
    return (counts["nv_inference_count"], counts["nv_inference_exec_count"]) if found else None


def _level(url: str, model: str, arrays: dict[str, np.ndarray], concurrency: int, duration_s: float,
           max_requests: int, warmup: int, timeout_s: float, metrics_url: Optional[str], body_kind: str = "binary",
           expected: Optional[np.ndarray] = None) -> dict:
    """One concurrency level: every client warms up, then all start together and stop at the deadline.
    With ``expected`` every answer is compared with it (``wrong``: answers off by more than 1e-5 relative)."""
    batch = len(next(iter(arrays.values())))
    ready = threading.Barrier(concurrency + 1)
    go = threading.Barrier(concurrency + 1)
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    wrong = [0]
    budget = [max_requests]
    ends: list[float] = []

    def client_loop():
        sender = None
        try:
            sender = _Sender(url, model, arrays, body_kind, timeout_s)
            for _ in range(warmup):
                sender.send()
        except Exception as e:  # counted; this client then sits the level out
            with lock:
                errors.append(first_line(e))
            sender = None
        ready.wait()
        go.wait()
        if sender is None:
            return
        deadline = time.perf_counter() + duration_s
        mine, bad, off = [], [], 0
        while time.perf_counter() < deadline:
            with lock:
                if budget[0] <= 0:
                    break
                budget[0] -= 1
            t0 = time.perf_counter()
            try:
                y = sender.send()
                mine.append((time.perf_counter() - t0) * 1e3)
                off += expected is not None and not _close(y, expected)
            except Exception as e:  # the server's answer (or a timeout) is counted, not fatal
                bad.append(first_line(e))
        with lock:
            latencies.extend(mine)
            errors.extend(bad)
            wrong[0] += off
            ends.append(time.perf_counter())
        sender.close()

    threads = [threading.Thread(target=client_loop, name=f"load-client-{i}", daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    ready.wait()
    before = read_counters(metrics_url, model) if metrics_url else None
    go.wait()
    start = time.perf_counter()
    for t in threads:
        t.join(timeout=duration_s + 2 * timeout_s + 10)
    wall = (max(ends) if ends else time.perf_counter()) - start
    after = read_counters(metrics_url, model) if metrics_url else None
    row = {"concurrency": concurrency, "batch": batch, "body": body_kind, "requests": len(latencies),
           "errors": len(errors), "first_error": errors[0] if errors else None, "wall_s": round(wall, 3)}
    if expected is not None:
        row["wrong"] = wrong[0]
    if latencies:
        row.update({k: v for k, v in summarize(latencies, batch).items() if k != "throughput"})
    row["throughput"] = len(latencies) * batch / wall if wall > 0 else 0.0
    served = before and after and after[1] > before[1]
    row["mean_batch"] = (after[0] - before[0]) / (after[1] - before[1]) if served else None
    row["_latencies"], row["_counts"] = latencies, ((after[0] - before[0], after[1] - before[1]) if served else None)
    return row


def _merge(rows: list[dict]) -> dict:
    """One row of the blocks of a level: latencies pooled, throughput = all samples / all blocks' wall time,
    the mean batch over all blocks; ``blocks`` the block count."""
    if len(rows) == 1:
        return {**rows[0], "blocks": 1}
    first, batch = rows[0], rows[0]["batch"]
    latencies = [v for r in rows for v in r["_latencies"]]
    wall = sum(r["wall_s"] for r in rows)
    errors = [r["first_error"] for r in rows if r["first_error"]]
    row = {"concurrency": first["concurrency"], "batch": batch, "body": first["body"], "requests": len(latencies),
           "errors": sum(r["errors"] for r in rows), "first_error": errors[0] if errors else None,
           "wall_s": round(wall, 3), "blocks": len(rows)}
    if "wrong" in first:
        row["wrong"] = sum(r["wrong"] for r in rows)
    if latencies:
        row.update({k: v for k, v in summarize(latencies, batch).items() if k != "throughput"})
    row["throughput"] = len(latencies) * batch / wall if wall > 0 else 0.0
    counts = [r["_counts"] for r in rows if r["_counts"]]
    row["mean_batch"] = sum(c[0] for c in counts) / sum(c[1] for c in counts) if counts else None
    row["_latencies"], row["_counts"] = latencies, None
    return row


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _close(y: np.ndarray, expected: np.ndarray, rtol: float = 1e-5) -> bool:
    """``y`` equals ``expected`` in shape and within ``rtol`` of its scale."""
    y = np.asarray(y)
    return y.shape == expected.shape and float(np.abs(y - expected).max(initial=0.0)) <= \
        rtol * max(1.0, float(np.abs(expected).max(initial=0.0)))


def run_load(url: str, model: str, concurrency: Sequence[int] = (1, 4, 16), duration_s: float = 10.0,
             batch: int = 1, metrics_url: Optional[str] = None, arrays: Optional[dict[str, np.ndarray]] = None,
             max_requests: int = 100_000, warmup: int = 2, timeout_s: float = 60.0,
             offline: Optional[Callable[[int], dict]] = None, log: Callable[[str], None] = lambda s: None,
             body_kind: str = "binary", expected: Optional[np.ndarray] = None, floor: Optional[dict] = None,
             floor_app: Optional["FloorApp"] = None, rounds: int = 1, pause_s: float = 1.0) -> dict:
    """Drive the server at ``url`` at each concurrency; ``arrays`` is one request (default: from the
    model's metadata, see :func:`model_inputs`), sent as tritonclient's binary tensors (``body_kind``
    ``binary``) or JSON data (``json``); ``expected`` the answer each response is checked against.
    ``metrics_url`` default: ``URL/metrics`` if it answers (the Ray Serve app); Triton's metrics port must be
    given. ``offline`` (:func:`offline_timer`), timed right after each level so that both see about the same
    machine, adds the offline comparison; ``floor`` (:func:`measure_floor`'s report) the targets.

    ``floor_app`` (a running :class:`FloorApp`) measures the floor side by side instead: each level is
    ``rounds`` rounds of blocks of ``duration_s / rounds`` each (and ``max_requests / rounds`` requests at
    most): the floor app and the server, their order alternating by round, then (with ``offline``)
    ``Engine.predict`` at the request's batch (one client) or 8 (the throughput target's batch), called
    back to back for a block of the same length, a ``pause_s`` pause before each block (short blocks of a
    few calls after a pause time a colder engine: 3.9 ms against 2.4-2.6 ms back to back for the
    7x3x9x17 engine, which made the serving cost look 1.3 ms smaller); each side's blocks are pooled (latencies, and requests over wall
    time), and the targets come from the pooled figures of one run."""
    check_loopback(url)
    if min(concurrency) < 1 or duration_s <= 0 or batch < 1 or max_requests < 1:
        raise LoadError("concurrency, batch and --requests must be >= 1 and --duration > 0")
    if body_kind not in ("binary", "json"):
        raise LoadError(f"expected body kind binary or json, got {body_kind!r}")
    module, client = connect(url, timeout_s)
    try:
        if not client.is_server_ready():
            raise LoadError(f"the server at {url} is not ready")
        if not client.is_model_ready(model):
            raise LoadError(f"the server at {url} has no ready model {model!r}")
        arrays = arrays if arrays is not None else model_inputs(module, client, model, batch)
    except LoadError:
        raise
    except Exception as e:
        raise LoadError(f"cannot reach a server at {url}: {first_line(e)}") from None
    finally:
        client.close()
    protocol, address = parse_url(url)
    if body_kind == "json" and protocol != "http":
        raise LoadError("JSON bodies go over HTTP: give an http:// URL")
    if metrics_url is None and protocol == "http" and read_counters(f"http://{address}/metrics", model):
        metrics_url = f"http://{address}/metrics"
    if metrics_url:
        check_loopback(metrics_url)
    report = {"url": url, "protocol": protocol, "body": body_kind, "model": model, "metrics_url": metrics_url,
              "duration_s": duration_s, "results": []}
    if floor is not None:
        report["floor"] = floor
    if floor_app is not None:
        return _side_by_side(report, url, model, arrays, concurrency, duration_s, max_requests, warmup, timeout_s,
                             metrics_url, body_kind, expected, offline, floor_app, max(1, rounds), pause_s, log)
    for n in concurrency:
        row = _public(_level(url, model, arrays, n, duration_s, max_requests, warmup, timeout_s, metrics_url,
                             body_kind, expected))
        log(f"concurrency {n}: {row['requests']} requests, {row['errors']} errors, "
            f"{row['throughput']:.1f} samples/s, mean server batch {_fmt(row['mean_batch'], '.2f')}")
        if offline is not None:
            _compare(report, row, offline)
        report["results"].append(row)
    if floor is not None and offline is not None:
        report["targets"] = _targets(report, floor, offline)
    return report


def _side_by_side(report: dict, url: str, model: str, arrays: dict[str, np.ndarray], concurrency: Sequence[int],
                  duration_s: float, max_requests: int, warmup: int, timeout_s: float, metrics_url: Optional[str],
                  body_kind: str, expected: Optional[np.ndarray], offline: Optional[Callable[[int], dict]],
                  floor_app: "FloorApp", rounds: int, pause_s: float, log: Callable[[str], None]) -> dict:
    """:func:`run_load` with the floor measured in blocks interleaved with the server's (see there)."""
    block_s, block_requests = duration_s / rounds, max(1, max_requests // rounds)
    batch = len(next(iter(arrays.values())))
    floor_rows, offline_runs = [], {}
    for n in concurrency:
        blocks: dict[str, list] = {"server": [], "floor": []}
        for r in range(rounds):
            for who in (("floor", "server") if r % 2 == 0 else ("server", "floor")):
                time.sleep(pause_s)
                if who == "floor":
                    blocks[who].append(_level(floor_app.url, model, arrays, n, block_s, block_requests, warmup,
                                              timeout_s, None, "json"))
                else:
                    blocks[who].append(_level(url, model, arrays, n, block_s, block_requests, warmup, timeout_s,
                                              metrics_url, body_kind, expected))
            if offline is not None:  # a block of the same length, after the same pause, calls back to back
                b = batch if n == 1 else 8
                offline_runs.setdefault(b, []).append(offline(b, block_s, pause_s))
        row, floor_row = _merge(blocks["server"]), _merge(blocks["floor"])
        log(f"concurrency {n}: {row['requests']} requests, {row['errors']} errors, {row['throughput']:.1f} samples/s "
            f"(floor {floor_row['throughput']:.1f} requests/s), mean server batch {_fmt(row['mean_batch'], '.2f')}")
        report["results"].append(_public(row))
        floor_rows.append(_public(floor_row))
    report["floor"] = {"kind": floor_app.kind, "app": floor_app.app, "results": floor_rows, "side_by_side": True,
                       "rounds": rounds, "pause_s": pause_s}
    if offline is not None:
        pooled = {b: _pool(runs, b) for b, runs in offline_runs.items()}
        report["offline_interleaved"] = {str(b): {k: v for k, v in p.items() if k != "samples_ms"}
                                         for b, p in pooled.items()}
        for row in report["results"]:
            b = batch if row["concurrency"] == 1 else 8
            ref = pooled[b]
            row.update(offline_batch=b, offline_p50_ms=ref["p50_ms"], offline_throughput=ref["throughput"],
                       served_vs_offline=row["throughput"] / ref["throughput"])
            if row["concurrency"] == 1 and row["batch"] == 1 and "p50_ms" in row:
                report["serving_cost_ms"] = row["p50_ms"] - ref["p50_ms"]
        report["targets"] = _targets(report, report["floor"], lambda b: pooled[b] if b in pooled else offline(b))
    return report


def _pool(runs: list[dict], batch: int) -> dict:
    """Offline timings of several blocks as one (their samples pooled)."""
    samples = [v for r in runs for v in r["samples_ms"]]
    return {**summarize(samples, batch), "samples_ms": samples, "blocks": len(runs)}


class FloorApp:
    """The server kind's own floor (:mod:`stvfm_engine.bench.floor`: a Ray Serve deployment for ``ray``, a
    uvicorn ASGI app for ``asgi``) that decodes the same JSON body and answers a ``y_shape``-sized array,
    running in a child process (``with FloorApp(kind, y_shape) as app: app.url``)."""

    def __init__(self, kind: str, y_shape: Sequence[int]):
        from stvfm_engine.bench.floor import KINDS

        if kind not in KINDS:
            raise LoadError(f"expected a floor app kind of {list(KINDS)}, got {kind!r}")
        self.kind, self.app, self.y_shape = kind, KINDS[kind], list(y_shape)
        self.proc = None

    def __enter__(self) -> "FloorApp":
        import subprocess
        import sys
        import tempfile

        from stvfm_engine.bench.floor import free_port

        port = free_port()
        log_file = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "stvfm_engine.bench.floor",
                                      json.dumps({"kind": self.kind, "port": port, "y": self.y_shape})],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                log_file.seek(0)
                raise LoadError(f"the {self.kind} floor app did not start: {log_file.read().decode()[-500:]}")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        import subprocess

        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure_floor(kind: str, model: str, arrays: dict[str, np.ndarray], y_shape: Sequence[int],
                  concurrency: Sequence[int], duration_s: float, max_requests: int = 100_000, warmup: int = 2,
                  timeout_s: float = 60.0, log: Callable[[str], None] = lambda s: None) -> dict:
    """The server kind's floor app (:class:`FloorApp`) measured alone: started, driven at each concurrency
    with JSON bodies, stopped."""
    with FloorApp(kind, y_shape) as app:
        rows = []
        for n in concurrency:
            row = _public(_level(app.url, model, arrays, n, duration_s, max_requests, warmup, timeout_s, None, "json"))
            log(f"floor ({kind}) concurrency {n}: {row['requests']} requests, {row['errors']} errors, "
                f"p50 {_fmt(row.get('p50_ms'), '.2f')} ms, {row['throughput']:.1f} requests/s")
            rows.append(row)
    return {"kind": kind, "app": app.app, "results": rows}


def _targets(report: dict, floor: dict, offline: Callable[[int], dict]) -> dict:
    """Issue 23's targets from one run: at 1 client, Ray's p50 <= 1.5 x the floor's p50 + Engine.predict's
    batch-1 p50 and the front's serving cost <= 3 ms (``asgi``); at the highest concurrency, throughput >=
    0.8 x 1 / (1 / floor rate + 1 / offline batch-8 rate)."""
    by_n = {r["concurrency"]: r for r in report["results"]}
    floor_by_n = {r["concurrency"]: r for r in floor["results"]}
    out: dict = {}
    b1 = offline(1)
    if 1 in by_n and 1 in floor_by_n and "p50_ms" in by_n[1] and "p50_ms" in floor_by_n[1]:
        p50, floor_p50 = by_n[1]["p50_ms"], floor_by_n[1]["p50_ms"]
        out["offline_b1_p50_ms"] = b1["p50_ms"]
        out["floor_p50_ms"] = floor_p50
        if floor["kind"] == "ray":
            limit = 1.5 * floor_p50 + b1["p50_ms"]
            out["p50_1_client"] = {"served_ms": p50, "limit_ms": limit, "met": p50 <= limit}
        else:
            cost = p50 - b1["p50_ms"]
            out["cost_1_client"] = {"served_ms": cost, "limit_ms": 3.0, "met": cost <= 3.0,
                                    "over_floor_ms": p50 - floor_p50}
    top = max(set(by_n) & set(floor_by_n), default=None)
    if top is not None and top > 1:
        b8 = offline(8)
        rate = 1 / (1 / floor_by_n[top]["throughput"] + 1 / b8["throughput"]) if floor_by_n[top]["throughput"] else 0.0
        served = by_n[top]["throughput"]
        out["throughput"] = {"clients": top, "served": served, "floor": floor_by_n[top]["throughput"],
                             "offline_b8": b8["throughput"], "limit": 0.8 * rate,
                             "ratio": served / rate if rate else None, "met": served >= 0.8 * rate}
    return out


def offline_timer(predict: Callable, arrays_for: Callable[[int], tuple], iters: int = 20,
                  warmup: int = 3) -> Callable[[int], dict]:
    """``timer(batch)``: ``predict`` (``Engine.predict``) timed in this process at ``batch`` (engine.timing's
    schedule, whose cool-down pauses also let the server's thread pools go idle)."""
    def timer(batch: int, duration_s: Optional[float] = None, pause_s: float = 0.0) -> dict:
        args = arrays_for(batch)
        if duration_s is None:
            samples = time_interleaved({batch: lambda: predict(*args)}, Schedule.for_iters(iters, warmup))[batch]
        else:  # one block like a server's: after the pause, calls back to back for duration_s
            time.sleep(pause_s)
            for _ in range(warmup):
                predict(*args)
            samples, end = [], time.perf_counter() + duration_s
            while time.perf_counter() < end or not samples:
                t0 = time.perf_counter()
                predict(*args)
                samples.append((time.perf_counter() - t0) * 1e3)
        return {**summarize(samples, batch), "samples_ms": list(samples)}

    return timer


def _compare(report: dict, row: dict, offline: Callable[[int], dict]) -> None:
    """Right after a level: the offline throughput at the server's mean batch (rounded), the ratio, and at
    one client the serving cost (served p50 minus the direct p50 at the request's batch)."""
    b = max(1, round(row["mean_batch"] or row["batch"]))
    ref = offline(b)
    row.update(offline_batch=b, offline_p50_ms=ref["p50_ms"], offline_throughput=ref["throughput"],
               served_vs_offline=row["throughput"] / ref["throughput"])
    if row["concurrency"] == 1 and b == row["batch"] and "p50_ms" in row:
        report["serving_cost_ms"] = row["p50_ms"] - ref["p50_ms"]


def format_load_table(report: dict) -> str:
    lines = [f"{report['url']} model {report['model']} ({report['protocol']}, {report.get('body', 'binary')} bodies), "
             f"{report['duration_s']:g} s per level"]
    head = (f"{'':>6} {'clients':>7} {'batch':>5} {'requests':>8} {'errors':>6} {'wrong':>5} {'p50 ms':>8} "
            f"{'p90 ms':>8} {'p99 ms':>8} {'samples/s':>10} {'srv batch':>9} {'offline/s':>10} {'ratio':>6}")
    lines += [head, "-" * len(head)]
    rows = [("floor", r) for r in report.get("floor", {}).get("results", [])] + \
        [("server", r) for r in report["results"]]
    for who, r in rows:
        lines.append(f"{who:>6} {r['concurrency']:>7} {r['batch']:>5} {r['requests']:>8} {r['errors']:>6} "
                     f"{_fmt(r.get('wrong'), 'd'):>5} {_fmt(r.get('p50_ms'), '.2f'):>8} "
                     f"{_fmt(r.get('p90_ms'), '.2f'):>8} {_fmt(r.get('p99_ms'), '.2f'):>8} {r['throughput']:>10.1f} "
                     f"{_fmt(r.get('mean_batch'), '.2f'):>9} {_fmt(r.get('offline_throughput'), '.1f'):>10} "
                     f"{_fmt(r.get('served_vs_offline'), '.2f'):>6}")
        if r["first_error"]:
            lines.append(f"        first error: {r['first_error']}")
    if "serving_cost_ms" in report:
        lines.append(f"serving cost per request at 1 client: {report['serving_cost_ms']:.2f} ms "
                     "(served p50 - direct Engine.predict p50)")
    if "floor" in report:
        f = report["floor"]
        lines.append(f"floor: {f['app']}, " + (f"side by side: {f['rounds']} rounds of blocks (floor and server "
                     f"in alternating order, then Engine.predict), {f['pause_s']:g} s pause before each" if
                     f.get("side_by_side") else "measured alone before the server"))
    for name, t in report.get("targets", {}).items():
        if isinstance(t, dict):
            values = ", ".join(f"{k} {format(v, '.2f') if isinstance(v, float) else v}" for k, v in t.items()
                               if k != "met")
            lines.append(f"target {name}: {'met' if t['met'] else 'NOT met'} ({values})")
    return "\n".join(lines)

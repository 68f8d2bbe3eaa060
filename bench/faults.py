"""The fault scenario and the overload case of ``bench DIR --faults triton|ray`` (issue 19): this module starts
``stvfm-engine serve`` itself, so that it can signal it, and drives it with JSON bodies over loopback.

Fault scenario: ``clients`` concurrent keep-alive clients send ``requests`` requests, ``malformed`` of them
broken on the wire; SIGTERM when half have been sent. Every answer is classified: answered correctly
(against ``Engine.predict``), wrong, refused (503/504, or the connection refused once the server is
gone), malformed rejected (4xx), lost (no answer: a reset or dropped connection, a timeout, or a status
that is none of those). Also the drain (signal to exit), readiness turning false, the exit code, peak RSS
of the process tree, processes left behind. Overload case: ``--max-queue`` 8 and 256 requests at once:
refusals immediate, every accepted one right.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Optional

import numpy as np

from stvfm_engine.bench.floor import free_port
from stvfm_engine.bench.load import _close
from stvfm_engine.wire import JsonClient, json_body, json_output
from stvfm_engine.engine.timing import summarize
from stvfm_engine.errors import LoadError


def malformed_bodies(good: dict[str, np.ndarray]) -> list[tuple[str, bytes]]:
    """Bodies broken on the wire, each ``(what, body)``: every one must be answered 4xx."""
    base = json.loads(json_body(good))
    x = base["inputs"][0]

    def variant(what: str, change: Callable[[dict], None]) -> tuple[str, bytes]:
        body = json.loads(json.dumps(base))
        change(body)
        return what, json.dumps(body).encode()

    out = [("truncated JSON", json_body(good)[:-7]), ("not JSON", b"hello"),
           ("deep nesting", b"[" * 20000 + b"]" * 20000),
           variant("inputs not a list", lambda b: b.update(inputs={"x": 1})),
           variant("negative shape", lambda b: b["inputs"][0].update(shape=[-1, *x["shape"][1:]])),
           variant("huge shape", lambda b: b["inputs"][0].update(shape=[2 ** 40, *x["shape"][1:]])),
           variant("string in x", lambda b: b["inputs"][0]["data"].__setitem__(0, "7")),
           variant("null in x", lambda b: b["inputs"][0]["data"].__setitem__(0, None)),
           variant("short data", lambda b: b["inputs"][0].update(data=x["data"][:-1])),
           variant("wrong datatype", lambda b: b["inputs"][0].update(datatype="FP64")),
           variant("unknown input", lambda b: b["inputs"].append({"name": "z", "datatype": "FP32", "shape": [1],
                                                                  "data": [0.0]}))]
    if len(base["inputs"]) > 1:  # tod: a float, a string, a bool in an INT64 input
        for what, value in (("float in INT64", 1.9), ("string in INT64", "3"), ("bool in INT64", True)):
            out.append(variant(what, lambda b, v=value: b["inputs"][1]["data"].__setitem__(0, v)))
    return out


class ServeProcess:
    """``stvfm-engine serve ARGS`` in a subprocess (stderr kept), its process tree sampled for RSS."""

    def __init__(self, args: list[str]):
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "stvfm_engine", "serve", *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        self.peak_rss = 0
        self.family: set[int] = set()
        self._sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while "serve: ready" not in self.stderr():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(5)
                raise LoadError(f"serve did not become ready: {self.stderr()[-1500:]}")
            time.sleep(0.25)

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
                except (OSError, IndexError, ValueError):
                    continue
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children.get(pid, [])
        return out

    def _sample(self) -> None:
        while not self._sampling.wait(0.2):
            tree = self._tree()
            self.family.update(tree)
            rss = 0
            for pid in tree:
                try:
                    with open(f"/proc/{pid}/statm") as f:
                        rss += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                except (OSError, IndexError, ValueError):
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            if self.proc.poll() is not None:
                return

    def stop(self, timeout_s: float) -> tuple[int, list[int]]:
        """SIGTERM (if still running), wait; returns the exit code and the processes left (then killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._sampling.set()
        left = []
        for pid in sorted(self.family - {self.proc.pid}):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        left.append(pid)
                        os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return code, left


def _serve_args(engine_dir: str, kind: str, port: int, extra: list[str]) -> list[str]:
    args = [engine_dir, "--name", "m", "--http-port", str(port), "--threads", "1", *extra]
    if kind == "ray":
        return [*args, "--ray"]
    grpc, metrics = free_port(), free_port()
    return [*args, "--grpc-port", str(grpc), "--metrics-port", str(metrics)]


def _classify(status: Optional[int], error: Optional[BaseException], good: bool, right: bool) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if error is not None or status is None:
        return "lost"
    if status in (503, 504):
        return "refused"
    if good:
        return ("correct" if right else "wrong") if status == 200 else "lost"
    return "rejected" if 400 <= status < 500 else ("wrong" if status == 200 else "lost")


def _ready(base: str) -> Optional[bool]:
    try:
        with urllib.request.urlopen(base + "/v2/health/ready", timeout=1) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return False
    except (urllib.error.URLError, OSError):
        return None


def run_faults(engine_dir: str, kind: str, predict: Callable, make_inputs: Callable[[int, int], dict],
               clients: int = 64, requests: int = 2000, malformed: float = 0.10, drain_timeout_s: float = 30.0,
               ready_timeout_s: float = 300.0, log: Callable[[str], None] = lambda s: None) -> dict:
    """The fault scenario on ``kind`` (``triton`` or ``ray``). ``make_inputs(batch, seed)`` -> arrays by
    name; ``predict(arrays)`` -> the answer ``Engine.predict`` gives."""
    port = free_port()
    server = ServeProcess(_serve_args(engine_dir, kind, port, ["--drain-timeout", str(drain_timeout_s)]))
    base = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(0)
    pool = []
    for seed in range(16):
        arrays = make_inputs(1 + seed % 3, seed)
        pool.append((json_body(arrays), predict(arrays)))
    bad = malformed_bodies(make_inputs(1, 99))
    plan = [("bad", i % len(bad)) if rng.random() < malformed else ("good", i % len(pool)) for i in range(requests)]
    server.wait_ready(ready_timeout_s)
    log(f"{kind}: ready; {clients} clients, {requests} requests, SIGTERM after {requests // 2}")
    lock = threading.Lock()
    next_index = [0]
    outcomes: list[Optional[dict]] = [None] * requests
    signalled = threading.Event()
    t_signal = [0.0]

    def client() -> None:
        conn = JsonClient(f"127.0.0.1:{port}", timeout_s=drain_timeout_s + 30)
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= requests:
                break
            if i == requests // 2:
                t_signal[0] = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                signalled.set()
            what, j = plan[i]
            body, expected = pool[j] if what == "good" else (bad[j][1], None)
            after = signalled.is_set()
            t0 = time.perf_counter()
            status = error = None
            right = False
            try:
                status, data = conn.post("/v2/models/m/infer", body)
                if status == 200 and expected is not None:
                    right = _close(json_output(data), expected)
            except (OSError, http.client.HTTPException) as e:
                error = e
                conn.close()
            outcomes[i] = {"kind": _classify(status, error, what == "good", right), "good": what == "good",
                           "after_signal": after, "ms": (time.perf_counter() - t0) * 1e3, "status": status,
                           "error": None if error is None else f"{type(error).__name__}: {error}"[:120]}
        conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    signalled.wait(timeout=600)
    readiness_false_s = None
    while time.monotonic() - t_signal[0] < 5:
        if _ready(base) is not True:
            readiness_false_s = time.monotonic() - t_signal[0]
            break
        time.sleep(0.02)
    code, left = server.stop(timeout_s=drain_timeout_s + 30)
    drain_s = time.monotonic() - t_signal[0]
    for t in threads:
        t.join(timeout=120)
    counts = {k: 0 for k in ("correct", "wrong", "refused", "rejected", "lost", "reset")}
    for o in outcomes:
        # a connection dropped without an answer: lost if the request was sent before the signal; one sent
        # after it, to a server already refusing new work, is counted apart (reset at exit, not served work)
        counts["lost" if o is None else "reset" if o["kind"] == "lost" and o["after_signal"] else o["kind"]] += 1
    accepted = [o["ms"] for o in outcomes if o and o["kind"] in ("correct", "wrong")]
    lat = summarize(accepted, 1) if accepted else {}
    examples = sorted({f"{'after' if o['after_signal'] else 'before'} the signal: {o['status']} {o['error']}"
                       for o in outcomes if o and o["kind"] in ("lost", "wrong")})[:5]
    return {"server": kind, "clients": clients, "requests": requests, "malformed": sum(w == "bad" for w, _ in plan),
            "accepted": len(accepted) + counts["lost"], "answered_correctly": counts["correct"],
            "refused": counts["refused"], "malformed_rejected": counts["rejected"], "lost": counts["lost"],
            "reset_after_signal": counts["reset"],
            "wrong": counts["wrong"], "p50_ms": lat.get("p50_ms"), "p99_ms": lat.get("p99_ms"),
            "readiness_false_s": readiness_false_s, "drain_s": round(drain_s, 2), "exit_code": code,
            "wall_s": round(time.monotonic() - start, 2), "peak_rss_mb": round(server.peak_rss / 2 ** 20),
            "left_behind": len(left), "examples": examples, "log_tail": server.stderr()[-600:]}


def run_overload(engine_dir: str, kind: str, predict: Callable, make_inputs: Callable[[int, int], dict],
                 queue: int = 8, concurrency: int = 256, ready_timeout_s: float = 300.0,
                 log: Callable[[str], None] = lambda s: None) -> dict:
    """``--max-queue queue`` and ``concurrency`` requests at once (one connection each): refused (503) at
    once, every accepted one right."""
    port = free_port()
    server = ServeProcess(_serve_args(engine_dir, kind, port, ["--max-queue", str(queue)]))
    arrays = make_inputs(1, 7)
    body, expected = json_body(arrays), predict(arrays)
    try:
        server.wait_ready(ready_timeout_s)
        log(f"{kind}: ready; {concurrency} requests at once, --max-queue {queue}")
        answers = _burst(port, "/v2/models/m/infer", body, concurrency, timeout_s=60)
        results: list[tuple[str, float]] = []
        for status, data, ms in answers:  # checked after the burst: nothing but I/O while it is timed
            kind_ = status if isinstance(status, str) else \
                ("correct" if _close(json_output(data), expected) else "wrong") if status == 200 else \
                "refused" if status in (503, 504) else f"HTTP {status}"
            results.append((kind_, ms))
    finally:
        code, left = server.stop(timeout_s=60)
    refusals = [ms for k, ms in results if k == "refused"]
    accepted = [ms for k, ms in results if k in ("correct", "wrong")]
    return {"server": kind, "max_queue": queue, "concurrency": concurrency,
            "correct": sum(k == "correct" for k, _ in results), "wrong": sum(k == "wrong" for k, _ in results),
            "refused": len(refusals), "other": sorted({k for k, _ in results} - {"correct", "wrong", "refused"}),
            "refusal_p50_ms": summarize(refusals, 1)["p50_ms"] if refusals else None,
            "refusal_p99_ms": summarize(refusals, 1)["p99_ms"] if refusals else None,
            "accepted_p99_ms": summarize(accepted, 1)["p99_ms"] if accepted else None,
            "peak_rss_mb": round(server.peak_rss / 2 ** 20), "exit_code": code, "left_behind": len(left)}


def _burst(port: int, path: str, body: bytes, n: int, timeout_s: float) -> list[tuple[object, bytes, float]]:
    """``n`` requests at once, from one event loop (uvloop where installed): ``n`` connections opened first,
    then every request written back to back; each answer's ``(status, body, ms from its write to its last
    byte)``, or ``("lost: Error", b"", ms)``. Threads would time the client: 256 of them sharing the GIL
    wait whole switch intervals (5 ms) before they see their answer."""
    import asyncio

    import httptools

    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    class Answer(asyncio.Protocol):
        def __init__(self):
            self.parser = httptools.HttpResponseParser(self)
            self.body: list[bytes] = []
            self.done = asyncio.get_running_loop().create_future()
            self.t0 = 0.0

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as e:
                self._end(f"lost: {type(e).__name__}")

        def on_body(self, data: bytes) -> None:
            self.body.append(data)

        def on_message_complete(self) -> None:
            self._end(self.parser.get_status_code())

        def connection_lost(self, exc) -> None:
            self._end(f"lost: {type(exc).__name__ if exc else 'closed'}")

        def _end(self, status) -> None:
            if not self.done.done():
                self.done.set_result((status, b"".join(self.body), (time.perf_counter() - self.t0) * 1e3))

    async def main():
        loop = asyncio.get_running_loop()
        conns = [(await loop.create_connection(Answer, "127.0.0.1", port)) for _ in range(n)]
        for transport, answer in conns:
            answer.t0 = time.perf_counter()
            transport.write(head)
        out = []
        for transport, answer in conns:
            try:
                out.append(await asyncio.wait_for(asyncio.shield(answer.done), timeout_s))
            except asyncio.TimeoutError:
                out.append(("lost: timeout", b"", timeout_s * 1e3))
            transport.close()
        return out

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def format_faults(report: dict) -> str:
    lines = []
    for r in report.get("faults", []):
        lines.append(f"{r['server']}: {r['requests']} requests ({r['malformed']} malformed), {r['clients']} clients, "
                     f"SIGTERM at the midpoint: accepted {r['accepted']}, answered correctly {r['answered_correctly']}, "
                     f"refused {r['refused']}, malformed rejected {r['malformed_rejected']}, LOST {r['lost']}, "
                     f"reset after the signal {r['reset_after_signal']}, "
                     f"WRONG {r['wrong']}; p50/p99 {_ms(r['p50_ms'])}/{_ms(r['p99_ms'])} ms; readiness false after "
                     f"{_ms(r['readiness_false_s'], 1e3)} ms; drain {r['drain_s']} s, exit {r['exit_code']}; "
                     f"peak RSS {r['peak_rss_mb']} MiB; left behind {r['left_behind']}")
        for e in r["examples"]:
            lines.append(f"    e.g. {e}")
    for r in report.get("overload", []):
        lines.append(f"{r['server']} overload (--max-queue {r['max_queue']}, {r['concurrency']} at once): correct "
                     f"{r['correct']}, wrong {r['wrong']}, refused {r['refused']} (p50/p99 {_ms(r['refusal_p50_ms'])}/"
                     f"{_ms(r['refusal_p99_ms'])} ms), other {r['other']}; accepted p99 {_ms(r['accepted_p99_ms'])} ms; "
                     f"peak RSS {r['peak_rss_mb']} MiB; exit {r['exit_code']}")
    return "\n".join(lines)


def _ms(v: Optional[float], scale: float = 1.0) -> str:
    return "-" if v is None else f"{v * scale:.1f}"

"""``stvfm-engine serve --ray``: each engine directory an application whose replica is the HTTP ingress of its
models, a collector gathering what arrives while the model runs, the strict wire decoder, admission, warm
readiness and the drain. One Ray instance for the whole module (Ray takes ~20 s to start on 2 cores); every
server on 127.0.0.1, every test bounded. Answers are compared with ``Engine.predict`` of the same directory.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from helpers import CONFIGS, ServerProcess, free_ports, random_inputs, rel_err, write_checkpoint
from stvfm_engine.cli import main
from stvfm_engine.engine import Engine
from stvfm_engine.errors import InputError
from stvfm_engine.export.build import build_engine
from stvfm_engine.export.multi_build import build_multi_engine
from stvfm_engine.model.checkpoint import load_model

pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'stvfm-engine[ray]'")
pytest.importorskip("tritonclient", reason="the serve extra is not installed: pip install 'stvfm-engine[serve]'")

from stvfm_engine.bench.load import run_load  # noqa: E402
from stvfm_engine.wire import json_body, json_output  # noqa: E402
from stvfm_engine.client import Client  # noqa: E402
from stvfm_engine.serving.ray_app import Collector  # noqa: E402
from stvfm_engine.serving.ray_server import ray_address  # noqa: E402

CONFIG = CONFIGS["deit-tiny-distilled-c2-7x6-p2-T4-H2-day24"]
MAX_BATCH = 4
QUEUE = 12


# ---------------------------------------------------------------------------------------- without Ray
def _collect(items, max_samples=4, delay_s=0.0, run_s=0.05, timeouts=None):
    """Submit ``items`` (sizes) to a Collector whose run sleeps ``run_s``; returns (results, runs seen)."""
    runs = []

    def run(batch):
        runs.append(list(batch))
        time.sleep(run_s)
        return [f"y{b}" for b in batch]

    async def go():
        collector = Collector(run, max_samples, lambda b: int(b[1:]) if isinstance(b, str) else 1, delay_s)
        tasks = []
        for i, item in enumerate(items):
            tasks.append(asyncio.create_task(collector.submit(item, (timeouts or {}).get(i, 10.0))))
            await asyncio.sleep(0)
        return await asyncio.gather(*tasks, return_exceptions=True)

    return asyncio.run(go()), runs


def test_collector_runs_at_once_when_idle_then_takes_what_queued():
    results, runs = _collect(["a1", "b1", "c2", "d1", "e3", "f1"])
    assert results == ["ya1", "yb1", "yc2", "yd1", "ye3", "yf1"]
    assert runs[0] == ["a1"]  # an idle model runs the first request alone, at once
    assert runs[1] == ["b1", "c2", "d1"]  # what queued meanwhile, in order, up to 4 samples, never split
    assert runs[2] == ["e3", "f1"]


def test_collector_delay_gathers_and_deadline_answers_504():
    _, runs = _collect(["a1", "b1", "c1"], delay_s=0.05)
    assert runs == [["a1", "b1", "c1"]]  # --max-queue-delay-ms: a run that is not full waits for more
    results, runs = _collect(["a1", "b1", "c1"], run_s=0.3, timeouts={1: 0.05})
    assert isinstance(results[1], asyncio.TimeoutError) and results[0] == "ya1" and results[2] == "yc1"
    assert ["b1"] not in runs and all("b1" not in r for r in runs[1:])  # an expired request is not run


def test_ray_address_flag_environment_and_local(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(None) is None and ray_address("local") is None
    assert ray_address("ray://10.0.0.1:10001") == "ray://10.0.0.1:10001"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert ray_address(None) == "127.0.0.1:6379" and ray_address("local") is None


class _FakeControl:
    """The Control actor's calls as the drain makes them (``x.remote()`` -> value; ``ray.get`` patched to pass)."""

    def __init__(self, inflight):
        self.inflight, self.state = inflight, None
        self.set_state = type("M", (), {"remote": lambda _, *a: setattr(self, "state", a)})()
        self.snapshot = type("M", (), {"remote": lambda _: {"r1": {"inflight": self.inflight, "refused": 0,
                                                                   "at": time.time()}}})()


@pytest.mark.parametrize("inflight, code", [(0, 0), (2, 3)])
def test_drain_waits_for_accepted_requests_and_exits_3_past_its_timeout(monkeypatch, capsys, inflight, code):
    import ray

    from stvfm_engine.serving.lifecycle import StopRequest
    from stvfm_engine.serving.ray_server import RayOptions, _drain

    monkeypatch.setattr(ray, "get", lambda value: value)
    control = _FakeControl(inflight)
    assert _drain(control, RayOptions(drain_timeout_s=0.6), StopRequest()) == code
    assert control.state == (False, True)  # not ready, draining: at once
    err = capsys.readouterr().err
    assert ("drained in" in err) if code == 0 else (f"expired with {inflight} accepted request(s) unanswered" in err)


@pytest.mark.skipif(not hasattr(__import__("os"), "pidfd_open"), reason="needs Linux pidfd_open (Python 3.9+, Linux 5.3+)")
def test_closing_a_descendants_listener_answers_what_it_accepted_and_refuses_new_connections():
    """What the Ray drain does to its proxy: the listener of a child process stops taking connections (new
    ones refused) while the connection it accepted still gets its answer, and no queued one is reset."""
    import subprocess
    import sys

    from stvfm_engine.serving.ray_server import _close_listener

    port = free_ports(1)[0]
    child = subprocess.Popen([sys.executable, "-c", f"""
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", {port})); s.listen(16); print("listening", flush=True)
c, _ = s.accept(); time.sleep(0.3); c.sendall(b"answer"); c.close(); time.sleep(10)
"""], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"listening"
        accepted = socket.create_connection(("127.0.0.1", port), timeout=10)
        t0 = time.monotonic()
        assert _close_listener(port)
        assert time.monotonic() - t0 < 3
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        assert accepted.recv(16) == b"answer"
        accepted.close()
    finally:
        child.kill()
        child.wait()
    assert not _close_listener(port)  # nothing listens there any more


def test_floor_app_decodes_json_and_answers_y_sized_arrays():
    """bench --floor's plain app (asgi here: no Ray start), driven in JSON mode, started and stopped."""
    from stvfm_engine.bench.load import measure_floor

    arrays = {"x": np.ones((2, 4, 2, 7, 6), np.float32), "tod": np.zeros((2, 4), np.int64)}
    floor = measure_floor("asgi", "m", arrays, [2, 2, 7, 6], concurrency=[1, 3], duration_s=0.5)
    assert [r["concurrency"] for r in floor["results"]] == [1, 3]
    assert all(r["requests"] > 0 and r["errors"] == 0 and r["p50_ms"] > 0 for r in floor["results"])
    with pytest.raises(Exception, match="floor app kind"):
        measure_floor("nginx", "m", arrays, [2], concurrency=[1], duration_s=0.1)


# ---------------------------------------------------------------------------------------- with Ray
@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    one = write_checkpoint(root / "one.pt", CONFIG, seed=3)
    pair = [write_checkpoint(root / f"{n}.pt", CONFIG, seed=5, mean=m, std=[1.5, 4.0])
            for n, m in (("north", [2.0, 5.0]), ("south", [9.0, 3.0]))]
    return {"one": build_engine(one, root / "one", backends=["onnxruntime"], max_batch=MAX_BATCH, progress=False),
            "regions": build_multi_engine(pair, root / "regions", backends=["onnxruntime"], max_batch=MAX_BATCH,
                                          progress=False, cache_dir=root / "cache"),
            "refs": {"one": load_model(one), "north": load_model(pair[0]), "south": load_model(pair[1])}}


@pytest.fixture(scope="module")
def direct(engines):
    one = Engine.load(engines["one"], backend="onnxruntime", threads=1)
    regions = Engine.load(engines["regions"], backend="onnxruntime", threads=1)
    predict = {"one": lambda *a: one.predict(*a),
               "north": lambda *a: regions.predict(*a, model="north"),
               "south": lambda *a: regions.predict(*a, model="south")}
    return {m: (predict[m], lambda b, rng, r=engines["refs"][m]: random_inputs(r, b, rng)) for m in predict}


@pytest.fixture(scope="module")
def ray_server(engines):
    (http_port,) = free_ports(1)
    proc = ServerProcess(["serve", str(engines["one"]), str(engines["regions"]), "--ray", "--http-port",
                          str(http_port), "--threads", "1", "--max-queue", str(QUEUE), "--drain-timeout", "20"])
    proc.wait_ready(timeout_s=300)
    yield {"url": f"http://127.0.0.1:{http_port}", "port": http_port, "proc": proc}
    proc.stop(timeout_s=40)


def _post(url, path, body, headers=None):
    request = urllib.request.Request(url + path, data=body, headers={"content-type": "application/json",
                                                                     **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _body(make, rng, batch=1):
    x, tod, dow = make(batch, rng)
    return {"x": x, "tod": tod.astype(np.int64), "dow": dow.astype(np.int64)}


@pytest.mark.slow
def test_ready_means_warm_first_request_near_steady(ray_server, direct):
    """Right after 'ready' (this module's first request): within 3x the steady p50 (or, on a busy machine, no
    slower than the slowest steady request)."""
    predict, make = direct["one"]
    arrays = _body(make, np.random.default_rng(1))
    conn = http.client.HTTPConnection("127.0.0.1", ray_server["port"], timeout=60)
    times = []
    for _ in range(12):
        t0 = time.perf_counter()
        conn.request("POST", "/v2/models/one/infer", json_body(arrays), {"content-type": "application/json"})
        response = conn.getresponse()
        y = json_output(response.read())
        times.append(time.perf_counter() - t0)
        assert response.status == 200 and rel_err(y, predict(*arrays.values())) <= 1e-6
    steady = float(np.median(times[2:]))
    # on a machine shared with other jobs a steady request may stall too: the first one must not stand out
    assert times[0] <= max(3 * steady, max(times[2:])), \
        f"first {times[0] * 1e3:.1f} ms, steady p50 {steady * 1e3:.1f} ms, max {max(times[2:]) * 1e3:.1f} ms"
    with urllib.request.urlopen(ray_server["url"] + "/v2/health/ready", timeout=10) as r:
        assert r.status == 200


@pytest.mark.slow
def test_answers_equal_engine_predict_binary_and_json(ray_server, direct):
    url = ray_server["url"]
    for model in ("one", "north", "south"):  # north, south: one replica, one backbone
        predict, make = direct[model]
        rng = np.random.default_rng(21)
        with Client(url, model=model) as client:
            assert client.ready(model) and not client.ready("no-such-model")
            for batch in (1, 3, MAX_BATCH):
                x, tod, dow = make(batch, rng)
                assert rel_err(client.predict(x, tod, dow), predict(x, tod, dow)) <= 1e-6, (model, batch)
        arrays = _body(make, rng, 2)
        status, data = _post(url, f"/v2/models/{model}/infer", json_body(arrays))
        assert status == 200 and rel_err(json_output(data), predict(*arrays.values())) <= 1e-6
    with urllib.request.urlopen(url + "/v2/models/one", timeout=10) as r:
        meta = json.load(r)
    c = CONFIG
    assert [(t["name"], t["shape"]) for t in meta["inputs"]] == [
        ("x", [-1, c.history, c.channels, c.height, c.width]), ("tod", [-1, c.history]), ("dow", [-1, c.history])]
    predict, make = direct["one"]
    x, tod, dow = make(1, np.random.default_rng(22))
    with Client(url, model="one") as client:  # the model's rules: session.check, answered 400 naming them
        for args, expected in (((x * np.nan, tod, dow), "expected finite float32"),
                               ((x, tod + c.steps_per_day, dow), "tod must be in"),
                               ((x, None, None), "missing input(s) ['tod', 'dow']")):
            with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
                client.predict(*args)


@pytest.mark.slow
def test_wire_is_strict_and_a_good_request_follows(ray_server, direct):
    url = ray_server["url"]
    predict, make = direct["one"]
    good = json.loads(json_body(_body(make, np.random.default_rng(30))))

    def with_tod(value):
        body = json.loads(json.dumps(good))
        body["inputs"][1]["data"][0] = value
        return json.dumps(body).encode()

    negative = json.loads(json.dumps(good))
    negative["inputs"][0]["shape"][0] = -1
    cases = [(with_tod(1.9), 400, "'tod'"), (with_tod("3"), 400, "'tod'"), (with_tod(True), 400, "'tod'"),
             (json.dumps(negative).encode(), 400, "non-negative"), (b"[" * 100000 + b"]" * 100000, 400, "nested"),
             (b'{"inputs": [', 400, "JSON"), (b'{"inputs": {"x": 1}}', 400, "list")]
    for body, status, named in cases:
        got, data = _post(url, "/v2/models/one/infer", body)
        message = json.loads(data)["error"]
        assert got == status and named in message and "\n" not in message, (body[:60], got, message)
    # over --max-request-mb: 413 from Content-Length, before the body is read (the client reads the answer early)
    with socket.create_connection(("127.0.0.1", ray_server["port"]), timeout=20) as s:
        s.sendall(b"POST /v2/models/one/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (70 * 2 ** 20) + b"0" * 2 ** 16)
        assert s.recv(200).startswith(b"HTTP/1.1 413")
    status, data = _post(url, "/v2/models/one/infer", json.dumps(good).encode())
    assert status == 200


@pytest.mark.slow
def test_concurrent_clients_batch_and_a_full_queue_is_refused_at_once(ray_server, direct):
    url = ray_server["url"]
    before = _metric(url, "one")
    report = run_load(url, "one", concurrency=[8], duration_s=2.0, body_kind="json",
                      arrays=_body(direct["one"][1], np.random.default_rng(40)),
                      expected=direct["one"][0](*_body(direct["one"][1], np.random.default_rng(40)).values()))
    row = report["results"][0]
    assert row["errors"] == 0 and row["wrong"] == 0 and row["requests"] > 0, row["first_error"]
    after = _metric(url, "one", wait_for=before[0] + row["requests"])
    assert (after[0] - before[0]) / (after[1] - before[1]) > 1.2, "requests that queue while a run goes are batched"
    # 2 x max batch ongoing + QUEUE waiting in Ray's router: 64 at once must see 503s naming the limit
    predict, make = direct["one"]
    arrays = _body(make, np.random.default_rng(41))
    body, expected = json_body(arrays), predict(*arrays.values())
    results = []
    go = threading.Barrier(64)

    def one():
        conn = http.client.HTTPConnection("127.0.0.1", ray_server["port"], timeout=60)
        conn.connect()
        go.wait()
        conn.request("POST", "/v2/models/one/infer", body, {"content-type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        results.append((r.status, rel_err(json_output(data), expected) if r.status == 200 else data.decode()))
        conn.close()

    threads = [threading.Thread(target=one) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert {s for s, _ in results} == {200, 503} and len(results) == 64
    assert all(e <= 1e-6 for s, e in results if s == 200)
    assert all(f"max_queued_requests={QUEUE}" in e for s, e in results if s == 503)


def _metric(url, model, wait_for=None):
    from stvfm_engine.bench.load import read_counters

    deadline = time.monotonic() + 10
    while True:
        counts = read_counters(url + "/metrics", model)
        if wait_for is None or counts[0] >= wait_for or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


@pytest.mark.slow
def test_port_held_and_options_ray_cannot_honour_are_one_line(ray_server, engines, capsys):
    assert main(["serve", str(engines["one"]), "--ray", "--http-port", str(ray_server["port"])]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{ray_server['port']}" in err and err.count("\n") == 1
    for flag in (["--grpc-port", "9001"], ["--metrics-port", "9002"], ["--instances", "2"], ["--verbose"]):
        assert main(["serve", str(engines["one"]), "--ray", *flag]) == 2
        err = capsys.readouterr().err
        assert flag[0] in err and err.count("\n") == 1


@pytest.mark.slow
def test_sigterm_drains_every_accepted_request_then_exits_0(ray_server, direct):
    """Last: SIGTERM with 12 clients sending. Readiness false within 0.5 s; every request sent before the signal
    answered correctly or 503; after it also the connection refused once the proxy's listener is closed (never a
    reset); exit 0; no process left."""
    proc, port = ray_server["proc"], ray_server["port"]
    predict, make = direct["one"]
    bodies = []
    for seed in range(4):
        arrays = _body(make, np.random.default_rng(50 + seed))
        bodies.append((json_body(arrays), predict(*arrays.values())))
    stop, outcomes, signalled = threading.Event(), [], threading.Event()

    def client(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        k = 0
        while not stop.is_set():
            body, expected = bodies[(i + k) % len(bodies)]
            k += 1
            after = signalled.is_set()
            try:
                conn.request("POST", "/v2/models/one/infer", body, {"content-type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                outcomes.append(("ok" if r.status == 200 and rel_err(json_output(data), expected) <= 1e-6 else
                                 "refused" if r.status == 503 else f"HTTP {r.status}", after))
            except ConnectionRefusedError:
                outcomes.append(("refused", after))
                conn.close()
                time.sleep(0.05)
            except (OSError, http.client.HTTPException) as e:
                outcomes.append((f"dropped {type(e).__name__}", after))
                conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    t0 = time.monotonic()
    signalled.set()
    proc.proc.send_signal(__import__("signal").SIGTERM)
    not_ready = None
    while time.monotonic() - t0 < 3:
        try:
            with urllib.request.urlopen(ray_server["url"] + "/v2/health/ready", timeout=1):
                pass
        except (urllib.error.URLError, OSError):
            not_ready = time.monotonic() - t0
            break
    code = proc.stop(timeout_s=40)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    before = [k for k, after in outcomes if not after]
    assert not_ready is not None and not_ready <= 0.5, not_ready
    assert code == 0, proc.stderr()[-2000:]
    assert before.count("ok") > 0 and set(before) <= {"ok", "refused"}, sorted(set(before))  # none lost or wrong
    # after it too: the proxy's listener is closed (connections refused) only once those it holds are answered
    assert {k for k, after in outcomes if after} <= {"ok", "refused"}, sorted({k for k, _ in outcomes})
    assert proc.leftovers == [], "Ray processes left behind"
    assert "serve: drained" in proc.stderr() and "serve: stopped" in proc.stderr()

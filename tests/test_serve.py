"""`stvfm-engine serve` on the Triton Inference Server bundled with nvidia-pytriton, `export-triton`, the
Python client and `bench --url`.

Three random-weight engine directories of odd configurations are served by one server: a 13x7 grid with
C=3, p=2, T=5, horizon 2 and time inputs; a 6x5 grid with C=1, p=3 and no time inputs; and a multi-model
directory (models `north` and `south` on one backbone). Every answer is compared with `Engine.predict`
of the same directory on fresh random inputs (relative error <= 1e-6), over HTTP and gRPC, alone, 16
clients at a time, and with malformed requests in flight.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from helpers import CONFIGS, free_ports, random_inputs, rel_err, ServerProcess, write_checkpoint
from stvfm_engine.cli import main
from stvfm_engine.engine import Engine
from stvfm_engine.errors import InputError, ServeError
from stvfm_engine.export.build import build_engine
from stvfm_engine.export.multi_build import build_multi_engine
from stvfm_engine.model.checkpoint import load_model

pytest.importorskip("tritonclient", reason="the serve extra is not installed: pip install 'stvfm-engine[serve]'")
pytest.importorskip("pytriton", reason="the serve extra is not installed: pip install 'stvfm-engine[serve]'")

from stvfm_engine.bench.load import read_counters, run_load  # noqa: E402
from stvfm_engine.wire import check_loopback  # noqa: E402
from stvfm_engine.client import Client  # noqa: E402
from stvfm_engine.serving.models import Worker, models_of  # noqa: E402
from stvfm_engine.serving.tritonserver_repo import export_repository, read_config  # noqa: E402

ODD = CONFIGS["vit-tiny-c3-13x7-p2-T5-H2-day24-a16-m4"]
NOTIME = CONFIGS["vit-tiny-c1-6x5-p3-T3-H1-notime"]
MAX_BATCH = 8


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """Engine directories named as the models they serve: ``odd``, ``notime``, ``regions`` (north, south)."""
    root = tmp_path_factory.mktemp("serve")
    out, ckpts = {}, {}
    for name, config in (("odd", ODD), ("notime", NOTIME)):
        ckpts[name] = write_checkpoint(root / f"{name}.pt", config, seed=3)
        out[name] = build_engine(ckpts[name], root / name, backends=["onnxruntime"], max_batch=MAX_BATCH,
                                 progress=False)
    # one backbone (same seed), two models told apart by their normalisation
    for name, mean in (("north", [2.0, 5.0, 1.0]), ("south", [9.0, 3.0, 6.0])):
        ckpts[name] = write_checkpoint(root / f"{name}.pt", ODD, seed=5, mean=mean, std=[1.5, 4.0, 2.5])
    out["regions"] = build_multi_engine([ckpts["north"], ckpts["south"]], root / "regions", backends=["onnxruntime"],
                                        max_batch=MAX_BATCH, progress=False, cache_dir=root / "cache")
    out["checkpoints"] = ckpts
    return out


class ModelOf:
    """``Engine.predict`` of one model of a directory (``model=`` where it holds several)."""

    def __init__(self, engine, name=None):
        self.engine, self.name = engine, name
        self.config = engine.models[name] if name else engine.config

    def predict(self, x, tod=None, dow=None):
        return self.engine.predict(x, tod, dow, model=self.name)


@pytest.fixture(scope="module")
def direct(engines):
    """Per served model: what the server must answer (``Engine.predict``) and a maker of fresh inputs."""
    out = {}
    for name in ("odd", "notime", "regions"):
        engine = Engine.load(engines[name], backend="onnxruntime", threads=1)
        for key in (("north", "south") if name == "regions" else (None,)):
            ref = load_model(engines["checkpoints"][key or name])
            out[key or name] = (ModelOf(engine, key), lambda batch, rng, ref=ref: random_inputs(ref, batch, rng))
    return out


@pytest.fixture(scope="module")
def server(engines):
    http, grpc, metrics = free_ports(3)
    proc = ServerProcess(["serve", str(engines["odd"]), str(engines["notime"]), str(engines["regions"]),
                          "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                          "--threads", "1", "--max-queue-delay-ms", "20"])
    proc.wait_ready(timeout_s=240)
    yield {"http": f"http://127.0.0.1:{http}", "grpc": f"grpc://127.0.0.1:{grpc}",
           "metrics": f"http://127.0.0.1:{metrics}/metrics", "proc": proc}
    assert proc.stop() == 0, proc.stderr()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", ["odd", "notime", "north", "south"])
def test_answers_equal_engine_predict(server, direct, protocol, model):
    engine, make = direct[model]
    rng = np.random.default_rng(len(protocol) * 10 + len(model))
    with Client(server[protocol], model=model) as client:
        assert client.ready(model) and not client.ready("no-such-model")
        for batch in (1, 3, MAX_BATCH):
            x, tod, dow = make(batch, rng)
            y = client.predict(x, tod, dow)
            assert y.dtype == np.float32 and y.shape == (batch, engine.config.horizon, *x.shape[2:])
            assert rel_err(y, engine.predict(x, tod, dow)) <= 1e-6, (protocol, model, batch)


def test_health_metadata_and_metrics(server):
    base = server["http"]
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/odd/ready"):
        with urllib.request.urlopen(base + path, timeout=10) as r:
            assert r.status == 200, path
    with urllib.request.urlopen(base + "/v2/models/odd", timeout=10) as r:
        meta = json.load(r)
    shapes = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"] + meta["outputs"]}
    c = ODD
    assert shapes == {"x": ("FP32", [-1, c.history, c.channels, c.height, c.width]), "tod": ("INT64", [-1, c.history]),
                      "dow": ("INT64", [-1, c.history]), "y": ("FP32", [-1, c.horizon, c.channels, c.height, c.width])}
    with urllib.request.urlopen(base + "/v2/models/notime", timeout=10) as r:
        assert [t["name"] for t in json.load(r)["inputs"]] == ["x"]
    assert read_counters(server["metrics"], "odd") is not None  # nv_inference_count / nv_inference_exec_count


def _hammer(url, model, make, engine, clients, per_client, seed, bad=None):
    """``clients`` threads, each sending ``per_client`` batch-1 requests; returns the failures seen."""
    failures, good = [], []
    start = threading.Barrier(clients + (1 if bad else 0))

    def run(i):
        rng = np.random.default_rng(seed + i)
        with Client(url, model=model) as client:
            requests = [make(1, rng) for _ in range(per_client)]
            start.wait()
            for x, tod, dow in requests:
                try:
                    y = client.predict(x, tod, dow)
                except Exception as e:  # a good request must never fail
                    failures.append(f"good request failed: {e}")
                    continue
                if rel_err(y, engine.predict(x, tod, dow)) > 1e-6:
                    failures.append("wrong answer")
                good.append(1)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    if bad:
        threads.append(threading.Thread(target=bad, args=(start,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert len(good) == clients * per_client
    return failures


def _hammer_models(url, direct, seeds, clients, per_client):
    """:func:`_hammer` on several models at once (one thread per model, ``seeds`` = {model: seed});
    returns every failure seen, a thread's exception included."""
    failures: list = []

    def load(model, seed):
        try:
            failures.extend(_hammer(url, model, direct[model][1], direct[model][0], clients=clients,
                                    per_client=per_client, seed=seed))
        except Exception as e:  # noqa: BLE001 - reported to the test, not lost in the thread
            failures.append(repr(e))

    threads = [threading.Thread(target=load, args=item) for item in seeds.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    return failures


def _counted(metrics, model, before, samples, timeout_s=10.0):
    """The counters' growth since ``before`` once ``samples`` are counted (a server may count a
    request a moment after it has answered it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        after = read_counters(metrics, model)
        if after[0] - before[0] >= samples or time.monotonic() > deadline:
            return after[0] - before[0], after[1] - before[1]
        time.sleep(0.1)


def test_sixteen_clients_are_batched(server, direct):
    engine, make = direct["odd"]
    before = read_counters(server["metrics"], "odd")
    assert _hammer(server["grpc"], "odd", make, engine, clients=16, per_client=6, seed=100) == []
    samples, executions = _counted(server["metrics"], "odd", before, 16 * 6)
    assert samples == 16 * 6
    assert samples / executions >= 2, f"mean server batch {samples / executions:.2f}"


def test_models_of_a_directory_share_one_backbone_and_its_batches(server, direct):
    """north and south run their own parts and send every backbone pass to the one ``_backbone`` model (one
    instance: one backbone in memory), whose dynamic batcher may join passes of both models."""
    import tritonclient.grpc as tg

    from tritonclient.utils import InferenceServerException

    with tg.InferenceServerClient(server["grpc"][len("grpc://"):]) as client:  # internal: on neither public port
        with pytest.raises(InferenceServerException, match="NOT_FOUND.*unknown model '_backbone'"):
            client.get_model_metadata("_backbone", as_json=True)
        assert client.is_model_ready("north") and not client.is_model_ready("_backbone")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(server["http"] + "/v2/models/_backbone", timeout=10)
    before = {m: read_counters(server["metrics"], m) for m in ("north", "south", "_backbone")}
    assert _hammer_models(server["grpc"], direct, {"north": 300, "south": 400}, clients=8, per_client=4) == []
    grown = {m: _counted(server["metrics"], m, before[m], 32 if m != "_backbone" else 2 * 64) for m in before}
    assert grown["north"][0] == grown["south"][0] == 32
    assert grown["_backbone"][0] == 2 * 64  # two sequences (raw, flow branch) per sample
    # at most one backbone pass per model execution: fewer where the dynamic batcher joined passes of both
    # models (it does when their batches fit in one and arrive within the queue delay: timing, not asserted)
    assert grown["_backbone"][1] <= grown["north"][1] + grown["south"][1], grown


def test_malformed_requests_in_flight_get_errors_others_answers(server, direct):
    engine, make = direct["odd"]
    c = ODD
    rng = np.random.default_rng(7)
    x, tod, dow = make(1, rng)
    nan_x = x.copy()
    nan_x[0, 1, 2, 3, 4] = np.nan
    cases = [  # (x, tod, dow, the expectation the error must name)
        (nan_x, tod, dow, "expected finite float32"),
        (x, np.full_like(tod, c.steps_per_day), dow, f"tod must be in [0, {c.steps_per_day})"),
        (x, tod, dow + 7, "dow must be in [0, 7)"),
        (x[..., :-1], tod, dow, f"Expected [-1,{c.history},{c.channels},{c.height},{c.width}]"),  # Triton's check
        (np.zeros((MAX_BATCH + 1, *x.shape[1:]), np.float32), np.zeros((MAX_BATCH + 1, c.history), np.int64),
         np.zeros((MAX_BATCH + 1, c.history), np.int64), f"must be <= {MAX_BATCH}"),
    ]
    seen = []

    def bad(start):
        with Client(server["http"], model="odd") as client:
            start.wait()
            for _ in range(3):
                for bx, btod, bdow, expected in cases:
                    with pytest.raises(InputError) as err:
                        client.predict(bx, btod, bdow)
                    seen.append((expected, str(err.value)))
                time.sleep(0.01)

    assert _hammer(server["http"], "odd", make, engine, clients=8, per_client=8, seed=200, bad=bad) == []
    assert len(seen) == 3 * len(cases)
    for expected, message in seen:
        assert expected in message and "\n" not in message.strip(), message


def test_worker_answers_each_request_of_a_mixed_batch(direct):
    """The step every server runs on the requests it gathered: each is checked by the session on its own
    (bad ones answered alone), the rest run through the session's one scheduler."""
    engine, make = direct["odd"]
    worker = Worker(engine.engine)
    rng = np.random.default_rng(5)
    good = [make(b, rng) for b in (1, 3, 4, 2)]  # 10 samples: two backend calls of <= 8
    bad_x = good[0][0].copy()
    bad_x[0, 0, 0, 0, 0] = np.inf
    requests = [good[0], (bad_x, good[0][1], good[0][2]), good[1], good[2], (good[3][0], good[3][1], None), good[3]]
    results = worker.answer([(None, *r) for r in requests])
    assert isinstance(results[1], InputError) and "non-finite" in str(results[1])
    assert isinstance(results[4], InputError) and "missing dow" in str(results[4])
    for i, request in ((0, good[0]), (2, good[1]), (3, good[2]), (5, good[3])):
        assert rel_err(results[i], engine.predict(*request)) <= 1e-6
    assert list(worker.counts.values()) == [[10, 2]]


def test_multi_model_directory_serves_each_model_by_its_name(engines, direct, capsys):
    served = models_of(Engine.load(engines["regions"], backend="onnxruntime"))
    assert [(m.name, m.key) for m in served] == [("north", "north"), ("south", "south")]
    assert served[1].load_parameters()["model_key"] == "south"
    x, tod, dow = direct["north"][1](2, np.random.default_rng(4))
    north, south = direct["north"][0].predict(x, tod, dow), direct["south"][0].predict(x, tod, dow)
    assert rel_err(north, south) > 1e-2  # the server's answers above tell the two apart
    assert main(["serve", str(engines["regions"]), "--name", "renamed"]) == 2
    assert "drop --name" in capsys.readouterr().err


def test_bench_url_load_test(server, engines, tmp_path):
    report = run_load(server["http"], "odd", concurrency=[1, 4], duration_s=1.5, metrics_url=server["metrics"])
    for row in report["results"]:
        assert row["requests"] > 0 and row["errors"] == 0 and row["p50_ms"] <= row["p99_ms"]
        assert row["mean_batch"] is not None and row["mean_batch"] >= 1
    out = tmp_path / "load.json"
    assert main(["bench", str(engines["odd"]), "--url", server["grpc"], "--model", "odd", "--concurrency", "2",
                 "--duration", "1", "--metrics-url", server["metrics"], "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    row = saved["results"][0]
    assert row["concurrency"] == 2 and row["errors"] == 0 and row["offline_throughput"] > 0
    assert {"device", "versions", "date", "command"} <= set(saved)  # the header every bench result carries
    assert "serving_cost_ms" not in saved  # no concurrency-1 level here
    # one model of a multi-model directory, offline through Engine.predict(model=)
    assert main(["bench", str(engines["regions"]), "--url", server["http"], "--model", "south", "--concurrency", "1",
                 "--duration", "0.5", "--iters", "2", "--metrics-url", server["metrics"], "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["results"][0]["errors"] == 0 and "serving_cost_ms" in saved
    # --floor: the plain ASGI app measured side by side with the server, blocks interleaved, targets from one run
    assert main(["bench", str(engines["odd"]), "--url", server["http"], "--model", "odd", "--body", "json",
                 "--floor", "asgi", "--rounds", "2", "--pause", "0.1", "--concurrency", "1,3", "--duration", "0.6", "--iters", "2",
                 "--metrics-url", server["metrics"], "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["floor"]["side_by_side"] and saved["floor"]["rounds"] == 2 and saved["floor"]["pause_s"] == 0.1
    for rows in (saved["results"], saved["floor"]["results"]):
        assert [r["concurrency"] for r in rows] == [1, 3]
        assert all(r["blocks"] == 2 and r["requests"] > 0 and r["errors"] == 0 for r in rows)
        assert not any(k.startswith("_") for r in rows for k in r)  # raw latencies stay out of the JSON
    assert all(r["wrong"] == 0 for r in saved["results"])
    assert set(saved["offline_interleaved"]) == {"1", "8"} and saved["offline_interleaved"]["1"]["blocks"] == 2
    assert saved["targets"]["cost_1_client"]["served_ms"] == pytest.approx(saved["serving_cost_ms"])
    assert saved["targets"]["throughput"]["clients"] == 3


def test_bench_url_refuses_other_machines():
    with pytest.raises(Exception, match="this machine only"):
        check_loopback("http://192.0.2.7:8000")
    check_loopback("http://localhost:8000")


def test_sigterm_drains_and_leaves_no_process(engines, direct):
    """SIGTERM with requests in flight: they are answered, the command exits 0 within 10 s, and no process
    it started (tritonserver, the Python-backend stub) is left."""
    engine, make = direct["odd"]
    http, grpc, metrics = free_ports(3)
    proc = ServerProcess(["serve", str(engines["odd"]), "--name", "odd", "--http-port", str(http),
                          "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--threads", "1"])
    proc.wait_ready(timeout_s=240)
    assert len(proc.family) >= 3, "expected the command, tritonserver and its Python-backend stub"
    answers, rng = [], np.random.default_rng(9)
    inputs = [make(MAX_BATCH, rng) for _ in range(4)]

    def send(x, tod, dow):
        with Client(f"http://127.0.0.1:{http}", model="odd") as client:
            try:
                answers.append(rel_err(client.predict(x, tod, dow), engine.predict(x, tod, dow)))
            except ServeError as e:  # refused because the server is stopping: never a wrong answer
                answers.append(str(e))

    threads = [threading.Thread(target=send, args=a) for a in inputs]
    for t in threads:
        t.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    code = proc.stop(timeout_s=12)
    assert code == 0, proc.stderr()
    assert time.monotonic() - t0 < 10
    for t in threads:
        t.join(timeout=30)
    assert all(isinstance(a, str) or a <= 1e-6 for a in answers) and len(answers) == 4
    assert any(not isinstance(a, str) for a in answers), f"no in-flight request was answered: {answers}"
    assert proc.leftovers == [], "processes left behind"
    assert "serve: ready" in proc.stderr() and "serve: stopped" in proc.stderr()


def test_serve_refuses_bad_arguments_in_one_line(engines, capsys):
    assert main(["serve", str(engines["odd"]), "--name", "a", "--name", "b"]) == 2
    assert "one name per directory" in capsys.readouterr().err
    assert main(["serve", str(engines["odd"]), str(engines["odd"])]) == 2
    assert "share the name" in capsys.readouterr().err
    assert main(["serve", str(engines["odd"]), "--name", "../x"]) == 2
    assert "not usable" in capsys.readouterr().err


@pytest.mark.parametrize("platform", ["onnxruntime", "python"])
def test_export_triton_configs_parse_with_tritons_protobuf(engines, tmp_path, platform):
    repo = tmp_path / "repo"
    assert main(["export-triton", str(engines["odd"]), "-o", str(repo), "--platform", platform, "--name", "odd"]) == 0
    cfg = read_config(repo / "odd" / "config.pbtxt")
    c = ODD
    assert cfg.name == "odd" and cfg.max_batch_size == MAX_BATCH
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000 and cfg.instance_group[0].count == 1
    assert [(t.name, list(t.dims)) for t in cfg.input] == [("x", [c.history, c.channels, c.height, c.width]),
                                                          ("tod", [c.history]), ("dow", [c.history])]
    assert [(t.name, list(t.dims)) for t in cfg.output] == [("y", [c.horizon, c.channels, c.height, c.width])]
    version = repo / "odd" / "1"
    if platform == "onnxruntime":
        assert cfg.platform == "onnxruntime_onnx" and (version / "model.onnx").is_file()
    else:
        assert cfg.backend == "python" and (version / "model.py").is_file()
        assert cfg.parameters["engine_dir"].string_value == "engine"
        Engine.load(version / "engine")  # a complete, verified copy
    # exporting again replaces the model directory whole
    assert main(["export-triton", str(engines["odd"]), "-o", str(repo), "--platform", platform, "--name", "odd"]) == 0
    assert sorted(p.name for p in repo.iterdir()) == ["odd"]


def test_export_triton_refusals_are_one_line(engines, tmp_path, capsys):
    assert main(["export-triton", str(engines["odd"]), "-o", str(tmp_path / "r"), "--platform", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert "holds no tensorrt artifact" in err and err.count("\n") == 1
    (tmp_path / "r" / "odd").mkdir(parents=True)
    (tmp_path / "r" / "odd" / "keep.txt").write_text("not a Triton model")
    assert main(["export-triton", str(engines["odd"]), "-o", str(tmp_path / "r")]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert (tmp_path / "r" / "odd" / "keep.txt").is_file()


@pytest.mark.slow
def test_exported_python_repository_serves_on_the_bundled_server(engines, direct, tmp_path):
    """The Python-backend repository export-triton writes, loaded by the bundled Triton server as is."""
    from stvfm_engine.serving.tritonserver import TritonOptions, TritonProcess, backend_directory, bundle

    engine, make = direct["odd"]
    export_repository(engines["odd"], tmp_path / "repo", platform="python", name="odd")
    http, grpc, metrics = free_ports(3)
    found = bundle()
    triton = TritonProcess(found, tmp_path / "repo", backend_directory(found, tmp_path / "backends"),
                           TritonOptions(http_port=http, grpc_port=grpc, metrics_port=metrics))
    try:
        deadline = time.monotonic() + 240
        with Client(f"http://127.0.0.1:{http}", model="odd") as client:
            while not client.ready("odd"):
                assert triton.died() is None and time.monotonic() < deadline, triton.died()
                time.sleep(0.5)
            x, tod, dow = make(3, np.random.default_rng(11))
            assert rel_err(client.predict(x, tod, dow), engine.predict(x, tod, dow)) <= 1e-6
    finally:
        assert triton.stop() == 0

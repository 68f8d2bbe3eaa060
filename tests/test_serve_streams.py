"""The ``M_stream`` companion of a served model over HTTP, on ``serve`` (Triton, SQLite ``--state-dir``) and
``serve --ray`` (the PostgreSQL store the tests start): a full window pushed every 30 minutes across New York's
fall-back hour forecasts what ``Engine.predict`` gives on that window with tod/dow computed here with
``zoneinfo``; ``steps = 2 * horizon`` equals the rollout done by hand; concurrent streams are answered right
(the server's batcher puts them in one engine call); a missing frame is refused naming its time; a restart
keeps every stream. Loopback only; each server started once."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from helpers import CONFIGS, ServerProcess, free_ports, rel_err, write_checkpoint
from stvfm_engine.engine import Engine
from stvfm_engine.export.build import build_engine

pytest.importorskip("tritonclient", reason="the serve extra is not installed: pip install 'stvfm-engine[serve]'")

NY = ZoneInfo("America/New_York")
UTC = timezone.utc
CALENDAR = {"start": "2026-10-31T00:00:00-04:00", "zone": "America/New_York"}
CONFIG = CONFIGS["vit-tiny-c2-6x5-p2-T4-H2-day48"].replace(calendar=CALENDAR)
T, H, SHAPE = CONFIG.history, CONFIG.horizon, (CONFIG.channels, CONFIG.height, CONFIG.width)
STEP = timedelta(minutes=30)
START = datetime(2026, 11, 1, 4, 30, tzinfo=UTC)  # 00:30 EDT; New York falls back at 06:00 UTC (01:00 EST again)
MAX_BATCH = 4
CONCURRENT = 3  # streams pushing at once


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-streams")
    ckpt = write_checkpoint(root / "bike.pt", CONFIG, seed=7)
    return build_engine(ckpt, root / "bike", backends=["onnxruntime"], max_batch=MAX_BATCH, progress=False)


@pytest.fixture(scope="module")
def engine(engine_dir):
    return Engine.load(engine_dir, backend="onnxruntime", threads=1)


def iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def frame(stream: str, k: int) -> np.ndarray:
    seed = sum(map(ord, stream)) * 1000 + k
    return (6.0 + 2.5 * np.random.default_rng(seed).standard_normal(SHAPE)).astype(np.float32)


def features(times):
    """tod/dow ``[1, n]`` computed here: the New York wall-clock half-hour slot and weekday."""
    local = [t.astimezone(NY) for t in times]
    return (np.array([[(t.hour * 3600 + t.minute * 60 + t.second) // 1800 for t in local]], np.int64),
            np.array([[t.weekday() for t in local]], np.int64))


def by_hand(engine, frames, times, steps):
    """``steps`` forecast by hand: predict, then again on the window that ends with the forecast."""
    x, t, out = list(frames), list(times), []
    while sum(len(o) for o in out) < steps:
        y = engine.predict(np.stack(x[-T:])[None], *features(t[-T:]))[0]
        out.append(y)
        x += list(y)
        t += [t[-1] + STEP * (i + 1) for i in range(len(y))]
    return np.concatenate(out)[:steps]


def body(stream, when=None, x=None, steps=None, batch=1) -> bytes:
    inputs = [{"name": "stream", "datatype": "BYTES", "shape": [batch, 1], "data": [stream] * batch}]
    if when is not None:
        inputs.append({"name": "time", "datatype": "BYTES", "shape": [1, 1], "data": [iso(when)]})
    if x is not None:
        inputs.append({"name": "frame", "datatype": "FP32", "shape": [1, *x.shape], "data": x.ravel().tolist()})
    if steps is not None:
        inputs.append({"name": "steps", "datatype": "INT64", "shape": [1, 1], "data": [steps]})
    return json.dumps({"inputs": inputs}).encode()


def post(url, model, data: bytes):
    request = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=data,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def outputs(doc):
    """``(y [steps, C, H, W], times, held)`` of a companion's JSON answer."""
    out = {o["name"]: o for o in doc["outputs"]}
    y = np.asarray(out["y"]["data"], np.float32).reshape(out["y"]["shape"])
    assert out["time"]["datatype"] == "BYTES" and out["time"]["shape"] == [1, y.shape[1]]
    return y[0], [datetime.fromisoformat(s) for s in out["time"]["data"]], out["held"]["data"][0]


def push_window(url, engine, stream, start=START):
    """Push ``T`` frames from ``start``: each short push answers 0 steps with the frames held, the last the
    forecast, checked against ``Engine.predict``. Returns the frames and times pushed."""
    frames, times = [], []
    for k in range(T):
        when = start + k * STEP
        frames.append(frame(stream, k))
        times.append(when)
        status, doc = post(url, "bike_stream", body(stream, when, frames[-1]))
        assert status == 200, doc
        y, at, held = outputs(doc)
        assert held == k + 1
        if k < T - 1:
            assert y.shape == (0, *SHAPE) and at == []
    want = engine.predict(np.stack(frames)[None], *features(times))[0]
    assert rel_err(y, want) <= 1e-6
    assert at == [times[-1] + STEP * (i + 1) for i in range(H)]
    return frames, times


def scenario(url, engine, prefix):
    """What both servers must do; returns a stream's forecast for a later restart to repeat."""
    status, meta = 200, json.loads(urllib.request.urlopen(f"{url}/v2/models/bike_stream", timeout=10).read())
    assert status == 200 and [t["name"] for t in meta["inputs"]] == ["stream", "time", "frame", "steps"]
    # a full window across the fall-back hour (01:00 and 01:30 come twice): tod/dow from zoneinfo
    frames, times = push_window(url, engine, f"{prefix}-midtown")
    assert len({features([t])[0][0, 0] for t in times}) < T  # a slot repeats: the DST day is in the window
    # forecast only (no frame, no time), 2 x horizon: the rollout done by hand
    status, doc = post(url, "bike_stream", body(f"{prefix}-midtown", steps=2 * H))
    assert status == 200, doc
    y, at, held = outputs(doc)
    assert held == T and rel_err(y, by_hand(engine, frames, times, 2 * H)) <= 1e-6
    assert at == [times[-1] + STEP * (i + 1) for i in range(2 * H)]
    # streams pushing at once: the server batches them; every answer is that stream's own
    errors = []

    def one(i):
        try:
            push_window(url, engine, f"{prefix}-region-{i}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"region-{i}: {e!r}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    # a missing frame: the push after it is kept (its window incomplete: 0 steps, held < T), a forecast is
    # refused naming the missing time
    status, doc = post(url, "bike_stream", body(f"{prefix}-midtown", times[-1] + 2 * STEP, frame("x", 9)))
    assert status == 200 and outputs(doc)[0].shape == (0, *SHAPE) and outputs(doc)[2] == T - 1, doc
    status, doc = post(url, "bike_stream", body(f"{prefix}-midtown"))
    assert status == 400 and iso(times[-1] + STEP).replace("Z", "") in doc["error"], doc
    # refused in one line, nothing stored: two streams in one request, a wrong frame, an off-grid time
    status, doc = post(url, "bike_stream", body(f"{prefix}-a", batch=2))
    assert status == 400 and "one stream per request" in doc["error"], doc
    status, doc = post(url, "bike_stream", body(f"{prefix}-a", START, np.ones((1, 6, 5), np.float32)))
    assert status == 400 and "frame" in doc["error"], doc
    status, doc = post(url, "bike_stream", body(f"{prefix}-a", START + timedelta(minutes=7), frame("a", 0)))
    assert status == 400 and "grid" in doc["error"].lower(), doc
    status, doc = post(url, "bike_stream", body(f"{prefix}-never"))
    assert status == 400 and "unknown stream" in doc["error"], doc
    # the plain model is served as before
    x, (tod, dow) = np.stack(frames)[None], features(times)
    plain = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()},
                        {"name": "tod", "datatype": "INT64", "shape": [1, T], "data": tod.ravel().tolist()},
                        {"name": "dow", "datatype": "INT64", "shape": [1, T], "data": dow.ravel().tolist()}]}
    status, doc = post(url, "bike", json.dumps(plain).encode())
    assert status == 200 and rel_err(np.asarray(doc["outputs"][0]["data"], np.float32).reshape(1, H, *SHAPE),
                                     engine.predict(x, tod, dow)) <= 1e-6
    status, doc = post(url, "bike_stream", body(f"{prefix}-region-0", steps=3))
    assert status == 200, doc
    return outputs(doc)[0]


def _serve(directories, *extra):
    """``serve`` of the directories (named after them: ``bike``, and a multi-model directory's own names)."""
    ports = free_ports(3)
    args = ["serve", *map(str, directories), "--backend", "onnxruntime", "--threads", "1",
            "--http-port", str(ports[0]), *extra]
    if "--ray" not in extra:
        args += ["--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    proc = ServerProcess(args)
    proc.wait_ready(timeout_s=300)
    return proc, f"http://127.0.0.1:{ports[0]}"


@pytest.fixture(scope="module")
def regions(tmp_path_factory):
    """A multi-model directory (north, south: one backbone) with the same calendar, and its Engine."""
    from stvfm_engine.export.multi_build import build_multi_engine

    root = tmp_path_factory.mktemp("serve-streams-regions")
    pair = [write_checkpoint(root / f"{n}.pt", CONFIG, seed=5, mean=m, std=[1.5, 4.0])
            for n, m in (("north", [2.0, 5.0]), ("south", [9.0, 3.0]))]
    directory = build_multi_engine(pair, root / "regions", backends=["onnxruntime"], max_batch=MAX_BATCH,
                                   progress=False, cache_dir=root / "cache")
    return directory, Engine.load(directory, backend="onnxruntime", threads=1)


@pytest.mark.slow
def test_stream_companion_on_triton_and_a_restart_keeps_the_streams(engine_dir, engine, regions, tmp_path):
    """Also a multi-model directory's companions: their worker calls the directory's shared backbone model
    (BLS), so they are warmed inside Triton's execute (not in initialize, where BLS is not allowed)."""
    pytest.importorskip("pytriton", reason="the serve extra is not installed: pip install 'stvfm-engine[serve]'")
    state = tmp_path / "state"
    state.mkdir()
    proc, url = _serve([engine_dir, regions[0]], "--state-dir", str(state))
    try:
        before = scenario(url, engine, "triton")
        for model in ("north", "south"):
            frames, times = [frame(model, k) for k in range(T)], [START + k * STEP for k in range(T)]
            for when, x in zip(times, frames):
                status, doc = post(url, f"{model}_stream", body(f"{model}-a", when, x))
                assert status == 200, doc
            want = regions[1].predict(np.stack(frames)[None], *features(times), model=model)[0]
            assert rel_err(outputs(doc)[0], want) <= 1e-6 and outputs(doc)[2] == T
        # binary tensors (tritonclient): the same stream, the same answer; BYTES decoded both ways
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(url.split("//")[1])
        name = httpclient.InferInput("stream", [1, 1], "BYTES")
        name.set_data_from_numpy(np.array([[b"triton-region-0"]], dtype=object))
        steps = httpclient.InferInput("steps", [1, 1], "INT64")
        steps.set_data_from_numpy(np.array([[3]], np.int64))
        result = client.infer("bike_stream", [name, steps])
        assert rel_err(result.as_numpy("y")[0], before) <= 1e-6 and result.as_numpy("held")[0, 0] == T
        assert result.as_numpy("time").shape == (1, 3) and result.as_numpy("time")[0, 0].endswith(b"Z")
        client.close()
    finally:
        assert proc.stop() == 0, proc.stderr()[-2000:]
    proc, url = _serve([engine_dir], "--state-dir", str(state))  # a new server on the same store
    try:
        status, doc = post(url, "bike_stream", body("triton-region-0", steps=3))
        assert status == 200 and rel_err(outputs(doc)[0], before) <= 1e-6, doc
    finally:
        assert proc.stop() == 0, proc.stderr()[-2000:]


@pytest.mark.slow
def test_stream_companion_on_ray_with_postgresql(engine_dir, engine, postgres_url):
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'stvfm-engine[ray]'")
    proc, url = _serve([engine_dir], "--ray", "--stream-store", postgres_url)
    try:
        scenario(url, engine, "ray")
    finally:
        assert proc.stop(timeout_s=40) == 0, proc.stderr()[-2000:]


def test_stream_options_are_refused_in_one_line(engine_dir, tmp_path, capsys):
    from helpers import one_error_line
    from stvfm_engine.cli import main

    cases = [(["--state-dir", str(tmp_path / "missing")], "not an existing directory"),
             (["--state-dir", str(tmp_path), "--stream-store", "postgresql://x@127.0.0.1:1/x"], "give one"),
             (["--stream-gaps", "hold"], "--state-dir DIR or --stream-store URL"),
             (["--stream-store", str(tmp_path / "a.db")], "expected a postgresql:// URL")]
    for extra, message in cases:
        assert main(["serve", str(engine_dir), "--http-port", str(free_ports(1)[0]), *extra]) == 2
        assert message in one_error_line(capsys.readouterr().err, "serve")


def test_the_decoder_takes_bytes_tensors_strictly(engine_dir, tmp_path):
    """BYTES on the wire (no server): JSON strings and Triton's binary form decode to bytes; a lying length,
    extra or missing elements, a number where a string goes, a missing ``stream``: 400s naming the input;
    random blobs give only refusals or arrays of the shape."""
    from dataclasses import replace

    from hypothesis import given, settings, strategies as st

    from stvfm_engine.errors import ProtocolError
    from stvfm_engine.serving.models import StreamOptions, served_models
    from stvfm_engine.serving.oip import decode_request, deserialize_bytes, encode_response, serialize_bytes

    model = replace(served_models([engine_dir], ["bike"])[0], name="bike_stream",
                    streams=StreamOptions(str(tmp_path / "s.db")))
    arrays, binary = decode_request(model, body("midtown é", START, frame("a", 0)), None)
    assert arrays["stream"].dtype == object and arrays["stream"][0, 0] == "midtown é".encode() and not binary
    assert arrays["time"][0, 0] == iso(START).encode() and arrays["frame"].shape == (1, *SHAPE)

    def binary_body(blob: bytes, shape=(1, 1), size=None):
        head = json.dumps({"inputs": [{"name": "stream", "datatype": "BYTES", "shape": list(shape),
                                       "parameters": {"binary_data_size": len(blob) if size is None else size}}]})
        return head.encode() + blob, str(len(head))

    assert decode_request(model, *binary_body(serialize_bytes(np.array([[b"abc"]], object))))[0]["stream"][0, 0] == b"abc"
    refused = {"a length past the end": binary_body(b"\xe8\x03\x00\x00abc"),
               "two elements for one": binary_body(serialize_bytes(np.array([b"a", b"b"], object))),
               "a cut length": binary_body(b"\x03\x00"),
               "no element": binary_body(b""),
               "a size past the body": binary_body(b"\x01\x00\x00\x00a", size=9)}
    for what, (data, header) in refused.items():
        with pytest.raises(ProtocolError, match="stream|body"):
            decode_request(model, data, header)
            pytest.fail(what)
    number = json.loads(body("a"))
    number["inputs"][0]["data"] = [5]
    with pytest.raises(ProtocolError, match="input 'stream': expected BYTES data as JSON strings, got an integer"):
        decode_request(model, json.dumps(number).encode(), None)
    with pytest.raises(ProtocolError, match=r"missing input\(s\) \['stream'\]"):
        decode_request(model, json.dumps({"inputs": json.loads(body("a", START))["inputs"][1:]}).encode(), None)
    # answers: BYTES as JSON strings, or length-prefixed after the JSON header
    times = np.array([[b"2026-11-01T06:00:00Z", b"2026-11-01T06:30:00Z"]], object)
    out = {"y": np.zeros((1, 2, *SHAPE), np.float32), "time": times, "held": np.array([[4]], np.int64)}
    doc = json.loads(encode_response(model, out, False)[0])
    assert doc["outputs"][1]["data"] == ["2026-11-01T06:00:00Z", "2026-11-01T06:30:00Z"]
    raw, headers = encode_response(model, out, True)
    head = json.loads(raw[:int(headers["inference-header-content-length"])])
    start = int(headers["inference-header-content-length"]) + head["outputs"][0]["parameters"]["binary_data_size"]
    blob = raw[start:start + head["outputs"][1]["parameters"]["binary_data_size"]]
    assert (deserialize_bytes(blob, [1, 2]) == times).all()

    @settings(max_examples=200, deadline=None, database=None)
    @given(st.binary(max_size=40), st.lists(st.integers(0, 3), min_size=1, max_size=3))
    def fuzz(blob, shape):
        try:
            arrays, _ = decode_request(model, *binary_body(blob, shape))
        except ProtocolError:
            return
        assert arrays["stream"].shape == tuple(shape) and all(type(v) is bytes for v in arrays["stream"].ravel())

    fuzz()


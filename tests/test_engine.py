"""`Engine.load(...).predict` for onnxruntime, aoti and eager, input validation, and `stvfm-engine run`.

The engine here is an odd configuration (DINOv2 with registers, C=3, 13x7 grid with p=2, time inputs,
horizon 2), built once per module for onnxruntime + aoti; every output is compared with the fp32
reference model on fresh random inputs: relative error ||y - y_ref|| / ||y_ref||.
"""
from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch

from stvfm_engine.cli import main
from helpers import CONFIGS, why_not_run
from stvfm_engine.engine import Engine, open_session, reference_model
from stvfm_engine.engine.inputs import validate_inputs
from stvfm_engine.errors import EngineDirError, InputError, STVFMError
from stvfm_engine.export.build import build_engine
from stvfm_engine.export.parity import relative_error
from stvfm_engine.model.checkpoint import save_checkpoint
from stvfm_engine.model.config import STVFMConfig
from stvfm_engine.model.stvfm import build_model

CONFIG = CONFIGS["dinov2-small-reg4-c3-13x7-p2-T6-H2-day24"]
MAX_BATCH = 6
SHAPE = [CONFIG.history, CONFIG.channels, CONFIG.height, CONFIG.width]


def inputs(batch: int, rng: np.random.Generator, mean=10.0, std=4.0):
    x = (mean + std * rng.standard_normal((batch, *SHAPE))).astype(np.float32)
    return x, rng.integers(0, CONFIG.steps_per_day, (batch, CONFIG.history)), rng.integers(0, 7, (batch, CONFIG.history))


def reference(model, x, tod, dow) -> np.ndarray:
    with torch.inference_mode():
        return model(*(torch.as_tensor(a) for a in (x, tod, dow))).numpy()


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    model = build_model(CONFIG, seed=11)
    model.set_normalization([10.0, 20.0, 5.0], [4.0, 8.0, 1.5])
    save_checkpoint(model, root / "odd.pt")
    return build_engine(root / "odd.pt", root / "odd.engine", backends=["onnxruntime", "aoti"], max_batch=MAX_BATCH,
                        progress=False)


@pytest.fixture(scope="module")
def ref(engine_dir):
    return reference_model(engine_dir)


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti", "eager"])
def test_predict_matches_reference(engine_dir, ref, backend):
    engine = Engine.load(engine_dir, backend=backend, threads=1 if backend == "onnxruntime" else None)
    assert (engine.backend, engine.precision, engine.device) == (backend, "fp32", "cpu")
    assert engine.config == STVFMConfig.from_dict(engine.manifest["config"]) and engine.max_batch == MAX_BATCH
    rng = np.random.default_rng(hash(backend) % 1000)
    for batch in (1, 3, MAX_BATCH):
        x, tod, dow = inputs(batch, rng)
        y = engine.predict(x, tod, dow)
        assert y.dtype == np.float32 and y.shape == (batch, CONFIG.horizon, *SHAPE[1:])
        assert relative_error(y, reference(ref, x, tod, dow)) <= 1e-4, batch
    # torch tensors in (any float dtype for x, int32 for tod/dow) give the same numpy out
    x, tod, dow = inputs(2, rng)
    y_np = engine.predict(x, tod, dow)
    y_t = engine.predict(torch.from_numpy(x).double(), torch.from_numpy(tod).int(), torch.from_numpy(dow))
    np.testing.assert_allclose(y_t, y_np, rtol=1e-5, atol=1e-5)


def test_default_backend_on_cpu_is_onnxruntime(engine_dir):
    engine = Engine.load(engine_dir)
    assert engine.backend == "onnxruntime" and engine.device == "cpu"
    assert Engine.load(engine_dir, precision="fp32").backend == "onnxruntime"


def test_loading_keeps_process_settings(engine_dir):
    before = (torch.get_num_threads(), torch.is_inference_mode_enabled(), torch.is_grad_enabled())
    for backend in ("onnxruntime", "aoti", "eager"):
        Engine.load(engine_dir, backend=backend, threads=1).predict(*inputs(1, np.random.default_rng(0)))
    assert (torch.get_num_threads(), torch.is_inference_mode_enabled(), torch.is_grad_enabled()) == before


def test_session_checks_once_and_schedules_requests_into_max_batch_calls(engine_dir, ref):
    """Engine.predict_many is the session's check of each request, then its one scheduler: requests in order,
    consecutive ones joined while they fit in max_batch (6), never split; answers equal one-by-one predicts."""
    session = open_session(engine_dir, "onnxruntime")
    rng = np.random.default_rng(17)
    batches = [inputs(b, rng) for b in (2, 3, 4, 1, 6, 5)]  # calls: [2, 3], [4, 1], [6], [5]
    checked = [session.check(None, *b) for b in batches]
    assert [r.batch for r in checked] == [2, 3, 4, 1, 6, 5] and checked[0].x.dtype == np.float32
    before = session.backbone_calls
    ys = session.run(checked)
    assert session.backbone_calls - before == 4
    for y, b in zip(ys, batches):
        assert relative_error(y, reference(ref, *b)) <= 1e-4
    with pytest.raises(InputError, match="unknown model 'other'"):
        session.check("other", *batches[0])
    engine = Engine.load(engine_dir, backend="onnxruntime")
    assert engine.session.models == session.models and list(session.models) == [engine_dir.resolve().name]
    assert all(np.array_equal(a, b) for a, b in zip(engine.predict_many([(None, *b) for b in batches]), ys))


def test_a_bench_baseline_opens_only_through_the_bench(engine_dir):
    with pytest.raises(STVFMError, match="unknown backend 'compile'"):
        open_session(engine_dir, "compile")
    with pytest.raises(STVFMError, match="unknown backend 'compile'"):
        Engine.load(engine_dir, backend="compile")


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti"])
def test_engine_is_safe_to_call_from_threads(engine_dir, backend):
    engine = Engine.load(engine_dir, backend=backend)
    rng = np.random.default_rng(5)
    batches = [inputs(b, rng) for b in (1, 2, 3, 4, 5, 6, 1, 3)]
    expected = [engine.predict(*b) for b in batches]
    results = [None] * len(batches)
    errors = []

    def work(i):
        try:
            results[i] = engine.predict(*batches[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


GOOD = dict(x=np.ones((2, *SHAPE), np.float32) * 3.0, tod=np.zeros((2, 6), np.int64) + 5, dow=np.ones((2, 6), np.int64))


def _with(**changes):
    return {**GOOD, **changes}


@pytest.mark.parametrize("kwargs, message", [
    (_with(x=np.ones((2, 6, 3, 13), np.float32)), "expected x [B, 6, 3, 13, 7], got [2, 6, 3, 13]"),
    (_with(x=np.ones((2, 6, 2, 13, 7), np.float32)), "expected x [B, 6, 3, 13, 7], got [2, 6, 2, 13, 7]"),
    (_with(x=np.ones((2, *SHAPE), np.int64)), "expected x float32 (any float dtype is converted), got int64"),
    (_with(x=np.where(np.arange(3276).reshape(2, *SHAPE) == 77, np.nan, 1.0)), "x holds 1 non-finite value"),
    (_with(x=torch.full((2, *SHAPE), float("inf"))), "x holds 3276 non-finite values"),
    (_with(x=np.ones((7, *SHAPE), np.float32), tod=np.zeros((7, 6), np.int64), dow=np.zeros((7, 6), np.int64)),
     "batch 7 is outside this engine's range [1, 6]"),
    (_with(x=np.ones((0, *SHAPE), np.float32)), "batch 0 is outside this engine's range [1, 6]"),
    (_with(tod=None), "uses time inputs (steps_per_day=24): missing tod, int64 [2, 6]"),
    (_with(tod=None, dow=None), "missing tod and dow"),
    (_with(tod=np.full((2, 6), 24)), r"tod must be in [0, 24), got values in [24, 24]"),
    (_with(dow=np.full((2, 6), -1)), r"dow must be in [0, 7), got values in [-1, -1]"),
    (_with(tod=np.zeros((2, 5), np.int64)), "expected tod [2, 6], got [2, 5]"),
    (_with(dow=np.zeros((3, 6), np.int64)), "expected dow [2, 6] (x's batch is 2), got [3, 6]"),
    (_with(tod=np.zeros((2, 6), np.float32)), "expected tod int64, got float32"),
    (_with(dow=torch.zeros((2, 6))), "expected dow int64, got float32"),
    (_with(x="not an array"), "expected x"),
])
def test_bad_inputs_fail_before_any_backend_runs(engine_dir, kwargs, message):
    engine = Engine.load(engine_dir, backend="eager")

    def must_not_run(*args):
        raise AssertionError("the backend ran on invalid input")

    engine.session._runner = must_not_run
    with pytest.raises(InputError) as info:
        engine.predict(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_validation_of_a_model_without_time_inputs():
    cfg = CONFIGS["vit-tiny-c1-4x5-T3-notime"]
    x = np.random.default_rng(0).standard_normal((2, 3, 1, 4, 5))
    vx, tod, dow = validate_inputs(cfg, 4, x)
    assert vx.dtype == np.float32 and tod is None and dow is None
    with pytest.raises(InputError, match="takes no time inputs"):
        validate_inputs(cfg, 4, x, np.zeros((2, 3), np.int64), np.zeros((2, 3), np.int64))


@pytest.mark.parametrize("kwargs, match", [
    ({"backend": "tensorrt"}, r"holds no tensorrt artifact; built: \['aoti', 'onnxruntime'\]"),
    ({"backend": "nope"}, "unknown backend 'nope'"),
    ({"backend": "aoti", "precision": "bf16"}, "the aoti artifact is fp32, not bf16"),
    ({"backend": "aoti", "device": "cuda"}, "aoti artifact was built for cpu, not cuda"),
    ({"backend": "onnxruntime", "device": "cuda"}, "cannot run on cuda"),
    ({"precision": "fp8"}, "unknown precision 'fp8'"),
    ({"device": "abacus"}, "unknown device 'abacus'"),
])
def test_load_errors_are_one_line(engine_dir, kwargs, match):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(STVFMError, match=match) as info:
        Engine.load(engine_dir, **kwargs)
    assert "\n" not in str(info.value)


def test_tampered_artifact_is_refused(engine_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(engine_dir, copy)
    data = bytearray((copy / "model.pt2").read_bytes())
    data[-100] ^= 0xFF
    (copy / "model.pt2").write_bytes(bytes(data))
    for backend in ("aoti", "onnxruntime", "eager", None):  # every listed file, whatever backend is asked for
        with pytest.raises(EngineDirError, match="model.pt2 does not match its sha256"):
            Engine.load(copy, backend=backend)
    Engine.load(copy, backend="onnxruntime", verify=False)  # the opt-out skips the check
    shutil.copy(engine_dir / "model.pt2", copy / "model.pt2")
    (copy / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(EngineDirError, match="weights.safetensors does not match"):
        Engine.load(copy, backend="eager")
    with pytest.raises(EngineDirError, match="not an engine directory"):
        Engine.load(tmp_path)


def test_triton_backend_runs_or_says_why(engine_dir, ref):
    why = why_not_run("triton", "cpu")
    if why is not None:
        with pytest.raises(STVFMError, match="triton cannot run on cpu"):
            Engine.load(engine_dir, backend="triton", device="cpu")
        return
    try:
        engine = Engine.load(engine_dir, backend="triton", device="cpu")
    except STVFMError as e:  # e.g. the interpreter is not enabled: a clear one-line reason is the contract
        assert "\n" not in str(e)
        pytest.skip(f"triton backend unavailable here: {e}")
    x, tod, dow = inputs(2, np.random.default_rng(9))
    assert relative_error(engine.predict(x, tod, dow), reference(ref, x, tod, dow)) <= 1e-4


@pytest.mark.parametrize("backend", [None, "aoti", "eager"])
def test_cli_run(engine_dir, ref, tmp_path, capsys, backend):
    x, tod, dow = inputs(3, np.random.default_rng(12))
    np.savez(tmp_path / "in.npz", x=x, tod=tod, dow=dow)
    argv = ["run", str(engine_dir), "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz")]
    assert main(argv + (["--backend", backend] if backend else [])) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["backend"] == (backend or "onnxruntime") and result["shape"] == [3, 2, 3, 13, 7]
    with np.load(tmp_path / "out.npz") as out:
        assert list(out.files) == ["y"]
        assert relative_error(out["y"], reference(ref, x, tod, dow)) <= 1e-4


def test_cli_run_errors(engine_dir, tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", inputs=np.zeros(3))
    out = str(tmp_path / "out.npz")
    assert main(["run", str(engine_dir), "--input", str(tmp_path / "bad.npz"), "--output", out]) == 2
    assert "expected arrays x (and tod, dow), found ['inputs']" in capsys.readouterr().err
    np.savez(tmp_path / "short.npz", x=np.zeros((1, 6, 3, 13), np.float32))
    assert main(["run", str(engine_dir), "--input", str(tmp_path / "short.npz"), "--output", out]) == 2
    assert "expected x [B, 6, 3, 13, 7], got [1, 6, 3, 13]" in capsys.readouterr().err
    assert main(["run", str(engine_dir), "--input", str(tmp_path / "missing.npz"), "--output", out]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "out.npz").exists()


def test_onnx_artifact_built_on_a_gpu_machine_serves_on_the_cpu(engine_dir, tmp_path):
    """model.onnx is device-independent: an engine built with --device cuda still serves here on the
    CPU provider, picked by default and when asked for by name."""
    import json

    copy = tmp_path / "gpu-built"
    shutil.copytree(engine_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["backends"]["onnxruntime"]["device"] = "cuda"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    if why_not_run("onnxruntime", "cuda") is None:
        pytest.skip("this machine has ONNX Runtime's CUDA provider: the CPU fallback is not exercised")
    for backend in ("onnxruntime", None):
        engine = Engine.load(copy, backend=backend, verify=False)
        if backend == "onnxruntime" or engine.backend == "onnxruntime":
            assert engine.device == "cpu"
    c = engine.config
    rng = np.random.default_rng(5)
    x = rng.random((2, c.history, c.channels, c.height, c.width), dtype=np.float32) * 10
    t = (rng.integers(0, c.steps_per_day, (2, c.history)), rng.integers(0, 7, (2, c.history))) if c.uses_time else (None, None)
    served = Engine.load(copy, backend="onnxruntime", verify=False).predict(x, *t)
    np.testing.assert_array_equal(served, Engine.load(engine_dir, backend="onnxruntime").predict(x, *t))

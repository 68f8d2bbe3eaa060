"""int8 ONNX quantisation and the reduced-precision gates (relative error; test MAE on real data)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from stvfm_engine.bench.runner import make_inputs  # noqa: E402
from stvfm_engine.export import quantize as q  # noqa: E402
from stvfm_engine.model.config import from_preset  # noqa: E402
from stvfm_engine.model.evaluate import model_forecaster  # noqa: E402
from stvfm_engine.model.stvfm import build_model  # noqa: E402

TINY = from_preset("tiny", backbone_layers=2)  # 2 blocks: scopes differ, exports fast


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    model = build_model(TINY, seed=0)
    path = tmp_path_factory.mktemp("quant") / "model.onnx"
    x, tod, dow = (torch.from_numpy(a) for a in make_inputs(TINY, 2))
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(model, (x, tod, dow), str(path), dynamo=True, input_names=["x", "tod", "dow"],
                      output_names=["y"], dynamic_shapes={"x": {0: batch}, "tod": {0: batch}, "dow": {0: batch}},
                      opset_version=18, external_data=False, verbose=False)
    return model, path


def test_weight_matmuls_scopes(tiny_onnx):
    _, path = tiny_onnx
    backbone = q.weight_matmuls(path, "backbone")
    every = q.weight_matmuls(path, "all")
    assert len(backbone) == 4 * 2  # qkv, proj, fc1, fc2 per block
    # + 2 adapters x 2 linears, 4 prompt attentions x 3, fuse, head
    assert len(every) == len(backbone) + 4 + 12 + 2
    with pytest.raises(q.ConfigError):
        q.weight_matmuls(path, "everything")


@pytest.mark.parametrize("scope", ["backbone", "all"])
def test_int8_dynamic_passes_relative_gate(tiny_onnx, tmp_path, scope):
    model, path = tiny_onnx
    inputs = [make_inputs(TINY, b, seed=b) for b in (1, 5)]
    rec = q.build_int8_onnx(path, tmp_path / "int8.onnx", model_forecaster(model), TINY, inputs, scope=scope)
    assert rec["gate"]["passed"] and rec["gate"]["max_rel_err"] <= q.RELATIVE_TOLERANCE["int8"]
    assert rec["gate"]["max_rel_err"] > 1e-6  # it really is quantised
    assert (tmp_path / "int8.onnx").stat().st_size < path.stat().st_size


def test_gate_refuses_and_removes_the_artifact(tiny_onnx, tmp_path, monkeypatch):
    model, path = tiny_onnx
    monkeypatch.setitem(q.RELATIVE_TOLERANCE, "int8", 1e-9)
    with pytest.raises(q.PrecisionGateError, match="fails its gate"):
        q.build_int8_onnx(path, tmp_path / "int8.onnx", model_forecaster(model), TINY, [make_inputs(TINY, 2)])
    assert not (tmp_path / "int8.onnx").exists()


def test_mae_gate_on_real_data(tiny_onnx, tmp_path, nyc_data):
    model, path = tiny_onnx
    prefix = nyc_data / "NYBike_flow"
    fp32 = q.ort_forecaster(path)  # equal to the reference model within 1e-6, and faster
    rec = q.build_int8_onnx(path, tmp_path / "int8.onnx", fp32, TINY, [], calib_data=prefix, mode="static")
    g = rec["gate"]
    assert g["gate"] == "test_mae" and g["passed"] and g["windows"] > 800
    assert abs(g["mae_loss"]) <= 0.01
    # a forecaster that is visibly off fails the 1% default
    with pytest.raises(q.PrecisionGateError, match="task gate"):
        q.mae_gate(lambda x, t, d: fp32(x, t, d) + 5.0 * np.sign(x[:, -1:] - 1), fp32, prefix, TINY, "int8")


def test_bf16_is_not_an_onnx_runtime_cpu_precision():
    assert q.why_not_onnx_precision("fp32") is None and q.why_not_onnx_precision("int8") is None
    assert "bf16" in q.why_not_onnx_precision("bf16")
    assert isinstance(q.cpu_supports_bf16(), bool)


def test_relative_error():
    a = np.ones((2, 3), np.float32)
    assert q.relative_error(a, a) == 0.0
    assert q.relative_error(a * 1.01, a) == pytest.approx(0.01, rel=1e-5)


def test_build_engine_int8(tmp_path):
    from stvfm_engine import Engine
    from stvfm_engine.export.build import build_engine
    from stvfm_engine.model.checkpoint import save_checkpoint

    model = build_model(from_preset("tiny", backbone_layers=1), seed=0)
    ckpt = save_checkpoint(model, tmp_path / "m.pt")
    out = build_engine(ckpt, tmp_path / "int8.engine", precision="int8", max_batch=4, progress=False)
    engine = Engine.load(out, backend="onnxruntime")
    entry = engine.manifest["backends"]["onnxruntime"]
    assert engine.precision == "int8" and list(engine.manifest["backends"]) == ["onnxruntime"]
    assert entry["reduced_precision"]["quantization"]["quantized_nodes"] == 4
    assert 1e-6 < entry["parity"]["max_rel_err"] <= 5e-2 and entry["parity"]["tolerance"] == 5e-2
    x, tod, dow = make_inputs(model.config, 3)
    assert q.relative_error(engine.predict(x, tod, dow), model_forecaster(model)(x, tod, dow)) <= 5e-2
    with pytest.raises(Exception, match="int8 is built for onnxruntime only"):
        build_engine(ckpt, tmp_path / "x.engine", backends=["aoti"], precision="int8", progress=False)

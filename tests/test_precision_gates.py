"""Reduced precision: int8 ONNX quantisation, the parity gate at each precision's tolerance, and the
task gate (test MAE vs fp32 on real data) that every reduced-precision build passes with --calib-data."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from helpers import check_reduced, random_inputs, reference_output, rel_err, within, write_checkpoint  # noqa: E402
from stvfm_engine.engine import Engine  # noqa: E402
from stvfm_engine.engine.backends.onnxruntime import quantize_int8  # noqa: E402
from stvfm_engine.engine.graph import weight_matmuls  # noqa: E402
from stvfm_engine.engine.precision import PRECISIONS  # noqa: E402
from stvfm_engine.errors import BuildError, DataError, PrecisionGateError  # noqa: E402
from stvfm_engine.export.build import build_engine  # noqa: E402
from stvfm_engine.export.gates import mae_gate  # noqa: E402
from stvfm_engine.model.config import from_preset  # noqa: E402
from stvfm_engine.model.evaluate import model_forecaster  # noqa: E402
from stvfm_engine.model.checkpoint import load_model  # noqa: E402

TINY = from_preset("tiny", backbone_layers=2)  # 2 blocks: the scopes differ, it builds fast


@pytest.fixture(scope="module")
def fp32_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("prec")
    ckpt = write_checkpoint(root / "tiny.pt", TINY)
    return ckpt, build_engine(ckpt, root / "fp32.engine", backends=["onnxruntime"], max_batch=8, progress=False)


def test_weight_matmuls_scopes(fp32_engine):
    _, out = fp32_engine
    backbone = weight_matmuls(out / "model.onnx", "backbone")
    every = weight_matmuls(out / "model.onnx", "")
    assert len(backbone) == 4 * 2  # qkv, proj, fc1, fc2 per block
    # + 2 adapters x 2 linears, 4 prompt attentions x 3, fuse, head
    assert len(every) == len(backbone) + 4 + 12 + 2


def test_quantize_int8_is_smaller_and_close(fp32_engine, tmp_path):
    import onnxruntime as ort

    _, out = fp32_engine
    info = quantize_int8(out / "model.onnx", tmp_path / "int8.onnx")
    assert info["quantized_nodes"] == 8 and info["per_channel"]
    assert (tmp_path / "int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size
    model = load_model(fp32_engine[0])
    x, tod, dow = random_inputs(model, 5, np.random.default_rng(3))
    y = ort.InferenceSession(str(tmp_path / "int8.onnx")).run(None, {"x": x, "tod": tod, "dow": dow})[0]
    err = rel_err(y, reference_output(model, x, tod, dow))
    assert 1e-6 < err <= PRECISIONS["int8"].tolerance  # really quantised, within the int8 gate


def test_build_engine_int8(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.pt", from_preset("tiny", backbone_layers=1))
    out = build_engine(ckpt, tmp_path / "int8.engine", precision="int8", max_batch=4, progress=False)
    engine = Engine.load(out, backend="onnxruntime")
    entry = engine.manifest["backends"]["onnxruntime"]
    assert engine.precision == "int8" and "aoti" not in engine.manifest["backends"]  # every int8 builder here
    assert entry["precision"] == "int8" and engine.manifest["precision"] == "int8"
    assert entry["reduced_precision"]["quantization"]["quantized_nodes"] == 4
    assert entry["reduced_precision"]["gate"]["gate"] == "relative_error"
    check_reduced(entry["parity"]["max_rel_err"], "int8")
    assert entry["parity"]["tolerance"] == 5e-2
    model = load_model(ckpt)
    x, tod, dow = random_inputs(model, 3, np.random.default_rng(5))
    assert within(rel_err(engine.predict(x, tod, dow), reference_output(model, x, tod, dow)), "int8")
    with pytest.raises(BuildError, match="aoti builds fp32, bf16, fp16 only"):
        build_engine(ckpt, tmp_path / "x.engine", backends=["aoti"], precision="int8", progress=False)


@pytest.mark.slow
def test_task_gate_on_real_data(tmp_path, nyc_data):
    """int8 is gated on NYBike's test MAE; a forecaster far off fails the 1% default."""
    prefix = nyc_data / "NYBike_flow"
    config = from_preset("tiny", backbone_layers=1)  # NYBike's 14 x 8 grid, 2 channels
    ckpt = write_checkpoint(tmp_path / "bike.pt", config)
    out = build_engine(ckpt, tmp_path / "int8.engine", precision="int8", max_batch=16, progress=False,
                       calib_data=prefix, max_mae_loss=0.05)
    gate = Engine.load(out).manifest["backends"]["onnxruntime"]["reduced_precision"]["gate"]
    assert gate["gate"] == "test_mae" and gate["passed"] and gate["windows"] > 800
    assert abs(gate["mae_loss"]) <= 0.05 and gate["max_rel_err_vs_fp32"] > 0
    fp32 = model_forecaster(load_model(ckpt))
    with pytest.raises(PrecisionGateError, match="task gate"):
        mae_gate(lambda x, t, d: fp32(x, t, d) + 1e4, fp32, prefix, config, "int8")
    with pytest.raises(DataError, match="grid 16x12"):  # another city's grid is refused before any export
        build_engine(ckpt, tmp_path / "x.engine", precision="int8", calib_data=nyc_data / "NYTaxi_flow",
                     progress=False)
    assert not (tmp_path / "x.engine").exists()

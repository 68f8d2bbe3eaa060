"""Reduced precision for the CPU engine, and the gate every reduced-precision build must pass.

- **int8**: ONNX Runtime quantization of the fp32 ``model.onnx``. By default *dynamic* (weights int8
  per output channel, activations quantised at run time) and only the backbone's weight matmuls
  (stage 4, nearly all of the FLOPs); the adapters, BCPC and head stay fp32. *Static* (QDQ,
  calibrated activation ranges) is available with calibration inputs.
- **bf16**: ONNX Runtime's CPU provider has no bf16 MatMul/Add/Softmax kernels (measured with
  onnxruntime 1.32: NOT_IMPLEMENTED), so a bf16 CPU engine is a PyTorch one (``aoti``/``eager``),
  only worthwhile where the CPU has avx512_bf16 or AMX: :func:`cpu_supports_bf16`.
- **The gate**: with data (``calib_data``: a ``PREFIX`` of ``PREFIX_{train,val,test}.npz``) the
  reduced-precision engine's test MAE must be within ``max_mae_loss`` (default 1%) of fp32's on the
  same windows; without data, its relative error ``||y - y_ref|| / ||y_ref||`` on random inputs
  must be within :data:`RELATIVE_TOLERANCE` (2e-2 bf16/fp16, 5e-2 int8).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from stvfm_engine.errors import ConfigError, STVFMError

RELATIVE_TOLERANCE = {"bf16": 2e-2, "fp16": 2e-2, "int8": 5e-2}
DEFAULT_MAX_MAE_LOSS = 0.01
INT8_MODES = ("dynamic", "static")
# Module scopes (found in the exporter's ``namespace`` node metadata) whose weight matmuls int8 quantises.
INT8_SCOPES = {"backbone": "backbone", "all": ""}

# (x, tod, dow) numpy -> y numpy
Forecaster = Callable[[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]], np.ndarray]


class PrecisionGateError(STVFMError):
    """A reduced-precision artifact that loses more accuracy than the gate allows."""


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def cpu_supports_bf16() -> bool:
    """True where the CPU computes bf16 natively (avx512_bf16 or AMX-BF16)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def why_not_onnx_precision(precision: str) -> Optional[str]:
    """None when an ONNX Runtime CPU artifact can be made at ``precision``, else why not."""
    if precision in ("fp32", "int8"):
        if precision == "int8":
            try:
                import onnxruntime.quantization  # noqa: F401
            except ImportError as e:
                return f"onnxruntime.quantization is not importable ({e})"
        return None
    if precision == "bf16":
        return ("ONNX Runtime's CPU provider has no bf16 MatMul kernels; build bf16 with the aoti backend"
                + ("" if cpu_supports_bf16() else " (and this CPU has neither avx512_bf16 nor AMX)"))
    return f"ONNX Runtime CPU artifacts are fp32 or int8, not {precision}"


# ----------------------------------------------------------------------------- int8
def weight_matmuls(onnx_path: str | os.PathLike, scope: str = "backbone") -> list[str]:
    """Names of the MatMul/Gemm nodes with a constant weight inside ``scope`` (see :data:`INT8_SCOPES`)."""
    import onnx

    if scope not in INT8_SCOPES:
        raise ConfigError(f"unknown int8 scope {scope!r}; expected one of {sorted(INT8_SCOPES)}")
    model = onnx.load(str(onnx_path), load_external_data=False)
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    module = INT8_SCOPES[scope]
    names = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in consts:
            continue
        # namespace: ": Root/attr: Class/attr.sub: Class/..." -> the module path of each level
        namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        paths = [seg.split(":", 1)[0].strip() for seg in namespace.split("/")[1:]]
        if not module or any(module in path.split(".") for path in paths):
            names.append(node.name)
    return names


class _Calibration:
    """onnxruntime's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: Sequence[dict]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - only some calibrators call it
        pass


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, mode: str = "dynamic", scope: str = "backbone",
                  per_channel: bool = True, calibration: Optional[Iterable[dict]] = None) -> dict:
    """Write an int8 copy of the fp32 ONNX file ``src`` to ``dst``; returns what was done.

    ``calibration``: feeds ``{"x": ..., "tod": ..., "dow": ...}`` for ``mode="static"``. ``dst`` is one
    file (int8 weights are a quarter of fp32's; ``src``'s external data, if any, is read).
    """
    import logging

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode not in INT8_MODES:
        raise ConfigError(f"unknown int8 mode {mode!r}; expected one of {list(INT8_MODES)}")
    nodes = weight_matmuls(src, scope)
    if not nodes:
        raise ConfigError(f"{src}: no weight matmuls found in scope {scope!r} to quantise")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser warns about pre-processing on every call
    try:
        if mode == "dynamic":
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                             nodes_to_quantize=nodes, use_external_data_format=False)
        else:
            feeds = list(calibration or [])
            if not feeds:
                raise ConfigError("static int8 quantisation needs calibration inputs (--calib-data)")
            quantize_static(str(src), str(dst), _Calibration(feeds), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.MinMax,
                            use_external_data_format=False)
    finally:
        root.setLevel(level)
    return {"mode": mode, "scope": scope, "per_channel": per_channel, "quantized_nodes": len(nodes)}


# ----------------------------------------------------------------------------- the gate
def relative_error(y: np.ndarray, ref: np.ndarray) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(y, dtype=np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


def relative_error_gate(predict: Forecaster, reference: Forecaster, inputs: Sequence[tuple], precision: str,
                        tolerance: Optional[float] = None) -> dict:
    """The data-free gate: max relative error over ``inputs`` (tuples ``(x, tod, dow)``)."""
    tol = RELATIVE_TOLERANCE[precision] if tolerance is None else tolerance
    errs = [relative_error(predict(*a), reference(*a)) for a in inputs]
    result = {"gate": "relative_error", "precision": precision, "max_rel_err": max(errs), "tolerance": tol,
              "batches": [int(a[0].shape[0]) for a in inputs], "passed": max(errs) <= tol}
    if not result["passed"]:
        raise PrecisionGateError(f"{precision} artifact fails its gate: relative error {max(errs):.3g} > {tol:g} "
                                 "(pass --calib-data to judge it on the forecasting task instead)")
    return result


def task_windows(calib_data: str | os.PathLike, config, split: str = "test"):
    """The sliding windows of ``split`` of the data at ``calib_data`` (a ``PREFIX``), checked against ``config``."""
    from stvfm_engine.errors import DataError
    from stvfm_engine.model.data import Windows, load_flow_data

    data = load_flow_data(calib_data)
    if data.channels != config.channels or data.grid != (config.height, config.width):
        raise DataError(f"{calib_data}: data has C={data.channels}, grid {data.grid[0]}x{data.grid[1]}; "
                        f"the model expects C={config.channels}, grid {config.height}x{config.width}")
    return Windows(data.splits[split], config.history, config.horizon, config.steps_per_day, config.start_dow)


def calibration_feeds(calib_data: str | os.PathLike, config, count: int = 64, batch: int = 8) -> list[dict]:
    """Up to ``count`` training windows as ONNX feeds of ``batch`` windows, evenly spread over the split."""
    w = task_windows(calib_data, config, "train")
    idx = np.linspace(0, len(w) - 1, num=min(count, len(w))).astype(np.int64)
    feeds = []
    for s in range(0, len(idx), batch):
        x, _, tod, dow = w.batch(idx[s:s + batch])
        feeds.append({"x": x} if tod is None else {"x": x, "tod": tod, "dow": dow})
    return feeds


def mae_gate(predict: Forecaster, reference: Forecaster, calib_data: str | os.PathLike, config, precision: str,
             max_mae_loss: float = DEFAULT_MAX_MAE_LOSS, split: str = "test", batch_size: int = 64) -> dict:
    """The forecasting-task gate: test MAE of ``predict`` vs ``reference`` (fp32) on the same windows.

    ``mae_loss = (mae - mae_fp32) / mae_fp32`` must be <= ``max_mae_loss`` (a gain always passes).
    """
    from stvfm_engine.model.evaluate import ErrorAccumulator

    if not max_mae_loss >= 0:
        raise ConfigError(f"max_mae_loss must be >= 0, got {max_mae_loss}")
    windows = task_windows(calib_data, config, split)
    acc_ref, acc = ErrorAccumulator(), ErrorAccumulator()
    worst_rel = 0.0
    for x, y, tod, dow in windows.batches(batch_size):
        y_ref, y_low = reference(x, tod, dow), predict(x, tod, dow)
        acc_ref.add(y_ref, y)
        acc.add(y_low, y)
        worst_rel = max(worst_rel, relative_error(y_low, y_ref))
    mae_ref, mae = acc_ref.result()["mae"], acc.result()["mae"]
    loss = (mae - mae_ref) / max(mae_ref, 1e-12)
    result = {"gate": "test_mae", "precision": precision, "data": str(calib_data), "split": split,
              "windows": len(windows), "mae_fp32": mae_ref, "mae": mae, "mae_loss": loss,
              "max_mae_loss": max_mae_loss, "max_rel_err_vs_fp32": worst_rel, "passed": loss <= max_mae_loss}
    if not result["passed"]:
        raise PrecisionGateError(f"{precision} artifact fails the task gate: {split} MAE {mae:.4f} vs fp32 {mae_ref:.4f} "
                                 f"(+{100 * loss:.2f}% > {100 * max_mae_loss:g}% allowed; --max-mae-loss changes it)")
    return result


def ort_forecaster(onnx_path: str | os.PathLike, threads: Optional[int] = None) -> Forecaster:
    """A plain ONNX Runtime CPU session over ``onnx_path`` as a numpy forecaster."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}

    def predict(x, tod=None, dow=None):
        feed = {k: v for k, v in (("x", x), ("tod", tod), ("dow", dow)) if k in names}
        return sess.run(None, feed)[0]

    return predict


def gate(predict: Forecaster, reference: Forecaster, config, precision: str,
         calib_data: Optional[str | os.PathLike] = None, max_mae_loss: float = DEFAULT_MAX_MAE_LOSS,
         random_inputs: Sequence[tuple] = ()) -> dict:
    """The gate a ``precision`` build must pass: :func:`mae_gate` with data, else :func:`relative_error_gate`."""
    if calib_data is not None:
        return mae_gate(predict, reference, calib_data, config, precision, max_mae_loss)
    return relative_error_gate(predict, reference, random_inputs, precision)


def build_int8_onnx(fp32_onnx: str | os.PathLike, dst: str | os.PathLike, reference: Forecaster, config,
                    random_inputs: Sequence[tuple], calib_data: Optional[str | os.PathLike] = None,
                    max_mae_loss: float = DEFAULT_MAX_MAE_LOSS, mode: str = "dynamic", scope: str = "backbone",
                    threads: Optional[int] = None) -> dict:
    """Quantise ``fp32_onnx`` to ``dst`` and gate it; returns the manifest record (quantisation + gate).

    Raises :class:`PrecisionGateError` (and removes ``dst``) when the gate fails.
    """
    feeds = calibration_feeds(calib_data, config) if mode == "static" and calib_data is not None else None
    info = quantize_int8(fp32_onnx, dst, mode=mode, scope=scope, calibration=feeds)
    try:
        result = gate(ort_forecaster(dst, threads), reference, config, "int8", calib_data, max_mae_loss, random_inputs)
    except PrecisionGateError:
        for p in (Path(dst), Path(f"{dst}.data")):
            p.unlink(missing_ok=True)
        raise
    return {"quantization": info, "gate": result}


def quantize_onnx_artifact(path: str | os.PathLike, model, calib_data: Optional[str | os.PathLike] = None,
                           max_mae_loss: float = DEFAULT_MAX_MAE_LOSS, mode: str = "dynamic",
                           scope: str = "backbone") -> dict:
    """Replace the fp32 ONNX artifact ``path`` of an engine being built by its int8 version.

    With ``calib_data`` the int8 file must pass :func:`mae_gate` against the fp32 file first (the
    build's parity gate then checks it against ``model`` at the int8 tolerance); without data the
    parity gate alone decides. The int8 file is written as one file (no external data). Returns
    the record for the manifest.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".int8.tmp")
    fp32 = ort_forecaster(path)
    feeds = calibration_feeds(calib_data, model.config) if mode == "static" and calib_data is not None else None
    try:
        info = quantize_int8(path, tmp, mode=mode, scope=scope, calibration=feeds)
        result = (mae_gate(ort_forecaster(tmp), fp32, calib_data, model.config, "int8", max_mae_loss)
                  if calib_data is not None else
                  {"gate": "relative_error", "note": "no --calib-data: the parity gate at the int8 tolerance decides"})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    Path(f"{path}.data").unlink(missing_ok=True)  # the fp32 weights, if the export wrote them beside it
    return {"quantization": info, "gate": result}

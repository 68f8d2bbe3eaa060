"""OpenVINO on the CPU: ``model.xml`` + ``model.bin``, the fp32 ONNX export converted to OpenVINO IR
with the batch axis bounded to ``[1, max_batch]``, run at fp32, bf16 or int8.

fp32 and bf16 run the same fp32 IR: the precision is OpenVINO's ``INFERENCE_PRECISION_HINT``, recorded
in the manifest and always set explicitly (OpenVINO picks bf16 by itself on CPUs that have it). int8
is NNCF post-training quantisation (weights and activations int8) of the backbone's weight matmuls,
calibrated on train windows of ``--calib-data`` when given, else on synthetic count-like windows;
the rest of the graph stays fp32.
"""
from __future__ import annotations

import contextlib
import io
import logging
import queue
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from stvfm_engine.engine.graph import INT8_SCOPE, input_names, weight_matmuls
from stvfm_engine.engine.precision import Precision
from stvfm_engine.engine.registry import Artifact, BuildContext, OpenRequest
from stvfm_engine.engine.runtime import Runner, installed_version, major_minor, missing, rebuild_hint, to_numpy
from stvfm_engine.errors import BackendError, ExportError, first_line
from stvfm_engine.model.config import STVFMConfig
from stvfm_engine.model.data import flow_data_from_array, load_flow_data, synthetic_flow, windows_for
from stvfm_engine.model.stvfm import STVFM

XML = "model.xml"
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the quantised matmuls run int8, the rest f32
CAPABILITY = {"bf16": "BF16", "int8": "INT8"}  # the CPU plugin's OPTIMIZATION_CAPABILITIES a precision needs
CALIBRATION_WINDOWS = 128
INSTALL = "pip install 'stvfm-engine[openvino]'"


def why_not_run(device: torch.device) -> Optional[str]:
    if why := missing("openvino"):
        return f"{why} ({INSTALL})"
    return None


def cpu_capabilities() -> list[str]:
    """What OpenVINO's CPU plugin says this CPU accelerates (FP32, BF16, INT8, ...)."""
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def why_not_build(device: torch.device, precision: Precision) -> Optional[str]:
    if why := missing("openvino", "onnx", "onnxscript", *(("nncf",) if precision.name == "int8" else ())):
        return f"{why} ({INSTALL})"
    need = CAPABILITY.get(precision.name)
    if need and need not in (caps := cpu_capabilities()):
        return (f"OpenVINO's CPU plugin has no {need} support on this CPU (it reports {', '.join(caps)}"
                + ("; bf16 needs avx512_bf16 or AMX)" if precision.name == "bf16" else ")"))
    return None


def version_problem(manifest: dict[str, Any]) -> Optional[str]:
    """An IR needs an OpenVINO at least as new as the one that wrote it."""
    built, here = (manifest.get("versions") or {}).get("openvino"), installed_version("openvino")
    if here is None:
        return None  # why_not_run says it
    if major_minor(built) is None or major_minor(here) < major_minor(built):
        return f"model.xml was built with openvino {built}, this is openvino {here} (older runtimes may not read it)"
    return None


def build(ctx: BuildContext) -> Artifact:
    import openvino as ov

    onnx_path = ctx.onnx()
    prec = ctx.precision.name
    with ctx.stage("openvino", f"convert {onnx_path.name} to OpenVINO IR (batch 1..{ctx.max_batch})"):
        try:
            model = ov.Core().read_model(str(onnx_path))
            model.reshape({i.get_any_name(): ov.PartialShape([ov.Dimension(1, ctx.max_batch), *i.get_partial_shape()[1:]])
                           for i in model.inputs})
        except Exception as e:  # openvino raises its own RuntimeError subclasses
            raise ExportError(f"OpenVINO could not convert {onnx_path.name}: {first_line(e)}") from None
    details: dict[str, Any] = {}
    if prec == "int8":
        samples, source = calibration_samples(ctx.model, ctx.calib_data)
        with ctx.stage("openvino", f"NNCF int8 post-training quantisation on {len(samples)} windows"):
            model, details["quantization"] = quantize_int8(model, onnx_path, samples)
        details["quantization"]["calibration"] = {"source": source, "windows": len(samples)}
    xml = ctx.directory / XML
    ov.save_model(model, str(xml), compress_to_fp16=False)  # fp16 weights would break fp32 parity
    return Artifact(xml, details, runtime={"inference_precision_hint": HINTS[prec]})


def calibration_samples(model: STVFM, calib_data=None, count: int = CALIBRATION_WINDOWS) -> tuple[list[dict], str]:
    """``count`` input windows spread evenly over the train split of ``calib_data`` (a data PREFIX) or,
    without it, of a synthetic periodic count grid shifted and scaled to the model's per-channel
    normalisation; and a line saying which."""
    c = model.config
    if calib_data is not None:
        data, source = load_flow_data(calib_data), f"train windows of {calib_data}"
    else:
        flow = synthetic_flow(height=c.height, width=c.width, channels=c.channels, steps_per_day=c.steps_per_day or 48)
        z = (flow - flow.mean(axis=(0, 1, 2))) / np.maximum(flow.std(axis=(0, 1, 2)), 1e-6)
        mean, std = (t.detach().cpu().numpy().astype(np.float64) for t in (model.norm_mean, model.norm_std))
        data = flow_data_from_array(mean + std * z, source="synthetic")
        source = "synthetic count-like windows (no --calib-data), at the model's normalisation"
    windows = windows_for(c, data, "train")
    index = np.unique(np.linspace(0, len(windows) - 1, min(count, len(windows))).astype(np.int64))
    x, _, tod, dow = windows.batch(index)
    values = [x, tod, dow][: len(input_names(c))]
    return [{n: v[i:i + 1] for n, v in zip(input_names(c), values)} for i in range(len(index))], source


def quantize_int8(model, onnx_path: Path, samples: list[dict]) -> tuple[Any, dict]:
    """NNCF static int8 of the backbone's weight matmuls of the OpenVINO ``model``; the rest stays fp32."""
    import nncf

    scope = set(weight_matmuls(onnx_path, INT8_SCOPE))  # ONNX node names = OpenVINO friendly names
    matmuls = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"]
    kept = [n for n in matmuls if n in scope]
    if not kept:
        raise ExportError(f"{onnx_path.name}: no weight matmuls found in scope {INT8_SCOPE!r} to quantise")
    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bars: the build shows its own stage
        try:
            q = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples),
                              model_type=nncf.ModelType.TRANSFORMER,
                              ignored_scope=nncf.IgnoredScope(names=[n for n in matmuls if n not in scope]))
        except Exception as e:  # nncf raises many types
            raise ExportError(f"NNCF quantisation failed: {type(e).__name__}: {first_line(e)}") from None
    return q, {"method": "nncf post-training static int8", "scope": INT8_SCOPE, "quantized_nodes": len(kept)}


class OpenVinoRunner(Runner):
    """One compiled model and a pool of infer requests: each call borrows a request of its own, so calls
    from several threads are safe (the plugin runs them one after another on its one stream)."""

    def __init__(self, path: Path, config: STVFMConfig, hint: str, threads: Optional[int]):
        import openvino as ov

        props: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            props["INFERENCE_NUM_THREADS"] = int(threads)
        core = ov.Core()
        try:
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", props)
        except Exception as e:  # openvino raises its own RuntimeError subclasses
            raise BackendError(f"openvino {ov.__version__} cannot open {path} ({rebuild_hint(path.parent)}): "
                               f"{first_line(e)}") from None
        got = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        if got != hint:  # the plugin falls back silently where the CPU lacks the type
            raise BackendError(f"OpenVINO runs {got}, not {hint}, on this CPU (it reports "
                               f"{', '.join(cpu_capabilities())}); {rebuild_hint(path.parent)} at another precision")
        self.names = input_names(config)
        self._idle: queue.SimpleQueue = queue.SimpleQueue()

    @property
    def threads(self) -> int:
        return int(self.compiled.get_property("INFERENCE_NUM_THREADS"))

    def __call__(self, x, tod, dow) -> np.ndarray:
        feed = {n: to_numpy(v) for n, v in zip(self.names, (x, tod, dow))}
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            return request.infer(feed)[0]  # a copy: the request's output buffer is reused
        finally:
            self._idle.put(request)


def open(request: OpenRequest) -> Runner:  # noqa: A001 - the registry's interface name
    hint = (request.entry.get("runtime") or {}).get("inference_precision_hint", HINTS[request.precision.name])
    return OpenVinoRunner(request.directory / request.entry["file"], request.config, hint, request.threads)

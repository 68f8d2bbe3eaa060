"""ONNX export of the served graphs (``torch.onnx.export(dynamo=True)``, opset 18, dynamic axes), checked;
a multi-model engine's small per-model parts through the TorchScript exporter first (see :func:`export_parts`).

The one-model graph (``x[, tod, dow] -> y``) and a multi-model engine's parts (per model ``pre``/``post``,
one shared ``backbone``) go through the same export and check. Export uses an example batch of 2: with
batch 1 the dynamo exporter specialises the batch axis even when it is declared dynamic
(shared/docs/pitfalls.md).
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from stvfm_engine.engine.graph import (FEATURES_NAME, OUTPUT_NAME, TOKENS_NAME, BackboneGraph, PostGraph, PreGraph,
                                       ServingModel, backbone_dynamic_shapes, backbone_example, dynamic_shapes,
                                       example_inputs, input_names, post_dynamic_shapes)
from stvfm_engine.errors import ExportError, first_line
from stvfm_engine.model.stvfm import STVFM

OPSET = 18
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to model.onnx.data (protobuf's limit is 2 GiB)


def export_onnx(model: STVFM, path: Path, max_batch: int) -> Path:
    """Write the fp32 served graph of ``model`` to ``path`` (plus ``path.data`` for large weights), checked."""
    return export_graph(ServingModel(model, "fp32").eval(), example_inputs(model, batch=2), path,
                        input_names(model.config), [OUTPUT_NAME], dynamic_shapes(model.config, max_batch))


def export_parts(model: STVFM, pre_path: Path, post_path: Path, max_batch: int) -> tuple[Path, Path]:
    """Write one model's ``pre`` (``x[, tod, dow] -> tokens``) and ``post`` (``h -> y``) graphs, checked.

    These small graphs are re-exported on every rebuild after retraining, so they go through the
    TorchScript exporter first (0.4 s a graph on 2 cores, against 5-10 s for the dynamo exporter, which
    dominated the rebuild); the same checks follow, the build's parity gate runs them against the fp32
    reference, and where the TorchScript exporter fails or is gone the dynamo exporter does the work."""
    inputs = input_names(model.config)

    def features(batch: int) -> tuple[torch.Tensor]:
        with torch.no_grad():  # not inference_mode: the TorchScript exporter traces with autograd on
            return (model.backbone.encode(model.backbone_input(*example_inputs(model, batch=batch))),)

    batch = {0: "batch"}
    for module, make, path, ins, outs, axes, shapes in (
            (PreGraph(model), lambda b: example_inputs(model, batch=b), pre_path, inputs, [TOKENS_NAME],
             {**dict.fromkeys(inputs, batch), TOKENS_NAME: {0: "sequences"}}, dynamic_shapes(model.config, max_batch)),
            (PostGraph(model), features, post_path, [FEATURES_NAME], [OUTPUT_NAME],
             {FEATURES_NAME: {0: "sequences"}, OUTPUT_NAME: batch}, post_dynamic_shapes(max_batch))):
        example = make(2)
        try:
            export_torchscript(module, example, path, ins, outs, axes)
            # a trace may have baked a shape in: the graph must reproduce the module at other batches
            why = _differs(module, path, ins, [make(b) for b in (1, 3)])
            if why:
                raise ExportError(f"TorchScript export of {path.name} does not generalise: {why}")
        except ExportError:
            export_graph(module, example, path, ins, outs, shapes)
    return pre_path, post_path


def _differs(module: nn.Module, path: Path, inputs: Sequence[str], examples: Sequence[tuple]) -> str:
    """Why the ONNX graph at ``path`` does not reproduce ``module`` on ``examples`` (fp32, 1e-4), or ''."""
    from stvfm_engine.export.parity import relative_error

    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # a failing graph is an answer here, not an error to log
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for args in examples:
            with torch.no_grad():
                ref = module(*args).numpy()
            got = sess.run(None, {n: a.numpy() for n, a in zip(inputs, args)})[0]
            if not (err := relative_error(got, ref)) <= 1e-4:  # the parity gate's measure (raises on shape)
                return f"relative error {err:.1e}"
    except Exception as e:  # noqa: BLE001 - onnxruntime missing, the graph fails or its shape is wrong: not usable
        return first_line(e)
    return ""


def export_torchscript(module: nn.Module, args: tuple, path: Path, inputs: Sequence[str], outputs: Sequence[str],
                       axes: dict) -> Path:
    """``torch.onnx.export(dynamo=False)`` of a small graph (dynamic ``axes``), checked like every export."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated and says so on every call
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, input_names=list(inputs),
                              output_names=list(outputs), dynamic_axes=axes)
        except Exception as e:  # noqa: BLE001 - any failure: the caller falls back to the dynamo exporter
            path.unlink(missing_ok=True)
            raise ExportError(f"TorchScript ONNX export failed: {type(e).__name__}: {first_line(e)}") from None
    check_onnx(path, inputs, outputs)
    return path


def export_backbone(model: STVFM, path: Path, max_batch: int) -> Path:
    """Write the shared backbone (``tokens [N, L, D] -> h``, N and L dynamic) of ``model``, checked."""
    return export_graph(BackboneGraph(model.backbone), (backbone_example(model),), path, [TOKENS_NAME],
                        [FEATURES_NAME], backbone_dynamic_shapes(max_batch), dynamic_axes=(0, 1))


def export_graph(module: nn.Module, args: tuple, path: Path, inputs: Sequence[str], outputs: Sequence[str],
                 shapes: dict, dynamic_axes: Sequence[int] = (0,)) -> Path:
    """Export ``module`` on the example ``args`` to ``path`` (weights over 1 GiB go to ``path.data``), checked."""
    big = sum(t.numel() * t.element_size() for t in module.state_dict().values()) > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")  # the exporter warns about every renamed dynamic axis
        try:
            torch.onnx.export(module, args, str(path), dynamo=True, opset_version=OPSET, input_names=list(inputs),
                              output_names=list(outputs), dynamic_shapes=shapes, external_data=big, verbose=False)
        except Exception as e:  # the exporter raises many types; name the first line of it
            raise ExportError(f"ONNX export failed: {type(e).__name__}: {first_line(e)}") from None
    check_onnx(path, inputs, outputs, dynamic_axes)
    return path


def check_onnx(path: Path, inputs: Sequence[str], outputs: Sequence[str], dynamic_axes: Sequence[int] = (0,)) -> None:
    """``onnx.checker`` (full check), the opset, the I/O names, and that ``dynamic_axes`` of every I/O are dynamic."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{path.name} fails onnx.checker: {first_line(e)}") from None
    proto = onnx.load(str(path), load_external_data=False)
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < OPSET:
        raise ExportError(f"{path.name} has opset {opset}; expected >= {OPSET}")
    names = [i.name for i in proto.graph.input]
    outs = [o.name for o in proto.graph.output]
    if names != list(inputs) or outs != list(outputs):
        raise ExportError(f"{path.name} has inputs {names} and outputs {outs}; expected {list(inputs)} -> {list(outputs)}")
    for value in list(proto.graph.input) + list(proto.graph.output):
        for axis in dynamic_axes:
            dim = value.type.tensor_type.shape.dim[axis]
            if not dim.dim_param:
                what = "the batch axis" if axis == 0 else f"axis {axis}"
                raise ExportError(f"{path.name}: {what} of {value.name} is fixed to {dim.dim_value}; expected dynamic")

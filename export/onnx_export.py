"""ONNX export of the served graph (``torch.onnx.export(dynamo=True)``, opset 18, dynamic batch), checked.

Export uses an example batch of 2: with batch 1 the dynamo exporter specialises the batch axis even
when it is declared dynamic (shared/docs/pitfalls.md).
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import torch

from stvfm_engine.engine.graph import OUTPUT_NAME, ServingModel, dynamic_shapes, example_inputs, input_names
from stvfm_engine.engine.runtime import ExportError
from stvfm_engine.errors import first_line
from stvfm_engine.model.stvfm import STVFM

OPSET = 18
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to model.onnx.data (protobuf's limit is 2 GiB)


def export_onnx(model: STVFM, path: Path, max_batch: int) -> Path:
    """Write the fp32 served graph of ``model`` to ``path`` (plus ``path.data`` for large weights), checked."""
    serving = ServingModel(model, "fp32").eval()
    args = example_inputs(model, batch=2)
    big = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")  # the exporter warns about every renamed dynamic axis
        try:
            torch.onnx.export(serving, args, str(path), dynamo=True, opset_version=OPSET,
                              input_names=input_names(model.config), output_names=[OUTPUT_NAME],
                              dynamic_shapes=dynamic_shapes(model.config, max_batch), external_data=big,
                              verbose=False)
        except Exception as e:  # the exporter raises many types; name the first line of it
            raise ExportError(f"ONNX export failed: {type(e).__name__}: {first_line(e)}") from None
    check_onnx(path, model)
    return path


def check_onnx(path: Path, model: STVFM) -> None:
    """``onnx.checker`` (full check), the opset, and the I/O names and dynamic batch axis."""
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
    if names != input_names(model.config) or outs != [OUTPUT_NAME]:
        raise ExportError(f"{path.name} has inputs {names} and outputs {outs}; expected {input_names(model.config)} -> [y]")
    for value in list(proto.graph.input) + list(proto.graph.output):
        batch = value.type.tensor_type.shape.dim[0]
        if not batch.dim_param:
            raise ExportError(f"{path.name}: the batch axis of {value.name} is fixed to {batch.dim_value}; expected dynamic")

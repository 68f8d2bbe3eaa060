"""The graph every backend serves: fixed positional I/O ``(x[, tod, dow]) -> y``, float32 in and out.

ONNX export, AOTInductor and the eager backend all wrap the reference model in :class:`ServingModel`,
so that input names, the dynamic batch axis and the precision cast are defined once. A multi-model
engine serves the same model in three parts instead: per model :class:`PreGraph` and :class:`PostGraph`
around one shared :class:`BackboneGraph` (``x[, tod, dow] -> tokens -> h -> y``).
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from stvfm_engine.engine.precision import Precision, get_precision
from stvfm_engine.model.config import MAX_TOKENS, STVFMConfig
from stvfm_engine.model.stvfm import STVFM

OUTPUT_NAME = "y"
TOKENS_NAME = "tokens"  # the backbone's input [N, L, D]: N = 2B sequences (raw then flow branch), L = P + n
FEATURES_NAME = "h"  # the backbone's output, same shape
MAX_SEQUENCE = MAX_TOKENS + 64  # n tokens plus the backbone's prefix tokens
INT8_SCOPE = "backbone"  # the module whose weight matmuls int8 quantises (ONNX Runtime, OpenVINO)


def input_names(config: STVFMConfig) -> list[str]:
    """``["x", "tod", "dow"]``, or ``["x"]`` for a model without time inputs."""
    return ["x", "tod", "dow"] if config.uses_time else ["x"]


def io_spec(config: STVFMConfig, max_batch: int) -> dict:
    """Names, dtypes and shapes of the served graph; axis 0 (``"batch"``) is dynamic in ``[1, max_batch]``."""
    c = config
    shapes = {"x": ("float32", [c.history, c.channels, c.height, c.width]),
              "tod": ("int64", [c.history]), "dow": ("int64", [c.history])}
    inputs = [{"name": n, "dtype": shapes[n][0], "shape": ["batch", *shapes[n][1]]} for n in input_names(c)]
    outputs = [{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", c.horizon, c.channels, c.height, c.width]}]
    return {"inputs": inputs, "outputs": outputs, "dynamic_axes": {"batch": {"axis": 0, "min": 1, "max": max_batch}}}


class ServingModel(nn.Module):
    """``forward(x[, tod, dow]) -> y`` float32, computed in the precision's dtype.

    For a reduced precision the wrapped model is a cast copy; the fp32 model is used as it is.
    """

    def __init__(self, model: STVFM, precision: str | Precision = "fp32"):
        super().__init__()
        self.precision = get_precision(precision)
        self.uses_time = model.config.uses_time
        dtype = self.precision.dtype
        self.model = copy.deepcopy(model).to(dtype) if dtype != torch.float32 else model
        self.model.eval()

    def forward(self, x: torch.Tensor, tod: torch.Tensor | None = None, dow: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x.to(self.precision.dtype), tod, dow).float()


def example_inputs(model: STVFM, batch: int = 2, device: str | torch.device = "cpu",
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """Random raw-unit inputs in the order of :func:`input_names`: ``x = mean + std * N(0, 1)`` per
    channel (never zeros), tod/dow uniform over their ranges."""
    c = model.config
    z = torch.randn(batch, c.history, c.channels, c.height, c.width, generator=generator)
    x = z * model.norm_std.detach().cpu().view(1, 1, -1, 1, 1) + model.norm_mean.detach().cpu().view(1, 1, -1, 1, 1)
    out = [x]
    if c.uses_time:
        out.append(torch.randint(0, c.steps_per_day, (batch, c.history), generator=generator))
        out.append(torch.randint(0, 7, (batch, c.history), generator=generator))
    return tuple(t.to(device) for t in out)


def dynamic_shapes(config: STVFMConfig, max_batch: int) -> dict:
    """``torch.export`` dynamic shapes: one shared batch dim in ``[1, max_batch]`` on every input."""
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
    return {name: {0: batch} for name in input_names(config)}


class _Part(nn.Module):
    """A part of a model as a graph of its own (fp32, eval mode)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.eval()


class PreGraph(_Part):
    """``forward(x[, tod, dow]) -> tokens [2B, P+n, D]``: one model's stages 0-3 and the prefix tokens."""

    def forward(self, x: torch.Tensor, tod: torch.Tensor | None = None, dow: torch.Tensor | None = None) -> torch.Tensor:
        return self.module.backbone_input(x, tod, dow)


class BackboneGraph(_Part):
    """``forward(tokens [N, L, D]) -> h [N, L, D]``: the shared frozen backbone (a ``FrozenViT``), any N and L."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.module.encode(tokens)


class PostGraph(_Part):
    """``forward(h [2B, P+n, D]) -> y [B, T_out, C, H, W]``: one model's stages 5-6."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.module.forecast(h)


def backbone_example(model: STVFM, sequences: int = 4) -> torch.Tensor:
    """Random backbone input ``[sequences, P+n, D]`` of ``model`` (4 sequences: 2 would specialise the axis)."""
    return torch.randn(sequences, model.sequence_length, model.dim)


def backbone_dynamic_shapes(max_batch: int) -> dict:
    """Both the sequence axis (``2 * max_batch`` at most) and the token axis of the backbone are dynamic."""
    return {TOKENS_NAME: {0: torch.export.Dim("sequences", min=1, max=2 * max(2, max_batch)),
                          1: torch.export.Dim("length", min=2, max=MAX_SEQUENCE)}}


def post_dynamic_shapes(max_batch: int) -> dict:
    """``h`` holds ``2B`` sequences: its axis 0 is twice the dynamic batch."""
    return {FEATURES_NAME: {0: 2 * torch.export.Dim("batch", min=1, max=max(2, max_batch))}}


def weight_matmuls(onnx_path: str | os.PathLike, scope: str = INT8_SCOPE) -> list[str]:
    """Names of the MatMul/Gemm nodes with a constant weight inside the module ``scope`` ("" = everywhere)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    names = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in consts:
            continue
        # namespace: ": Root/attr: Class/attr.sub: Class/..." -> the module path of each level
        namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        paths = [seg.split(":", 1)[0].strip() for seg in namespace.split("/")[1:]]
        if not scope or any(scope in path.split(".") for path in paths):
            names.append(node.name)
    return names

"""AOTInductor package of the served graph: ``torch.export`` with a dynamic batch dim, then
``torch._inductor.aoti_compile_and_package`` for the CPU or a CUDA device."""
from __future__ import annotations

import copy

import contextlib
import sys
from pathlib import Path

import torch

from stvfm_engine.export.graph import ServingModel, dynamic_shapes, example_inputs
from stvfm_engine.export.onnx_export import ExportError
from stvfm_engine.export.precision import Precision
from stvfm_engine.model.stvfm import STVFM


def export_aoti(model: STVFM, path: Path, precision: Precision, device: str, max_batch: int) -> Path:
    """Compile the served graph of ``model`` (in ``precision``, on ``device``) into the package ``path``."""
    # a copy: moving the shared fp32 build model to the device would break the other builders' parity runs
    serving = ServingModel(copy.deepcopy(model), precision).to(device).eval()
    args = example_inputs(model, batch=2, device=device)
    with contextlib.redirect_stdout(sys.stderr):
        try:
            program = torch.export.export(serving, args, dynamic_shapes=dynamic_shapes(model.config, max_batch))
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        except Exception as e:  # torch.export / inductor raise many types; name the first line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ExportError(f"AOTInductor build failed: {type(e).__name__}: {msg}") from None
    return path

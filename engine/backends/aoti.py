"""AOTInductor: ``model.pt2``, the served graph through ``torch.export`` (dynamic batch) and
``torch._inductor.aoti_compile_and_package``, for the CPU or a CUDA device, fp32/bf16/fp16."""
from __future__ import annotations

import contextlib
import copy
import sys
from typing import Any, Optional

import torch

from stvfm_engine.engine.graph import ServingModel, dynamic_shapes, example_inputs
from stvfm_engine.engine.precision import Precision
from stvfm_engine.engine.registry import Artifact, BuildContext, OpenRequest
from stvfm_engine.engine.runtime import Runner, TorchRunner, major_minor, quiet_cuda_probes, which_compiler
from stvfm_engine.errors import BackendError, ExportError, first_line


def why_not_run(device: torch.device) -> Optional[str]:
    return None if hasattr(torch._inductor, "aoti_load_package") else f"torch {torch.__version__} lacks aoti_load_package"


def why_not_build(device: torch.device, precision: Precision) -> Optional[str]:
    if which_compiler() is None:
        return "no C++ compiler found (AOTInductor compiles C++: install g++ or set CXX)"
    return None


def version_problem(manifest: dict[str, Any]) -> Optional[str]:
    """A ``model.pt2`` needs the torch major.minor it was built with."""
    built, here = (manifest.get("versions") or {}).get("torch"), torch.__version__
    if major_minor(built) is None or major_minor(built) != major_minor(here):
        return (f"model.pt2 was built with torch {built}, this is torch {here} "
                "(an AOTInductor package needs the torch major.minor it was built with)")
    return None


def build(ctx: BuildContext) -> Artifact:
    quiet_cuda_probes()
    path = ctx.directory / "model.pt2"
    with ctx.stage("aoti", f"torch.export + AOTInductor compile ({ctx.device}, {ctx.precision.name})"):
        # a copy: moving the shared fp32 build model to the device would break the other builders' parity runs
        serving = ServingModel(copy.deepcopy(ctx.model), ctx.precision).to(ctx.device).eval()
        args = example_inputs(ctx.model, batch=2, device=ctx.device)
        with contextlib.redirect_stdout(sys.stderr):
            try:
                program = torch.export.export(serving, args,
                                              dynamic_shapes=dynamic_shapes(ctx.model.config, ctx.max_batch))
                torch._inductor.aoti_compile_and_package(program, package_path=str(path))
            except Exception as e:  # torch.export / inductor raise many types; name the first line
                raise ExportError(f"AOTInductor build failed: {type(e).__name__}: {first_line(e)}") from None
    return Artifact(path)


def open(request: OpenRequest) -> Runner:  # noqa: A001 - the registry's interface name
    path, device = request.directory / request.entry["file"], request.device
    kwargs = {"device_index": device.index} if device.type == "cuda" and device.index is not None else {}
    try:
        fn = torch._inductor.aoti_load_package(str(path), **kwargs)
    except Exception as e:  # the loader raises RuntimeError and friends from C++
        raise BackendError(f"cannot load AOTInductor package {path}: {first_line(e)}") from None
    # the package takes only the inputs its graph has (no None for a model without time inputs)
    return TorchRunner(lambda *args: fn(*(a for a in args if a is not None)), device, thread_safe=False)

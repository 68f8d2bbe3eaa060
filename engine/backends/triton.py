"""The fused Triton kernels around one backbone pass (:mod:`stvfm_engine.engine.triton_backend`)."""
from __future__ import annotations

from typing import Optional

import torch

from stvfm_engine.engine.registry import OpenRequest
from stvfm_engine.engine.runtime import BackendError, Runner, TorchRunner, missing
from stvfm_engine.errors import STVFMError, first_line


def why_not_run(device: torch.device) -> Optional[str]:
    if why := missing("triton"):
        return why
    from stvfm_engine.kernels import why_not_runnable

    return why_not_runnable(device)


def open(request: OpenRequest) -> Runner:  # noqa: A001 - the registry's interface name
    from stvfm_engine.engine.triton_backend import load_triton_backend

    try:
        fn = load_triton_backend(request.reference(), precision=request.precision.name, device=str(request.device),
                                 max_batch=request.max_batch)
    except STVFMError:
        raise
    except Exception as e:  # the Triton path may fail in many ways (no GPU, no interpreter, unsupported op)
        raise BackendError(f"the triton backend cannot load on {request.device}: {type(e).__name__}: "
                           f"{first_line(e)}") from None
    return TorchRunner(fn, request.device, thread_safe=False)

"""The fused Triton kernels around one backbone pass (:mod:`stvfm_engine.engine.triton_backend`)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from stvfm_engine.engine.registry import OpenRequest
from stvfm_engine.engine.runtime import BackendError, Runner, missing, output
from stvfm_engine.errors import STVFMError, first_line


class TritonRunner(Runner):
    """Host inputs straight into the predictor, which copies them into its CUDA graphs' static inputs
    under its own lock (one host-to-device copy, serialised with the replay); the output's copy back
    runs outside that lock. Without graphs (Triton's interpreter) the Engine serialises calls."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.thread_safe = predictor.cuda_graphs

    def __call__(self, x, tod, dow) -> np.ndarray:
        args = [None if a is None else torch.as_tensor(a) for a in (x, tod, dow)]
        with torch.inference_mode():
            return output(self.predictor(*args))


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
    return TritonRunner(fn)

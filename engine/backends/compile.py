"""The ``compile`` bench baseline: ``torch.compile(mode="max-autotune")`` of the reference model.

What a user gets from PyTorch alone (Inductor's autotuned kernels and CUDA graphs) at the same
precision; ``bench`` times it beside the served backends. It compiles on its first call of each
batch size (slowly: the autotuning benchmarks many GEMM configurations).
"""
from __future__ import annotations

import torch

from stvfm_engine.engine.graph import ServingModel
from stvfm_engine.engine.registry import OpenRequest
from stvfm_engine.engine.runtime import Runner, TorchRunner


def open(request: OpenRequest) -> Runner:  # noqa: A001 - the registry's interface name
    serving = ServingModel(request.reference(), request.precision).to(request.device).eval()
    # TorchRunner copies each output to the host before the next call replays the CUDA graph over it.
    return TorchRunner(torch.compile(serving, mode="max-autotune"), request.device, thread_safe=False)

"""The reference model itself, served in fp32, bf16 or fp16 (rebuilt from ``weights.safetensors``)."""
from __future__ import annotations

from stvfm_engine.engine.graph import ServingModel
from stvfm_engine.engine.registry import OpenRequest
from stvfm_engine.engine.runtime import Runner, TorchRunner


def open(request: OpenRequest) -> Runner:  # noqa: A001 - the registry's interface name
    serving = ServingModel(request.reference(), request.precision).to(request.device)
    return TorchRunner(serving, request.device, thread_safe=True)

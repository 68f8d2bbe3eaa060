"""The reference model itself, served in fp32, bf16 or fp16 (rebuilt from ``weights.safetensors``); and for a
multi-model directory the reference models' own parts around one copy of the shared backbone (fp32)."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from stvfm_engine.engine.graph import ServingModel
from stvfm_engine.engine.multi import Parts
from stvfm_engine.engine.registry import MultiOpenRequest, OpenRequest
from stvfm_engine.engine.runtime import Runner, TorchRunner, output, to_torch
from stvfm_engine.model.stvfm import STVFM


def open(request: OpenRequest) -> Runner:  # noqa: A001 - the registry's interface name
    serving = ServingModel(request.reference(), request.precision).to(request.device)
    return TorchRunner(serving, request.device, thread_safe=True)


class TorchParts(Parts):
    """``STVFM.backbone_input`` / ``FrozenViT.encode`` / ``STVFM.forecast`` of the reference models, which
    share one backbone (``FrozenViT.share_encoder``), so it is held once."""

    def __init__(self, models: Mapping[str, STVFM], device: torch.device):
        self.models = {name: m.to(device).eval() for name, m in models.items()}
        self.shared = next(iter(self.models.values())).backbone
        self.device = device

    def pre(self, name, x, tod, dow) -> torch.Tensor:
        with torch.inference_mode():
            return self.models[name].backbone_input(*(to_torch(a, self.device) for a in (x, tod, dow)))

    def backbone(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.shared.encode(tokens)

    def post(self, name: str, h: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return output(self.models[name].forecast(h))


def open_multi(request: MultiOpenRequest) -> Parts:
    return TorchParts(request.references(), request.device)

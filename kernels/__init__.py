"""Fused Triton kernels of ST-VFM, one file per op; importing this package registers torch.ops.stvfm.*.

``flow`` (flow_patchify), ``token_adapter``, ``prompt_attention`` (prompt_condition,
bilateral_attention). Set ``TRITON_INTERPRET=1`` before this import to run them on a CPU.
:func:`why_not_runnable` says whether they can run on a device here.
"""
from __future__ import annotations

from typing import Optional

import torch

from stvfm_engine.kernels import flow, prompt_attention, token_adapter  # noqa: F401  (registers the ops)
from stvfm_engine.kernels.common import interpreted


def why_not_runnable(device: str | torch.device = "cuda") -> Optional[str]:
    """None when the fused kernels can run on ``device`` in this process, else why not (one line)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return None if torch.cuda.is_available() else "torch sees no CUDA device"
    if kind == "cpu":
        if interpreted(flow._flow_kernel):
            return None
        return ("on a CPU the kernels run only in Triton's interpreter (slow, for tests): set TRITON_INTERPRET=1 "
                "before stvfm_engine.kernels is imported")
    return f"the kernels run on cuda (or on a CPU under TRITON_INTERPRET=1), not {kind}"

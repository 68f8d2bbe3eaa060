"""Fused Triton kernels of ST-VFM, one file per op; importing this package registers torch.ops.stvfm.*.

``flow`` (flow_patchify), ``token_adapter``, ``prompt_attention`` (prompt_condition,
bilateral_attention). :func:`why_not_runnable` says whether they can run on a device here; set
``TRITON_INTERPRET=1`` before this import to run them on a CPU (Triton's interpreter, for tests).
"""
from stvfm_engine.kernels import flow, prompt_attention, token_adapter  # noqa: F401  (registers the ops)
from stvfm_engine.kernels.common import KernelArgError, running_interpreted, why_not_runnable

__all__ = ["KernelArgError", "running_interpreted", "why_not_runnable"]

"""Fused Triton kernels of ST-VFM, one file per op; importing this package registers torch.ops.stvfm.*.

``flow`` (flow_patchify), ``token_adapter``, ``prompt_attention`` (prompt_condition,
bilateral_attention). Set ``TRITON_INTERPRET=1`` before this import to run them on a CPU.
"""
from stvfm_engine.kernels import flow, prompt_attention, token_adapter  # noqa: F401  (registers the ops)

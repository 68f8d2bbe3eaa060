"""Fused Triton kernels of ST-VFM, one file per op, registered as torch.ops.stvfm.*."""

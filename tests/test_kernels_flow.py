"""torch.ops.stvfm.flow_patchify against its PyTorch reference (Triton interpreter on a CPU)."""
from __future__ import annotations

import pytest
import torch

from helpers import rel_err
from stvfm_engine.kernels.flow import flow_patchify_ref
from stvfm_engine.model.stvfm import normalize, patchify, temporal_difference

SHAPES = [  # B, T, C, H, W, p
    (1, 3, 3, 7, 9, 2),
    (2, 5, 2, 14, 8, 1),
    (3, 4, 3, 10, 7, 3),
    (2, 2, 1, 5, 6, 4),
    (5, 12, 2, 14, 8, 2),
]


def inputs(B, T, C, H, W):
    x = torch.randn(B, T, C, H, W) * 3 + 1
    return x, torch.randn(C), torch.rand(C) + 0.5


@pytest.mark.parametrize("B,T,C,H,W,p", SHAPES)
def test_flow_patchify_fp32(B, T, C, H, W, p):
    x, mean, std = inputs(B, T, C, H, W)
    u = torch.ops.stvfm.flow_patchify(x, mean, std, p, torch.float32)
    ref = flow_patchify_ref(x, mean, std, p)
    n = -(-H // p) * -(-W // p)
    assert u.shape == (2 * B, n, T, C * p * p) and u.dtype == torch.float32
    assert rel_err(u, ref) <= 1e-5


def test_flow_patchify_strided_input():
    x, mean, std = inputs(2, 4, 3, 9, 7)
    xt = x.transpose(3, 4).contiguous().transpose(3, 4)  # same values, other strides
    assert not xt.is_contiguous()
    u = torch.ops.stvfm.flow_patchify(xt, mean, std, 2, torch.float32)
    assert rel_err(u, flow_patchify_ref(x, mean, std, 2)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,C,H,W,p", SHAPES[:3])
def test_flow_patchify_low_precision(B, T, C, H, W, p, dtype):
    x, mean, std = inputs(B, T, C, H, W)
    u = torch.ops.stvfm.flow_patchify(x, mean, std, p, dtype)
    assert u.dtype == dtype
    ref = flow_patchify_ref(x, mean, std, p)
    xn = normalize(x.to(dtype), mean.to(dtype), std.to(dtype))  # what PyTorch loses at this precision
    lowp = torch.cat([patchify(xn, p), patchify(temporal_difference(xn), p)]).float()
    atol = 2 * torch.finfo(dtype).eps * ref.abs().max()
    assert ((u.float() - ref).abs() <= 2 * (lowp - ref).abs() + atol).all()

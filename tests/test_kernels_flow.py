"""torch.ops.stvfm.flow_patchify against its PyTorch reference (on CUDA where present, else the interpreter)."""
from __future__ import annotations

import pytest
import torch

from helpers import rel_err
from stvfm_engine.kernels.common import KernelArgError
from stvfm_engine.kernels.flow import flow_patchify_ref
from stvfm_engine.model.stvfm import normalize, patchify, temporal_difference

SHAPES = [  # B, T, C, H, W, p
    (1, 3, 3, 7, 9, 2),
    (2, 5, 2, 14, 8, 1),
    (3, 4, 3, 10, 7, 3),
    (2, 2, 1, 5, 6, 4),
    (5, 12, 2, 14, 8, 2),
]
PRESET_SHAPES = {"city": (12, 2, 32, 32, 2), "large": (12, 2, 64, 64, 4)}  # T, C, H, W, p



def inputs(B, T, C, H, W):
    x = torch.randn(B, T, C, H, W) * 3 + 1
    return x, torch.randn(C), torch.rand(C) + 0.5


def check_low_precision(u, x, mean, std, p, dtype):
    """``|ours - ref32| <= 2 |torch_lowp - ref32| + atol`` elementwise (torch_lowp on the kernel's device)."""
    ref = flow_patchify_ref(x, mean, std, p)
    dev = u.device
    xn = normalize(x.to(dev, dtype), mean.to(dev, dtype), std.to(dev, dtype))
    lowp = torch.cat([patchify(xn, p), patchify(temporal_difference(xn), p)]).float().cpu()
    atol = 2 * torch.finfo(dtype).eps * ref.abs().max()
    assert ((u.float().cpu() - ref).abs() <= 2 * (lowp - ref).abs() + atol).all()


@pytest.mark.parametrize("B,T,C,H,W,p", SHAPES)
def test_flow_patchify_fp32(device, B, T, C, H, W, p):
    x, mean, std = inputs(B, T, C, H, W)
    u = torch.ops.stvfm.flow_patchify(x.to(device), mean.to(device), std.to(device), p, torch.float32)
    ref = flow_patchify_ref(x, mean, std, p)
    n = -(-H // p) * -(-W // p)
    assert u.shape == (2 * B, n, T, C * p * p) and u.dtype == torch.float32
    assert rel_err(u, ref) <= 1e-5


def test_flow_patchify_strided_input(device):
    x, mean, std = inputs(2, 4, 3, 9, 7)
    xt = x.to(device).transpose(3, 4).contiguous().transpose(3, 4)  # same values, other strides
    assert not xt.is_contiguous()
    u = torch.ops.stvfm.flow_patchify(xt, mean.to(device), std.to(device), 2, torch.float32)
    assert rel_err(u, flow_patchify_ref(x, mean, std, 2)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,C,H,W,p", SHAPES[:3])
def test_flow_patchify_low_precision(device, B, T, C, H, W, p, dtype):
    x, mean, std = inputs(B, T, C, H, W)
    u = torch.ops.stvfm.flow_patchify(x.to(device), mean.to(device), std.to(device), p, dtype)
    assert u.dtype == dtype
    check_low_precision(u, x, mean, std, p, dtype)


def test_flow_patchify_contract(device):
    x, mean, std = inputs(1, 2, 3, 5, 5)
    x, mean, std = x.to(device), mean.to(device), std.to(device)
    with pytest.raises(KernelArgError, match=r"mean must be \[3\], got \[2\]"):
        torch.ops.stvfm.flow_patchify(x, mean[:2], std, 2, torch.float32)
    with pytest.raises(KernelArgError, match="std must be contiguous"):
        torch.ops.stvfm.flow_patchify(x, mean, torch.rand(6, device=device)[::2], 2, torch.float32)
    with pytest.raises(KernelArgError, match=r"x must be \[B, T, C, H, W\]"):
        torch.ops.stvfm.flow_patchify(x[0], mean, std, 2, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 17, 64])
@pytest.mark.parametrize("preset", sorted(PRESET_SHAPES))
def test_flow_patchify_presets_on_gpu(preset, B, dtype):
    T, C, H, W, p = PRESET_SHAPES[preset]
    x, mean, std = inputs(B, T, C, H, W)
    u = torch.ops.stvfm.flow_patchify(x.cuda(), mean.cuda(), std.cuda(), p, dtype)
    check_low_precision(u, x, mean, std, p, dtype)

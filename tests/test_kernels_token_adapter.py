"""torch.ops.stvfm.token_adapter against its PyTorch reference and the model's TokenAdapter (CUDA or interpreter)."""
from __future__ import annotations

import pytest
import torch

from helpers import rel_err
from stvfm_engine.kernels.common import KernelArgError
from stvfm_engine.kernels.token_adapter import adapter_weights, token_adapter_ref
from stvfm_engine.model.stvfm import TokenAdapter

SHAPES = [  # B, n, T, K, A, D, steps_per_day, prefix tokens
    (1, 7, 3, 3, 24, 40, 0, 1),
    (2, 13, 4, 12, 16, 150, 10, 2),
    (3, 28, 5, 8, 64, 192, 48, 1),
    (2, 9, 2, 27, 20, 72, 7, 0),
    (1, 35, 12, 2, 33, 130, 0, 5),
]
PRESET_SHAPES = {"city": (256, 12, 8, 64, 768, 48, 1), "large": (256, 12, 32, 64, 1024, 48, 1)}  # n, T, K, A, D, S, P



def case(B, n, T, K, A, D, S, P):
    adapters = [TokenAdapter(K, T, A, D, S) for _ in range(2)]
    with torch.no_grad():
        for m in adapters:
            for prm in m.parameters():
                prm.add_(0.3 * torch.randn_like(prm))
    u = torch.randn(2 * B, n, T, K)
    tod = torch.randint(0, S, (B, T)) if S else None
    dow = torch.randint(0, 7, (B, T)) if S else None
    return adapters, u, tod, dow, torch.randn(n, D), torch.randn(P, D)


def on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def module_forward(adapters, u, tod, dow, pos, prefix, dtype, device="cpu"):
    """The model's own TokenAdapters (in ``dtype`` on ``device``), with the prefix rows the op writes in front."""
    B = u.shape[0] // 2
    u, tod, dow, pos, prefix = on(device, u, tod, dow, pos, prefix)
    out = []
    with torch.no_grad():
        for br, m in enumerate(adapters):
            m = m.to(device, dtype)
            z = m(u[br * B:(br + 1) * B].to(dtype), tod, dow, pos.to(dtype).unsqueeze(0))
            out.append(torch.cat([prefix.to(dtype).expand(B, -1, -1), z], dim=1))
            m.to("cpu", torch.float32)
    return torch.cat(out).float().cpu()


def run_op(adapters, u, tod, dow, pos, prefix, dtype, device):
    w = {k: None if v is None else v.to(device) for k, v in adapter_weights(*adapters, dtype).items()}
    u, tod, dow, pos, prefix = on(device, u, tod, dow, pos, prefix)
    return torch.ops.stvfm.token_adapter(u.to(dtype), tod, dow, pos=pos, prefix=prefix, **w)


def check_low_precision(adapters, u, tod, dow, pos, prefix, dtype, device):
    """``|ours - ref32| <= 2 |torch_lowp - ref32| + atol`` elementwise, torch_lowp on the kernel's device."""
    ref = module_forward(adapters, u, tod, dow, pos, prefix, torch.float32)
    z = run_op(adapters, u, tod, dow, pos, prefix, dtype, device)
    assert z.dtype == dtype
    lowp = module_forward(adapters, u, tod, dow, pos, prefix, dtype, device)
    atol = 2 * torch.finfo(dtype).eps * ref.abs().max()
    assert ((z.float().cpu() - ref).abs() <= 2 * (lowp - ref).abs() + atol).all()


@pytest.mark.parametrize("B,n,T,K,A,D,S,P", SHAPES)
def test_token_adapter_fp32(device, B, n, T, K, A, D, S, P):
    adapters, u, tod, dow, pos, prefix = case(B, n, T, K, A, D, S, P)
    z = run_op(adapters, u, tod, dow, pos, prefix, torch.float32, device)
    assert z.shape == (2 * B, P + n, D) and z.dtype == torch.float32
    w = adapter_weights(*adapters)
    assert rel_err(z, token_adapter_ref(u, tod, dow, pos=pos, prefix=prefix, **w)) <= 1e-5
    assert rel_err(z, module_forward(adapters, u, tod, dow, pos, prefix, torch.float32)) <= 1e-5


def test_token_adapter_strided_tokens(device):
    adapters, u, tod, dow, pos, prefix = case(2, 10, 3, 4, 16, 48, 5, 1)
    w = adapter_weights(*adapters)
    ut, tod_t, dow_t = (t.to(device).transpose(0, 1).contiguous().transpose(0, 1) for t in (u, tod, dow))
    assert not ut.is_contiguous() and not tod_t.is_contiguous()
    z = torch.ops.stvfm.token_adapter(ut, tod_t, dow_t, pos=pos.to(device).t().contiguous().t(),
                                      prefix=prefix.to(device), **{k: v.to(device) for k, v in w.items()})
    assert rel_err(z, token_adapter_ref(u, tod, dow, pos=pos, prefix=prefix, **w)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,n,T,K,A,D,S,P", SHAPES[:3])
def test_token_adapter_low_precision(device, B, n, T, K, A, D, S, P, dtype):
    check_low_precision(*case(B, n, T, K, A, D, S, P), dtype, device)


def test_token_adapter_contract(device):
    adapters, u, tod, dow, pos, prefix = case(2, 5, 2, 3, 16, 32, 5, 1)
    w = {k: v.to(device) for k, v in adapter_weights(*adapters).items()}
    u, tod, dow, pos, prefix = on(device, u, tod, dow, pos, prefix)

    def call(**change):
        args = {"u": u, "tod": tod, "dow": dow, "pos": pos, "prefix": prefix, **w, **change}
        return torch.ops.stvfm.token_adapter(**args)

    with pytest.raises(KernelArgError, match="w_out must be contiguous"):
        call(w_out=w["w_out"].transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(KernelArgError, match=r"e_step must be \[2, 2, 16\], got \[2, 3, 16\]"):
        call(e_step=torch.zeros(2, 3, 16, device=device))
    with pytest.raises(KernelArgError, match="same strides"):
        call(dow=dow.t().contiguous().t())
    with pytest.raises(KernelArgError, match="together"):
        call(dow=None)
    with pytest.raises(KernelArgError, match="w_in and w_out must be torch.bfloat16 like u"):
        call(u=u.bfloat16())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 17, 64])
@pytest.mark.parametrize("preset", sorted(PRESET_SHAPES))
def test_token_adapter_presets_on_gpu(preset, B, dtype):
    n, T, K, A, D, S, P = PRESET_SHAPES[preset]
    check_low_precision(*case(B, n, T, K, A, D, S, P), dtype, "cuda")

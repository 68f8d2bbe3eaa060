"""The kernels compile for an H100 (sm_90) without a GPU, with no register spills and shared memory that fits.

The numeric tests check the numbers; this checks what the interpreter cannot: that each kernel lowers
through Triton's GPU compiler and ptxas exactly as a real launch at the ``city`` and ``large`` presets
would compile it. The ops run on meta tensors with the launch recorded instead of run, so block sizes,
constexprs, argument types and the specialisation Triton gives real launches (integers equal to 1 as
constants, integers and pointers divisible by 16 marked so) all come from the launchers themselves.
Runs in a subprocess without TRITON_INTERPRET, with the ptxas/cuobjdump that ship with the triton wheel.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

SCRIPT = textwrap.dedent('''
    import json, os, re, subprocess, sys, tempfile
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from stvfm_engine.kernels import flow, prompt_attention as pa, token_adapter as ta
    from stvfm_engine.model.stvfm import CrossPromptCoordination, TokenAdapter

    CUOBJDUMP, TARGET = sys.argv[1], GPUTarget("cuda", 90, 32)
    TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64"}
    launches = []

    class Recorder:  # stands in for wrap_triton: records kernel[grid](*args, **kwargs) instead of launching
        def __init__(self, kernel):
            self.kernel = kernel
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    for mod in (flow, ta, pa):
        mod.wrap_triton, mod.check_device = Recorder, lambda *a: None

    def specialise(value):
        """(signature type, divisible by 16) as Triton's JIT specialises a launch argument."""
        if isinstance(value, torch.Tensor):
            return "*" + TYPES[value.dtype], value.storage_offset() * value.element_size() % 16 == 0
        if isinstance(value, float):
            return "fp32", False
        if value == 1:
            return "constexpr", False
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0

    def compile_(kernel, args, kwargs, tag):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(kernel.arg_names, args), **kwargs)
        sig, consts, attrs = {}, {}, {}
        for i, name in enumerate(kernel.arg_names):
            value = bound[name]
            if name in kwargs:
                sig[name], consts[name] = "constexpr", value
                continue
            ty, div16 = specialise(value)
            sig[name] = ty
            if ty == "constexpr":
                consts[name] = value
            elif div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
        try:  # where this triton exposes its own specialisation, check that ours agrees with it
            from triton._C.libtriton import native_specialize_impl
            from triton.backends.compiler import BaseBackend
            for i, name in enumerate(kernel.arg_names):
                if name not in kwargs:
                    ty, attr = native_specialize_impl(BaseBackend, bound[name], False, True, True)[:2]
                    assert ty == sig[name] and (attr == "D") == ((i,) in attrs), (name, ty, attr, sig[name])
        except ImportError:
            pass
        k = triton.compile(ASTSource(kernel, sig, constexprs=consts, attrs=attrs), target=TARGET, options=options)
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        return {"kernel": kernel.__name__, "case": tag, "regs": int(re.search(r"REG:(\\d+)", usage).group(1)),
                "spill_bytes": int(re.search(r"STACK:(\\d+)", usage).group(1)), "shared": k.metadata.shared,
                "divisible": sorted(kernel.arg_names[i[0]] for i in attrs)}

    # (preset, dtype, B); city: ViT-B, 32x32 grid, p=2; large: ViT-L, 64x64 grid, p=4 (n=256, T=12, A=64, M=8)
    PRESETS = {"city": (2, 32, 768, 12), "large": (4, 64, 1024, 16)}  # p, grid side, D, heads
    CASES = [("city", torch.bfloat16, 64), ("city", torch.float32, 1), ("large", torch.float16, 64),
             ("large", torch.float32, 64)]
    rows, seen = [], set()
    with torch.device("meta"):
        for preset, dt, B in CASES:
            p, side, D, heads = PRESETS[preset]
            T, C, A, M, P = 12, 2, 64, 8, 1
            n, K = (side // p) ** 2, C * p * p
            launches.clear()
            x = torch.empty(B, T, C, side, side)
            u = torch.ops.stvfm.flow_patchify(x, torch.empty(C), torch.empty(C), p, dt)
            tod = torch.empty(B, T, dtype=torch.int64)
            adapters = [TokenAdapter(K, T, A, D, 48) for _ in range(2)]
            torch.ops.stvfm.token_adapter(u, tod, torch.empty_like(tod), pos=torch.empty(n, D),
                                          prefix=torch.empty(P, D), **ta.adapter_weights(*adapters, dt))
            bcpc = CrossPromptCoordination(D, M, heads)
            h = torch.empty(2 * B, P + n, D, dtype=dt)[:, P:]  # the backbone output without its prefix rows
            q = torch.ops.stvfm.prompt_condition(h, **pa.condition_weights(bcpc, dt))
            torch.ops.stvfm.bilateral_attention(h, q, **pa.coordination_weights(bcpc))
            for kernel, args, kwargs in launches:
                key = (kernel.__name__, repr([specialise(a) if not isinstance(a, torch.Tensor) else
                                              specialise(a)[0] for a in args]), repr(sorted(kwargs.items())))
                if key not in seen:
                    seen.add(key)
                    rows.append(compile_(kernel, args, dict(kwargs), f"{preset}/{TYPES[dt]}/B{B}"))
    print(json.dumps(rows))
''')


@pytest.mark.skipif(not (BIN / "ptxas").is_file() or not (BIN / "cuobjdump").is_file(),
                    reason="this triton wheel ships no ptxas/cuobjdump")
def test_kernels_compile_for_sm90_as_launched():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(BIN / "cuobjdump")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_flow_kernel", "_adapter_gelu_kernel", "_adapter_norm_kernel", "_condition_scores_kernel",
                       "_condition_context_kernel", "_bilateral_kernel"}, kernels
    assert {r["case"] for r in rows} == {"city/bf16/B64", "city/fp32/B1", "large/fp16/B64", "large/fp32/B64"}
    assert any("stride_uk" not in r["divisible"] and "x_ptr" in r["divisible"] for r in rows)  # specialised
    for r in rows:
        assert r["spill_bytes"] == 0, f"register spills: {r}"
        assert r["shared"] <= 227 * 1024, f"more shared memory than an H100 block can have: {r}"

"""The kernels compile for an H100 (sm_90) without a GPU, with no register spills and shared memory that fits.

The interpreter tests check the numbers; this checks what the interpreter cannot: that each kernel
lowers through Triton's GPU compiler and ptxas at the block sizes its launcher picks for the
``city`` and ``large`` presets. Runs in a subprocess without TRITON_INTERPRET (kernels compiled for
a GPU), using the ptxas/cuobjdump that ship with the triton wheel.
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
    from stvfm_engine.kernels.common import block

    CUOBJDUMP, TARGET = sys.argv[1], GPUTarget("cuda", 90, 32)
    TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    rows = []

    def compile_(kernel, constants, dtype, pointers=(), floats=("eps",), fp32_pointers=()):
        consts = {k: v for k, v in constants.items() if k != "num_warps"}
        consts.update(DOT_PREC="ieee", UPCAST_DOT=False) if "DOT_PREC" in kernel.arg_names else None
        sig = {}
        for name in kernel.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = ("*i64" if name in ("tod_ptr", "dow_ptr") else
                             "*" + TYPES[dtype] if name in pointers else "*fp32")
            else:
                sig[name] = "fp32" if name in floats else "i32"
        k = triton.compile(ASTSource(kernel, sig, constexprs=consts), target=TARGET,
                           options={"num_warps": constants.get("num_warps", 4)})
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        stack = int(re.search(r"STACK:(\\d+)", usage).group(1))
        regs = int(re.search(r"REG:(\\d+)", usage).group(1))
        rows.append({"kernel": kernel.__name__, "dtype": TYPES[dtype], "regs": regs, "spill_bytes": stack,
                     "shared": k.metadata.shared})

    # (name, B, n, T, K, A, D, M, heads): city (ViT-B, p=2, 32x32) and large (ViT-L, p=4, 64x64), batch 64
    for name, B, n, T, K, A, D, M, heads in (("city", 64, 256, 12, 8, 64, 768, 8, 12),
                                           ("large", 64, 256, 12, 32, 64, 1024, 8, 16)):
        for dt in (torch.bfloat16, torch.float32):
            compile_(flow._flow_kernel, dict(P=2, **flow.flow_blocks(n, K)), dt, pointers=("u_ptr",), floats=())
            compile_(ta._token_adapter_kernel, dict(HAS_TIME=True, **ta.adapter_blocks(B * n, K, A, D)), dt,
                     pointers=("u_ptr", "w_in_ptr", "w_out_ptr", "z_ptr"))
            scores, context = pa.condition_blocks(heads * M, D, dt)
            compile_(pa._condition_scores_kernel, scores, dt, pointers=("h_ptr", "a_ptr"))
            compile_(pa._condition_context_kernel, context, dt, pointers=("h_ptr",), floats=())
            compile_(pa._bilateral_kernel, pa.bilateral_blocks(n, M, heads, D, dt), dt,
                     pointers=("h_ptr", "kt_ptr", "vt_ptr", "out_ptr"))
    print(json.dumps(rows))
''')


@pytest.mark.skipif(not (BIN / "ptxas").is_file() or not (BIN / "cuobjdump").is_file(),
                    reason="this triton wheel ships no ptxas/cuobjdump")
def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(BIN / "cuobjdump")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(rows) == 20
    for r in rows:
        assert r["spill_bytes"] == 0, f"register spills: {r}"
        assert r["shared"] <= 227 * 1024, f"more shared memory than an H100 block can have: {r}"

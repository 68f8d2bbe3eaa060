"""bench/gpu_check without a GPU: exit 2 within 10 s, saying why (the GPU run itself needs a GPU)."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

GPU_CHECK = Path(__file__).resolve().parents[1] / "bench" / "gpu_check"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: gpu_check would run in full")
def test_gpu_check_exits_2_without_cuda():
    assert os.access(GPU_CHECK, os.X_OK), "bench/gpu_check must be executable"
    started = time.perf_counter()
    out = subprocess.run([str(GPU_CHECK)], capture_output=True, text=True, timeout=10)
    assert time.perf_counter() - started < 10
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stdout.startswith("no CUDA device: ") and out.stdout.count("\n") == 1, out.stdout

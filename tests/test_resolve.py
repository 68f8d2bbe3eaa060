"""Backend/precision/device resolution (engine/resolve.py) as a table: the manifest's artifacts and what
the machine can run go in, ``Engine.load``'s choice (or its one-line refusal) comes out."""
from __future__ import annotations

import re

import pytest

from stvfm_engine.engine.resolve import Choice, resolve
from stvfm_engine.errors import BackendError


def manifest(*entries, default=None):
    """``entries``: (backend, precision, device) of the built artifacts."""
    m = {"backends": {b: {"file": "f", "precision": p, "device": d} for b, p, d in entries}}
    if default:
        m["default"] = {"backend": default[0], "precision": default[1]}
    return m


def machine(*runnable):
    """``usable`` for a machine that runs exactly these (backend, device type) pairs."""
    return lambda name, kind: None if (name, kind) in runnable else f"{name} not on {kind} here"


CPU = machine(("onnxruntime", "cpu"), ("aoti", "cpu"), ("eager", "cpu"))
GPU = machine(("onnxruntime", "cpu"), ("aoti", "cpu"), ("aoti", "cuda"), ("eager", "cpu"), ("eager", "cuda"),
              ("triton", "cuda"), ("tensorrt", "cuda"))
ORT_AOTI = manifest(("onnxruntime", "fp32", "cpu"), ("aoti", "fp32", "cpu"))

CASES = [
    # (manifest, backend, precision, device, usable, cuda) -> Choice or error text
    (ORT_AOTI, None, None, None, CPU, False, Choice("onnxruntime", "fp32", "cpu")),
    (ORT_AOTI, "aoti", None, None, CPU, False, Choice("aoti", "fp32", "cpu")),
    (ORT_AOTI, None, None, None, machine(("aoti", "cpu")), False, Choice("aoti", "fp32", "cpu")),
    (ORT_AOTI, None, None, None, machine(), False, Choice("eager", "fp32", "cpu")),
    (ORT_AOTI, None, None, None, machine(), True, Choice("eager", "fp32", "cuda")),
    # the manifest's default comes first when it can run here
    (manifest(("onnxruntime", "int8", "cpu"), ("aoti", "bf16", "cpu"), default=("aoti", "bf16")),
     None, None, None, CPU, False, Choice("aoti", "bf16", "cpu")),
    (manifest(("onnxruntime", "int8", "cpu"), ("aoti", "bf16", "cpu"), default=("aoti", "bf16")),
     None, None, None, machine(("onnxruntime", "cpu")), False, Choice("onnxruntime", "int8", "cpu")),
    # a precision filters the artifacts
    (manifest(("onnxruntime", "int8", "cpu"), ("aoti", "bf16", "cpu")), None, "bf16", None, CPU, False,
     Choice("aoti", "bf16", "cpu")),
    # an artifact built for CUDA: aoti stays on CUDA; model.onnx is portable and falls back to the CPU
    (manifest(("aoti", "bf16", "cuda")), None, None, None, GPU, True, Choice("aoti", "bf16", "cuda")),
    (manifest(("aoti", "bf16", "cuda")), "aoti", None, "cpu", CPU, False, "built for cuda, not cpu"),
    (manifest(("onnxruntime", "fp32", "cuda")), "onnxruntime", None, None, CPU, False,
     Choice("onnxruntime", "fp32", "cpu")),
    (manifest(("onnxruntime", "fp32", "cuda")), None, None, None, CPU, False, Choice("onnxruntime", "fp32", "cpu")),
    # weights backends: any float precision; triton defaults to bf16 on CUDA, fp32 elsewhere
    (ORT_AOTI, "triton", None, None, GPU, True, Choice("triton", "bf16", "cuda")),
    (ORT_AOTI, "triton", None, "cpu", CPU, False, Choice("triton", "fp32", "cpu")),
    (ORT_AOTI, "triton", "fp16", "cuda:1", GPU, True, Choice("triton", "fp16", "cuda:1")),
    (ORT_AOTI, "eager", None, None, GPU, True, Choice("eager", "fp32", "cuda")),
    (ORT_AOTI, "eager", "int8", None, CPU, False, "eager backend runs fp32, bf16, fp16, not int8"),
    # refusals name what was expected
    (ORT_AOTI, "tensorrt", None, None, GPU, True, "holds no tensorrt artifact; built: ['aoti', 'onnxruntime']"),
    (ORT_AOTI, "onnxruntime", "int8", None, CPU, False, "artifact is fp32, not int8 (rebuild with --precision int8)"),
    (ORT_AOTI, "bogus", None, None, CPU, False, "unknown backend 'bogus'"),
    (ORT_AOTI, None, None, "tpu", CPU, False, "unknown device 'tpu'"),
    (ORT_AOTI, None, "fp8", None, CPU, False, "unknown precision 'fp8'"),
]


@pytest.mark.parametrize("m, backend, precision, device, usable, cuda, expected", CASES)
def test_resolve(m, backend, precision, device, usable, cuda, expected):
    if isinstance(expected, Choice):
        assert resolve(m, backend, precision, device, usable, cuda) == expected
    else:
        with pytest.raises(Exception, match=re.escape(expected)) as info:
            resolve(m, backend, precision, device, usable, cuda)
        assert "\n" not in str(info.value)


def test_refusals_are_backend_errors():
    with pytest.raises(BackendError):
        resolve(ORT_AOTI, "tensorrt", None, None, GPU, True)

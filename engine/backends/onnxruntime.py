"""ONNX Runtime: ``model.onnx`` (opset 18, dynamic batch), fp32 or int8.

int8 is ONNX Runtime's dynamic quantisation (weights int8 per output channel, activations quantised at
run time) of the backbone's weight matmuls (stage 4, nearly all the FLOPs); the adapters, BCPC and
head stay fp32. The file runs on the CPU provider, or on CUDA where onnxruntime-gpu is installed.

A multi-model directory holds one ``backbone.onnx`` (sequence and token axes dynamic) and per model
``pre.onnx``/``post.onnx`` (fp32), each an ONNX Runtime session; tensors pass between them through host
memory (on CUDA too: no IO binding for the parts).
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from stvfm_engine.engine.graph import FEATURES_NAME, INT8_SCOPE, OUTPUT_NAME, TOKENS_NAME, input_names, weight_matmuls
from stvfm_engine.engine.multi import Parts
from stvfm_engine.engine.precision import Precision
from stvfm_engine.engine.registry import Artifact, BuildContext, MultiBuildContext, MultiOpenRequest, OpenRequest
from stvfm_engine.engine.runtime import Runner, missing, output, rebuild_hint, to_numpy, to_torch
from stvfm_engine.errors import BackendError, ConfigError, first_line
from stvfm_engine.model.config import STVFMConfig

BACKBONE_NAME = "backbone.onnx"  # a multi-model directory's shared backbone


def why_not_run(device: torch.device) -> Optional[str]:
    if why := missing("onnxruntime"):
        return f"{why} (pip install 'stvfm-engine[onnx]')"
    import onnxruntime as ort

    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu instead of onnxruntime)"
    return None


def why_not_build(device: torch.device, precision: Precision) -> Optional[str]:
    if why := missing("onnx", "onnxscript", "onnxruntime"):
        return f"{why} (pip install 'stvfm-engine[onnx]')"
    if precision.name == "int8":
        return missing("onnxruntime.quantization")
    return None


def build(ctx: BuildContext) -> Artifact:
    src = ctx.onnx()  # the build's fp32 export, shared with the other backends that start from it: never modified
    path = ctx.directory / src.name
    if ctx.precision.name != "int8":
        for f in (src, src.with_name(src.name + ".data")):  # the weights may sit beside it (external data)
            if f.exists():
                _link_or_copy(f, ctx.directory / f.name)
        return Artifact(path)
    with ctx.stage("onnxruntime", "dynamic int8 quantisation of the backbone matmuls"):
        info = quantize_int8(src, path)
    return Artifact(path, {"quantization": info})


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links there
        shutil.copy2(src, dst)


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, scope: str = INT8_SCOPE) -> dict:
    """Write a dynamic-int8 copy of the fp32 ONNX file ``src`` to ``dst`` (one file); returns what was done."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = weight_matmuls(src, scope)
    if not nodes:
        raise ConfigError(f"{src}: no weight matmuls found in scope {scope!r} to quantise")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser warns about pre-processing on every call
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_quantize=nodes, use_external_data_format=False)
    finally:
        root.setLevel(level)
    return {"mode": "dynamic", "scope": scope, "per_channel": True, "quantized_nodes": len(nodes)}


def session(path: Path, device: torch.device, threads: Optional[int], arena: bool = True, spin: Optional[bool] = None):
    """An ONNX Runtime session on ``path`` with full graph optimisation, for ``device``; ``arena`` False: no
    CPU memory arena (for the small per-model parts, whose arenas would hold more than their weights).
    ``spin`` False: the intra-op threads sleep instead of spinning between parallel sections (env
    ``STVFM_ORT_SPIN=0/1`` overrides): where several sessions run one after another on the same cores,
    one session's spinning threads slow the next one's."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_cpu_mem_arena = arena
    spin = {"0": False, "1": True}.get(os.environ.get("STVFM_ORT_SPIN", ""), spin)
    if spin is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    if device.type == "cuda":
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise BackendError(f"onnxruntime {ort.__version__} cannot open {path} (e.g. an opset it does not support; "
                           f"{rebuild_hint(path.parent)}): {first_line(e)}") from None


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime with full graph optimisation; IO binding on CUDA (device-resident in and out)."""

    def __init__(self, path: Path, config: STVFMConfig, device: torch.device, threads: Optional[int]):
        self.device = device
        self.session = session(path, device, threads)
        self.names = input_names(config)
        self.out_tail = [config.horizon, config.channels, config.height, config.width]

    def __call__(self, x, tod, dow) -> np.ndarray:
        values = [x, tod, dow][: len(self.names)]
        if self.device.type != "cuda":
            return self.session.run([OUTPUT_NAME], {n: to_numpy(v) for n, v in zip(self.names, values)})[0]
        tensors = [to_torch(v, self.device) for v in values]
        y = torch.empty([tensors[0].shape[0], *self.out_tail], dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        idx = self.device.index or 0
        for name, t in zip(self.names, tensors):
            dtype = np.float32 if t.dtype == torch.float32 else np.int64
            binding.bind_input(name, "cuda", idx, dtype, list(t.shape), t.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", idx, np.float32, list(y.shape), y.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # inputs written on torch's stream
        self.session.run_with_iobinding(binding)
        return output(y)


def open(request: OpenRequest) -> Runner:  # noqa: A001 - the registry's interface name
    return OnnxRuntimeRunner(request.directory / request.entry["file"], request.config, request.device, request.threads)


def build_backbone(ctx: MultiBuildContext) -> Artifact:
    return Artifact(ctx.backbone_onnx())


def build_parts(ctx: MultiBuildContext, name: str) -> dict[str, Path]:
    pre, post = ctx.parts_onnx(name)
    return {"pre": pre, "post": post}


class OnnxRuntimeParts(Parts):
    """One session for the shared ``backbone.onnx``, two (``pre``/``post``) per model, each opened on its
    first use: a process that only runs the backbone (a server's shared backbone) or only some models'
    parts (a server's per-model workers) holds only those sessions in memory."""

    def __init__(self, request: MultiOpenRequest):
        self._request = request
        self._sessions: dict[tuple[str, str], Any] = {}
        self._open = threading.Lock()
        self.names = {name: input_names(c) for name, c in request.configs.items()}

    def _session(self, name: str, part: str):
        key = (name, part)
        if (s := self._sessions.get(key)) is None:
            with self._open:
                if (s := self._sessions.get(key)) is None:
                    r = self._request
                    # three sessions run one after another on the same cores: none may spin after its run
                    # (measured on 2 cores, bike batch 1: 168 ms with spinning part sessions, 99 without)
                    if part == "backbone":
                        s = session(r.directory / r.entry["file"], r.device, r.threads, spin=False)
                    else:
                        s = session(r.directory / r.models[name]["backends"]["onnxruntime"][part], r.device,
                                    r.threads, arena=False, spin=False)
                    self._sessions[key] = s
        return s

    def pre(self, name, x, tod, dow) -> torch.Tensor:
        feeds = {n: to_numpy(v) for n, v in zip(self.names[name], (x, tod, dow))}
        return torch.from_numpy(self._session(name, "pre").run([TOKENS_NAME], feeds)[0])

    def backbone(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._session("", "backbone").run([FEATURES_NAME], {TOKENS_NAME: to_numpy(tokens)})[0])

    def post(self, name: str, h: torch.Tensor) -> np.ndarray:
        return self._session(name, "post").run([OUTPUT_NAME], {FEATURES_NAME: to_numpy(h.contiguous())})[0]


def open_multi(request: MultiOpenRequest) -> Parts:
    return OnnxRuntimeParts(request)

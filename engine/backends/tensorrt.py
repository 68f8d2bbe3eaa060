"""TensorRT: ``model.plan`` built from the fp32 ONNX file through the name-based API, fp32/bf16/fp16.

Works with the Python APIs of TensorRT 10 and 11. One optimisation profile over batch 1..max, a
timing cache stored next to the plan (``model.timing.cache``; the previous build's cache seeds the
next one), no TF32 in an fp32 build (the fp32 parity gate is 1e-4), and LayerNorm kept in fp32 at
fp16/bf16 (TensorRT fp16 LayerNorm overflows on ViTs: NVIDIA/TensorRT 2564, 3692). Reduced precision
differs by version: TensorRT 10 is weakly typed (builder precision flags, normalisation layers
pinned to fp32); TensorRT 11 removed those flags and builds strongly typed networks only, so there
every matrix multiply gets casts to the reduced type around it and all other layers keep the parsed
fp32 (:func:`cast_matmuls`).

Untested here: neither this project's machines nor the lent GPU have TensorRT.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from stvfm_engine.engine.graph import OUTPUT_NAME, input_names
from stvfm_engine.engine.precision import Precision
from stvfm_engine.engine.registry import Artifact, BuildContext, OpenRequest
from stvfm_engine.engine.runtime import Runner, installed_version, missing, output, to_torch
from stvfm_engine.model.config import STVFMConfig
from stvfm_engine.errors import BackendError, ExportError

PLAN_NAME = "model.plan"
TIMING_CACHE_NAME = "model.timing.cache"
WORKSPACE_BYTES = 4 << 30


def why_not_run(device: torch.device) -> Optional[str]:
    return f"{why} (pip install 'stvfm-engine[gpu]')" if (why := missing("tensorrt")) else None


def why_not_build(device: torch.device, precision: Precision) -> Optional[str]:
    if why := missing("tensorrt"):
        return f"{why} (pip install 'stvfm-engine[gpu]'); untested here"
    return missing("onnx", "onnxscript", "onnxruntime")  # it is built from the fp32 ONNX file


def version_problem(manifest: dict[str, Any]) -> Optional[str]:
    """A plan needs the exact TensorRT version it was built with."""
    built, here = (manifest.get("versions") or {}).get("tensorrt"), installed_version("tensorrt")
    if here is not None and built != here:
        return f"model.plan was built with TensorRT {built}, this is TensorRT {here} (a plan needs the exact version)"
    return None


def build(ctx: BuildContext) -> Artifact:
    onnx_path = ctx.onnx()
    path = ctx.directory / PLAN_NAME
    with ctx.stage("tensorrt", f"TensorRT engine build ({ctx.precision.name})"):
        build_tensorrt(onnx_path, path, ctx.precision, ctx.max_batch, seed_cache=ctx.target / TIMING_CACHE_NAME)
    return Artifact(path)


def build_tensorrt(onnx_path: Path, plan_path: Path, precision: Precision, max_batch: int,
                   seed_cache: Path | None = None) -> Path:
    """Build ``plan_path`` from ``onnx_path``; the timing cache goes beside it, seeded from ``seed_cache``."""
    import tensorrt as trt

    major = int(trt.__version__.split(".")[0])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode (10); strongly typed is the only one (11)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    opt = min(max_batch, 8)
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (1, *rest), (opt, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)

    cache_path = plan_path.with_name(TIMING_CACHE_NAME)
    seed = seed_cache.read_bytes() if seed_cache is not None and seed_cache.is_file() else b""
    cache = config.create_timing_cache(seed)
    config.set_timing_cache(cache, ignore_mismatch=False)

    if not precision.reduced:
        config.clear_flag(trt.BuilderFlag.TF32)
    elif major >= 11:
        if cast_matmuls(trt, network, trt.DataType.HALF if precision.name == "fp16" else trt.DataType.BF16) == 0:
            raise ExportError(f"{onnx_path.name} has no matrix multiply to run in {precision.name}")
    else:
        config.set_flag(trt.BuilderFlag.FP16 if precision.name == "fp16" else trt.BuilderFlag.BF16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = 0
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.NORMALIZATION:
                layer.precision = trt.float32
                layer.set_output_type(0, trt.float32)
                pinned += 1
        if pinned == 0:
            raise ExportError(f"{onnx_path.name} has no LayerNormalization layer to keep in fp32; "
                              f"refusing a {precision.name} TensorRT build")

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    plan_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return plan_path


def cast_matmuls(trt, network, dtype) -> int:
    """Run every fp32 matrix multiply of a strongly typed ``network`` in ``dtype``; returns how many.

    Each float32 operand goes through a cast to ``dtype`` (one per tensor, shared), and the product
    through a cast back to float32 that every former consumer (and the network output, by name) now
    reads; normalisation, softmax and element-wise layers keep the parsed fp32.
    """
    fp32 = trt.DataType.FLOAT
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    consumers: dict[str, list] = {}
    for layer in layers:
        for j in range(layer.num_inputs):
            if (t := layer.get_input(j)) is not None:
                consumers.setdefault(t.name, []).append((layer, j))
    down: dict[str, Any] = {}
    count = 0
    for mm in layers:
        if mm.type != trt.LayerType.MATRIX_MULTIPLY or any(mm.get_input(j).dtype != fp32 for j in range(2)):
            continue
        for j in range(2):
            src = mm.get_input(j)
            if src.name not in down:
                down[src.name] = network.add_cast(src, dtype).get_output(0)
            mm.set_input(j, down[src.name])
        out = mm.get_output(0)
        back = network.add_cast(out, fp32).get_output(0)
        for layer, j in consumers.get(out.name, []):
            layer.set_input(j, back)
        if out.is_network_output:
            name = out.name
            network.unmark_output(out)
            out.name = f"{name}.{dtype}"
            back.name = name
            network.mark_output(back)
        count += 1
    return count


class TensorRTRunner(Runner):
    """A TensorRT engine (``model.plan``), run through the name-based tensor API.

    Untested here: neither this project's machines nor the lent GPU have TensorRT.
    """

    thread_safe = False  # one execution context

    def __init__(self, path: Path, config: STVFMConfig, device: torch.device):
        import tensorrt as trt

        self.device = device
        self.logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(device):
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise BackendError(f"TensorRT cannot deserialize {path} (built by another TensorRT version or GPU?)")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(device)
        self.names = input_names(config)

    def __call__(self, x, tod, dow) -> np.ndarray:
        tensors = [to_torch(v, self.device) for v in (x, tod, dow)[: len(self.names)]]
        for name, t in zip(self.names, tensors):
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        y = torch.empty(tuple(self.context.get_tensor_shape(OUTPUT_NAME)), dtype=torch.float32, device=self.device)
        self.context.set_tensor_address(OUTPUT_NAME, y.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BackendError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        return output(y)


def open(request: OpenRequest) -> Runner:  # noqa: A001 - the registry's interface name
    return TensorRTRunner(request.directory / request.entry["file"], request.config, request.device)

"""TensorRT 10 engine (``model.plan``) from the fp32 ONNX file, through the name-based API.

One optimisation profile over batch 1..max, a timing cache stored next to the plan
(``model.timing.cache``; the previous build's cache seeds the next one), and for fp16/bf16 every normalisation layer
pinned to fp32 (TensorRT fp16 LayerNorm overflows on ViTs: NVIDIA/TensorRT 2564, 3692).

Untested here: neither this project's machines nor the lent GPU have TensorRT.
"""
from __future__ import annotations

from pathlib import Path

from stvfm_engine.export.onnx_export import ExportError
from stvfm_engine.export.precision import Precision

TIMING_CACHE_NAME = "model.timing.cache"
WORKSPACE_BYTES = 4 << 30


def build_tensorrt(onnx_path: Path, plan_path: Path, precision: Precision, max_batch: int,
                   seed_cache: Path | None = None) -> Path:
    """Build ``plan_path`` from ``onnx_path``; the timing cache goes beside it, seeded from ``seed_cache``."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
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

    if precision.reduced:
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

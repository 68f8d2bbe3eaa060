"""The ``triton`` backend: the fused ``torch.ops.stvfm.*`` kernels around one backbone pass over ``2B``.

:func:`load_triton_backend` turns the fp32 reference model into a callable ``fn(x, tod, dow) -> y``:
flow + patchify (one kernel), token adaptation (GELU kernel, one GEMM, LayerNorm kernel writing the
backbone's input with its prefix tokens in place), the frozen ViT blocks (on CUDA compiled by
``torch.compile``, SDPA / flash attention inside), prompt conditioning (two kernels) and the
bilateral step (one kernel), then fusion and head in PyTorch. Compute precision fp32, bf16 or fp16
(bf16 by default on CUDA); LayerNorm statistics and softmaxes are fp32 at every precision; inputs
and outputs are fp32. On CUDA a fixed set of batch sizes (1, 2, 4, ... up to the max batch) is
captured as CUDA graphs at load, sharing one memory pool; each request is padded up to its bucket.
On a CPU it runs only under ``TRITON_INTERPRET=1`` (Triton's interpreter: slow, for tests), with the
same padding.
"""
from __future__ import annotations

import contextlib
import copy
import threading
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stvfm_engine.engine.precision import get_precision
from stvfm_engine.engine.registry import DEFAULT_MAX_BATCH, OpenRequest
from stvfm_engine.engine.runtime import Runner, missing, output
from stvfm_engine.engine.registry import get_backend
from stvfm_engine.errors import BackendError, first_line, InputError, STVFMError
from stvfm_engine.model.stvfm import LN_EPS, STVFM, denormalize, unpatchify

Mark = Callable[[str], ContextManager]


def _no_mark(stage: str) -> ContextManager:
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- pure choices (tested on a CPU)
def graph_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes captured at load, ascending: the powers of two below ``max_batch``, then ``max_batch``."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise STVFMError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    return tuple(1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch) + (max_batch,)


def bucket_for(batch: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``batch`` rows (``buckets`` ascending)."""
    for size in buckets:
        if size >= batch:
            return size
    raise InputError(f"batch {batch} is larger than this predictor's max batch {buckets[-1]}")


def copy_padded(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst[:len(src)] = src`` and the padding rows after it zeroed; returns ``dst``.

    Samples never mix in this model, so the first ``len(src)`` output rows of a padded batch are the
    request's; zeros are valid inputs (tod/dow slot 0) and keep the padding finite.
    """
    n = src.shape[0]
    dst[:n].copy_(src)
    if n < dst.shape[0]:
        dst[n:].zero_()
    return dst


def compile_blocks(blocks: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``blocks`` through ``torch.compile`` with the sequence axis dynamic: one compilation serves every bucket."""
    compiled = torch.compile(blocks)

    def run(z: torch.Tensor) -> torch.Tensor:
        torch._dynamo.maybe_mark_dynamic(z, 0)
        return compiled(z)

    return run


@dataclass
class _Graph:
    """One captured bucket: the graph and its output (overwritten by every replay of this graph)."""
    graph: "torch.cuda.CUDAGraph"
    y: torch.Tensor


class TritonPredictor:
    """``predictor(x, tod, dow) -> y``: float32 ``[B, T, C, H, W]`` (+ int64 ``[B, T]``) -> ``[B, T_out, C, H, W]``.

    Holds its own copies of the weights on ``device`` (matmul weights in the compute dtype); the
    reference model passed in is left untouched. ``buckets`` are the batch sizes requests are padded
    to; with ``cuda_graphs`` each is captured once, here, and requests only replay them.
    """

    def __init__(self, model: STVFM, dtype: torch.dtype, device: torch.device, max_batch: int,
                 cuda_graphs: bool, compile_backbone: bool):
        # Importing the kernels registers torch.ops.stvfm.*.
        from stvfm_engine.kernels.prompt_attention import condition_weights, coordination_weights
        from stvfm_engine.kernels.token_adapter import adapter_weights

        self.config = model.config
        self.dtype, self.device = dtype, device
        self.prefix_tokens = model.backbone.num_prefix_tokens
        self.dim = model.dim
        self.buckets = graph_buckets(max_batch)

        def dev(t: Optional[torch.Tensor], dt: Optional[torch.dtype] = None):
            return None if t is None else t.detach().to(device=device, dtype=dt or t.dtype).contiguous()

        with torch.no_grad():
            self.mean = dev(model.norm_mean, torch.float32)
            self.std = dev(model.norm_std, torch.float32)
            self.adapter = {k: dev(v) for k, v in adapter_weights(model.adapter_r, model.adapter_f, dtype).items()}
            self.pos = dev(model.backbone.patch_pos[0], torch.float32)  # [n, D]
            self.prefix = dev(model.backbone.prefix[0], torch.float32)  # [P, D]
            bb = model.backbone
            self.backbone = copy.deepcopy(nn.Sequential(bb.norm_pre, *bb.blocks, bb.norm)).to(device, dtype).eval()
            self.condition = {k: dev(v) for k, v in condition_weights(model.bcpc, dtype).items()}
            self.coordinate = {k: (dev(v) if isinstance(v, torch.Tensor) else v)
                               for k, v in coordination_weights(model.bcpc).items()}
            self.fuse_w, self.fuse_b = dev(model.bcpc.fuse.weight, dtype), dev(model.bcpc.fuse.bias, dtype)
            self.head_norm_w, self.head_norm_b = dev(model.head_norm.weight), dev(model.head_norm.bias)
            self.head_w, self.head_b = dev(model.head.weight), dev(model.head.bias)
        self.compiled_backbone = compile_backbone
        self._blocks = compile_blocks(self.backbone) if compile_backbone else self.backbone
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, _Graph] = {}
        self._lock = threading.Lock()
        if cuda_graphs:
            self._capture_buckets()

    # ------------------------------------------------------------------ the forward pass
    @torch.no_grad()
    def forward(self, x: torch.Tensor, tod: Optional[torch.Tensor], dow: Optional[torch.Tensor],
                mark: Mark = _no_mark) -> torch.Tensor:
        """One prediction on device tensors without CUDA graphs (what the graphs capture).

        ``mark(stage)`` wraps each stage (the bench's stage breakdown passes CUDA-event or profiler markers).
        """
        c, P = self.config, self.prefix_tokens
        with mark("normalise+flow"):
            u = torch.ops.stvfm.flow_patchify(x, self.mean, self.std, c.patch, self.dtype)  # [2B, n, T, C*p*p]
        with mark("token adapter"):
            z = torch.ops.stvfm.token_adapter(u, tod, dow, pos=self.pos, prefix=self.prefix, **self.adapter)
        with mark("backbone"):
            h = self._blocks(z)[:, P:]  # [2B, n, D], one pass over both branches
        with mark("bcpc"):
            q = torch.ops.stvfm.prompt_condition(h, **self.condition)  # [2B, M, D] fp32
            hc = torch.ops.stvfm.bilateral_attention(h, q, **self.coordinate)  # [B, n, 2D] = concat(H_r', H_f')
            fused = F.linear(hc, self.fuse_w, self.fuse_b)
        with mark("head"):
            # Head in fp32: [B, n, D] x [D, T_out*C*p*p] is small, and the output is fp32 anyway.
            y = F.linear(F.layer_norm(fused.float(), (self.dim,), self.head_norm_w, self.head_norm_b, LN_EPS),
                         self.head_w, self.head_b)
            y = unpatchify(y, c.horizon, c.channels, c.patch, c.height, c.width)
            return denormalize(y, self.mean, self.std)

    def __call__(self, x: torch.Tensor, tod: Optional[torch.Tensor] = None,
                 dow: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Inputs as :func:`~stvfm_engine.engine.inputs.validate_inputs` leaves them (``Engine.predict`` runs it;
        checking again here would cost a GPU synchronisation), on any device."""
        batch = x.shape[0]
        bucket = bucket_for(batch, self.buckets)
        if not self.cuda_graphs:
            padded = [None if t is None else copy_padded(torch.empty((bucket, *t.shape[1:]), dtype=dt,
                                                                     device=self.device), t)
                      for t, dt in ((x, torch.float32), (tod, torch.int64), (dow, torch.int64))]
            return self.forward(*padded)[:batch]
        with self._lock, torch.cuda.device(self.device):
            caller = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(caller)  # inputs the caller wrote on its stream
            with torch.cuda.stream(self._stream):
                # Inputs go straight into the static buffers (host-to-device included), under the lock.
                for static, t in zip(self._static, (x, tod, dow)):
                    if t is not None:
                        copy_padded(static[:bucket], t)
                g = self._graphs[bucket]
                g.graph.replay()
                y = g.y[:batch].clone()  # the next replay overwrites g.y
            caller.wait_stream(self._stream)
            y.record_stream(caller)  # allocated on our stream, handed to the caller's
        return y

    # ------------------------------------------------------------------ helpers
    def _capture_buckets(self) -> None:
        """Capture every bucket, largest first, into one shared memory pool, on this predictor's stream.

        The static inputs are one buffer per input at the largest bucket (each bucket uses its first
        rows). Every bucket is run twice on the stream first (Triton and torch.compile compilation,
        cuBLAS / SDPA set-up), so nothing compiles or allocates a workspace during a capture.
        """
        c, mx = self.config, self.buckets[-1]
        with torch.cuda.device(self.device):
            self._stream = torch.cuda.Stream(self.device)
            x = torch.zeros(mx, c.history, c.channels, c.height, c.width, device=self.device)
            time = [torch.zeros(mx, c.history, dtype=torch.int64, device=self.device) if c.uses_time else None
                    for _ in range(2)]
            self._static = (x, *time)
            inputs = {b: [None if t is None else t[:b] for t in self._static] for b in self.buckets}
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                for b in reversed(self.buckets):
                    for _ in range(2):
                        self.forward(*inputs[b])
            self._stream.synchronize()
            pool = torch.cuda.graph_pool_handle()
            for b in reversed(self.buckets):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=self._stream):
                    y = self.forward(*inputs[b])
                self._graphs[b] = _Graph(graph, y)
            self._stream.synchronize()


def load_triton_backend(model: STVFM, precision: Optional[str] = None, device: str | torch.device = "cpu",
                        max_batch: int = DEFAULT_MAX_BATCH, compile_backbone: Optional[bool] = None,
                        cuda_graphs: Optional[bool] = None) -> TritonPredictor:
    """The ``triton`` backend of ``model`` (the fp32 reference) at ``precision`` on ``device``.

    Returns ``fn(x, tod=None, dow=None) -> y``: torch tensors, ``x`` float32 ``[B, T, C, H, W]``,
    ``tod``/``dow`` int64 ``[B, T]`` (only for models with ``steps_per_day > 0``), ``y`` float32
    ``[B, T_out, C, H, W]`` on ``device``, ``B <= max_batch``. ``precision``: ``fp32``, ``bf16`` or
    ``fp16`` (None: the registry's default, bf16 on CUDA). ``compile_backbone`` (None: on CUDA only) runs the
    frozen blocks through ``torch.compile``. With ``cuda_graphs`` (None: on CUDA, not under the
    interpreter) every bucket of :func:`graph_buckets` is captured as a CUDA graph here; calls then
    replay them, serialised by a lock, on the predictor's own stream. Raises
    :class:`~stvfm_engine.errors.STVFMError` where it cannot run.
    """
    from stvfm_engine.kernels import running_interpreted, why_not_runnable

    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    precision = get_backend("triton").precision_for(device, precision)
    dtype = get_precision(precision).dtype
    if not dtype.is_floating_point:
        raise STVFMError(f"the triton backend runs at precision fp32, bf16 or fp16, not {precision}")
    if why := why_not_runnable(device, dtype):
        raise STVFMError(f"the triton backend cannot run on {device}: {why}")
    compiled = device.type == "cuda" and not running_interpreted()
    if cuda_graphs and not compiled:
        raise STVFMError("CUDA graphs need a CUDA device and compiled kernels (not TRITON_INTERPRET=1)")
    return TritonPredictor(model, dtype, device, max_batch,
                           cuda_graphs=compiled if cuda_graphs is None else cuda_graphs,
                           compile_backbone=compiled if compile_backbone is None else compile_backbone)


# ----------------------------------------------------------------------------- the registry's interface
class TritonRunner(Runner):
    """Host inputs straight into the predictor, which copies them into its CUDA graphs' static inputs
    under its own lock (one host-to-device copy, serialised with the replay); the output's copy back
    runs outside that lock. Without graphs (Triton's interpreter) the Engine serialises calls."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.thread_safe = predictor.cuda_graphs

    def __call__(self, x, tod, dow) -> np.ndarray:
        args = [None if a is None else torch.as_tensor(a) for a in (x, tod, dow)]
        with torch.inference_mode():
            return output(self.predictor(*args))


def why_not_run(device: torch.device) -> Optional[str]:
    if why := missing("triton"):
        return why
    from stvfm_engine.kernels import why_not_runnable

    return why_not_runnable(device)


def open(request: OpenRequest) -> Runner:  # noqa: A001 - the registry's interface name
    try:
        fn = load_triton_backend(request.reference(), precision=request.precision.name, device=str(request.device),
                                 max_batch=request.max_batch)
    except STVFMError:
        raise
    except Exception as e:  # the Triton path may fail in many ways (no GPU, no interpreter, unsupported op)
        raise BackendError(f"the triton backend cannot load on {request.device}: {type(e).__name__}: "
                           f"{first_line(e)}") from None
    return TritonRunner(fn)

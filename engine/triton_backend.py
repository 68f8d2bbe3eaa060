"""The ``triton`` backend: the fused ``torch.ops.stvfm.*`` kernels around one backbone pass over ``2B``.

:func:`load_triton_backend` turns the fp32 reference model into a callable ``fn(x, tod, dow) -> y``:
flow + patchify (one kernel), token adaptation (one kernel, writing the backbone's input with its
prefix tokens in place), the frozen ViT blocks through timm (SDPA / flash attention on a GPU),
prompt conditioning (two kernels) and the bilateral step (one kernel), then fusion and head in
PyTorch. Compute precision fp32, bf16 or fp16; LayerNorm statistics and softmaxes are fp32 at every
precision; inputs and outputs are fp32. On a GPU each batch size is captured once as a CUDA graph.
On a CPU it runs only under ``TRITON_INTERPRET=1`` (Triton's interpreter: slow, for tests).
"""
from __future__ import annotations

import copy
import os
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from stvfm_engine.engine.precision import get_precision
from stvfm_engine.errors import STVFMError
from stvfm_engine.model.stvfm import LN_EPS, STVFM, denormalize, unpatchify



def _check_runtime(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, with a reason, every place the kernels cannot run (no silent PyTorch fallback)."""
    from stvfm_engine.kernels import why_not_runnable

    if why := why_not_runnable(device):
        raise STVFMError(f"the triton backend cannot run on {device}: {why}")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise STVFMError(f"{torch.cuda.get_device_name(device)} has no bfloat16 support: use fp16 or fp32")


@dataclass
class _Graph:
    """One captured batch size: static inputs, the graph, and its (overwritten on replay) output."""
    x: torch.Tensor
    tod: Optional[torch.Tensor]
    dow: Optional[torch.Tensor]
    graph: "torch.cuda.CUDAGraph"
    y: torch.Tensor


class TritonPredictor:
    """``predictor(x, tod, dow) -> y``: float32 ``[B, T, C, H, W]`` (+ int64 ``[B, T]``) -> ``[B, T_out, C, H, W]``.

    Holds its own copies of the weights on ``device`` (matmul weights in the compute dtype); the
    reference model passed in is left untouched.
    """

    def __init__(self, model: STVFM, dtype: torch.dtype, device: torch.device, cuda_graphs: bool):
        # Importing the kernels registers torch.ops.stvfm.*.
        from stvfm_engine.kernels.prompt_attention import condition_weights, coordination_weights
        from stvfm_engine.kernels.token_adapter import adapter_weights

        self.config = model.config
        self.dtype, self.device = dtype, device
        self.prefix_tokens = model.backbone.num_prefix_tokens
        self.dim = model.dim

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
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[int, bool], _Graph] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the forward pass
    @torch.no_grad()
    def forward(self, x: torch.Tensor, tod: Optional[torch.Tensor], dow: Optional[torch.Tensor]) -> torch.Tensor:
        """One prediction without CUDA graphs (also what the graphs capture)."""
        c, P = self.config, self.prefix_tokens
        u = torch.ops.stvfm.flow_patchify(x, self.mean, self.std, c.patch, self.dtype)  # [2B, n, T, C*p*p]
        z = torch.ops.stvfm.token_adapter(u, tod, dow, pos=self.pos, prefix=self.prefix, **self.adapter)
        h = self.backbone(z)[:, P:]  # [2B, n, D], one pass over both branches
        q = torch.ops.stvfm.prompt_condition(h, **self.condition)  # [2B, M, D] fp32
        hc = torch.ops.stvfm.bilateral_attention(h, q, **self.coordinate)  # [B, n, 2D] = concat(H_r', H_f')
        fused = F.linear(hc, self.fuse_w, self.fuse_b)
        # Head in fp32: [B, n, D] x [D, T_out*C*p*p] is small, and the output is fp32 anyway.
        y = F.linear(F.layer_norm(fused.float(), (self.dim,), self.head_norm_w, self.head_norm_b, LN_EPS),
                     self.head_w, self.head_b)
        y = unpatchify(y, c.horizon, c.channels, c.patch, c.height, c.width)
        return denormalize(y, self.mean, self.std)

    def __call__(self, x: torch.Tensor, tod: Optional[torch.Tensor] = None,
                 dow: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, tod, dow = self._inputs(x, tod, dow)
        if not self.cuda_graphs:
            return self.forward(x, tod, dow)
        key = (x.shape[0], tod is not None)
        with self._lock, torch.cuda.device(self.device):
            g = self._graphs.get(key)
            if g is None:
                g = self._graphs[key] = self._capture(x, tod, dow)
            else:
                g.x.copy_(x)
                if tod is not None:
                    g.tod.copy_(tod)
                    g.dow.copy_(dow)
            g.graph.replay()
            return g.y.clone()  # the next replay overwrites g.y

    # ------------------------------------------------------------------ helpers
    def _inputs(self, x, tod, dow):
        """Inputs already checked by :func:`~stvfm_engine.engine.inputs.validate_inputs` (``Engine.predict``
        runs it; checking again here would cost a GPU synchronisation), moved to the device."""
        x = x.to(device=self.device, dtype=torch.float32)
        if tod is not None:
            tod = tod.to(device=self.device, dtype=torch.int64).contiguous()
            dow = dow.to(device=self.device, dtype=torch.int64).contiguous()
        return x, tod, dow

    def _capture(self, x, tod, dow) -> _Graph:
        """Warm up (Triton compilation, cuBLAS/SDPA setup) on a side stream, then capture one batch size."""
        sx = x.clone()
        stod = None if tod is None else tod.clone()
        sdow = None if dow is None else dow.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(sx, stod, sdow)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = self.forward(sx, stod, sdow)
        return _Graph(sx, stod, sdow, graph, y)


def load_triton_backend(model: STVFM, precision: str = "fp32",
                        device: str | torch.device = "cpu") -> Callable[..., torch.Tensor]:
    """The ``triton`` backend of ``model`` (the fp32 reference) at ``precision`` on ``device``.

    Returns ``fn(x, tod=None, dow=None) -> y``: torch tensors, ``x`` float32 ``[B, T, C, H, W]``,
    ``tod``/``dow`` int64 ``[B, T]`` (only for models with ``steps_per_day > 0``), ``y`` float32
    ``[B, T_out, C, H, W]`` on ``device``. ``precision``: ``fp32``, ``bf16`` or ``fp16``. On CUDA the
    first call of each batch size captures a CUDA graph (not under the interpreter); calls are
    serialised by a lock. Raises :class:`~stvfm_engine.errors.STVFMError` where it cannot run.
    """
    dtype = get_precision(precision).dtype
    if not dtype.is_floating_point:
        raise STVFMError(f"the triton backend runs fp32, bf16 or fp16, not {precision}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    _check_runtime(device, dtype)
    graphs = device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
    return TritonPredictor(model, dtype, device, cuda_graphs=graphs)

"""Roofline figures from the model's configuration: FLOPs and bytes per call, by stage, and what a
measured latency achieves against a device's peak (H100/H200 built in; a CPU is reported as measured).

FLOPs count each multiply-add as 2 over every matmul (linear layers and attention products);
element-wise work is left out. Bytes are a simple unfused model: every weight read once per call
plus each matmul's input and output activations read/written once, at the precision's element size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from stvfm_engine.model.config import STVFMConfig

STAGES = ("normalise+flow", "token adapter", "backbone", "bcpc", "head")

# Dense peaks (no sparsity) of the SXM parts: (TFLOPS per precision, memory TB/s). fp32 is the
# non-tensor-core rate; int8 is TOPS.
DEVICE_PEAKS: dict[str, dict] = {
    "H100": {"tflops": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "int8": 1978.9}, "tb_s": 3.35},
    "H200": {"tflops": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "int8": 1978.9}, "tb_s": 4.8},
}
BYTES_PER_ELEMENT = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "int8": 1}


@dataclass(frozen=True)
class BackboneShape:
    """What the FLOP count needs from the timm ViT: width, blocks used, MLP width, prefix tokens, params."""

    dim: int
    layers: int
    mlp_hidden: int
    prefix_tokens: int
    params_per_block: int
    other_params: int  # prefix tokens, final norm (the patch-embedding and head are not used)


def backbone_shape(config: STVFMConfig) -> BackboneShape:
    """Read the backbone's sizes from a timm model built on the meta device (no memory, no weights)."""
    from stvfm_engine.model.stvfm import build_timm_backbone

    with torch.device("meta"):
        vit = build_timm_backbone(config.backbone)
    layers = len(vit.blocks) if config.backbone_layers is None else config.backbone_layers
    block = vit.blocks[0]
    per_block = sum(p.numel() for p in block.parameters())
    other = sum(p.numel() for p in vit.norm.parameters()) + sum(
        t.numel() for t in (getattr(vit, "cls_token", None), getattr(vit, "dist_token", None),
                            getattr(vit, "reg_token", None)) if t is not None)
    return BackboneShape(int(vit.embed_dim), int(layers), int(block.mlp.fc1.out_features),
                         int(vit.num_prefix_tokens), int(per_block), int(other))


def _linear(rows: int, k: int, n: int) -> tuple[int, int, int]:
    """(flops, weight elements, activation elements) of ``[rows, k] @ [k, n] + b``."""
    return 2 * rows * k * n, k * n + n, rows * (k + n)


def model_cost(config: STVFMConfig, batch: int, precision: str = "fp32",
               shape: Optional[BackboneShape] = None) -> dict:
    """FLOPs and bytes of one forward call at ``batch``, in total and per stage."""
    c, B = config, batch
    s = shape or backbone_shape(config)
    D, n, T, K, da = s.dim, c.num_tokens, c.history, c.token_dim, c.adapter_dim
    heads = c.heads or max(1, D // 64)
    M, S = c.prompts, c.num_tokens + s.prefix_tokens
    el = BYTES_PER_ELEMENT[precision]
    acc = {st: [0, 0, 0] for st in STAGES}  # flops, weight elements, activation elements

    def add(stage: str, flops: int, weights: int = 0, acts: int = 0) -> None:
        a = acc[stage]
        a[0] += flops
        a[1] += weights
        a[2] += acts

    # stages 0-2: element-wise only (read x, write both branches' tokens)
    x_el = B * T * c.channels * c.height * c.width
    add("normalise+flow", 0, 0, x_el + 2 * B * n * T * K)
    # stage 3: two adapters
    for _ in range(2):
        add("token adapter", *_linear(B * n * T, K, da))
        add("token adapter", *_linear(B * n, T * da, D))
        time_rows = T + (c.steps_per_day + 7 if c.uses_time else 0)
        add("token adapter", 0, time_rows * da + 2 * D, 0)  # step/tod/dow embeddings, LayerNorm
    # stage 4: 2B sequences of S tokens through L blocks
    N = 2 * B
    for _ in range(s.layers):
        f_qkv, _, a_qkv = _linear(N * S, D, 3 * D)
        f_proj, _, a_proj = _linear(N * S, D, D)
        f_fc1, _, a_fc1 = _linear(N * S, D, s.mlp_hidden)
        f_fc2, _, a_fc2 = _linear(N * S, s.mlp_hidden, D)
        f_attn = 2 * 2 * N * S * S * D  # q k^T and attn v
        add("backbone", f_qkv + f_proj + f_fc1 + f_fc2 + f_attn, s.params_per_block,
            a_qkv + a_proj + a_fc1 + a_fc2 + 2 * N * heads * S * S)
    add("backbone", 0, s.other_params, 0)

    # stage 5: four prompt attentions and the fusion
    def prompt_attention(Lq: int, Lk: int) -> None:
        for rows, k_, n_ in ((B * Lq, D, D), (B * Lk, D, 2 * D), (B * Lq, D, D)):
            add("bcpc", *_linear(rows, k_, n_))
        add("bcpc", 2 * 2 * B * Lq * Lk * D, 4 * D, 0)  # products; two LayerNorms' weights

    for _ in range(2):
        prompt_attention(M, n)  # conditioning: prompts read their branch
        prompt_attention(n, M)  # coordination: tokens read the other branch's prompts
    add("bcpc", *_linear(B * n, 2 * D, D))
    add("bcpc", 0, 2 * M * D, 0)
    # stage 6
    add("head", *_linear(B * n, D, c.horizon * K))
    add("head", 0, 2 * D, B * c.horizon * c.channels * c.height * c.width)

    stages = {st: {"flops": a[0], "bytes": (a[1] + a[2]) * el} for st, a in acc.items()}
    weight_bytes = sum(a[1] for a in acc.values()) * el
    return {"batch": B, "precision": precision, "flops": sum(a[0] for a in acc.values()),
            "bytes": sum(v["bytes"] for v in stages.values()), "weight_bytes": weight_bytes,
            "stages": stages}


def device_peak(device_name: str) -> Optional[dict]:
    """The built-in peak of a device whose name contains H100 or H200 (else None: measured only)."""
    upper = device_name.upper()
    for key in ("H200", "H100"):  # H200 first: its name never contains "H100"
        if key in upper:
            return DEVICE_PEAKS[key]
    return None


def achieved(cost: dict, latency_ms: float, device_name: str, precision: str = "fp32") -> dict:
    """Achieved TFLOPS and GB/s of one call, with their fraction of the device's peak where known."""
    seconds = latency_ms / 1e3
    out = {"flops": cost["flops"], "bytes": cost["bytes"],
           "tflops": cost["flops"] / seconds / 1e12, "gb_s": cost["bytes"] / seconds / 1e9,
           "arithmetic_intensity": cost["flops"] / max(cost["bytes"], 1),
           "peak_tflops": None, "peak_gb_s": None, "fraction_of_peak_tflops": None, "fraction_of_peak_gb_s": None}
    peak = device_peak(device_name)
    if peak is not None:
        tf = peak["tflops"].get(precision, peak["tflops"]["fp32"])
        out.update(peak_tflops=tf, peak_gb_s=peak["tb_s"] * 1e3,
                   fraction_of_peak_tflops=out["tflops"] / tf, fraction_of_peak_gb_s=out["gb_s"] / (peak["tb_s"] * 1e3))
    return out

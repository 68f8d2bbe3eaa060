"""The ST-VFM reference model in plain fp32 PyTorch: ``shared/docs/model-spec.md``, stage by stage.

Every backend of the engine (ONNX Runtime, AOTInductor, TensorRT, the Triton kernels) is checked
against this module. Stage functions (normalise, flow, patchify, ...) are plain tensor functions so
that kernels and tests can use them as their references.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from stvfm_engine.errors import ConfigError
from stvfm_engine.model.config import STVFMConfig

LN_EPS = 1e-6  # every LayerNorm of ours (timm's ViTs use the same)
BACKBONE_PREFIX = "backbone."  # state-dict names of the frozen backbone's tensors


# ----------------------------------------------------------------------------- stages 0-2, 6
def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Stage 0: ``(x - mean_c) / std_c`` for ``x`` of shape ``[B, T, C, H, W]``."""
    return (x - mean.view(1, 1, -1, 1, 1)) / std.view(1, 1, -1, 1, 1)


def denormalize(y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`."""
    return y * std.view(1, 1, -1, 1, 1) + mean.view(1, 1, -1, 1, 1)


def temporal_difference(x: torch.Tensor) -> torch.Tensor:
    """Stage 1, the ST flow: ``f_0 = 0``, ``f_t = x_t - x_{t-1}`` along axis 1 of ``[B, T, ...]``."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], dim=1)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Stage 2: ``[B, T, C, H, W]`` -> ``[B, n, T, C*p*p]``.

    The grid is zero-padded at the bottom/right to multiples of ``p``; tokens are numbered row-major
    over the ``h x w`` token grid, and each token's vector is ordered ``(C, p_row, p_col)``.
    """
    B, T, C, H, W = x.shape
    h, w = -(-H // p), -(-W // p)
    x = F.pad(x, (0, w * p - W, 0, h * p - H))
    x = x.reshape(B, T, C, h, p, w, p).permute(0, 3, 5, 1, 2, 4, 6)
    return x.reshape(B, h * w, T, C * p * p)


def unpatchify(y: torch.Tensor, steps: int, channels: int, p: int, height: int, width: int) -> torch.Tensor:
    """Stage 6: ``[B, n, T_out*C*p*p]`` -> ``[B, T_out, C, H, W]`` (inverse of :func:`patchify`, cropped)."""
    B = y.shape[0]
    h, w = -(-height // p), -(-width // p)
    y = y.reshape(B, h, w, steps, channels, p, p).permute(0, 3, 4, 1, 5, 2, 6)
    y = y.reshape(B, steps, channels, h * p, w * p)
    return y[..., :height, :width]


# ----------------------------------------------------------------------------- stage 3
class TokenAdapter(nn.Module):
    """Temporal-Aware Token Adapter (stage 3), one per branch.

    ``a = u @ W_in + b_in + E_step[t] (+ E_tod[tod_t] + E_dow[dow_t])``; ``g = GELU(a)`` flattened
    over ``(T, d_a)``; ``z = LayerNorm(g @ W_out + b_out) + pos``.
    """

    def __init__(self, token_dim: int, history: int, adapter_dim: int, dim: int, steps_per_day: int):
        super().__init__()
        self.w_in = nn.Linear(token_dim, adapter_dim)
        self.step_embed = nn.Parameter(torch.randn(history, adapter_dim) * 0.02)
        if steps_per_day > 0:
            self.tod_embed = nn.Parameter(torch.randn(steps_per_day, adapter_dim) * 0.02)
            self.dow_embed = nn.Parameter(torch.randn(7, adapter_dim) * 0.02)
        else:
            self.tod_embed = None
            self.dow_embed = None
        self.w_out = nn.Linear(history * adapter_dim, dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def time_embedding(self, tod: Optional[torch.Tensor], dow: Optional[torch.Tensor]) -> torch.Tensor:
        """``E_step[t] (+ E_tod[tod_t] + E_dow[dow_t])``: ``[T, d_a]`` or ``[B, 1, T, d_a]``."""
        if self.tod_embed is None:
            return self.step_embed
        return (self.step_embed + self.tod_embed[tod] + self.dow_embed[dow]).unsqueeze(1)

    def forward(self, u: torch.Tensor, tod: Optional[torch.Tensor], dow: Optional[torch.Tensor],
                pos: torch.Tensor) -> torch.Tensor:
        a = self.w_in(u) + self.time_embedding(tod, dow)  # [B, n, T, d_a]
        g = F.gelu(a).flatten(2)  # [B, n, T*d_a]
        return self.norm(self.w_out(g)) + pos


# ----------------------------------------------------------------------------- stage 4
def build_timm_backbone(name: str) -> nn.Module:
    """A randomly initialised timm Vision Transformer (pretrained weights come from a local file)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    try:
        vit = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as e:
        raise ConfigError(f"unknown timm model {name!r}: {e}") from None
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(
            f"backbone {name!r} is a {type(vit).__name__}; expected a timm VisionTransformer "
            "(DINO, DINOv2, CLIP, DeiT, distilled DeiT)")
    return vit


class FrozenViT(nn.Module):
    """Stage 4: the frozen timm ViT without its image patch-embedding or head.

    Parameter names are timm's (``cls_token``, ``pos_embed``, ``blocks.N...``, ``norm``), so a timm
    state dict loads into it directly. ``patch_pos`` (the patch position embedding resampled to the
    token grid, as timm resamples it) and ``prefix`` (prefix tokens plus their position embedding)
    are derived from the weights and recomputed whenever weights are loaded.
    """

    def __init__(self, vit: nn.Module, layers: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = tuple(grid)
        self.source_grid = tuple(vit.patch_embed.grid_size)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.no_embed_class = bool(getattr(vit, "no_embed_class", False))
        self.embed_dim = int(vit.embed_dim)
        self.cls_token = vit.cls_token
        self.dist_token = getattr(vit, "dist_token", None)
        self.reg_token = getattr(vit, "reg_token", None)
        self.pos_embed = vit.pos_embed
        self.norm_pre = vit.norm_pre
        self.blocks = nn.Sequential(*list(vit.blocks)[:layers])
        self.norm = vit.norm
        n_prefix = sum(t.shape[1] for t in self._prefix_params())
        if n_prefix != self.num_prefix_tokens:
            raise ConfigError(f"backbone reports {self.num_prefix_tokens} prefix tokens but holds {n_prefix}")
        h, w = self.grid
        self.register_buffer("patch_pos", torch.zeros(1, h * w, self.embed_dim), persistent=False)
        self.register_buffer("prefix", torch.zeros(1, self.num_prefix_tokens, self.embed_dim), persistent=False)
        self.requires_grad_(False)
        self.refresh_derived()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_derived())

    def _prefix_params(self) -> list[torch.Tensor]:
        # timm's order: class token, distillation token (DeiT distilled), register tokens
        return [t for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]

    @torch.no_grad()
    def refresh_derived(self) -> None:
        """Recompute ``patch_pos`` and ``prefix`` from the backbone's weights."""
        from timm.layers import resample_abs_pos_embed

        ref = next(iter(self.parameters()), None)  # any weight tells where the model lives
        device, dtype = (ref.device, ref.dtype) if ref is not None else (torch.device("cpu"), torch.float32)
        D, P = self.embed_dim, self.num_prefix_tokens
        prefix_params = self._prefix_params()
        prefix = (torch.cat([t.float() for t in prefix_params], dim=1) if prefix_params
                  else torch.zeros(1, 0, D, device=device))
        if self.pos_embed is None:
            patch_pos = torch.zeros(1, self.grid[0] * self.grid[1], D, device=device)
        else:
            n_pos_prefix = 0 if self.no_embed_class else P
            pos = resample_abs_pos_embed(self.pos_embed.float(), new_size=list(self.grid),
                                         old_size=list(self.source_grid), num_prefix_tokens=n_pos_prefix)
            patch_pos = pos[:, n_pos_prefix:]
            if n_pos_prefix:
                prefix = prefix + pos[:, :n_pos_prefix]
        self.patch_pos = patch_pos.to(device=device, dtype=dtype).contiguous()
        self.prefix = prefix.to(device=device, dtype=dtype).contiguous()

    def add_prefix(self, z: torch.Tensor) -> torch.Tensor:
        """``[N, n, D]`` tokens (position embedding already added) -> ``[N, P+n, D]`` with the prefix tokens first."""
        if not self.num_prefix_tokens:
            return z
        return torch.cat([self.prefix.expand(z.shape[0], -1, -1), z], dim=1)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """``norm_pre -> blocks -> norm`` on ``[N, L, D]``: every sequence on its own, for any length ``L``."""
        return self.norm(self.blocks(self.norm_pre(z)))

    def share_encoder(self, other: "FrozenViT") -> None:
        """Run ``other``'s ``norm_pre``/``blocks``/``norm`` modules (the same weights): models that share a
        backbone then hold its blocks once, on whatever device they are moved to."""
        self.norm_pre, self.blocks, self.norm = other.norm_pre, other.blocks, other.norm

    def drop_prefix(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, self.num_prefix_tokens:]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``[N, n, D]`` tokens (position embedding already added) -> ``[N, n, D]`` features."""
        return self.drop_prefix(self.encode(self.add_prefix(z)))


# ----------------------------------------------------------------------------- stage 5
class PromptAttention(nn.Module):
    """Pre-LayerNorm multi-head attention ``MHA(q=LN(q_in), kv=LN(kv_in))`` (no residual)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_kv = nn.LayerNorm(dim, eps=LN_EPS)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
        B, Lq, D = q_in.shape
        Lk = kv_in.shape[1]
        hd = D // self.heads
        q = self.q(self.norm_q(q_in)).reshape(B, Lq, self.heads, hd).transpose(1, 2)
        k, v = self.kv(self.norm_kv(kv_in)).reshape(B, Lk, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * (hd ** -0.5), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, Lq, D)
        return self.proj(out)


class CrossPromptCoordination(nn.Module):
    """Bilateral Cross-Prompt Coordination (stage 5).

    ``Q_r = P_r + MHA(LN(P_r), LN(H_r))``, ``Q_f = P_f + MHA(LN(P_f), LN(H_f))``;
    ``H_r' = H_r + MHA(LN(H_r), LN(Q_f))``, ``H_f' = H_f + MHA(LN(H_f), LN(Q_r))``;
    ``H = concat(H_r', H_f') @ W_fuse + b_fuse``.
    """

    def __init__(self, dim: int, prompts: int, heads: int):
        super().__init__()
        self.prompts_r = nn.Parameter(torch.randn(prompts, dim) * 0.02)
        self.prompts_f = nn.Parameter(torch.randn(prompts, dim) * 0.02)
        self.condition_r = PromptAttention(dim, heads)
        self.condition_f = PromptAttention(dim, heads)
        self.coordinate_r = PromptAttention(dim, heads)
        self.coordinate_f = PromptAttention(dim, heads)
        self.fuse = nn.Linear(2 * dim, dim)

    def condition(self, h_r: torch.Tensor, h_f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt conditioning: each branch's prompts read their own branch -> ``Q_r, Q_f``."""
        B = h_r.shape[0]
        p_r = self.prompts_r.unsqueeze(0).expand(B, -1, -1)
        p_f = self.prompts_f.unsqueeze(0).expand(B, -1, -1)
        return p_r + self.condition_r(p_r, h_r), p_f + self.condition_f(p_f, h_f)

    def coordinate(self, h_r, h_f, q_r, q_f) -> tuple[torch.Tensor, torch.Tensor]:
        """Bilateral step: each branch's tokens read the other branch's prompts."""
        return h_r + self.coordinate_r(h_r, q_f), h_f + self.coordinate_f(h_f, q_r)

    def forward(self, h_r: torch.Tensor, h_f: torch.Tensor) -> torch.Tensor:
        q_r, q_f = self.condition(h_r, h_f)
        h_r, h_f = self.coordinate(h_r, h_f, q_r, q_f)
        return self.fuse(torch.cat([h_r, h_f], dim=-1))


# ----------------------------------------------------------------------------- the model
class STVFM(nn.Module):
    """ST-VFM: ``model(x, tod=None, dow=None) -> y``, raw units in and out.

    ``x``: float ``[B, T, C, H, W]``; ``tod``, ``dow``: int64 ``[B, T]`` (only when
    ``config.steps_per_day > 0``); ``y``: ``[B, T_out, C, H, W]``.
    """

    def __init__(self, config: STVFMConfig, backbone: Optional[nn.Module] = None):
        super().__init__()
        config.validate()
        vit = backbone if backbone is not None else build_timm_backbone(config.backbone)
        total_blocks = len(vit.blocks)
        layers = total_blocks if config.backbone_layers is None else config.backbone_layers
        if layers > total_blocks:
            raise ConfigError(f"backbone_layers={layers} but {config.backbone} has {total_blocks} blocks")
        D = int(vit.embed_dim)
        heads = D // 64 if config.heads is None else config.heads
        if heads < 1 or D % heads:
            raise ConfigError(f"heads={heads} must divide the backbone width D={D}")
        self.config = config.replace(backbone_layers=layers, heads=heads)
        c = self.config
        self.register_buffer("norm_mean", torch.zeros(c.channels))
        self.register_buffer("norm_std", torch.ones(c.channels))
        args = (c.token_dim, c.history, c.adapter_dim, D, c.steps_per_day)
        self.adapter_r = TokenAdapter(*args)
        self.adapter_f = TokenAdapter(*args)
        self.backbone = FrozenViT(vit, layers, c.grid)
        self.bcpc = CrossPromptCoordination(D, c.prompts, heads)
        self.head_norm = nn.LayerNorm(D, eps=LN_EPS)
        self.head = nn.Linear(D, c.horizon * c.token_dim)
        self.freeze_backbone()

    @property
    def dim(self) -> int:
        return self.backbone.embed_dim

    def freeze_backbone(self) -> None:
        """The split that "frozen" means everywhere: backbone fixed, every other parameter trainable."""
        for name, p in self.named_parameters():
            p.requires_grad_(not name.startswith(BACKBONE_PREFIX))

    def set_normalization(self, mean, std) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        C = self.config.channels
        if mean.numel() != C or std.numel() != C:
            raise ConfigError(f"normalisation needs {C} means and stds, got {mean.numel()} and {std.numel()}")
        if not bool(torch.isfinite(mean).all()) or not bool((std > 0).all()):
            raise ConfigError("normalisation stds must be > 0 and means finite")
        self.norm_mean.copy_(mean)
        self.norm_std.copy_(std)

    # The forward is split into the stages that the fused kernels replace, so that the Triton path
    # and the stage breakdown reuse exactly these pieces.
    def embed_tokens(self, x, tod, dow) -> torch.Tensor:
        """Stages 0-3 for both branches: ``[2B, n, D]`` (raw branch first, flow branch second)."""
        p = self.config.patch
        xn = normalize(x, self.norm_mean, self.norm_std)
        u_r = patchify(xn, p)
        u_f = patchify(temporal_difference(xn), p)
        pos = self.backbone.patch_pos
        return torch.cat([self.adapter_r(u_r, tod, dow, pos), self.adapter_f(u_f, tod, dow, pos)], dim=0)

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """Stage 6: fused features ``[B, n, D]`` -> ``[B, T_out, C, H, W]`` in raw units."""
        c = self.config
        y = self.head(self.head_norm(h))
        y = unpatchify(y, c.horizon, c.channels, c.patch, c.height, c.width)
        return denormalize(y, self.norm_mean, self.norm_std)

    # A multi-model engine runs these two per model around one shared backbone call (FrozenViT.encode),
    # whose input is all that differs between models: its sequence length P+n.
    def backbone_input(self, x: torch.Tensor, tod: Optional[torch.Tensor] = None,
                       dow: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Stages 0-3 plus the backbone's prefix tokens: ``[2B, P+n, D]``, the input of ``backbone.encode``."""
        return self.backbone.add_prefix(self.embed_tokens(x, tod, dow))

    def forecast(self, h: torch.Tensor) -> torch.Tensor:
        """Stages 5-6 from ``backbone.encode``'s output ``[2B, P+n, D]`` -> ``[B, T_out, C, H, W]`` in raw units."""
        return self.decode_branches(self.backbone.drop_prefix(h))

    def decode_branches(self, h: torch.Tensor) -> torch.Tensor:
        """Stages 5-6 from both branches' features ``[2B, n, D]`` (raw branch first)."""
        B = h.shape[0] // 2
        return self.decode(self.bcpc(h[:B], h[B:]))

    @property
    def sequence_length(self) -> int:
        """Tokens per backbone sequence, ``P + n``: models with equal lengths can share one backbone call."""
        return self.backbone.num_prefix_tokens + self.config.num_tokens

    def forward(self, x: torch.Tensor, tod: Optional[torch.Tensor] = None,
                dow: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Stages 0-6 on inputs as ``Engine.predict`` validates them (:mod:`stvfm_engine.engine.inputs`)."""
        return self.decode_branches(self.backbone(self.embed_tokens(x, tod, dow)))  # one backbone call on 2B


def build_model(config: STVFMConfig, seed: Optional[int] = None) -> STVFM:
    """A randomly initialised model (identity normalisation), deterministic for ``seed``."""
    if seed is None:
        return STVFM(config).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return STVFM(config).eval()


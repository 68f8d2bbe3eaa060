"""ST-VFM configuration: one dataclass with the spec's keys, and the named presets.

A config is plain data (str/int/None) so that it travels inside a checkpoint that loads with
``torch.load(weights_only=True)`` and inside an engine manifest as JSON.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from stvfm_engine.errors import ConfigError
from stvfm_engine.model.calendar import calendar_from_start_dow, normalize_calendar, parse_time, time_features



# A checkpoint is untrusted data: a config may not ask for unbounded memory (the `large` preset has
# 256 tokens per branch; a 1024 x 1024 grid at p=4 is 65536).
MAX_TOKENS = 65536


@dataclass
class STVFMConfig:
    backbone: str = "vit_tiny_patch16_224"
    backbone_layers: Optional[int] = None  # first L blocks; None = all
    history: int = 12  # T
    horizon: int = 1  # T_out
    channels: int = 2  # C
    height: int = 14  # H
    width: int = 8  # W
    patch: int = 2  # p
    adapter_dim: int = 64  # d_a
    prompts: int = 8  # M
    heads: Optional[int] = None  # None = D / 64
    steps_per_day: int = 48  # 0 = no time inputs
    # {"start": ISO-8601 with a UTC offset (the data's step 0), "zone": IANA name}; None = not recorded
    # (see model/calendar.py). Checkpoints written before it carried `start_dow`: read into this form.
    calendar: Optional[dict] = None

    # ------------------------------------------------------------------ derived sizes
    @property
    def grid(self) -> tuple[int, int]:
        """Token grid ``(h, w) = (ceil(H/p), ceil(W/p))``."""
        p = self.patch
        return (-(-self.height // p), -(-self.width // p))

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def token_dim(self) -> int:
        """Values per token and step: ``C * p * p``."""
        return self.channels * self.patch * self.patch

    @property
    def uses_time(self) -> bool:
        return self.steps_per_day > 0

    @property
    def start_dow(self) -> int:
        """Read-only, for code written before calendars: the local weekday of step 0 (0 = Monday; 0 without a
        calendar). The calendar itself (:mod:`~stvfm_engine.model.calendar`) is the source of time features."""
        if self.calendar is None:
            return 0
        return int(time_features([parse_time(self.calendar["start"])], self.calendar["zone"], 1)[1][0])

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "STVFMConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"expected a config dict, got {type(d).__name__}")
        if "start_dow" in d:  # written before calendars: the same features as a UTC calendar from that weekday
            d = dict(d)
            start_dow = d.pop("start_dow")
            if d.get("calendar") is None:
                d["calendar"] = calendar_from_start_dow(start_dow)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; expected a subset of {sorted(known)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def replace(self, **changes: Any) -> "STVFMConfig":
        changes = {k: v for k, v in changes.items() if v is not None}
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def validate(self) -> "STVFMConfig":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(isinstance(self.backbone, str) and self.backbone != "", "backbone must be a timm model name")
        # a name only: timm's 'hf-hub:...' / 'local-dir:...' sources would make loading a checkpoint fetch or read files
        need(not any(ch in self.backbone for ch in ":/\\"),
             f"backbone must be a plain timm model name, got {self.backbone!r} (no hf-hub:/local-dir: sources or paths)")
        for name in ("history", "horizon", "channels", "height", "width", "patch", "adapter_dim", "prompts"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        need(self.backbone_layers is None or (isinstance(self.backbone_layers, int) and self.backbone_layers >= 1),
             f"backbone_layers must be an integer >= 1 or None, got {self.backbone_layers!r}")
        need(self.heads is None or (isinstance(self.heads, int) and self.heads >= 1),
             f"heads must be an integer >= 1 or None, got {self.heads!r}")
        need(isinstance(self.steps_per_day, int) and self.steps_per_day >= 0,
             f"steps_per_day must be an integer >= 0, got {self.steps_per_day!r}")
        if self.calendar is not None:
            self.calendar = normalize_calendar(self.calendar)
        need(self.num_tokens <= MAX_TOKENS and self.history * self.token_dim <= MAX_TOKENS,
             f"grid {self.height}x{self.width} with patch {self.patch} gives {self.num_tokens} tokens per branch and "
             f"{self.history * self.token_dim} values per token; expected at most {MAX_TOKENS} of each")
        return self


# The spec's reference configurations. Every preset: steps_per_day 48, adapter_dim 64, prompts 8,
# heads D/64 (resolved when the backbone is known).
PRESETS: dict[str, STVFMConfig] = {
    "tiny": STVFMConfig(backbone="vit_tiny_patch16_224", backbone_layers=4, height=14, width=8,
                        channels=2, history=12, horizon=1, patch=2),
    "bike": STVFMConfig(backbone="vit_small_patch16_224.dino", height=14, width=8,
                        channels=2, history=12, horizon=1, patch=1),
    "city": STVFMConfig(backbone="vit_base_patch16_clip_224.openai", height=32, width=32,
                        channels=2, history=12, horizon=6, patch=2),
    "large": STVFMConfig(backbone="vit_large_patch14_dinov2.lvd142m", height=64, width=64,
                         channels=2, history=12, horizon=12, patch=4),
}


def from_preset(name: str, **overrides: Any) -> STVFMConfig:
    """The named preset with ``overrides`` (keys whose value is None are ignored)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)

"""CLI sub-commands of the reference model: ``init``, ``train``, ``eval``, ``demo``."""
from __future__ import annotations

import argparse
import json
import sys

from stvfm_engine.model.config import PRESETS

FORMATTER = argparse.RawDescriptionHelpFormatter


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return v


def _non_negative(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return v


def _config_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model configuration (overrides the preset)")
    g.add_argument("--backbone", help="timm ViT name, e.g. vit_small_patch16_224.dino, "
                                      "vit_base_patch16_clip_224.openai, deit_small_patch16_224")
    g.add_argument("--backbone-layers", type=_positive, metavar="L", help="use the first L blocks (default: all)")
    g.add_argument("--history", type=_positive, metavar="T", help="history steps in")
    g.add_argument("--horizon", type=_positive, metavar="T_OUT", help="forecast steps out")
    g.add_argument("--channels", type=_positive, metavar="C")
    g.add_argument("--height", type=_positive, metavar="H")
    g.add_argument("--width", type=_positive, metavar="W")
    g.add_argument("--patch", type=_positive, metavar="P", help="patch size p (grid zero-padded to multiples of p)")
    g.add_argument("--adapter-dim", type=_positive, metavar="D", help="token adapter width d_a")
    g.add_argument("--prompts", type=_positive, metavar="M", help="prompts per branch")
    g.add_argument("--heads", type=_positive, metavar="N", help="attention heads of the prompt attention (default D/64)")
    g.add_argument("--steps-per-day", type=_non_negative, metavar="S", help="time-of-day slots; 0 = no time inputs")


def _config_overrides(args: argparse.Namespace) -> dict:
    keys = ("backbone", "backbone_layers", "history", "horizon", "channels", "height", "width", "patch",
            "adapter_dim", "prompts", "heads", "steps_per_day")
    return {k: getattr(args, k) for k in keys}


def cmd_init(args: argparse.Namespace) -> int:
    from stvfm_engine.model.checkpoint import save_checkpoint
    from stvfm_engine.model.config import from_preset
    from stvfm_engine.model.stvfm import build_model

    config = from_preset(args.preset, **_config_overrides(args))
    model = build_model(config, seed=args.seed)
    save_checkpoint(model, args.output)
    print(json.dumps({"checkpoint": str(args.output), "config": model.config.to_dict()}))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "init", formatter_class=FORMATTER,
        help="write a randomly initialised checkpoint (for building and benchmarking without training)",
        description="Write a randomly initialised ST-VFM checkpoint with identity normalisation.\n\n"
                    "Start from a preset and override any key, e.g.\n"
                    "  stvfm-engine init --preset bike --backbone deit_small_patch16_224 -o deit.pt\n"
                    "  stvfm-engine init --height 20 --width 10 --channels 3 --patch 4 --steps-per-day 0 -o odd.pt\n\n"
                    "Presets: " + ", ".join(f"{k} ({v.backbone}, {v.height}x{v.width}, p={v.patch})"
                                              for k, v in PRESETS.items()))
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="starting configuration (default: tiny)")
    _config_options(p)
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.add_argument("-o", "--output", required=True, metavar="CKPT", help="checkpoint file to write")
    p.set_defaults(func=cmd_init)

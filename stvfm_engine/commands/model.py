"""CLI commands of the reference model: ``init``, ``train``, ``eval``, and the ``demo``."""
from __future__ import annotations

import argparse
import json
import sys

from stvfm_engine.model.config import PRESETS
from stvfm_engine.commands.common import non_negative_int, positive_int

FORMATTER = argparse.RawDescriptionHelpFormatter


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite learning rate > 0, got {text!r}")
    return value


def _config_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model configuration (overrides the preset)")
    g.add_argument("--backbone", help="timm ViT name, e.g. vit_small_patch16_224.dino, "
                                      "vit_base_patch16_clip_224.openai, deit_small_patch16_224")
    g.add_argument("--backbone-layers", type=positive_int, metavar="L", help="use the first L blocks (default: all)")
    g.add_argument("--history", type=positive_int, metavar="T", help="history steps in")
    g.add_argument("--horizon", type=positive_int, metavar="T_OUT", help="forecast steps out")
    g.add_argument("--channels", type=positive_int, metavar="C")
    g.add_argument("--height", type=positive_int, metavar="H")
    g.add_argument("--width", type=positive_int, metavar="W")
    g.add_argument("--patch", type=positive_int, metavar="P", help="patch size p (grid zero-padded to multiples of p)")
    g.add_argument("--adapter-dim", type=positive_int, metavar="D", help="token adapter width d_a")
    g.add_argument("--prompts", type=positive_int, metavar="M", help="prompts per branch")
    g.add_argument("--heads", type=positive_int, metavar="N", help="attention heads of the prompt attention (default D/64)")
    g.add_argument("--steps-per-day", type=non_negative_int, metavar="S", help="time-of-day slots; 0 = no time inputs")


def _config_overrides(args: argparse.Namespace) -> dict:
    keys = ("backbone", "backbone_layers", "history", "horizon", "channels", "height", "width", "patch",
            "adapter_dim", "prompts", "heads", "steps_per_day")
    return {k: getattr(args, k) for k in keys}


def _calendar_options(p: argparse.ArgumentParser, default: str) -> None:
    g = p.add_argument_group("calendar (the time of each step: tod/dow inputs and forecast streams)")
    g.add_argument("--start", metavar="TIME", help="time of the data's first step, ISO-8601 with a UTC offset, "
                                                   f"e.g. 2026-01-05T00:00:00-05:00 (with --zone; default: {default})")
    g.add_argument("--zone", metavar="IANA_NAME", help="zone the data's days are counted in, e.g. America/New_York "
                                                       "(with --start)")
    g.add_argument("--start-dow", type=int, choices=range(7), metavar="D",
                   help="the older form, kept working: day of week of the first step (0=Monday), the same as a UTC "
                        "calendar from 00:00 of that day; prefer --start/--zone")


def _calendar(args: argparse.Namespace) -> dict | None:
    """``{"start", "zone"}`` from --start/--zone (None when neither is given)."""
    from stvfm_engine.errors import ConfigError
    from stvfm_engine.model.calendar import normalize_calendar

    start_dow = getattr(args, "start_dow", None)
    if start_dow is not None:
        if args.start is not None or args.zone is not None:
            raise ConfigError("--start-dow is the older form of --start/--zone: give one or the other")
        from stvfm_engine.model.calendar import calendar_from_start_dow

        return calendar_from_start_dow(start_dow)
    if args.start is None and args.zone is None:
        return None
    if args.start is None or args.zone is None:
        raise ConfigError("--start and --zone go together: the time of the first step and the zone of its days")
    return normalize_calendar({"start": args.start, "zone": args.zone})


def cmd_init(args: argparse.Namespace) -> int:
    from stvfm_engine.model.checkpoint import save_checkpoint
    from stvfm_engine.model.config import from_preset
    from stvfm_engine.model.stvfm import build_model

    config = from_preset(args.preset, **_config_overrides(args), calendar=_calendar(args))
    model = build_model(config, seed=args.seed)
    _load_backbone_weights(model, args.backbone_weights)
    save_checkpoint(model, args.output)
    print(json.dumps({"checkpoint": str(args.output), "config": model.config.to_dict()}))
    return 0


def _backbone_weights_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--backbone-weights", metavar="FILE",
                   help="local pretrained timm backbone weights (.safetensors, or a torch file read with "
                        f"weights_only=True){what}")


def _load_backbone_weights(model, path) -> None:
    from stvfm_engine.model.train import load_backbone_weights

    if path:
        n = load_backbone_weights(model, path)
        print(f"loaded {n} backbone tensors from {path}", file=sys.stderr)


def _print_metrics(metrics: dict, title: str) -> None:
    """A small aligned table on stdout."""
    print(title)
    print(f"  {'forecaster':<20} {'MAE':>9} {'RMSE':>9}")
    for name, m in metrics.items():
        print(f"  {name:<20} {m['mae']:>9.3f} {m['rmse']:>9.3f}")


def cmd_train(args: argparse.Namespace) -> int:
    from stvfm_engine.errors import DataError
    from stvfm_engine.model.checkpoint import load_model, save_checkpoint
    from stvfm_engine.model.config import from_preset
    from stvfm_engine.model.data import load_flow_data
    from stvfm_engine.model.stvfm import build_model
    from stvfm_engine.model.train import split_metrics, train

    calendar = _calendar(args)
    data = load_flow_data(args.data)
    C, (H, W) = data.channels, data.grid
    if args.init:
        model = load_model(args.init)
        c = model.config
        if (c.channels, c.height, c.width) != (C, H, W):
            raise DataError(f"--init checkpoint expects C={c.channels}, grid {c.height}x{c.width}; "
                            f"{args.data} has C={C}, grid {H}x{W}")
        model.config = c.replace(calendar=calendar)
    else:
        config = from_preset(args.preset, channels=C, height=H, width=W, calendar=calendar)
        model = build_model(config, seed=args.seed)
    _load_backbone_weights(model, args.backbone_weights)
    model.set_normalization(*data.normalization())
    result = train(model, data, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                   seed=args.seed, eval_every=args.eval_every, progress=not args.quiet)
    metrics = split_metrics(model, data, "test")
    summary = {"best_step": result.best_step, "best_val_loss": result.best_val_loss,
               "train_seconds": round(result.seconds, 2), "data": str(args.data), "test": metrics}
    save_checkpoint(model, args.output, metrics=summary)
    print(json.dumps({"checkpoint": str(args.output), **summary}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from stvfm_engine.model.checkpoint import load_model
    from stvfm_engine.model.data import load_flow_data
    from stvfm_engine.model.train import split_metrics

    model = load_model(args.checkpoint)
    metrics = split_metrics(model, load_flow_data(args.data), args.split)
    if args.json:
        print(json.dumps(metrics))
    else:
        _print_metrics(metrics, f"{args.checkpoint} on {args.data} ({args.split} split), raw units:")
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
    _calendar_options(p, "none recorded; streams then need one")
    _backbone_weights_option(p, "; checkpoints given the same file share one backbone (a multi-model engine)")
    p.add_argument("-o", "--output", required=True, metavar="CKPT", help="checkpoint file to write")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "train", formatter_class=FORMATTER, help="train a model on flow-grid data (frozen backbone)",
        description="Train ST-VFM on <PREFIX>_train.npz, keep the best weights by <PREFIX>_val.npz loss,\n"
                    "report test MAE/RMSE against persistence and historical average.\n\n"
                    "Channels and grid come from the data (a preset's grid is overridden). The backbone is\n"
                    "frozen: AdamW updates only the adapters, prompts, attention, fusion and head.\n\n"
                    "  stvfm-engine train --preset tiny --data ../shared/data/nyc/NYBike_flow -o bike.pt\n"
                    "  stvfm-engine train --init tiny.pt --data ../shared/data/nyc/NYTaxi_flow --max-steps 1000 -o taxi.pt")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset's configuration, random weights")
    src.add_argument("--init", metavar="CKPT", help="start from this checkpoint's weights and configuration")
    p.add_argument("--data", required=True, metavar="PREFIX",
                   help="data prefix: reads PREFIX_train.npz, PREFIX_val.npz, PREFIX_test.npz ('flow' [steps, H, W, C])")
    p.add_argument("--max-steps", type=positive_int, default=600, help="optimizer steps (default 600)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="windows per step (default 32)")
    p.add_argument("--lr", type=_learning_rate, default=1e-3, help="peak AdamW learning rate, cosine decay (default 1e-3)")
    p.add_argument("--eval-every", type=positive_int, default=100, help="validate every N steps (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of initial weights and batch order (default 0)")
    _calendar_options(p, "the --init checkpoint's, else none recorded and training counts steps from a "
                         "Monday 00:00 UTC")
    _backbone_weights_option(p, "")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", required=True, metavar="CKPT", help="checkpoint file to write")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval", formatter_class=FORMATTER, help="MAE/RMSE of a checkpoint vs persistence and historical average",
        description="Evaluate a checkpoint on every window of a split, in raw units, next to two baselines:\n"
                    "persistence (last observed step repeated) and historical average (mean of the history).")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--data", required=True, metavar="PREFIX", help="data prefix (PREFIX_{train,val,test}.npz)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to evaluate (default test)")
    p.add_argument("--json", action="store_true", help="print only the metrics as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "demo", formatter_class=FORMATTER, help="the whole flow offline: synthetic city flows, train, evaluate, build, time",
        description="Runs without GPU, network or data files: synthesises a periodic city-flow grid, trains the\n"
                    "tiny preset for a short while on the CPU, prints model vs persistence vs historical average,\n"
                    "then builds an engine and prints eager vs engine latency.")
    p.add_argument("--max-steps", type=positive_int, default=400, help="training steps (default 400, about a minute on 2 cores)")
    p.add_argument("--workdir", metavar="DIR", help="keep the checkpoint and engine here (default: a temp folder)")
    p.add_argument("--no-build", action="store_true", help="stop after training and evaluation")
    p.add_argument("--backends", default="onnxruntime",
                   help="backends to build for the latency comparison (default onnxruntime; add aoti for AOTInductor)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from stvfm_engine.demo import run_demo

    run_demo(max_steps=args.max_steps, workdir=args.workdir, build=not args.no_build,
             backends=[b.strip() for b in args.backends.split(",") if b.strip()])
    return 0

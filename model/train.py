"""Training: AdamW on the non-frozen parameters, best weights by validation loss, deterministic for a
seed, a rich progress bar on stderr. The backbone never changes."""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path


import numpy as np
import torch

from stvfm_engine.errors import CheckpointError, DataError, first_line
from stvfm_engine.model.data import FlowData, Windows, windows_for
from stvfm_engine.model.evaluate import evaluate_model
from stvfm_engine.model.stvfm import STVFM


@dataclass
class TrainResult:
    best_step: int
    best_val_loss: float
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)


def _validation_loss(model: STVFM, windows: Windows, batch_size: int) -> float:
    """Mean squared error in normalised units (the training objective) over all windows."""
    std = model.norm_std.view(1, 1, -1, 1, 1)
    total, count = 0.0, 0
    with torch.inference_mode():
        for x, y, tod, dow in windows.batches(batch_size):
            t = (lambda a: None if a is None else torch.from_numpy(a))
            err = (model(t(x), t(tod), t(dow)) - t(y)) / std
            total += float((err.double() ** 2).sum())
            count += err.numel()
    return total / max(count, 1)


def load_backbone_weights(model: STVFM, path: str | os.PathLike) -> int:
    """Load a local pretrained timm backbone (safetensors, or a torch file read with weights_only=True).

    Accepts a plain timm state dict (optionally nested under ``model``/``state_dict`` or prefixed
    ``backbone.``); the patch-embedding and head are ignored, as are blocks beyond ``backbone_layers``.
    Returns the number of tensors loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"backbone weights {str(path)!r} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # e.g. a pickle protocol notice: the error below is the one line
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any parse failure of an untrusted file is the user's input error
        raise CheckpointError(f"{path}: not readable backbone weights ({first_line(e)})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    own = model.backbone.state_dict()
    picked = {k: v for k, v in state.items() if k in own}
    missing = sorted(set(own) - set(picked))
    if missing:
        raise CheckpointError(f"{path}: not weights of {model.config.backbone}: missing {missing[:3]}"
                              f"{'...' if len(missing) > 3 else ''}")
    for k, v in picked.items():
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{path}: shape mismatch for {k}: expected {list(own[k].shape)}, "
                                  f"found {list(getattr(v, 'shape', []))}")
    model.backbone.load_state_dict({k: v.float() for k, v in picked.items()}, strict=True)
    return len(picked)


def train(model: STVFM, data: FlowData, max_steps: int = 600, batch_size: int = 32, lr: float = 1e-3,
          weight_decay: float = 0.01, seed: int = 0, eval_every: int = 100, progress: bool = True) -> TrainResult:
    """Train ``model`` in place on ``data``'s train split; at the end it holds the weights with the
    best validation loss. The backbone's tensors stay bit-identical."""
    train_w = windows_for(model, data, "train")
    val_w = windows_for(model, data, "val")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.freeze_backbone()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, min(50, max_steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, max_steps) / max_steps)))
    std = model.norm_std.view(1, 1, -1, 1, 1)
    best = (float("inf"), 0, None)
    history: list[dict] = []
    start = time.perf_counter()

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=max_steps, status="")
        for step in range(1, max_steps + 1):
            model.train()
            model.backbone.eval()  # frozen: no dropout / stochastic depth in the backbone
            x, y, tod, dow = train_w.batch(rng.integers(0, len(train_w), size=batch_size))
            t = (lambda a: None if a is None else torch.from_numpy(a))
            loss = (((model(t(x), t(tod), t(dow)) - t(y)) / std) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if step % eval_every == 0 or step == max_steps:
                model.eval()
                val = _validation_loss(model, val_w, 128)
                history.append({"step": step, "train_loss": loss.item(), "val_loss": val})
                if val < best[0]:
                    best = (val, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
                bar.update(task, status=f"loss {loss.item():.4f} val {val:.4f} (best {best[0]:.4f} @ {best[1]})")
            bar.advance(task)
    if best[2] is None:
        raise DataError(f"training diverged: the validation loss was never finite (last {history[-1]['val_loss']}); "
                        "try a smaller --lr")
    model.load_state_dict(best[2])
    model.eval()
    return TrainResult(best[1], best[0], max_steps, time.perf_counter() - start, history)


def split_metrics(model: STVFM, data: FlowData, split: str = "test") -> dict[str, dict[str, float]]:
    return evaluate_model(model, windows_for(model, data, split))

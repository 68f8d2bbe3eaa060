"""Forecast evaluation: MAE and RMSE in raw units over every window of a split, for a model (any
forecasting callable) and for the persistence and historical-average baselines."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from stvfm_engine.model.data import Windows

# (x, tod, dow) numpy -> y numpy [B, T_out, C, H, W]
Forecaster = Callable[[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]], np.ndarray]


class ErrorAccumulator:
    """Running sums for MAE and RMSE (float64)."""

    def __init__(self) -> None:
        self.abs = 0.0
        self.sq = 0.0
        self.count = 0

    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        d = pred.astype(np.float64) - target.astype(np.float64)
        self.abs += float(np.abs(d).sum())
        self.sq += float((d * d).sum())
        self.count += d.size

    def result(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {"mae": self.abs / n, "rmse": float(np.sqrt(self.sq / n))}


def model_forecaster(model: torch.nn.Module) -> Forecaster:
    """Wrap a torch model taking ``(x, tod, dow)`` tensors as a numpy forecaster."""
    device = next(model.parameters()).device

    def predict(x, tod, dow):
        with torch.inference_mode():
            t = (lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device))
            return model(t(x), t(tod), t(dow)).float().cpu().numpy()

    return predict


def evaluate_forecaster(predict: Forecaster, windows: Windows, batch_size: int = 64,
                        baselines: bool = True) -> dict[str, dict[str, float]]:
    """``{"model": {"mae", "rmse"}, "persistence": {...}, "historical_average": {...}}``."""
    acc = {"model": ErrorAccumulator()}
    if baselines:
        acc["persistence"] = ErrorAccumulator()
        acc["historical_average"] = ErrorAccumulator()
    for x, y, tod, dow in windows.batches(batch_size):
        acc["model"].add(predict(x, tod, dow), y)
        if baselines:
            acc["persistence"].add(np.broadcast_to(x[:, -1:], y.shape), y)
            acc["historical_average"].add(np.broadcast_to(x.mean(axis=1, keepdims=True), y.shape), y)
    return {k: v.result() for k, v in acc.items()}


def evaluate_model(model: torch.nn.Module, windows: Windows, batch_size: int = 64,
                   baselines: bool = True) -> dict[str, dict[str, float]]:
    was_training = model.training
    model.eval()
    try:
        return evaluate_forecaster(model_forecaster(model), windows, batch_size, baselines)
    finally:
        model.train(was_training)

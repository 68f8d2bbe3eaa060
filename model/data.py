"""Flow-grid data: the NYC ``<prefix>_{train,val,test}.npz`` splits, normalisation statistics and
sliding windows of ``T`` history steps -> ``T_out`` forecast steps with true ``tod``/``dow`` (from the
model's calendar, :mod:`~stvfm_engine.model.calendar`).

Files hold one array ``flow`` of shape ``[steps, H, W, C]``. The three splits are consecutive, so the
global step index runs on across them (val starts where train ends) and time features stay true.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from stvfm_engine.errors import DataError, first_line
from stvfm_engine.model.calendar import calendar_from_start_dow, grid_for
from stvfm_engine.model.config import STVFMConfig

SPLITS = ("train", "val", "test")


@dataclass
class FlowSeries:
    """One split: ``flow`` as ``[steps, C, H, W]`` float32 and the global index of its first step."""

    flow: np.ndarray
    start_step: int

    @property
    def steps(self) -> int:
        return self.flow.shape[0]


@dataclass
class FlowData:
    """All three splits of one data set."""

    splits: dict[str, FlowSeries]
    source: str

    @property
    def channels(self) -> int:
        return self.splits["train"].flow.shape[1]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.splits["train"].flow.shape[2:])  # type: ignore[return-value]

    def normalization(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std of the train split (std floored so a constant channel is safe)."""
        f = self.splits["train"].flow.astype(np.float64)
        mean = f.mean(axis=(0, 2, 3))
        std = np.maximum(f.std(axis=(0, 2, 3)), 1e-6)
        return mean.astype(np.float32), std.astype(np.float32)


def _read_flow(path: Path) -> np.ndarray:
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: expected an .npz archive holding 'flow', found a single .npy array")
        with z:
            if "flow" not in z.files:
                raise DataError(f"{path}: expected an array named 'flow', found {z.files}")
            flow = z["flow"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({first_line(e)})") from None
    if flow.ndim != 4 or not np.issubdtype(flow.dtype, np.number):
        raise DataError(f"{path}: expected 'flow' as a numeric [steps, H, W, C] array, got {flow.dtype} {list(flow.shape)}")
    if not np.isfinite(flow).all():
        raise DataError(f"{path}: 'flow' has non-finite values")
    return np.ascontiguousarray(flow.transpose(0, 3, 1, 2), dtype=np.float32)


def load_flow_data(prefix: str | Path) -> FlowData:
    """Read ``<prefix>_train.npz``, ``_val.npz`` and ``_test.npz`` (e.g. ``.../NYBike_flow``)."""
    prefix = str(prefix)
    splits: dict[str, FlowSeries] = {}
    step = 0
    for name in SPLITS:
        path = Path(f"{prefix}_{name}.npz")
        if not path.is_file():
            raise DataError(f"data file {str(path)!r} not found (expected {prefix}_train.npz, _val.npz, _test.npz)")
        flow = _read_flow(path)
        splits[name] = FlowSeries(flow, step)
        step += flow.shape[0]
    shapes = {n: s.flow.shape[1:] for n, s in splits.items()}
    if len(set(shapes.values())) != 1:
        raise DataError(f"{prefix}: splits disagree on [C, H, W]: {shapes}")
    return FlowData(splits, prefix)


class Windows:
    """Sliding windows over one split: window ``i`` has history steps ``[i, i+T)`` and targets
    ``[i+T, i+T+T_out)`` of the split. Arrays are gathered lazily, batch by batch."""

    def __init__(self, series: FlowSeries, history: int, horizon: int, steps_per_day: int,
                 calendar: Optional[dict] = None, start_dow: Optional[int] = None):
        self.series, self.history, self.horizon = series, history, horizon
        self.steps_per_day = steps_per_day
        self.count = series.steps - history - horizon + 1
        if self.count < 1:
            raise DataError(f"split of {series.steps} steps is too short for history {history} + horizon {horizon}")
        self.tod = self.dow = None
        if steps_per_day > 0:
            # time features of every step of the split, from its absolute time (start + k * interval) by the
            # calendar's one function; no calendar: the step-index features (UTC, step 0 a Monday 00:00 or
            # the old `start_dow`)
            calendar = calendar if calendar is not None else calendar_from_start_dow(start_dow or 0)
            grid = grid_for(steps_per_day, calendar)
            self.tod, self.dow = grid.features(range(series.start_step, series.start_step + series.steps))

    def __len__(self) -> int:
        return self.count

    def batch(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
        """``x [b, T, C, H, W]``, ``y [b, T_out, C, H, W]``, ``tod``/``dow [b, T]`` (None without time)."""
        index = np.asarray(index, dtype=np.int64)
        hist = index[:, None] + np.arange(self.history)
        fut = index[:, None] + self.history + np.arange(self.horizon)
        x, y = self.series.flow[hist], self.series.flow[fut]
        if self.steps_per_day <= 0:
            return x, y, None, None
        return x, y, self.tod[hist], self.dow[hist]

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]]:
        for s in range(0, self.count, batch_size):
            yield self.batch(np.arange(s, min(s + batch_size, self.count)))


def windows_for(model, data: FlowData, split: str) -> Windows:
    """The sliding windows of ``split`` that ``model`` (an ``STVFM`` or its config) reads, checked against the
    data's grid, with time features from the model's calendar."""
    c: STVFMConfig = model if isinstance(model, STVFMConfig) else model.config
    if data.channels != c.channels or data.grid != (c.height, c.width):
        raise DataError(f"{data.source}: data has C={data.channels}, grid {data.grid[0]}x{data.grid[1]}; "
                        f"the model expects C={c.channels}, grid {c.height}x{c.width}")
    return Windows(data.splits[split], c.history, c.horizon, c.steps_per_day, c.calendar)


def synthetic_flow(steps: int = 48 * 35, height: int = 14, width: int = 8, channels: int = 2,
                   steps_per_day: int = 48, seed: int = 0) -> np.ndarray:
    """A periodic city-flow grid ``[steps, H, W, C]`` for the offline demo: each cell has its own
    scale, a morning/evening daily profile, a weekday/weekend pattern, and Poisson counts."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    day_phase = 2 * np.pi * (t % steps_per_day) / steps_per_day
    weekday = ((t // steps_per_day) % 7) < 5
    morning = np.exp(-0.5 * ((day_phase - 2 * np.pi * 8.5 / 24) / 0.35) ** 2)
    evening = np.exp(-0.5 * ((day_phase - 2 * np.pi * 18 / 24) / 0.45) ** 2)
    midday = 0.4 * np.exp(-0.5 * ((day_phase - 2 * np.pi * 13 / 24) / 0.9) ** 2)
    scale = rng.gamma(1.2, 12.0, size=(height, width, channels)) * (rng.random((height, width, 1)) > 0.3)
    mix = rng.random((height, width, channels))
    profile = np.where(weekday, 1.0, 0.55)[:, None, None, None] * (
        mix * morning[:, None, None, None] + (1 - mix) * evening[:, None, None, None] + midday[:, None, None, None])
    rate = scale[None] * (0.05 + profile)
    return rng.poisson(rate).astype(np.float64)


def flow_data_from_array(flow: np.ndarray, fractions: tuple[float, float] = (0.7, 0.1), source: str = "array") -> FlowData:
    """Split one ``[steps, H, W, C]`` array into consecutive train/val/test splits."""
    f = np.ascontiguousarray(np.asarray(flow).transpose(0, 3, 1, 2), dtype=np.float32)
    n = f.shape[0]
    a, b = int(n * fractions[0]), int(n * (fractions[0] + fractions[1]))
    parts = {"train": f[:a], "val": f[a:b], "test": f[b:]}
    starts = {"train": 0, "val": a, "test": b}
    return FlowData({k: FlowSeries(v, starts[k]) for k, v in parts.items()}, source)

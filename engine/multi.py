"""Many models on one frozen backbone: the :class:`Parts` a multi-model backend opens, and the schedule
that serves a list of requests with one backbone call per group of equal sequence length.

Every sequence goes through the backbone on its own (attention within a sequence, LayerNorm per
token), so requests of different models whose sequences have the same length ``P + n`` can share one
backbone call: their tokens are concatenated along the batch axis and split again afterwards. Lengths
that differ are never padded: they run in separate calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from stvfm_engine.engine.runtime import Runner, to_torch

Array = Any  # np.ndarray | torch.Tensor


class Parts:
    """What a multi-model backend opens: per model ``pre``/``post`` around one shared ``backbone``.

    ``pre(name, x, tod, dow) -> tokens [2B, L, D]`` and ``backbone(tokens) -> h`` return torch tensors
    on ``device``; ``post(name, h) -> y`` returns numpy float32 ``[B, T_out, C, H, W]``. Inputs are
    validated (:mod:`stvfm_engine.engine.inputs`). ``thread_safe`` False: the Engine serialises calls.
    """

    thread_safe = True
    device = torch.device("cpu")

    def pre(self, name: str, x: Array, tod: Optional[Array], dow: Optional[Array]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def backbone(self, tokens: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def post(self, name: str, h: torch.Tensor) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class Request:
    """One validated request: ``model``'s inputs, its batch and the backbone sequence length it needs."""

    model: str
    x: Array
    tod: Optional[Array]
    dow: Optional[Array]
    length: int

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])


def schedule(requests: Sequence[Request], max_batch: int) -> list[list[int]]:
    """Request indices per backbone call: grouped by sequence length (in order of first appearance), each
    group cut into consecutive calls of at most ``max_batch`` samples (a request is never split)."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.length, []).append(i)
    calls: list[list[int]] = []
    for members in groups.values():
        call, size = [], 0
        for i in members:
            if call and size + requests[i].batch > max_batch:
                calls.append(call)
                call, size = [], 0
            call.append(i)
            size += requests[i].batch
        calls.append(call)
    return calls


def concat(arrays: Sequence[Optional[Array]], device: torch.device) -> Optional[Array]:
    """One array along axis 0 (numpy if all are numpy, else torch on ``device``); one array is passed as it is."""
    if arrays[0] is None:
        return None
    if len(arrays) == 1:
        return arrays[0]
    if all(isinstance(a, np.ndarray) for a in arrays):
        return np.concatenate(arrays)
    return torch.cat([to_torch(a, device) for a in arrays])


def _by_model(requests: Sequence[Request]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.model, []).append(i)
    return groups


def _inputs(requests: Sequence[Request], device: torch.device) -> tuple:
    return tuple(concat([getattr(r, k) for r in requests], device) for k in ("x", "tod", "dow"))


def _split(y: np.ndarray, requests: Sequence[Request]) -> list[np.ndarray]:
    if len(requests) == 1:
        return [y]
    ends = np.cumsum([r.batch for r in requests])[:-1]
    return list(np.split(y, ends))


def run_parts(parts: Parts, requests: Sequence[Request]) -> list[np.ndarray]:
    """Forecasts for ``requests`` (one sequence length, at most max_batch samples) with ONE backbone call:
    per model one ``pre`` over its requests, the tokens of all models concatenated, then per model ``post``."""
    groups = _by_model(requests)
    tokens = [parts.pre(name, *_inputs([requests[i] for i in idx], parts.device)) for name, idx in groups.items()]
    h = parts.backbone(tokens[0] if len(tokens) == 1 else torch.cat(tokens))
    out: list[Optional[np.ndarray]] = [None] * len(requests)
    start = 0
    for (name, idx), t in zip(groups.items(), tokens):
        rows = int(t.shape[0])
        ys = _split(parts.post(name, h[start:start + rows]), [requests[i] for i in idx])
        start += rows
        for i, y in zip(idx, ys):
            out[i] = y
    return out


def run_whole(runner: Runner, requests: Sequence[Request], device: torch.device) -> list[np.ndarray]:
    """Forecasts for ``requests`` of one model with one call of its monolithic runner."""
    return _split(runner(*_inputs(requests, device)), requests)

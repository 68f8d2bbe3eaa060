"""Input validation of :meth:`Engine.predict`: one cheap pass before any backend runs.

Every failure is a one-line :class:`~stvfm_engine.errors.InputError` naming what was expected and
what was found. Accepted: numpy arrays or torch tensors (any float dtype for ``x``, any integer dtype
for ``tod``/``dow``); the result keeps the kind of ``x`` (numpy, or torch on ``x``'s device), with
``x`` float32 and ``tod``/``dow`` int64.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from stvfm_engine.errors import InputError
from stvfm_engine.model.config import STVFMConfig

Array = Any  # np.ndarray | torch.Tensor


def _shape(name: str, a: Array, expected: list) -> None:
    """``expected[0]`` is the batch (a label or a number); the other axes must match exactly."""
    if a.ndim != len(expected) or [int(s) for s in a.shape[1:]] != expected[1:]:
        want = ", ".join(str(s) for s in expected)
        raise InputError(f"expected {name} [{want}], got {list(a.shape)}")


def _as_array(name: str, a: Any) -> Array:
    if isinstance(a, (np.ndarray, torch.Tensor)):
        return a
    try:
        return np.asarray(a)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name} must be a numpy array or torch tensor, got {type(a).__name__} ({e})") from None


def _check_x(x: Array) -> Array:
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise InputError(f"expected x float32 (any float dtype is converted), got {str(x.dtype).replace('torch.', '')}")
        x = x.detach().to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise InputError(f"x holds {bad} non-finite values (NaN or inf); expected finite float32")
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"expected x float32 (any float dtype is converted), got {x.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow to inf is reported just below
        x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise InputError(f"x holds {bad} non-finite values (NaN or inf); expected finite float32")
    return x


def _check_index(name: str, a: Array, high: int, like: Array) -> Array:
    if isinstance(a, torch.Tensor):
        if a.is_floating_point() or a.is_complex() or a.dtype == torch.bool:
            raise InputError(f"expected {name} int64, got {str(a.dtype).replace('torch.', '')}")
        lo, hi = int(a.min()), int(a.max())
    else:
        if not np.issubdtype(a.dtype, np.integer):
            raise InputError(f"expected {name} int64, got {a.dtype}")
        lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= high:
        raise InputError(f"{name} must be in [0, {high}), got values in [{lo}, {hi}]")
    if isinstance(like, torch.Tensor):
        return torch.as_tensor(a).to(device=like.device, dtype=torch.int64)
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a
    return np.ascontiguousarray(a, dtype=np.int64)


def validate_inputs(config: STVFMConfig, max_batch: int, x: Any, tod: Any = None,
                    dow: Any = None) -> tuple[Array, Optional[Array], Optional[Array]]:
    """Check ``x``/``tod``/``dow`` against the engine's config and max batch; return them converted."""
    c = config
    x = _as_array("x", x)
    _shape("x", x, ["B", c.history, c.channels, c.height, c.width])
    B = int(x.shape[0])
    if B < 1 or B > max_batch:
        raise InputError(f"batch {B} is outside this engine's range [1, {max_batch}] (rebuild with --max-batch to serve larger batches)")
    x = _check_x(x)
    if not c.uses_time:
        if tod is not None or dow is not None:
            raise InputError("this engine's model takes no time inputs (steps_per_day=0): do not pass tod/dow")
        return x, None, None
    if tod is None or dow is None:
        missing = " and ".join(n for n, v in (("tod", tod), ("dow", dow)) if v is None)
        raise InputError(f"this engine's model uses time inputs (steps_per_day={c.steps_per_day}): "
                         f"missing {missing}, int64 [{B}, {c.history}]")
    out = []
    for name, a, high in (("tod", tod, c.steps_per_day), ("dow", dow, 7)):
        a = _as_array(name, a)
        _shape(name, a, [B, c.history])
        if int(a.shape[0]) != B:
            raise InputError(f"expected {name} [{B}, {c.history}] (x's batch is {B}), got {list(a.shape)}")
        out.append(_check_index(name, a, high, x))
    return x, out[0], out[1]

"""Backend, precision and device resolution for ``Engine.load``: one pure function over the manifest.

What this machine can run is passed in (``usable``), so the rules are tested as a table without the
machine (tests/test_resolve.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from stvfm_engine.engine.precision import get_precision
from stvfm_engine.engine.registry import PREFERENCE, get_backend
from stvfm_engine.errors import BackendError

# (backend, device type) -> None when it can run there (library present, versions match), else why not
Usable = Callable[[str, str], Optional[str]]


@dataclass(frozen=True)
class Choice:
    backend: str
    precision: str
    device: str


def normalize_device(device: Optional[str]) -> Optional[str]:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` (None stays None); anything else is a one-line error."""
    if device is None:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise BackendError(f"unknown device {device!r}; expected cpu, cuda or cuda:N")
    return str(d)


def _kind(device: str) -> str:
    return torch.device(device).type


def resolve(manifest: dict[str, Any], backend: Optional[str], precision: Optional[str], device: Optional[str],
            usable: Usable, cuda: bool, directory: str = "DIR") -> Choice:
    """The backend, precision and device ``Engine.load`` opens.

    ``backend`` None: the manifest's ``default`` where this machine can run it, else the first built
    artifact of :data:`~stvfm_engine.engine.registry.PREFERENCE` that can run here (and matches
    ``device``/``precision`` if given), else ``eager``. An artifact backend runs at its built precision
    on its built device (a portable artifact, ``model.onnx``, on any device, falling back to the CPU);
    a weights backend at ``precision`` or its default for the device. ``cuda``: a CUDA device is usable.
    """
    if precision is not None:
        get_precision(precision)
    device = normalize_device(device)
    built = manifest["backends"]
    if backend is None:
        backend, kind = _choose(manifest, precision, device, usable)
        device = device or kind
    spec = get_backend(backend)
    if spec.artifact:
        entry = built.get(backend)
        if entry is None:
            raise BackendError(f"{directory} holds no {backend} artifact; built: {sorted(built)} "
                               "(the weights backends run from the weights)")
        if precision is not None and precision != entry["precision"]:
            raise BackendError(f"{directory}: the {backend} artifact is {entry['precision']}, not {precision} "
                               f"(rebuild with --precision {precision})")
        built_kind = _kind(entry["device"])
        if device is None:
            device = "cpu" if spec.portable and usable(backend, built_kind) is not None else entry["device"]
        if not spec.portable and _kind(device) != built_kind:
            raise BackendError(f"{directory}: the {backend} artifact was built for {built_kind}, not {device} "
                               f"(rebuild with --device {_kind(device)})")
        return Choice(backend, entry["precision"], device)
    device = device or ("cuda" if cuda else "cpu")
    precision = spec.precision_for(device, precision)
    if precision not in spec.precisions:
        raise BackendError(f"the {backend} backend runs {', '.join(spec.precisions)}, not {precision}")
    return Choice(backend, precision, device)


def _choose(manifest: dict[str, Any], precision: Optional[str], device: Optional[str],
            usable: Usable) -> tuple[str, Optional[str]]:
    built = manifest["backends"]
    default = manifest.get("default")
    order = list(PREFERENCE)
    if isinstance(default, dict) and default.get("backend") in built:
        entry = built[default["backend"]]
        order.insert(0, (default["backend"], _kind(entry["device"])))
    for name, kind in order:
        entry = built.get(name)
        if entry is None:
            continue
        spec = get_backend(name)
        if not spec.portable and _kind(entry["device"]) != kind:
            continue
        if (device and _kind(device) != kind) or (precision and entry["precision"] != precision):
            continue
        if usable(name, kind) is None:
            return name, kind
    return "eager", None

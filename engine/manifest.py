"""The engine directory's ``manifest.json``: what was built, from what, with which versions, and how
well each artifact matched the reference. Readers validate it and check file hashes against it.

Layout (``format_version`` 1)::

    {"format_version": 1, "stvfm_engine_version": "...", "created_utc": "...",
     "checkpoint": {"file": "bike.pt", "sha256": "...", "bytes": N},
     "config": {...}, "normalization": {"mean": [...], "std": [...]},
     "precision": "fp32", "device": "cpu", "max_batch": 64,
     "io": {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", T, C, H, W]}, ...],
            "outputs": [...], "dynamic_axes": {"batch": {"axis": 0, "min": 1, "max": 64}}},
     "versions": {"torch": "...", "onnxruntime": "...", ...},
     "files": {"model.onnx": {"sha256": "...", "bytes": N}, ...},        # every file but the manifest
     "backends": {"onnxruntime": {"file": "model.onnx", "precision": "fp32", "device": "cpu",
                                  "parity": {...measured...}, "build_seconds": 12.3}, ...}}

A multi-model directory (``format_version`` 2: several models on one frozen backbone; readers of
format 1 refuse it by its version) stores the backbone once and each model's own parts apart::

    {"format_version": 2, ..., "precision", "device", "max_batch", "versions", "files",
     "backbone": {"timm": "vit_small_patch16_224.dino", "layers": 12, "dim": 384, "prefix_tokens": 1,
                  "sha256": "<content hash of the backbone tensors>", "weights": "backbone.safetensors"},
     "backends": {"onnxruntime": {"file": "backbone.onnx", "precision", "device", "cache": "hit", ...}},
     "models": {"bike": {"checkpoint": {...}, "config": {...}, "normalization": {...}, "io": {...},
                         "weights": "models/bike/weights.safetensors", "sequence_length": 113,
                         "backends": {"onnxruntime": {"pre": "models/bike/pre.onnx",
                                                      "post": "models/bike/post.onnx", "parity": {...}}}}}}
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
from pathlib import Path
from typing import Any, Iterable

from stvfm_engine.atomic import atomic_path
from stvfm_engine.engine.registry import distributions
from stvfm_engine.errors import EngineDirError
from stvfm_engine.model.checkpoint import check_format

FORMAT_VERSION = 1  # one model: monolithic artifacts
MULTI_FORMAT_VERSION = 2  # several models around one shared backbone
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.safetensors"
BACKBONE_WEIGHTS_NAME = "backbone.safetensors"
REQUIRED_KEYS = ("config", "normalization", "max_batch", "io", "files", "backends")
MULTI_REQUIRED_KEYS = ("backbone", "models", "max_batch", "files", "backends")
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a folder name, a URL path segment, a Triton model name


def artifact_files(files: Iterable[str], names: Iterable[str]) -> list[str]:
    """The files among ``files`` that belong to the artifacts ``names``: each name itself and its
    companions ``NAME.*`` (``model.onnx.data``, ``model.plan.timing.cache``): the one rule for which files
    travel with an artifact."""
    names = list(names)
    return [f for f in files if any(f == n or f.startswith(n + ".") for n in names)]


def is_multi(manifest: dict[str, Any]) -> bool:
    """A multi-model manifest (several models on one backbone), as opposed to a one-model one."""
    return manifest.get("format_version") == MULTI_FORMAT_VERSION


def model_file(name: str, file: str) -> str:
    """Where a multi-model directory keeps ``file`` of model ``name``."""
    return f"models/{name}/{file}"


def check_model_name(name: Any) -> str:
    """A model name that is safe as a folder name and in a URL; anything else is a one-line error."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name) or len(name) > 128:
        raise EngineDirError(f"model name {name!r} is not usable: expected letters, digits, '_', '.', '-' "
                             "(not starting with '.' or '-', at most 128 characters)")
    return name


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def file_table(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``directory`` except the manifest, keyed by relative path."""
    return {p.relative_to(directory).as_posix(): file_record(p)
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in distributions():  # absent ones are recorded as null
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``DIR/manifest.json``; every failure is a one-line :class:`EngineDirError`."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise EngineDirError(f"engine directory {str(directory)!r} not found (build one with 'stvfm-engine build CKPT -o DIR')")
    if not path.is_file():
        raise EngineDirError(f"{directory}: not an engine directory (no {MANIFEST_NAME}; build one with 'stvfm-engine build CKPT -o DIR')")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineDirError(f"{path}: unreadable manifest ({e})") from None
    check_format(manifest, path, "manifest", {FORMAT_VERSION: REQUIRED_KEYS, MULTI_FORMAT_VERSION: MULTI_REQUIRED_KEYS},
                 (), EngineDirError)
    if problem := _structure_problem(manifest):
        raise EngineDirError(f"{path}: malformed manifest: {problem}")
    return manifest


_SHA256 = re.compile(r"[0-9a-f]{64}")
_DEVICE = re.compile(r"(cpu|cuda)(:[0-9]+)?")


def _structure_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with the types of a manifest's fields (None if nothing): readers index them freely."""
    objects = ("backbone", "models", "files", "backends") if is_multi(m) else ("config", "normalization", "io", "files", "backends")
    if not all(isinstance(m[k], dict) for k in objects):
        return f"expected objects for {', '.join(objects[:-1])} and {objects[-1]}"
    mb = m["max_batch"]
    if not isinstance(mb, int) or isinstance(mb, bool) or mb < 1:
        return f"expected max_batch an integer >= 1, found {mb!r}"
    if not isinstance(m.get("versions", {}), dict):
        return "expected versions an object"
    for name, rec in m["files"].items():
        parts = name.split("/")
        if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
            return f"file name {name!r} is not a plain relative path inside the directory"
        if (not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str) or not _SHA256.fullmatch(rec["sha256"])
                or not isinstance(rec.get("bytes"), int)):
            return f"expected files[{name!r}] as {{sha256: 64 hex digits, bytes: int}}, found {rec!r:.80}"
    for name, entry in m["backends"].items():
        if (not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("file", "precision", "device"))
                or not _DEVICE.fullmatch(entry["device"])):
            return f"expected backends[{name!r}] with file, precision and device (cpu or cuda[:N]), found {entry!r:.80}"
    return _models_problem(m) if is_multi(m) else None


def _models_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with a multi-model manifest's ``backbone`` and ``models`` (None if nothing).

    Every file they name must be listed in ``files``, so that it is hash-checked before it is read.
    """
    listed = m["files"]
    refs = [("backbone.weights", m["backbone"].get("weights"))]
    refs += [(f"backends[{b!r}].file", e["file"]) for b, e in m["backends"].items()]
    if not m["models"]:
        return "expected models to name at least one model"
    for name, entry in m["models"].items():
        if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
            return f"model name {name!r} is not a plain name (letters, digits, '_', '.', '-')"
        if (not isinstance(entry, dict) or not all(isinstance(entry.get(k), dict)
                                                   for k in ("config", "normalization", "io", "backends"))
                or not isinstance(entry.get("sequence_length"), int)):
            return (f"expected models[{name!r}] with config, normalization, io, backends (objects), weights and "
                    f"sequence_length, found {entry!r:.80}")
        refs.append((f"models[{name!r}].weights", entry.get("weights")))
        for b, parts in entry["backends"].items():
            if not isinstance(parts, dict):
                return f"expected models[{name!r}].backends[{b!r}] an object with pre and post, found {parts!r:.80}"
            refs += [(f"models[{name!r}].backends[{b!r}].{k}", parts.get(k)) for k in ("pre", "post")]
    for where, file in refs:
        if not isinstance(file, str) or file not in listed:
            return f"{where} is {file!r}, not a file the manifest lists with its sha256"
    return None


def verify_files(directory: str | os.PathLike, manifest: dict[str, Any], names: Iterable[str] | None = None) -> None:
    """Check the sha256 of ``names`` (default: every file the manifest lists) against the manifest.

    A file that belongs to an artifact, such as ONNX external data (``model.onnx.data``), is checked
    with it: ``names`` are matched as prefixes of the listed files.
    """
    directory = Path(directory)
    table = manifest["files"]
    wanted = list(table) if names is None else artifact_files(table, names)
    for name in names or ():
        if name not in table:
            raise EngineDirError(f"{directory}: manifest lists no file {name!r}")
    for name in wanted:
        path = directory / name
        if not path.is_file():
            raise EngineDirError(f"{directory}: {name} is missing (the manifest lists it)")
        if sha256_file(path) != table[name]["sha256"]:
            raise EngineDirError(f"{directory}: {name} does not match its sha256 in the manifest (changed after the build)")

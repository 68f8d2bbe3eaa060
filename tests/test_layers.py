"""The import layers (model <- kernels <- engine <- export <- bench <- top package) and the one backend
registry, checked from the source with ``ast`` (nothing is imported or run)."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("model", "kernels", "engine", "export", "bench")  # lowest first; the top package is above them all
GROUND = {"errors", "atomic", "version", "wire"}  # modules of the top package that import no layer


def _packages() -> dict[str, Path]:
    """Dotted package -> folder, from pyproject's package-dir mapping."""
    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {pkg: REPO / folder for pkg, folder in mapping.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in GROUND:
        return -1
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def _modules():
    """(dotted module name, path) of every source module of the package."""
    for pkg, folder in _packages().items():  # subpackages (engine/backends, ...) sit in their parent's folder
        for path in folder.rglob("*.py"):
            if "suite" in path.parts:  # bench/suite: pytest-benchmark files, not part of the package
                continue
            rel = path.relative_to(folder).with_suffix("").parts
            yield ".".join((pkg,) + tuple(p for p in rel if p != "__init__")), path


def _imports(module: str, path: Path):
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            yield target
            yield from (f"{target}.{a.name}" for a in node.names)


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for module, path in _modules():
        mine = _layer(module)
        for target in _imports(module, path):
            if target.startswith("stvfm_engine") and _layer(target) > mine >= 0:
                upward.append(f"{path.relative_to(REPO)}: {module} imports {target}")
            if mine == -1 and target.startswith("stvfm_engine.") and _layer(target) != -1:
                upward.append(f"{path.relative_to(REPO)}: ground-floor {module} imports {target}")
    assert not upward, "\n".join(sorted(set(upward)))


def test_backend_names_are_listed_together_only_in_the_registry():
    from stvfm_engine.engine.registry import BACKENDS

    names = set(BACKENDS)
    listing = []
    for module, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                elts = node.keys if isinstance(node, ast.Dict) else node.elts
                found = {e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                if len(found & names) >= 3:
                    listing.append(module)
    assert set(listing) <= {"stvfm_engine.engine.registry"}, listing


def _calls(name: str) -> list[str]:
    """Where product code calls ``name(...)`` (a plain or attribute call), as ``path:line``."""
    found = []
    for _, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                if (isinstance(f, ast.Name) and f.id == name) or (isinstance(f, ast.Attribute) and f.attr == name):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_one_way_to_open_check_and_schedule():
    """engine/session.py is the one place that opens a model (OpenRequest / MultiOpenRequest built once each)
    and checks inputs (validate_inputs called once); servers never batch beside the session."""
    for name in ("OpenRequest", "MultiOpenRequest", "validate_inputs"):
        calls = _calls(name)
        assert len(calls) == 1 and calls[0].startswith("engine/session.py"), f"{name}: {calls}"
    names = {n.id if isinstance(n, ast.Name) else n.name for _, path in _modules()
             for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Name, ast.FunctionDef, ast.ClassDef))}
    assert not names & {"MixedBatchRunner", "BatchRunner", "_chunks"}


def test_backend_modules_import_only_the_engine_core():
    """A backend module never imports another backend module (shared helpers live in the engine core)."""
    prefix = "stvfm_engine.engine.backends."
    crossing = []
    for module, path in _modules():
        if module.startswith(prefix):
            own = module[len(prefix):].split(".")[0]
            crossing += [f"{path.relative_to(REPO)} imports {t}" for t in _imports(module, path)
                         if t.startswith(prefix) and t[len(prefix):].split(".")[0] != own]
    assert not crossing, "\n".join(crossing)

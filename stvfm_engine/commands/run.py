"""CLI command ``run``: an npz in, an npz out, through an engine."""
from __future__ import annotations

import argparse
import json
import time
import zipfile

from stvfm_engine.commands.common import positive_int
from stvfm_engine.engine.registry import names
from stvfm_engine.errors import InputError


def read_npz(path: str) -> dict:
    """The arrays of an ``.npz`` (``allow_pickle=False``: data only)."""
    import numpy as np

    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise InputError(f"{path}: expected an .npz archive with arrays x[, tod, dow], found a single .npy array")
        with data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"input {path!r} not found") from None
    except InputError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a readable .npz of plain arrays ({e})") from None


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from stvfm_engine.atomic import atomic_path
    from stvfm_engine.engine import Engine

    arrays = read_npz(args.input)
    unknown = sorted(set(arrays) - {"x", "tod", "dow"})
    if "x" not in arrays or unknown:
        raise InputError(f"{args.input}: expected arrays x (and tod, dow), found {sorted(arrays)}")
    engine = Engine.load(args.engine, backend=args.backend, precision=args.precision, device=args.device,
                         threads=args.threads)
    t0 = time.perf_counter()
    y = engine.predict(arrays["x"], arrays.get("tod"), arrays.get("dow"), model=args.model)
    seconds = time.perf_counter() - t0
    with atomic_path(args.output, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, y=y)
    print(json.dumps({"output": args.output, "backend": engine.backend, "precision": engine.precision,
                      "device": engine.device, **({"model": args.model} if args.model else {}),
                      "shape": list(y.shape), "seconds": round(seconds, 6)}))
    return 0


def register(sub) -> None:
    p = sub.add_parser("run", help="run an engine on an .npz of inputs (x, tod, dow) and write y",
                       description="Run DIR on IN.npz (arrays x [B, T, C, H, W], and tod, dow [B, T] for a model\n"
                                   "with time inputs) and write OUT.npz with y [B, T_out, C, H, W] float32.\n"
                                   "The default backend is the fastest the manifest and this machine allow.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine", metavar="DIR", help="engine directory written by 'stvfm-engine build'")
    p.add_argument("--input", required=True, metavar="IN.npz")
    p.add_argument("--output", required=True, metavar="OUT.npz")
    p.add_argument("--model", metavar="NAME", help="which model of a multi-model engine (see 'stvfm-engine inspect DIR')")
    p.add_argument("--backend", choices=names(), help="default: the fastest available")
    p.add_argument("--precision", help="must match the artifact's (eager/triton: any of fp32, bf16, fp16)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: the artifact's)")
    p.add_argument("--threads", type=positive_int, help="ONNX Runtime intra-op threads")
    p.set_defaults(func=cmd_run)

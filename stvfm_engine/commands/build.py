"""CLI commands ``build``, ``inspect`` and ``env``."""
from __future__ import annotations

import argparse
import json
import sys

from stvfm_engine.commands.common import positive_int
from stvfm_engine.engine.precision import PRECISIONS, tolerances_text
from stvfm_engine.engine.registry import BACKENDS, DEFAULT_MAX_BATCH, names
from stvfm_engine.export.gates import DEFAULT_MAX_MAE_LOSS

FORMATTER = argparse.RawDescriptionHelpFormatter


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def cmd_build(args: argparse.Namespace) -> int:
    from stvfm_engine.engine.manifest import read_manifest
    from stvfm_engine.errors import BuildError
    from stvfm_engine.export.build import build_engine
    from stvfm_engine.export.multi_build import build_multi_engine

    if args.max_mae_loss is not None and not args.calib_data:
        raise BuildError("--max-mae-loss sets the task gate of --calib-data: give --calib-data PREFIX too")
    if len(args.checkpoint) == 1:
        if args.names:
            raise BuildError("--names names the models of a multi-model engine: give two or more checkpoints")
        if args.cache_dir or args.no_cache:
            raise BuildError("--cache-dir/--no-cache: the build cache serves multi-model builds; a one-model build "
                             "builds every artifact afresh")
        out = build_engine(args.checkpoint[0], args.output, backends=args.backends, precision=args.precision,
                           device=args.device, max_batch=args.max_batch, progress=not args.quiet,
                           calib_data=args.calib_data, threads=args.threads,
                           max_mae_loss=DEFAULT_MAX_MAE_LOSS if args.max_mae_loss is None else args.max_mae_loss)
        manifest = read_manifest(out)
        _print_auto(manifest, args.quiet)
        print(json.dumps({"engine": str(out), "backends": {b: {"precision": e["precision"], "device": e["device"],
                                                              "max_rel_err": e["parity"]["max_rel_err"]}
                                                          for b, e in manifest["backends"].items()},
                          **{k: manifest[k] for k in ("default", "auto") if k in manifest},
                          "build_seconds": manifest["build_seconds"]}))
        return 0
    if args.calib_data:
        raise BuildError("--calib-data gates reduced precisions; multi-model engines are built at fp32 "
                         "(build a reduced-precision engine one model at a time)")
    out = build_multi_engine(args.checkpoint, args.output, names=args.names, backends=args.backends,
                             precision=args.precision, device=args.device, max_batch=args.max_batch,
                             progress=not args.quiet, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                             threads=args.threads)
    manifest = read_manifest(out)
    _print_auto(manifest, args.quiet)
    print(json.dumps({"engine": str(out),
                      "backends": {b: {"precision": e["precision"], "device": e["device"], "cache": e["cache"]}
                                   for b, e in manifest["backends"].items()},
                      "models": {n: {b: {"max_rel_err": e["parity"]["max_rel_err"], "cache": e["cache"]}
                                     for b, e in m["backends"].items()} for n, m in manifest["models"].items()},
                      **{k: manifest[k] for k in ("default", "auto") if k in manifest},
                      "build_seconds": manifest["build_seconds"]}))
    return 0


def _print_auto(manifest: dict, quiet: bool) -> None:
    """The ``--precision auto`` table, on stderr (stdout carries the JSON)."""
    if "auto" in manifest and not quiet:
        from stvfm_engine.export.auto import format_table

        print(format_table(manifest["auto"]), file=sys.stderr)


def cmd_inspect(args: argparse.Namespace) -> int:
    from stvfm_engine.engine.manifest import WEIGHTS_NAME, artifact_files, is_multi, read_manifest, verify_files

    manifest = read_manifest(args.engine)
    if args.verify:
        verify_files(args.engine, manifest)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    files = manifest["files"]
    if is_multi(manifest):
        bb, models = manifest["backbone"], manifest["models"]
        print(f"multi-model engine {args.engine}: {len(models)} models on one backbone {bb['timm']} (L={bb['layers']}, "
              f"D={bb['dim']}, sha256 {bb['sha256'][:16]}); max batch {manifest['max_batch']} per backbone call; "
              f"built {manifest['created_utc']} with torch {manifest['versions']['torch']}")
        rows = [("model", "T -> T_out", "C", "grid", "p", "steps/day", "sequence", "checkpoint", "max rel err")]
        for n, m in models.items():
            c = m["config"]
            errs = ", ".join(f"{b} {e['parity']['max_rel_err']:.2e}" for b, e in m["backends"].items()) or "-"
            rows.append((n, f"{c['history']} -> {c['horizon']}", str(c["channels"]), f"{c['height']}x{c['width']}",
                         str(c["patch"]), str(c["steps_per_day"]), str(m["sequence_length"]), m["checkpoint"]["file"],
                         errs))
        _print_table(rows)
        print()
        weights_file = bb["weights"]
    else:
        c = manifest["config"]
        print(f"engine {args.engine}: {c['backbone']} (L={c['backbone_layers']}), T={c['history']} -> {c['horizon']}, "
              f"C={c['channels']}, grid {c['height']}x{c['width']}, p={c['patch']}, steps_per_day={c['steps_per_day']}")
        print(f"max batch {manifest['max_batch']}; built {manifest['created_utc']} with torch "
              f"{manifest['versions']['torch']}; checkpoint {manifest['checkpoint']['file']} "
              f"(sha256 {manifest['checkpoint']['sha256'][:16]})")
        weights_file = WEIGHTS_NAME
    rows = [("backend", "file", "precision", "device", "max rel err", "tolerance", "size", "build s", "runs here")]
    notes = []
    for name, e in manifest["backends"].items():
        own = BACKENDS[name].files if name in BACKENDS else (e["file"],)
        size = sum(files[k]["bytes"] for k in artifact_files(files, own))
        why = BACKENDS[name].why_not_run(e["device"]) if name in BACKENDS else f"unknown backend {name!r}"
        err, tol = ((f"{e['parity']['max_rel_err']:.2e}", f"{e['parity']['tolerance']:g}") if "parity" in e
                    else ("per model", "-"))  # a multi-model engine's parity is per model (table above)
        rows.append((name, e["file"], e["precision"], e["device"], err, tol, _human_bytes(size),
                     f"{e['build_seconds']:.1f}" + (f" (cache {e['cache']})" if "cache" in e else ""),
                     "yes" if why is None else "no"))
        if why:
            notes.append(f"{name}: {why}")
    weights = _human_bytes(files.get(weights_file, {}).get("bytes", 0))
    for name in names(artifact=False, multi_model=is_multi(manifest)):
        spec = BACKENDS[name]
        why = spec.why_not_run("cpu")
        rows.append((name, weights_file, "fp32" if is_multi(manifest) else "/".join(spec.precisions),
                     "/".join(spec.devices), "-", "-", weights, "-", "yes" if why is None else "no"))
        if why:
            notes.append(f"{name}: {why}")
    _print_table(rows)
    for n in notes:
        print(n)
    if default := manifest.get("default"):
        print(f"default: {default['backend']} {default['precision']} (Engine.load(DIR) with no backend opens it)")
    if "auto" in manifest:
        from stvfm_engine.export.auto import format_table

        print(format_table(manifest["auto"]))
    if args.verify:
        print(f"all {len(files)} files match their sha256 in the manifest")
    return 0


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def _status_text(status) -> str:
    """``None`` -> yes; a reason -> ``no: reason``; ``{precision: reason}`` -> which precisions build."""
    if not isinstance(status, dict):
        return "yes" if status is None else f"no: {status}"
    ok = [p for p, why in status.items() if why is None]
    reasons = "; ".join(sorted({why for why in status.values() if why}))
    if not ok:
        return f"no: {reasons}"
    no = [p for p, why in status.items() if why]
    return ", ".join(ok) + (f" (not {', '.join(no)}: {reasons})" if no else "")


def cmd_env(args: argparse.Namespace) -> int:
    from stvfm_engine.export.env import environment

    report = environment()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    v, cuda = report["versions"], report["cuda"]
    print(", ".join(f"{k} {ver}" for k, ver in v.items() if ver) + "; not installed: "
          + (", ".join(k for k, ver in v.items() if not ver) or "none"))
    print("CUDA: " + (f"{cuda['device']} (sm {cuda['capability']})" if cuda["available"] else f"no ({cuda['why_not']})"))
    print(f"ONNX Runtime providers: {', '.join(report['onnxruntime_providers']) or 'none'}")
    print(f"C++ compiler: {report['compilers']['c++'] or 'none'}; cmake: {report['compilers']['cmake'] or 'none'}; "
          f"torch threads: {report['torch_threads']}")
    print(f"Triton kernels: cpu {_status_text(report['kernels']['cpu'])}; cuda {_status_text(report['kernels']['cuda'])}")
    for name, row in report["backends"].items():
        print(name)
        for d in ("cpu", "cuda"):
            build = _status_text(row[f"build_{d}"]) if f"build_{d}" in row else "no artifact (runs from the weights)"
            print(f"  build {d:<4} {build}")
        for d in ("cpu", "cuda"):
            print(f"  run   {d:<4} {_status_text(row[f'run_{d}'])}")
        if "note" in row:
            print(f"  note: {row['note']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "build", formatter_class=FORMATTER,
        help="build a parity-gated engine directory (ONNX Runtime / OpenVINO / AOTInductor / TensorRT) from a checkpoint",
        description="Build DIR from CKPT: manifest.json, weights.safetensors and one artifact per backend\n"
                    "(model.onnx, model.xml, model.pt2, model.plan). Every artifact must match the fp32 reference\n"
                    f"on fresh random inputs (relative error {tolerances_text()}) or the\n"
                    "build fails; with --calib-data every artifact must also keep the test MAE within\n"
                    "--max-mae-loss of the fp32 reference's (int8 calibrates on its train windows).\nDIR is replaced atomically, and a failed build leaves it as it was.\n\n"
                    "  stvfm-engine build tiny.pt -o tiny.engine\n"
                    "  stvfm-engine build bike.pt -o bike.engine --backends onnxruntime --max-batch 16\n"
                    "  stvfm-engine build city.pt -o city.engine --device cuda --precision bf16\n"
                    "  stvfm-engine build bike.pt -o bike.engine --precision auto --calib-data ../shared/data/nyc/NYBike_flow\n\n"
                    "Several checkpoints that share one frozen backbone (bit for bit) make one multi-model engine:\n"
                    "the backbone is stored and built once, each model's own parts (pre: normalise, flow, token\n"
                    "adapters; post: prompt coordination, head) apart, each model parity-gated against its own\n"
                    "reference; fp32 only (--precision auto: the fastest backend that serves many models becomes the\n"
                    "default). Artifacts are cached by content, so a rebuild after retraining one model\n"
                    "re-exports only that model's parts:\n"
                    "  stvfm-engine build bike.pt taxi.pt -o nyc.engine [--names bike,taxi]")
    p.add_argument("checkpoint", metavar="CKPT", nargs="+",
                   help="checkpoint written by 'stvfm-engine init' or 'train'; several that share one backbone "
                        "make a multi-model engine")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="engine directory to (re)place")
    p.add_argument("--names", metavar="LIST", help="multi-model: comma-separated model names, one per checkpoint "
                                                   "(default: the checkpoints' file stems)")
    p.add_argument("--cache-dir", metavar="DIR", help="multi-model builds: cache of backbone and parts artifacts "
                                                      "(default $XDG_CACHE_HOME/stvfm-engine or ~/.cache/stvfm-engine)")
    p.add_argument("--no-cache", action="store_true", help="multi-model builds: build every artifact, use no cache")
    p.add_argument("--backends", metavar="LIST",
                   help=f"comma-separated subset of {','.join(names(artifact=True))} (default: all this machine can build)")
    p.add_argument("--precision", default="fp32", choices=[*sorted(PRECISIONS), "auto"],
                   help="compute precision (default fp32); auto: build every CPU candidate this machine can "
                        "(fp32, bf16, int8 per backend), keep those that pass their gates, time them interleaved "
                        "and keep the fastest of each backend, the fastest of all as the default")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="intra-op threads of the sessions that gate the artifacts and, with --precision auto, "
                        "time the candidates (default: torch's)")
    p.add_argument("--calib-data", metavar="PREFIX",
                   help="gate every artifact on the test MAE of PREFIX_{train,val,test}.npz (refused beyond "
                        "--max-mae-loss vs the fp32 reference); int8 calibrates on its train windows")
    p.add_argument("--max-mae-loss", type=float, metavar="F",
                   help=f"with --calib-data: allowed relative test-MAE loss vs the fp32 reference "
                        f"(default {DEFAULT_MAX_MAE_LOSS:g})")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--max-batch", type=positive_int, default=DEFAULT_MAX_BATCH, metavar="N",
                   help=f"every artifact accepts batches 1..N (default {DEFAULT_MAX_BATCH})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("inspect", help="show an engine directory's backends, precisions, parity and sizes",
                       description="Show what an engine directory holds, as its manifest records it.")
    p.add_argument("engine", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--verify", action="store_true", help="check every file's sha256 against the manifest")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("env", help="what this machine can build and run, and why not",
                       description="Report versions, devices, ONNX Runtime providers, compilers, and for each\n"
                                   "backend whether it builds / runs on cpu and cuda here (and why not).",
                       formatter_class=FORMATTER)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_env)

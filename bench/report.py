"""What a result file records besides the timings (device, versions, git sha, date, command), the
JSON writer and the readable stdout table."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from stvfm_engine.atomic import atomic_path
from stvfm_engine.engine.manifest import library_versions
from stvfm_engine.engine.runtime import cpu_flags

RESULT_KEYS = ("backend", "batch", "precision", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput",
               "peak_mem_mb", "speedup_vs_eager")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_family_model() -> Optional[str]:
    """``family/model`` of /proc/cpuinfo (tells apart hosts whose model name is the same, e.g. "AMD EPYC":
    25/1 is a Zen 3 without AVX-512, 25/17 a Zen 4 with avx512_bf16/vnni); None where unknown."""
    try:
        info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in
                Path("/proc/cpuinfo").read_text().splitlines()[:30] if ":" in line)}
        return f"{info['cpu family']}/{info['model']}"
    except (OSError, KeyError):
        return None


def device_info(device: str = "cpu") -> dict:
    """The machine a result was measured on: CPU model, cores and ISA extensions; the GPU if used."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512_bf16", "avx512_vnni", "amx", "avx2")))
    info = {"kind": "cpu", "name": cpu_model(), "cpu": cpu_model(), "cores": cores, "cpu_flags": flags,
            "cpu_family_model": cpu_family_model(),
            "platform": platform.platform(),
            # other work on a shared machine distorts timings: record how busy it was
            "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    if device.startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(kind="cuda", name=props.name, memory_gb=round(props.total_memory / 2 ** 30, 1),
                    cuda=torch.version.cuda, driver=_nvidia_driver())
    return info


def _nvidia_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_sha() -> Optional[str]:
    """The commit of this source tree (``+dirty`` when it has uncommitted changes); None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def header(device: str = "cpu", command: Optional[Sequence[str]] = None) -> dict:
    return {"device": device_info(device), "versions": library_versions(), "git_sha": git_sha(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(command if command is not None else ["stvfm-engine", *sys.argv[1:]])}


def write_json(report: dict, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2) + "\n")
    return Path(path)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(report: dict) -> str:
    """Latency table (one row per backend and batch), then the stage breakdown if any."""
    lines = [f"device: {report['device']['name']} ({report['device']['cores']} cores), "
             f"threads {report.get('threads')}, {report.get('schedule', {}).get('kept_per_variant', '?')} timed calls "
             f"per row, interleaved in blocks with a {report.get('schedule', {}).get('cooldown_s', 0):g} s pause before each"]
    head = f"{'backend':<12} {'prec':<5} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'mean ms':>9} " \
           f"{'samples/s':>10} {'peak MB':>8} {'vs eager':>8}"
    lines += [head, "-" * len(head)]
    for r in report["results"]:
        lines.append(f"{r['backend']:<12} {r['precision']:<5} {r['batch']:>5} {r['p50_ms']:>9.2f} {r['p90_ms']:>9.2f} "
                     f"{r['p99_ms']:>9.2f} {r['mean_ms']:>9.2f} {r['throughput']:>10.1f} "
                     f"{_fmt(r['peak_mem_mb'], '.0f'):>8} {_fmt(r['speedup_vs_eager'], '.2f'):>8}")
    if check := report.get("alone_check"):
        lines.append("")
        lines += [f"timed alone in a fresh process (same schedule): {r['backend']}/{r['precision']} batch {r['batch']} "
                  f"{r['alone_p50_ms']:.2f} ms; interleaved/alone {r['vs_alone']:.2f}"
                  for r in report["results"] if r.get("vs_alone") is not None]
        lines.append(f"harness check: interleaved p50 within {100 * check['tolerance']:.0f}% of alone for every row"
                     if check["ok"] else f"harness check FAILED (> {100 * check['tolerance']:.0f}%): "
                                         + "; ".join(check["outside"]) + " (a busy machine? check load_avg)")
    if report.get("stages"):
        lines += ["", f"{'runner':<8} {'batch':>5} {'stage':<16} {'ms':>9} {'share':>6}"]
        for s in report["stages"]:
            lines.append(f"{s['runner']:<8} {s['batch']:>5} {s['stage']:<16} {s['ms']:>9.3f} {100 * s['fraction']:>5.1f}%")
    return "\n".join(lines)

"""The one command for a lent GPU machine: measure the engine's GPU claims within a deadline, and always
bring a result back.

    python -m stvfm_engine.bench.gpu_check [--deadline-s 420] [--out bench/results] [--rehearse]

Phases, most valuable first (:data:`PHASES`): the environment; parity of every ``city`` variant against
fp32 eager on the GPU; ``city`` batch 1 timing (triton, eager, ``torch.compile`` max-autotune, aoti,
TensorRT where it imports); batches 8 and 64; the three fused stages against their eager composites;
``large``; the ``-m gpu`` tests. Every compiling variant, every preset and the tests run in a child
process (:mod:`~stvfm_engine.bench.gpu_tasks`) under a time cap, so one crash or hang costs one variant.
One JSON, ``gpu-check-<device>-<date>.json``, is rewritten after every phase and on SIGTERM/SIGINT (the
children are stopped first); errors are recorded in it (``errors``) and the run goes on. Seven goals get
a verdict each (:mod:`~stvfm_engine.bench.gpu_goals`). ``--rehearse`` runs every phase on the CPU with the
``tiny`` preset under Triton's interpreter (short counts; the CUDA-only variants are recorded as skipped),
so CI keeps the pipeline working. Without ``--rehearse`` and without a CUDA device it exits 2 at once.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from stvfm_engine.bench.gpu_goals import verdicts

REPO = Path(__file__).resolve().parents[1]  # the source checkout (bench/ is stvfm_engine.bench)
DEFAULT_OUT = REPO / "bench" / "results"
PHASES = ("environment", "parity", "batch1", "larger_batches", "fused_ops", "large", "gpu_tests")
RESERVE_S = 8.0  # kept back from the deadline for stopping the last child and writing the JSON
POLL_S = 0.2
MIN_PHASE_S = 10.0  # a phase that would get less than this is not started


@dataclass(frozen=True)
class Plan:
    """What a run does: presets, variants, batch sizes, call counts and per-phase caps (seconds)."""

    rehearse: bool
    device: str
    preset: str
    second: str
    variants: tuple[dict, ...]  # {"backend", "precision", "build", "b1_only"}
    skipped: dict  # variant -> why it is not run here
    batch1: tuple[int, ...]
    larger: tuple[int, ...]
    parity_batches: tuple[int, ...]
    max_batch: int
    schedule: dict
    ops_batches: tuple[int, ...]
    ops_iters: int
    ops_warmup: int
    second_batches: tuple[int, ...]  # the large phase's timed batch sizes
    tests: Optional[tuple[str, ...]]  # the test files of the gpu_tests phase (None: every file with gpu tests)
    caps: dict = field(default_factory=dict)


def make_plan(rehearse: bool) -> Plan:
    trt = importlib.util.find_spec("tensorrt") is not None
    variants = [{"backend": "eager", "precision": "bf16"}, {"backend": "triton", "precision": "bf16"},
                {"backend": "compile", "precision": "bf16", "b1_only": True},
                {"backend": "aoti", "precision": "bf16", "build": True},
                {"backend": "tensorrt", "precision": "fp16", "build": True}]
    skipped = {} if trt else {"tensorrt/fp16": "tensorrt is not installed here"}
    if rehearse:
        for v in variants[2:]:
            skipped.setdefault(f"{v['backend']}/{v['precision']}", "rehearsal: compiled for CUDA only")
        # short counts: one interpreted triton call of tiny takes ~1.3 s at batch 1 on an idle 2-core CPU
        return Plan(rehearse=True, device="cpu", preset="tiny", second="tiny", variants=tuple(variants[:2]),
                    skipped=skipped, batch1=(1,), larger=(2,), parity_batches=(1,), max_batch=2,
                    schedule={"warmup": 0, "rounds": 2, "block": 1, "drop": 0}, ops_batches=(1,), ops_iters=1,
                    ops_warmup=0, second_batches=(1,), tests=("tests/test_kernels_flow.py",),
                    caps={"environment": 30, "prepare": 90, "parity": 120, "batch1": 120, "larger_batches": 120,
                          "fused_ops": 120, "large": 120, "gpu_tests": 120})
    variants = [v for v in variants if f"{v['backend']}/{v['precision']}" not in skipped]
    return Plan(rehearse=False, device="cuda", preset="city", second="large", variants=tuple(variants),
                skipped=skipped, batch1=(1,), larger=(8, 64), parity_batches=(1, 8, 64), max_batch=64,
                schedule={"warmup": 20, "rounds": 10, "block": 22, "drop": 2},  # 200 timed calls per variant
                ops_batches=(1, 64), ops_iters=100, ops_warmup=10, second_batches=(1, 8, 64), tests=None,
                caps={"environment": 30, "prepare": 60, "parity": 180, "batch1": 120, "larger_batches": 90,
                      "fused_ops": 90, "large": 180, "gpu_tests": 240})


def no_cuda_reason() -> Optional[str]:
    """None when torch sees a CUDA device, else why not (the driver is looked for before torch is asked)."""
    if (not Path("/proc/driver/nvidia/version").exists() and not list(Path("/dev").glob("nvidia[0-9]*"))
            and shutil.which("nvidia-smi") is None):
        return "no NVIDIA driver on this machine (/proc/driver/nvidia/version, /dev/nvidia* and nvidia-smi are absent)"
    from stvfm_engine.engine.runtime import cuda_status

    return cuda_status()


def device_name(device: str) -> str:
    """The GPU's name (``cuda``), else the CPU model: the device part of the result file's name."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    from stvfm_engine.bench.report import cpu_model

    return cpu_model()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _prctl() -> Optional[Callable[..., int]]:
    try:
        return ctypes.CDLL(None).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _prctl()  # looked up here: the child, between fork and exec, only calls it


def _die_with_parent() -> None:  # in the child, before exec: SIGKILL it if this process dies
    if _PRCTL is not None:
        _PRCTL(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived: stop the children, write the JSON, exit."""


@dataclass
class Child:
    """One running child process: its JSON result (read while it runs) and its log."""

    label: str
    proc: subprocess.Popen
    out: Path
    log: Path
    started: float
    killed: Optional[str] = None

    def data(self) -> dict:
        try:
            return json.loads(self.out.read_text())
        except (OSError, ValueError):
            return {}

    def log_tail(self, lines: int = 1) -> str:
        try:
            text = [t for t in self.log.read_text(errors="replace").splitlines() if t.strip()]
        except OSError:
            return ""
        return " | ".join(t.strip() for t in text[-lines:])[-400:]


class GpuCheck:
    """One run: the result dict, the children, the phases."""

    def __init__(self, plan: Plan, deadline_s: float, out_dir: Path, work: Path, log: Callable[[str], None]):
        self.plan, self.deadline_s, self.work, self.say = plan, deadline_s, work, log
        self.t0 = time.monotonic()
        self.end = self.t0 + deadline_s - RESERVE_S
        self.children: list[Child] = []
        self.env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self.env["PYTHONUNBUFFERED"] = "1"
        if plan.rehearse:
            self.env["TRITON_INTERPRET"] = "1"
        now = dt.datetime.now(dt.timezone.utc)
        self.result: dict[str, Any] = {"device": None, "date": now.isoformat(timespec="seconds"), "versions": {},
                                       "deadline_s": deadline_s,
                                       "phases": {p: {"seconds": 0.0, "status": "pending"} for p in PHASES},
                                       "parity": {}, "runs": {}, "errors": [], "verdicts": {}}
        self.path = out_dir / f"gpu-check-{slug(device_name(plan.device))}-{now.strftime('%Y%m%dT%H%MZ')}.json"
        self.engines: dict[str, str] = {}  # variant -> engine directory, from parity

    # ------------------------------------------------------------------ bookkeeping
    def left(self) -> float:
        return self.end - time.monotonic()

    def error(self, phase: str, variant: Optional[str], message: str) -> None:
        self.result["errors"].append({"phase": phase, "variant": variant, "message": message})
        self.say(f"ERROR {phase}{' ' + variant if variant else ''}: {message}")

    def write(self) -> None:
        from stvfm_engine.bench.report import write_json

        self.result["verdicts"] = verdicts(self.result, self.plan.preset, cuda=self.plan.device == "cuda")
        write_json(self.result, self.path)

    def phase(self, name: str, body: Callable[[dict], Optional[str]]) -> None:
        """Run one phase: ``body(entry)`` fills the phase's entry and returns its status (None: ``ok``)."""
        entry = self.result["phases"][name]
        if self.left() <= MIN_PHASE_S:
            entry["status"] = "not run (deadline reached)"
            self.write()
            return
        entry["status"] = "running"
        self.write()
        started = time.monotonic()
        self.say(f"phase {name}")
        try:
            status = body(entry) or "ok"
        except Stopped:
            entry["status"] = "interrupted"
            entry["seconds"] = round(time.monotonic() - started, 2)
            raise
        except Exception as e:  # a bug of this script: recorded, the run goes on
            status = "failed"
            self.error(name, None, f"{type(e).__name__}: {e}")
        entry["status"] = status
        entry["seconds"] = round(time.monotonic() - started, 2)
        self.say(f"phase {name}: {status} ({entry['seconds']:.0f} s)")
        self.write()

    # ------------------------------------------------------------------ children
    def start(self, label: str, task: str, spec: dict) -> Child:
        spec = {"work": str(self.work), "device": self.plan.device, "max_batch": self.plan.max_batch,
                "schedule": self.plan.schedule, "command": ["python", "-m", "stvfm_engine.bench.gpu_check",
                                                            *sys.argv[1:]], **spec}
        name = slug(label)
        spec_path, out, log = (self.work / f"{name}.{ext}" for ext in ("spec.json", "out.json", "log"))
        spec_path.write_text(json.dumps(spec))
        with log.open("w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "stvfm_engine.bench.gpu_tasks", task, str(spec_path),
                                     str(out)], stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=self.work,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        child = Child(label, proc, out, log, time.monotonic())
        self.children.append(child)
        return child

    def wait(self, children: list[Child], caps: list[float], until: Optional[Callable[[dict], bool]] = None) -> None:
        """Until every child has exited (or ``until(data)`` holds for it), killing one at its cap or the deadline."""
        limit = [time.monotonic() + min(cap, self.left()) for cap in caps]
        pending = list(range(len(children)))
        while pending:
            for i in list(pending):
                c = children[i]
                if c.proc.poll() is not None or (until is not None and until(c.data())):
                    pending.remove(i)
                elif time.monotonic() >= limit[i]:
                    c.killed = f"stopped after {time.monotonic() - c.started:.0f} s (cap {caps[i]:.0f} s" + \
                               (", deadline)" if self.left() <= 0.5 else ")")
                    self.kill(c)
                    pending.remove(i)
            if pending:
                time.sleep(POLL_S)

    def kill(self, c: Child) -> None:
        if c.proc.poll() is None:
            for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(c.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    c.proc.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # whatever else is left in its process group (compile workers)
            os.killpg(c.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def keep_logs(self) -> None:
        """Every child's output beside the JSON (``<name>.logs/``): what a failure said, after the machine is gone."""
        logs = self.path.with_suffix(".logs")
        logs.mkdir(parents=True, exist_ok=True)
        for log in self.work.glob("*.log"):
            shutil.copyfile(log, logs / log.name)

    def stop_all(self) -> None:
        for c in self.children:
            self.kill(c)

    def finished(self, phase: str, c: Child, variant: Optional[str] = None) -> dict:
        """The child's data, its errors and its failure, if any, recorded under ``phase``."""
        data = c.data()
        for e in data.get("errors", []):
            self.error(phase, e.get("variant") or variant, e["message"])
        if c.killed:
            self.error(phase, variant, f"{c.killed}; last output: {c.log_tail()}")
        elif c.proc.poll() not in (None, 0):
            self.error(phase, variant, data.get("error") or f"exit status {c.proc.returncode}: {c.log_tail()}")
        return data

    # ------------------------------------------------------------------ the phases
    def environment(self, entry: dict) -> None:
        from stvfm_engine.bench.gpu_tasks import gpu_state
        from stvfm_engine.bench.report import device_info, git_sha
        from stvfm_engine.engine.manifest import library_versions

        import torch

        cuda = self.plan.device == "cuda"
        info = device_info(self.plan.device)
        self.result["device"] = info
        self.result["versions"] = {**library_versions(), "torch_cuda": torch.version.cuda,
                                   "cudnn": torch.backends.cudnn.version() if cuda else None,
                                   "triton": _version("triton"), "git_sha": git_sha()}
        entry.update(rehearsal=self.plan.rehearse, command=" ".join(["python -m stvfm_engine.bench.gpu_check",
                                                                     *sys.argv[1:]]),
                     gpu_state=gpu_state() if cuda else None, caps_s=self.plan.caps,
                     interpreter="TRITON_INTERPRET=1" if self.plan.rehearse else None)
        self.say(f"writing {self.path}")

    def parity(self, entry: dict) -> Optional[str]:
        p = self.plan
        prep = self.start(f"prepare {p.preset}", "prepare", {"preset": p.preset})
        self.wait([prep], [p.caps["prepare"]])
        data = self.finished("parity", prep, f"{p.preset} engine")
        if not data.get("engine") or prep.proc.returncode != 0:
            return "failed"
        entry["prepare_s"] = data.get("seconds")
        entry["skipped"] = dict(p.skipped)
        children, names = [], []
        for v in p.variants:
            name = f"{v['backend']}/{v['precision']}"
            batches = [1] if v.get("b1_only") else list(p.parity_batches)
            children.append(self.start(f"parity {name}", "parity", {"preset": p.preset, "variant": v,
                                                                     "batches": batches}))
            names.append(name)
        self.wait(children, [p.caps["parity"]] * len(children))
        entry["variants"] = {}
        for name, c in zip(names, children):
            data = self.finished("parity", c, name)
            if "max_rel_err" not in data:
                continue
            err, tol = data["max_rel_err"], data["tolerance"]
            self.result["parity"][name] = err
            entry["variants"][name] = {k: data.get(k) for k in ("per_batch", "tolerance", "build_s", "open_s",
                                                                "first_calls_s")}
            if err <= tol:
                self.engines[name] = data["engine"]
            else:
                self.error("parity", name, f"max relative error {err:.3g} above the {tol:g} tolerance of its "
                                           "precision: not timed")
        return None if self.engines else "failed"

    def timing(self) -> None:
        """batch1 and larger_batches: one child opens the variants once and times every batch size."""
        p = self.plan
        b1_only = {f"{v['backend']}/{v['precision']}" for v in p.variants if v.get("b1_only")}
        plan = [[b, list(self.engines)] for b in p.batch1]
        plan += [[b, [n for n in self.engines if n not in b1_only]] for b in p.larger]
        child: list[Optional[Child]] = [None]
        seen = [0]

        def phase_of(batches: tuple[int, ...], name: str) -> Callable[[dict], Optional[str]]:
            def body(entry: dict) -> Optional[str]:
                if not self.engines:
                    return "not run (no variant passed parity)"
                if child[0] is None:
                    child[0] = self.start(f"time {p.preset}", "time", {"preset": p.preset, "variants": self.engines,
                                                                       "plan": plan})
                c = child[0]
                if c.proc.poll() is not None and not set(batches) & set(c.data().get("done_batches", [])):
                    return "not run (the timing process had ended: see batch1)"
                c.started = time.monotonic()
                last = max(batches)
                self.wait([c], [p.caps[name]], until=lambda d: last in d.get("done_batches", []))
                data = c.data()
                errors = data.get("errors", [])
                for e in errors[seen[0]:]:
                    self.error(name, e.get("variant"), e["message"])
                seen[0] = len(errors)
                if "report" in data:
                    self.result["runs"][p.preset] = data["report"]
                entry.update(batches=list(batches), opened_s=data.get("opened"),
                             gpu_state={b: data.get("gpu_state", {}).get(str(b)) for b in batches})
                done = [b for b in batches if b in data.get("done_batches", [])]
                if len(done) == len(batches):
                    return None
                if c.proc.poll() is None:
                    c.killed = c.killed or (f"stopped after {time.monotonic() - c.started:.0f} s "
                                            f"(cap {p.caps[name]:.0f} s)")
                    self.kill(c)
                self.error(name, None, c.killed or data.get("error") or
                           f"exit status {c.proc.returncode}: {c.log_tail()}")
                return "failed" if not done else "partial"
            return body

        self.phase("batch1", phase_of(p.batch1, "batch1"))
        self.phase("larger_batches", phase_of(p.larger, "larger_batches"))
        if child[0] is not None:
            self.kill(child[0])

    def fused_ops(self, entry: dict) -> Optional[str]:
        p = self.plan
        engine = self.work / f"{p.preset}.engine"
        if not (engine / "manifest.json").is_file():
            return "not run (no engine: see the parity phase)"
        c = self.start(f"ops {p.preset}", "ops", {"engine": str(engine), "batches": list(p.ops_batches),
                                                  "iters": p.ops_iters, "warmup": p.ops_warmup})
        self.wait([c], [p.caps["fused_ops"]])
        data = self.finished("fused_ops", c)
        entry.update(batches=list(p.ops_batches), ratios=data.get("ratios"), backbone=data.get("backbone"),
                     method="stage time of the bf16 eager model over the same stage of the triton path, both "
                            "un-graphed, " + ("CUDA events" if p.device == "cuda" else "torch.profiler (interpreter)"))
        if data.get("rows") and p.preset in self.result["runs"]:
            self.result["runs"][p.preset]["stages"] = data["rows"]
        return None if data.get("done_batches") == list(p.ops_batches) else "failed"

    def large(self, entry: dict) -> Optional[str]:
        p = self.plan
        variants = [v for v in p.variants if v["backend"] in ("eager", "triton")]
        batches = list(p.second_batches)
        second = self.work / "second"
        second.mkdir(exist_ok=True)
        names = [f"{v['backend']}/{v['precision']}" for v in variants]  # each is timed if it passes parity
        c = self.start(f"large {p.second}", "large", {"preset": p.second, "work": str(second), "variant_list": variants,
                                                       "batches": [1], "plan": [[b, names] for b in batches]})
        self.wait([c], [p.caps["large"]])
        data = self.finished("large", c)
        key = p.second if p.second != p.preset else f"{p.second} (large phase)"
        for name, par in (data.get("parity") or {}).items():
            self.result["parity"][f"{key}:{name}"] = par["max_rel_err"]
            if par["max_rel_err"] > par["tolerance"]:
                self.error("large", name, f"max relative error {par['max_rel_err']:.3g} above the "
                                          f"{par['tolerance']:g} tolerance of its precision: not timed")
        if "report" in data:
            self.result["runs"][key] = data["report"]
        entry.update(preset=p.second, batches=batches, done_batches=data.get("done_batches"),
                     gpu_state=data.get("gpu_state"))
        return None if data.get("done_batches") == batches else "failed"

    def gpu_tests(self, entry: dict) -> Optional[str]:
        tests = REPO / "tests"
        files = sorted(str(f.relative_to(REPO)) for f in tests.glob("test_*.py")
                       if "pytest.mark.gpu" in f.read_text()) if tests.is_dir() else []
        if self.plan.tests is not None:  # the rehearsal: a subset (on a CPU every gpu test skips)
            files = [f for f in files if f in self.plan.tests]
        if not files:
            return f"skipped: no tests marked gpu under {tests}"
        junit = self.work / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={junit}",
               *files]
        entry["command"] = " ".join(["python", *cmd[1:-len(files)], *files])
        log = self.work / "gpu-tests.log"
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        c = Child("gpu tests", proc, self.work / "none.json", log, time.monotonic())
        self.children.append(c)
        self.wait([c], [self.plan.caps["gpu_tests"]])
        if c.killed:
            self.error("gpu_tests", None, f"{c.killed}; last output: {c.log_tail()}")
            return "failed"
        counts = junit_counts(junit)
        entry.update(counts, summary=c.log_tail())
        if counts["failed"] or counts["errors"] or proc.returncode not in (0, 5):
            self.error("gpu_tests", None, f"{counts['failed']} failed, {counts['errors']} errors: {c.log_tail(3)}")
            return "failed"
        if counts["passed"] == 0:
            return f"skipped: {counts['skipped']} of {counts['skipped']} tests skipped ({counts['skip_reason']})"
        return None

    def run(self) -> None:
        self.phase("environment", self.environment)
        self.phase("parity", self.parity)
        self.timing()
        self.phase("fused_ops", self.fused_ops)
        self.phase("large", self.large)
        self.phase("gpu_tests", self.gpu_tests)


def _version(dist: str) -> Optional[str]:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def junit_counts(path: Path) -> dict:
    """passed / failed / errors / skipped of a pytest JUnit XML file, and the first skip reason."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {"passed": 0, "failed": 0, "errors": 1, "skipped": 0, "skip_reason": None}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    reasons = Counter(s.get("message") or "no reason given" for s in root.iter("skipped"))
    skip = reasons.most_common(1)[0][0] if reasons else None
    return {"passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed": n["failures"],
            "errors": n["errors"], "skipped": n["skipped"], "skip_reason": skip}


# ----------------------------------------------------------------------------- the command
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stvfm_engine.bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--deadline-s", type=float, default=420.0, help="finish within this many seconds (default 420)")
    p.add_argument("--out", default=None, help="result folder (default bench/results; a rehearsal: a temporary one)")
    p.add_argument("--rehearse", action="store_true",
                   help="every phase on the CPU with the tiny preset under TRITON_INTERPRET=1 (CI)")
    args = p.parse_args(argv)
    if args.deadline_s < 30:
        p.error(f"--deadline-s: expected at least 30 seconds, got {args.deadline_s:g}")
    if not args.rehearse and (why := no_cuda_reason()):
        print(f"no CUDA device: {why}", flush=True)
        return 2
    if args.rehearse:
        os.environ["TRITON_INTERPRET"] = "1"
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {msg}", file=sys.stderr, flush=True)

    out_dir = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="stvfm-gpu-check-out-")) if args.rehearse
                                               else DEFAULT_OUT)
    work = Path(tempfile.mkdtemp(prefix="stvfm-gpu-check-"))  # checkpoints, engines, child specs/results/logs
    try:
        run = GpuCheck(make_plan(args.rehearse), args.deadline_s, out_dir.absolute(), work, log)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise

    def on_signal(signum, frame):
        if not getattr(on_signal, "fired", False):
            on_signal.fired = True
            raise Stopped(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        run.run()
    except Stopped as e:
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        run.stop_all()
        for name, entry in run.result["phases"].items():
            if entry["status"] in ("pending", "running"):
                entry["status"] = "interrupted" if entry["status"] == "running" else f"not run (stopped by {e})"
        run.error(next((n for n, v in run.result["phases"].items() if v["status"] == "interrupted"), "environment"),
                  None, f"stopped by {e}")
        code = 128 + getattr(signal, str(e))
    finally:
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        run.stop_all()
        run.write()
        run.keep_logs()
        shutil.rmtree(work, ignore_errors=True)
    if code == 0 and run.result["errors"]:
        code = 1
    log(f"{'stopped' if code > 128 else 'done'} in {time.monotonic() - started:.0f} s; "
        f"{len(run.result['errors'])} error(s); wrote {run.path}")
    print(summary(run.result))
    print(run.path)
    return code


def summary(result: dict) -> str:
    """The verdicts and the phases, one line each."""
    lines = [f"{name}: {v['status']}" + (f" (figure {v['figure']}, target {v['target']})" if v['figure'] is not None
                                           else f" (target {v['target']})") for name, v in result["verdicts"].items()]
    lines += [f"phase {n}: {v['status']} ({v['seconds']:.0f} s)" for n, v in result["phases"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""CLI command ``bench``: latency/throughput of engine backends, interleaved in blocks, with the
stage breakdown, the roofline, a JSON report and an optional plot."""
from __future__ import annotations

import argparse
import sys

from stvfm_engine.commands.common import non_negative_float, positive_int
from stvfm_engine.engine.registry import names

FORMATTER = argparse.RawDescriptionHelpFormatter

DESCRIPTION = """\
Time the backends of an engine (or of a checkpoint, built to a temporary engine first) at each batch
size. Backends are timed interleaved in one process: each round runs every backend in a block of
consecutive calls after a cool-down pause (--cooldown), the first calls of each block are dropped and
the block order rotates (thread pools of ONNX Runtime and PyTorch keep spinning after a call and
would slow whatever runs next). Peak memory is measured per (backend, batch) in a short separate
process; --alone also times each backend alone there, on the same schedule, as a check of the harness.

Examples:
  stvfm-engine bench bike.engine --batch 1,16 --json bench.json --plot bench.png
  stvfm-engine bench bike.pt --backends eager,onnxruntime --precision fp32,int8 --batch 1,16
  stvfm-engine bench fp32.engine int8.engine --backends eager,onnxruntime --threads 2
  stvfm-engine bench tiny.engine --backends eager,onnxruntime --batch 1 --alone   # harness check

With --url, load-test a running server instead (stvfm-engine serve, Triton or Ray Serve): N clients
(--concurrency) send requests of --batch samples back to back for --duration seconds per level, over
HTTP or gRPC with tritonclient, to this machine only; the report has p50/p90/p99, throughput, errors
and the server's mean batch (from its Prometheus counters: --metrics-url, e.g. Triton's
http://127.0.0.1:8002/metrics; a Ray Serve app answers URL/metrics). Given an engine DIR too, the same
model is timed offline with Engine.predict at the server's mean batch for comparison, and every answer is
checked against it. --body json sends JSON tensors instead of binary ones; --floor ray|asgi also
starts the server kind's own floor (a plain Ray Serve deployment, or a plain ASGI app) and measures it
side by side with the server and Engine.predict (--rounds rounds of blocks: floor and server in
alternating order, then Engine.predict back to back for as long, a --pause before each), then reports
issue 23's targets from that one run (--floor-alone: the floor first, alone, as before). --faults triton,ray starts 'serve DIR' itself and runs the fault scenario
(64 clients, 2000 requests, 10% malformed, SIGTERM at the midpoint) and the overload case.
  stvfm-engine bench tiny.engine --url http://127.0.0.1:8000 --model tiny.engine --body json --floor ray
  stvfm-engine bench tiny.engine --faults triton,ray --json faults.json
  stvfm-engine bench bike.engine --url http://127.0.0.1:8000 --model bike.engine --concurrency 1,4,16 \\
      --metrics-url http://127.0.0.1:8002/metrics --json load.json
  stvfm-engine bench nyc.engine bike.engine taxi.engine --mix bike:8,taxi:8 --backends onnxruntime
"""


def _progress(args: argparse.Namespace):
    """``log(line)``: progress on stderr, unless --quiet."""
    return (lambda s: None) if args.quiet else (lambda s: print(f"bench: {s}", file=sys.stderr))


def _one_batch(args: argparse.Namespace, mode: str) -> int:
    """The single --batch (samples per request, default 1) that --mix and --url take."""
    from stvfm_engine.bench.runner import BenchError, parse_list

    batches = parse_list(args.batch or "1", int)
    if len(batches) != 1 or batches[0] < 1:
        raise BenchError(f"{mode} takes one --batch (samples per request, >= 1), got {args.batch!r}")
    return batches[0]


def _save(report: dict, args: argparse.Namespace, log) -> None:
    """--json OUT, written atomically."""
    from stvfm_engine.bench.report import write_json

    if args.json:
        write_json(report, args.json)
        log(f"JSON written to {args.json}")


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from stvfm_engine.bench.report import format_table
    from stvfm_engine.bench.runner import BenchError, open_targets, parse_list, run_bench
    from stvfm_engine.engine.timing import Schedule

    if args.url:
        return _bench_url(args)
    if args.faults:
        return _bench_faults(args)
    if args.mix:
        return _bench_mix(args)
    if not args.target:
        raise BenchError("bench needs an engine DIR or checkpoint (or --url URL to load-test a server)")
    backends = parse_list(args.backends)
    batches = parse_list(args.batch or "1,8", int)
    precisions = parse_list(args.precision) if args.precision else [None]
    if min(batches) < 1:
        raise BenchError(f"batch sizes must be >= 1, got {batches}")
    if args.iters < 1 or args.warmup < 0 or not 0 <= args.cooldown <= 60:
        raise BenchError("--iters must be >= 1, --warmup >= 0 and --cooldown in [0, 60] seconds")
    if args.plot:  # fail before the long run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError("--plot needs matplotlib: pip install 'stvfm-engine[plot]'") from None
    log = _progress(args)
    threads = args.threads or torch.get_num_threads()
    with open_targets(args.target, backends, precisions, threads, args.device, progress=not args.quiet) as (variants, ref_dir):
        config = None
        stage_model = triton_stage = None
        from stvfm_engine.engine.reference import reference_model

        reference = reference_model(ref_dir)
        config = reference.config
        if not args.no_stages and "eager" in backends:
            dev = next((v.device for v in variants if v.backend == "eager"), "cpu")
            stage_model = reference.to(dev)
        if not args.no_stages and "triton" in backends:
            from stvfm_engine.bench.stages import triton_stage_runner

            tv = next(v for v in variants if v.backend == "triton")
            triton_stage = triton_stage_runner(reference, tv.precision, tv.device, max(batches), args.stage_iters)
        result = run_bench(variants, config, batches, Schedule.for_iters(args.iters, args.warmup, args.cooldown), threads,
                           measure_memory=not args.no_memory, stage_model=stage_model, triton_stage=triton_stage,
                           stage_iters=args.stage_iters, alone=args.alone, command=["stvfm-engine", "bench", *sys.argv[2:]]
                           if sys.argv[1:2] == ["bench"] else None, log=log)
    print(format_table(result))
    _save(result, args, log)
    if args.plot:
        from stvfm_engine.bench.plot import plot_report

        plot_report(result, args.plot)
        log(f"plot written to {args.plot}")
    return 0


def _bench_mix(args: argparse.Namespace) -> int:
    from stvfm_engine.bench.mix import format_mix, run_mix
    from stvfm_engine.bench.runner import BenchError, parse_list
    from stvfm_engine.engine.timing import Schedule

    batch = _one_batch(args, "--mix")
    if args.iters < 1 or args.warmup < 0:
        raise BenchError("--iters must be >= 1 and --warmup >= 0")
    log = _progress(args)
    result = run_mix(args.target[0], args.mix, singles=args.target[1:], backends=parse_list(args.backends),
                     batch=batch, schedule=Schedule.for_iters(args.iters, args.warmup), threads=args.threads,
                     measure_memory=not args.no_memory, command=["stvfm-engine", "bench", *sys.argv[2:]]
                     if sys.argv[1:2] == ["bench"] else None, log=log)
    print(format_mix(result))
    _save(result, args, log)
    return 0


def _bench_url(args: argparse.Namespace) -> int:
    """``bench --url``: the load test of a running server (bench.load), optionally against ``Engine.predict``
    (every answer checked, offline timings) and the server kind's floor app (``--floor``)."""
    import contextlib

    from stvfm_engine.bench.load import FloorApp, LoadError, format_load_table, measure_floor, offline_timer, run_load
    from stvfm_engine.bench.report import header
    from stvfm_engine.bench.runner import make_inputs, parse_list
    from stvfm_engine.engine import Engine

    batch = _one_batch(args, "--url")
    if not args.model:
        raise LoadError("--url needs --model NAME (the served model's name)")
    if len(args.target) > 1:
        raise LoadError("--url compares with at most one engine DIR")
    if args.floor and not args.target:
        raise LoadError("--floor needs the engine DIR (the floor app answers arrays of its output's size)")
    log = _progress(args)
    engine = Engine.load(args.target[0], threads=args.threads) if args.target else None
    arrays = offline = expected = floor = None
    concurrency = parse_list(args.concurrency, int)
    if engine is not None:  # requests like bench's own inputs, and Engine.predict timed after each level
        key = args.model if len(engine.models) > 1 else None  # the served model of a multi-model DIR
        if key is not None and key not in engine.models:
            raise LoadError(f"{engine.directory} holds no model {key!r}; its models: {list(engine.models)}")
        config = engine.models[key] if key else engine.config
        arrays = {k: v for k, v in zip(("x", "tod", "dow"), make_inputs(config, batch)) if v is not None}
        expected = engine.predict(arrays["x"], arrays.get("tod"), arrays.get("dow"), model=key)
        offline = offline_timer(lambda *a: engine.predict(*a, model=key), lambda b: make_inputs(config, b),
                                args.iters, args.warmup)
        if args.floor and args.floor_alone:
            floor = measure_floor(args.floor, args.model, arrays, expected.shape[1:], concurrency, args.duration,
                                  args.requests, log=log)
    command = ["stvfm-engine", "bench", *sys.argv[2:]] if sys.argv[1:2] == ["bench"] else None
    with contextlib.ExitStack() as stack:
        app = stack.enter_context(FloorApp(args.floor, expected.shape[1:])) if args.floor and not args.floor_alone \
            else None
        report = {**header("cpu", command), **run_load(args.url, args.model, concurrency, args.duration, batch,
                                                       args.metrics_url, arrays, args.requests, offline=offline,
                                                       log=log, body_kind=args.body, expected=expected, floor=floor,
                                                       floor_app=app, rounds=args.rounds, pause_s=args.pause)}
    if engine is not None:
        report["offline_engine"] = {"directory": str(engine.directory), "backend": engine.backend,
                                    "precision": engine.precision, "threads": engine.threads}
    print(format_load_table(report))
    _save(report, args, log)
    return 0


def _bench_faults(args: argparse.Namespace) -> int:
    """``bench DIR --faults triton,ray``: bench.faults' scenario and overload case, each on a ``serve`` it starts."""
    from stvfm_engine.bench.faults import format_faults, run_faults, run_overload
    from stvfm_engine.bench.report import header, write_json
    from stvfm_engine.bench.runner import BenchError, make_inputs, parse_list
    from stvfm_engine.engine import Engine

    kinds = parse_list(args.faults)
    if len(args.target) != 1 or any(k not in ("triton", "ray") for k in kinds):
        raise BenchError("--faults takes one engine DIR (a one-model engine) and servers from triton, ray")
    log = _progress(args)
    engine = Engine.load(args.target[0], threads=args.threads)
    config = engine.config

    def inputs(batch: int, seed: int) -> dict:
        return {k: v for k, v in zip(("x", "tod", "dow"), make_inputs(config, batch, seed)) if v is not None}

    def predict(arrays: dict):
        return engine.predict(arrays["x"], arrays.get("tod"), arrays.get("dow"))

    command = ["stvfm-engine", "bench", *sys.argv[2:]] if sys.argv[1:2] == ["bench"] else None
    report = {**header("cpu", command), "engine": str(engine.directory), "faults": [], "overload": []}
    for kind in kinds:
        report["faults"].append(run_faults(args.target[0], kind, predict, inputs, log=log))
        report["overload"].append(run_overload(args.target[0], kind, predict, inputs, log=log))
        print(format_faults({"faults": report["faults"][-1:], "overload": report["overload"][-1:]}), flush=True)
    if args.json:
        write_json(report, args.json)
        log(f"JSON written to {args.json}")
    return 0


def register(sub) -> None:
    """Add this package's sub-commands to the ``stvfm-engine`` parser."""
    p = sub.add_parser("bench", formatter_class=FORMATTER, description=DESCRIPTION,
                       help="latency/throughput of an engine's backends (interleaved), stage breakdown, roofline")
    p.add_argument("target", nargs="*", metavar="DIR|CKPT",
                   help="engine directory or checkpoint (several engines of one model are compared side by side)")
    p.add_argument("--backends", default="eager,onnxruntime",
                   help=f"comma list of {', '.join(names(bench=True))} (default eager,onnxruntime)")
    p.add_argument("--batch", help="comma list of batch sizes (default 1,8; with --url or --mix one: samples per "
                                   "request, default 1)")
    p.add_argument("--mix", metavar="NAME:N,...",
                   help="multi-model engine DIR: N requests per model, shuffled, through predict_many vs the same "
                        "requests through one-model engines (further DIRs: one-model engines built from the same "
                        "checkpoints; missing ones are built to a temp dir); also the backbone calls per mixed batch "
                        "and the RSS each adds (fresh processes)")
    p.add_argument("--precision", help="comma list of artifact precisions (fp32, int8, bf16); for a checkpoint, "
                                       "one temporary engine is built per precision (default: as built / fp32)")
    p.add_argument("--device", help="cpu or cuda (default: the artifact's)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per backend before timing (default 3)")
    p.add_argument("--iters", type=int, default=20, help="timed calls kept per backend and batch (default 20)")
    p.add_argument("--cooldown", type=float, default=0.3, metavar="S",
                   help="pause before every block of calls, so that the previous backend's threads go idle (default 0.3)")
    p.add_argument("--alone", action="store_true",
                   help="also time each backend alone in a fresh process on the same schedule and report "
                        "interleaved/alone (the harness check: within 15%%)")
    p.add_argument("--threads", type=int, help="intra-op threads for every backend (default: torch's default)")
    p.add_argument("--stage-iters", type=int, default=10, help="profiled calls for the stage breakdown (default 10)")
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown")
    p.add_argument("--no-memory", action="store_true", help="skip the per-(backend, batch) peak-memory processes")
    p.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="latency vs batch and the stage breakdown (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    load = p.add_argument_group("load test of a running server (extra [serve])")
    load.add_argument("--url", help="server to load-test: http://HOST:PORT or grpc://HOST:PORT (this machine only)")
    load.add_argument("--model", help="served model name (with --url)")
    load.add_argument("--concurrency", default="1,4,16", help="comma list of concurrent clients (default 1,4,16)")
    load.add_argument("--duration", type=non_negative_float, default=10.0, metavar="S",
                      help="seconds per concurrency level (default 10)")
    load.add_argument("--requests", type=positive_int, default=100_000,
                      help="at most this many requests per level (default 100000)")
    load.add_argument("--metrics-url", help="the server's Prometheus metrics (default: URL/metrics if it answers)")
    p.add_argument("--faults", metavar="SERVERS",
                   help="comma list of triton, ray: start 'serve DIR' on each and run the fault scenario (64 clients, "
                        "2000 JSON requests, 10%% malformed, SIGTERM at the midpoint) and the overload case "
                        "(--max-queue 8, 256 requests at once); lost and wrong must be 0")
    load.add_argument("--body", choices=("binary", "json"), default="binary",
                      help="request bodies: tritonclient's binary tensors (default) or JSON data (HTTP only)")
    load.add_argument("--floor", choices=("ray", "asgi"),
                      help="measure the server kind's own floor too (a plain Ray Serve deployment, or a plain ASGI "
                           "app on uvicorn, that decodes the same JSON body and answers a y-sized array) side by "
                           "side with the server; with DIR, report issue 23's targets")
    load.add_argument("--rounds", type=positive_int, default=4,
                      help="--floor: rounds of interleaved blocks (floor, server, Engine.predict) per level, each "
                           "block --duration / rounds long (default 4)")
    load.add_argument("--pause", type=non_negative_float, default=1.0, metavar="S",
                      help="--floor: pause before each block (default 1 s: lets the other side's threads go idle)")
    load.add_argument("--floor-alone", action="store_true",
                      help="--floor: measure the floor first, alone, then stop it and measure the server")
    p.set_defaults(func=cmd_bench)

"""CLI command ``bench``: latency/throughput of engine backends, interleaved in blocks, with the
stage breakdown, the roofline, a JSON report and an optional plot."""
from __future__ import annotations

import argparse
import sys

from stvfm_engine.engine.registry import names

FORMATTER = argparse.RawDescriptionHelpFormatter

DESCRIPTION = """\
Time the backends of an engine (or of a checkpoint, built to a temporary engine first) at each batch
size. Backends are timed interleaved in one process: each round runs every backend in a block of
consecutive calls, the first calls of each block are dropped and the block order rotates (thread
pools of ONNX Runtime and PyTorch keep spinning after a call and would slow whatever runs next).
Peak memory is measured per (backend, batch) in a short separate process.

Examples:
  stvfm-engine bench bike.engine --batch 1,16 --json bench.json --plot bench.png
  stvfm-engine bench bike.pt --backends eager,onnxruntime --precision fp32,int8 --batch 1,16
  stvfm-engine bench fp32.engine int8.engine --backends eager,onnxruntime --threads 2
  stvfm-engine bench nyc.engine bike.engine taxi.engine --mix bike:8,taxi:8 --backends onnxruntime
"""


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from stvfm_engine.bench.report import format_table, write_json
    from stvfm_engine.bench.runner import BenchError, open_targets, parse_list, run_bench
    from stvfm_engine.bench.timing import Schedule

    if args.mix:
        return _bench_mix(args)
    backends = parse_list(args.backends)
    batches = parse_list(args.batch or "1,8", int)
    precisions = parse_list(args.precision) if args.precision else [None]
    if min(batches) < 1:
        raise BenchError(f"batch sizes must be >= 1, got {batches}")
    if args.iters < 1 or args.warmup < 0:
        raise BenchError("--iters must be >= 1 and --warmup >= 0")
    if args.plot:  # fail before the long run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError("--plot needs matplotlib: pip install 'stvfm-engine[plot]'") from None
    log = (lambda s: None) if args.quiet else (lambda s: print(f"bench: {s}", file=sys.stderr))
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
            triton_stage = _triton_stage(reference, variants, config, threads)
        result = run_bench(variants, config, batches, Schedule.for_iters(args.iters, args.warmup), threads,
                           measure_memory=not args.no_memory, stage_model=stage_model, triton_stage=triton_stage,
                           stage_iters=args.stage_iters, command=["stvfm-engine", "bench", *sys.argv[2:]]
                           if sys.argv[1:2] == ["bench"] else None, log=log)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        log(f"JSON written to {args.json}")
    if args.plot:
        from stvfm_engine.bench.plot import plot_report

        plot_report(result, args.plot)
        log(f"plot written to {args.plot}")
    return 0


def _bench_mix(args: argparse.Namespace) -> int:
    from stvfm_engine.bench.mix import format_mix, run_mix
    from stvfm_engine.bench.report import write_json
    from stvfm_engine.bench.runner import BenchError, parse_list
    from stvfm_engine.bench.timing import Schedule

    batches = parse_list(args.batch or "1", int)
    if len(batches) != 1 or batches[0] < 1:
        raise BenchError(f"--mix takes one --batch (samples per request, >= 1), got {args.batch!r}")
    if args.iters < 1 or args.warmup < 0:
        raise BenchError("--iters must be >= 1 and --warmup >= 0")
    log = (lambda s: None) if args.quiet else (lambda s: print(f"bench: {s}", file=sys.stderr))
    result = run_mix(args.target[0], args.mix, singles=args.target[1:], backends=parse_list(args.backends),
                     batch=batches[0], schedule=Schedule.for_iters(args.iters, args.warmup), threads=args.threads,
                     measure_memory=not args.no_memory, command=["stvfm-engine", "bench", *sys.argv[2:]]
                     if sys.argv[1:2] == ["bench"] else None, log=log)
    print(format_mix(result))
    if args.json:
        write_json(result, args.json)
        log(f"JSON written to {args.json}")
    return 0


def _triton_stage(reference, variants, config, threads):
    """The Triton path's stage breakdown, profiled on its own module (see bench.stages)."""
    import torch

    from stvfm_engine.bench.runner import make_inputs
    from stvfm_engine.bench.stages import triton_stages
    from stvfm_engine.engine.triton_backend import load_triton_backend

    device = next((v.device for v in variants if v.backend == "triton"), "cpu")
    if str(device).startswith("cuda"):
        print("bench: the triton stage breakdown is CPU-only (CUDA graphs hide the stages); skipped", file=sys.stderr)
        return None
    fn = load_triton_backend(reference, precision="fp32", device=str(device))
    backbone = getattr(fn, "backbone", None)

    def run(batch):
        x, tod, dow = (None if a is None else torch.from_numpy(a).to(device) for a in make_inputs(config, batch))
        return triton_stages(lambda: fn(x, tod, dow), backbone, batch)

    return run


def register(sub) -> None:
    """Add this package's sub-commands to the ``stvfm-engine`` parser."""
    p = sub.add_parser("bench", formatter_class=FORMATTER, description=DESCRIPTION,
                       help="latency/throughput of an engine's backends (interleaved), stage breakdown, roofline")
    p.add_argument("target", nargs="+", metavar="DIR|CKPT",
                   help="engine directory or checkpoint (several engines of one model are compared side by side)")
    p.add_argument("--backends", default="eager,onnxruntime",
                   help=f"comma list of {', '.join(names(bench=True))} (default eager,onnxruntime)")
    p.add_argument("--batch", help="comma list of batch sizes (default 1,8; with --mix one: samples per request, "
                                   "default 1)")
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
    p.add_argument("--threads", type=int, help="intra-op threads for every backend (default: torch's default)")
    p.add_argument("--stage-iters", type=int, default=10, help="profiled calls for the stage breakdown (default 10)")
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown")
    p.add_argument("--no-memory", action="store_true", help="skip the per-(backend, batch) peak-memory processes")
    p.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="latency vs batch and the stage breakdown (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_bench)

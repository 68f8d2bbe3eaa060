"""CLI sub-commands ``serve`` (Triton Inference Server, or Ray Serve with ``--ray``) and ``export-triton``."""
from __future__ import annotations

import argparse
import json

from stvfm_engine.commands.common import non_negative_float, non_negative_int, port, positive_float, positive_int

FORMATTER = argparse.RawDescriptionHelpFormatter

SERVE_DESCRIPTION = """\
Serve engine directories over the Open Inference Protocol (KServe v2): HTTP and gRPC through the
Triton Inference Server bundled with nvidia-pytriton, or HTTP through Ray Serve with --ray. Each
directory is one model named after the directory (or --name); a multi-model directory serves each
of its models by its name. Inputs x float32 [B, T, C, H, W], tod/dow int64 [B, T]; output y.
Requests are batched by the server up to the engine's max batch; each is validated on its own, so a
bad one gets an error naming what was expected while the others batched with it are answered.
Readiness (only once every model has run) and progress go to stderr. A full queue is refused at
once (503); SIGTERM/SIGINT drains: readiness turns false, new requests get 503, every accepted one is
answered, then exit 0 (3 if --drain-timeout expired first). A port already in use: one line, exit 2.
With --state-dir DIR (or --stream-store URL) each model M also gets M_stream: clients push one
timestamped frame of a named stream per request and get its forecast; the server keeps the windows,
the calendar (tod/dow) and the gaps, durably (a restart keeps every stream).

Examples:
  stvfm-engine serve bike.engine                        # HTTP :8000, gRPC :8001, metrics :8002
  stvfm-engine serve bike.engine taxi.engine --max-queue-delay-ms 5
  stvfm-engine serve bike.engine --ray --replicas 2     # Ray Serve on a local Ray instance
  stvfm-engine serve bike.engine --state-dir state      # + bike.engine_stream (streams in state/streams.db)
  curl -s localhost:8000/v2/models/bike.engine          # model metadata
"""

EXPORT_DESCRIPTION = """\
Write a Triton model repository for a full Triton Inference Server: REPO/<name>/config.pbtxt and
REPO/<name>/1/model.onnx (onnxruntime_onnx), model.plan (tensorrt_plan), or model.py (Python
backend running stvfm_engine.Engine on a copy of the engine directory; needs stvfm-engine installed
where Triton runs). max_batch_size is the engine's max batch, with dynamic batching. Each config is
written with Triton's model-config protobuf and parsed back before it is kept.

Examples:
  stvfm-engine export-triton bike.engine -o model_repository
  stvfm-engine export-triton bike.engine -o model_repository --platform python --name bike
"""


def cmd_serve(args: argparse.Namespace) -> int:
    from stvfm_engine.serving.models import served_models

    _refuse_unhonoured(args)
    models = served_models(args.engines, args.name, backend=args.backend, threads=args.threads)
    models += _stream_companions(args, models)
    if args.ray:
        from stvfm_engine.serving.ray_server import RayOptions, serve_ray

        return serve_ray(models, RayOptions(host=args.host, http_port=args.http_port, address=args.ray_address,
                                            replicas=args.replicas or 1, ready_timeout_s=args.ready_timeout,
                                            **_delay(args), **_admission(args)))
    from stvfm_engine.serving.tritonserver import TritonOptions, serve_triton

    return serve_triton(models, TritonOptions(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port or 8001,
                                              metrics_port=args.metrics_port or 8002, instances=args.instances or 1,
                                              ready_timeout_s=args.ready_timeout, verbose=bool(args.verbose),
                                              **_delay(args), **_admission(args)))


def _stream_companions(args: argparse.Namespace, models: list) -> list:
    """The ``M_stream`` companions that ``--state-dir`` / ``--stream-store`` ask for (none without either)."""
    from pathlib import Path

    from stvfm_engine.errors import ServeError
    from stvfm_engine.serving.lifecycle import log
    from stvfm_engine.serving.models import StreamOptions, stream_companions

    stream_flags = [f for f, v in (("--stream-gaps", args.stream_gaps), ("--stream-max-gap", args.stream_max_gap),
                                   ("--stream-interval", args.stream_interval)) if v is not None]
    if args.state_dir is None and args.stream_store is None:
        if stream_flags:
            raise ServeError(f"{', '.join(stream_flags)}: set how forecast streams are served; give --state-dir DIR "
                             "or --stream-store URL to serve them")
        return []
    if args.state_dir is not None and args.stream_store is not None:
        raise ServeError("--state-dir and --stream-store both name the stream store; give one")
    if args.state_dir is not None:
        state = Path(args.state_dir)
        if not state.is_dir():
            raise ServeError(f"--state-dir {args.state_dir}: not an existing directory (create it first)")
        store = str((state / STREAM_DB).absolute())
    else:
        store = args.stream_store
        if not store.startswith(("postgresql://", "postgres://")):
            raise ServeError(f"--stream-store: expected a postgresql:// URL (a SQLite file: --state-dir DIR), "
                             f"got {store[:60]!r}")
    options = StreamOptions(store, args.stream_gaps or "refuse", 2 if args.stream_max_gap is None else args.stream_max_gap,
                            args.stream_interval)
    companions, notes = stream_companions(models, options)
    for note in notes:
        log(note)
    if not companions:
        raise ServeError("no served model can keep forecast streams: " + "; ".join(notes))
    if clash := sorted({m.name for m in models} & {c.name for c in companions}):
        raise ServeError(f"served model name(s) {clash} would also name a stream companion (M_stream); name the "
                         "models apart with --name")
    return companions


STREAM_DB = "streams.db"  # the SQLite file of --state-dir


def _delay(args: argparse.Namespace) -> dict:
    return {"max_queue_delay_ms": args.max_queue_delay_ms}


def _admission(args: argparse.Namespace) -> dict:
    """The options both servers take: admission (queue, deadline, body size) and the drain's limit."""
    return {"max_queue": args.max_queue, "request_timeout_ms": args.request_timeout_ms,
            "drain_timeout_s": args.drain_timeout, "max_request_mb": args.max_request_mb}


# options one server cannot honour: refused in one line rather than ignored
TRITON_ONLY = ("grpc_port", "metrics_port", "instances", "verbose")
RAY_ONLY = ("ray_address", "replicas")


def _refuse_unhonoured(args: argparse.Namespace) -> None:
    from stvfm_engine.errors import ServeError

    given = [name for name in (TRITON_ONLY if args.ray else RAY_ONLY) if getattr(args, name) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ServeError(f"{flags}: not honoured by {'Ray Serve (--ray)' if args.ray else 'Triton (serve without --ray)'}"
                         "; drop it")


def cmd_export_triton(args: argparse.Namespace) -> int:
    from stvfm_engine.serving.tritonserver_repo import export_repository

    paths = export_repository(args.engine, args.output, platform=args.platform, name=args.name, backend=args.backend,
                              max_queue_delay_us=int(args.max_queue_delay_ms * 1000), instances=args.instances)
    print(json.dumps({"repository": args.output, "platform": args.platform,
                      "models": [p.name for p in paths]}))
    return 0


def register(sub) -> None:
    from stvfm_engine.engine.registry import names

    p = sub.add_parser("serve", formatter_class=FORMATTER, description=SERVE_DESCRIPTION,
                       help="serve engines over HTTP/gRPC (Triton Inference Server, or Ray Serve with --ray)")
    p.add_argument("engines", nargs="+", metavar="DIR", help="engine directories written by 'stvfm-engine build'")
    p.add_argument("--name", action="append", metavar="NAME",
                   help="model name of each DIR, in order (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--http-port", type=port, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=port, help="gRPC port, Triton only (default 8001)")
    p.add_argument("--metrics-port", type=port,
                   help="Prometheus metrics port, Triton only (default 8002; Ray serves /metrics on the HTTP port)")
    p.add_argument("--max-queue-delay-ms", type=non_negative_float, default=0.0, metavar="MS",
                   help="how long a request may wait for others to batch with when its model is idle (default 0: "
                        "an idle model runs at once; requests that arrive while it runs form the next batch)")
    p.add_argument("--max-queue", type=positive_int, metavar="N",
                   help="requests waiting per model beyond which new ones are refused at once (HTTP 503, gRPC "
                        "UNAVAILABLE) (default 8 x the engine's max batch)")
    p.add_argument("--request-timeout-ms", type=positive_float, default=30000.0, metavar="MS",
                   help="a request not answered within MS is refused (HTTP 503/504, gRPC UNAVAILABLE or "
                        "DEADLINE_EXCEEDED) (default 30000)")
    p.add_argument("--max-request-mb", type=positive_float, default=64.0, metavar="MB",
                   help="largest request body in MiB; a larger one is answered 413 before it is read (default 64)")
    p.add_argument("--drain-timeout", type=non_negative_float, default=30.0, metavar="S",
                   help="on SIGTERM/SIGINT, wait at most S seconds for accepted requests to be answered, "
                        "else exit 3 (default 30)")
    p.add_argument("--backend", choices=names(bench=False), help="engine backend (default: the fastest available)")
    p.add_argument("--threads", type=positive_int, help="ONNX Runtime intra-op threads per model instance")
    p.add_argument("--instances", type=positive_int, help="Triton model instances per model (default 1)")
    p.add_argument("--ready-timeout", type=non_negative_float, default=300.0, metavar="S",
                   help="give up if the server is not ready after S seconds (default 300)")
    p.add_argument("--verbose", action="store_true", default=None, help="show Triton's info log too")
    st = p.add_argument_group(
        "forecast streams", "each served model M gets a companion M_stream that keeps per-stream windows: a request "
        "pushes one frame [1, C, H, W] of stream NAME at an ISO-8601 time and/or asks a forecast (outputs y, time, "
        "held); tod/dow come from the model's calendar (init/train --start --zone)")
    st.add_argument("--state-dir", metavar="DIR",
                    help=f"keep the streams in DIR/{STREAM_DB} (SQLite, WAL; DIR must exist); restarting keeps them")
    st.add_argument("--stream-store", metavar="URL",
                    help="keep the streams in PostgreSQL (postgresql://...; for Ray across machines)")
    st.add_argument("--stream-gaps", choices=("refuse", "hold", "linear"),
                    help="missing frames in a window: refused naming them (default), last value held, or linear")
    st.add_argument("--stream-max-gap", type=non_negative_int, metavar="N",
                    help="most consecutive missing frames that hold/linear fill (default 2)")
    st.add_argument("--stream-interval", type=positive_float, metavar="S",
                    help="seconds per step of a model without time inputs (steps_per_day 0)")
    ray = p.add_argument_group("Ray Serve (extra [ray])")
    ray.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead of Triton")
    ray.add_argument("--ray-address", metavar="ADDR",
                     help="an existing Ray cluster, or 'local': a private instance whose HTTP proxy binds --host "
                          "(default: RAY_ADDRESS if set, else local)")
    ray.add_argument("--replicas", type=positive_int, help="replicas per model (default 1)")
    p.set_defaults(func=cmd_serve)

    from stvfm_engine.serving.tritonserver_repo import platforms

    e = sub.add_parser("export-triton", formatter_class=FORMATTER, description=EXPORT_DESCRIPTION,
                       help="write a Triton model repository (ONNX Runtime, TensorRT or Python backend)")
    e.add_argument("engine", metavar="DIR", help="engine directory written by 'stvfm-engine build'")
    e.add_argument("-o", "--output", required=True, metavar="REPO", help="model repository (created if missing)")
    e.add_argument("--platform", choices=platforms(), default="onnxruntime",
                   help="onnxruntime (model.onnx), tensorrt (model.plan) or python (model.py + engine copy); "
                        "default onnxruntime")
    e.add_argument("--name", help="model name (default: the directory's name, as serve names it)")
    e.add_argument("--backend", choices=names(bench=False),
                   help="python platform: the engine backend (default: the fastest the serving machine allows)")
    e.add_argument("--max-queue-delay-ms", type=non_negative_float, default=2.0, metavar="MS",
                   help="dynamic batcher delay (default 2)")
    e.add_argument("--instances", type=positive_int, default=1, help="instances per model (default 1)")
    e.set_defaults(func=cmd_export_triton)

"""Load test of a running inference server (``bench --url``) with ``tritonclient`` over HTTP or gRPC, to
this machine only: latency percentiles, throughput, errors and the server's mean batch per concurrency."""
from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Optional, Sequence
from urllib.parse import urlsplit

import numpy as np

from stvfm_engine.bench.report import _fmt
from stvfm_engine.engine.timing import Schedule, summarize, time_interleaved
from stvfm_engine.errors import STVFMError, first_line

_COUNTER = re.compile(r'^(nv_inference_count|nv_inference_exec_count)\{([^}]*)\}\s+([0-9.eE+-]+)')


class LoadError(STVFMError):
    """A load test that cannot run (bad URL, a server that is not there, an unknown model)."""


def parse_url(url: str) -> tuple[str, str]:
    """``(protocol, "host:port")`` of ``http://host:port``, ``grpc://host:port`` or ``host:port`` (HTTP)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "grpc") or not parts.hostname or not parts.port or parts.path not in ("", "/"):
        raise LoadError(f"expected a server URL http://HOST:PORT or grpc://HOST:PORT, got {url!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return parts.scheme, f"{host}:{parts.port}"


def check_loopback(url: str) -> None:
    """The load test drives servers on this machine only."""
    host = urlsplit(url if "://" in url else f"http://{url}").hostname
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as e:
        raise LoadError(f"cannot resolve {host!r} ({e})") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise LoadError(f"the load test drives servers on this machine only (127.0.0.1, ::1, localhost); got {host!r}")


def connect(url: str, timeout_s: float = 60.0):
    """``(tritonclient module, client)`` for ``url``; an HTTP client times out after ``timeout_s``
    (a gRPC call takes ``client_timeout``, see :func:`infer`)."""
    protocol, address = parse_url(url)
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module

            return module, module.InferenceServerClient(address)
        import tritonclient.http as module

        return module, module.InferenceServerClient(address, connection_timeout=timeout_s, network_timeout=timeout_s)
    except ImportError:
        raise LoadError("talking to a server needs tritonclient: pip install 'stvfm-engine[serve]'") from None


def infer_inputs(module, arrays: dict[str, np.ndarray]) -> list:
    """``tritonclient`` inputs for ``{name: array}`` (float32 -> FP32, int64 -> INT64)."""
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def infer(module, client, model: str, inputs: list, timeout_s: float):
    """One request; raises ``InferenceServerException`` with the server's message on an error answer."""
    if module.__name__.endswith("grpc"):
        return client.infer(model, inputs, client_timeout=timeout_s)
    return client.infer(model, inputs)


def model_inputs(module, client, model: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid requests for any model, from its metadata: ``x`` uniform in [0, 20), ``tod``/``dow`` 0."""
    grpc = module.__name__.endswith("grpc")
    meta = client.get_model_metadata(model, as_json=True) if grpc else client.get_model_metadata(model)
    rng = np.random.default_rng(seed)
    out = {}
    for t in meta["inputs"]:
        shape = [batch, *(int(s) for s in t["shape"][1:])]
        out[t["name"]] = ((rng.random(shape) * 20).astype(np.float32) if t["datatype"] == "FP32"
                          else np.zeros(shape, dtype=np.int64))
    return out


def read_counters(metrics_url: str, model: str) -> Optional[tuple[float, float]]:
    """``(nv_inference_count, nv_inference_exec_count)`` of ``model`` (summed over versions), or None."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        return None
    counts = {"nv_inference_count": 0.0, "nv_inference_exec_count": 0.0}
    found = False
    for line in text.splitlines():
        m = _COUNTER.match(line)
        if m and f'model="{model}"' in m.group(2):
            counts[m.group(1)] += float(m.group(3))
            found = True
    return (counts["nv_inference_count"], counts["nv_inference_exec_count"]) if found else None


def _level(url: str, model: str, arrays: dict[str, np.ndarray], concurrency: int, duration_s: float,
           max_requests: int, warmup: int, timeout_s: float, metrics_url: Optional[str]) -> dict:
    """One concurrency level: every client warms up, then all start together and stop at the deadline."""
    batch = len(next(iter(arrays.values())))
    ready = threading.Barrier(concurrency + 1)
    go = threading.Barrier(concurrency + 1)
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    budget = [max_requests]
    ends: list[float] = []

    def client_loop():
        module = client = None
        try:
            module, client = connect(url, timeout_s)
            inputs = infer_inputs(module, arrays)
            for _ in range(warmup):
                infer(module, client, model, inputs, timeout_s)
        except Exception as e:  # counted; this client then sits the level out
            with lock:
                errors.append(first_line(e))
            client = None
        ready.wait()
        go.wait()
        if client is None:
            return
        deadline = time.perf_counter() + duration_s
        mine, bad = [], []
        while time.perf_counter() < deadline:
            with lock:
                if budget[0] <= 0:
                    break
                budget[0] -= 1
            t0 = time.perf_counter()
            try:
                infer(module, client, model, inputs, timeout_s)
                mine.append((time.perf_counter() - t0) * 1e3)
            except Exception as e:  # the server's answer (or a timeout) is counted, not fatal
                bad.append(first_line(e))
        with lock:
            latencies.extend(mine)
            errors.extend(bad)
            ends.append(time.perf_counter())
        client.close()

    threads = [threading.Thread(target=client_loop, name=f"load-client-{i}", daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    ready.wait()
    before = read_counters(metrics_url, model) if metrics_url else None
    go.wait()
    start = time.perf_counter()
    for t in threads:
        t.join(timeout=duration_s + 2 * timeout_s + 10)
    wall = (max(ends) if ends else time.perf_counter()) - start
    after = read_counters(metrics_url, model) if metrics_url else None
    row = {"concurrency": concurrency, "batch": batch, "requests": len(latencies), "errors": len(errors),
           "first_error": errors[0] if errors else None, "wall_s": round(wall, 3)}
    if latencies:
        row.update({k: v for k, v in summarize(latencies, batch).items() if k != "throughput"})
    row["throughput"] = len(latencies) * batch / wall if wall > 0 else 0.0
    served = before and after and after[1] > before[1]
    row["mean_batch"] = (after[0] - before[0]) / (after[1] - before[1]) if served else None
    return row


def run_load(url: str, model: str, concurrency: Sequence[int] = (1, 4, 16), duration_s: float = 10.0,
             batch: int = 1, metrics_url: Optional[str] = None, arrays: Optional[dict[str, np.ndarray]] = None,
             max_requests: int = 100_000, warmup: int = 2, timeout_s: float = 60.0,
             offline: Optional[Callable[[int], dict]] = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Drive the server at ``url`` at each concurrency; ``arrays`` is one request (default: from the
    model's metadata, see :func:`model_inputs`). ``metrics_url`` default: ``URL/metrics`` if it answers
    (the Ray Serve app); Triton's metrics port must be given. ``offline`` (:func:`offline_timer`), timed
    right after each level so that both see about the same machine, adds the offline comparison."""
    check_loopback(url)
    if min(concurrency) < 1 or duration_s <= 0 or batch < 1 or max_requests < 1:
        raise LoadError("concurrency, batch and --requests must be >= 1 and --duration > 0")
    module, client = connect(url, timeout_s)
    try:
        if not client.is_server_ready():
            raise LoadError(f"the server at {url} is not ready")
        if not client.is_model_ready(model):
            raise LoadError(f"the server at {url} has no ready model {model!r}")
        arrays = arrays if arrays is not None else model_inputs(module, client, model, batch)
    except LoadError:
        raise
    except Exception as e:
        raise LoadError(f"cannot reach a server at {url}: {first_line(e)}") from None
    finally:
        client.close()
    protocol, address = parse_url(url)
    if metrics_url is None and protocol == "http" and read_counters(f"http://{address}/metrics", model):
        metrics_url = f"http://{address}/metrics"
    if metrics_url:
        check_loopback(metrics_url)
    report = {"url": url, "protocol": protocol, "model": model, "metrics_url": metrics_url, "duration_s": duration_s,
              "results": []}
    for n in concurrency:
        row = _level(url, model, arrays, n, duration_s, max_requests, warmup, timeout_s, metrics_url)
        log(f"concurrency {n}: {row['requests']} requests, {row['errors']} errors, "
            f"{row['throughput']:.1f} samples/s, mean server batch {_fmt(row['mean_batch'], '.2f')}")
        if offline is not None:
            _compare(report, row, offline)
        report["results"].append(row)
    return report


def offline_timer(predict: Callable, arrays_for: Callable[[int], tuple], iters: int = 20,
                  warmup: int = 3) -> Callable[[int], dict]:
    """``timer(batch)``: ``predict`` (``Engine.predict``) timed in this process at ``batch`` (engine.timing's
    schedule, whose cool-down pauses also let the server's thread pools go idle)."""
    def timer(batch: int) -> dict:
        args = arrays_for(batch)
        samples = time_interleaved({batch: lambda: predict(*args)}, Schedule.for_iters(iters, warmup))
        return summarize(samples[batch], batch)

    return timer


def _compare(report: dict, row: dict, offline: Callable[[int], dict]) -> None:
    """Right after a level: the offline throughput at the server's mean batch (rounded), the ratio, and at
    one client the serving cost (served p50 minus the direct p50 at the request's batch)."""
    b = max(1, round(row["mean_batch"] or row["batch"]))
    ref = offline(b)
    row.update(offline_batch=b, offline_p50_ms=ref["p50_ms"], offline_throughput=ref["throughput"],
               served_vs_offline=row["throughput"] / ref["throughput"])
    if row["concurrency"] == 1 and b == row["batch"] and "p50_ms" in row:
        report["serving_cost_ms"] = row["p50_ms"] - ref["p50_ms"]


def format_load_table(report: dict) -> str:
    lines = [f"{report['url']} model {report['model']} ({report['protocol']}), {report['duration_s']:g} s per level"]
    head = (f"{'clients':>7} {'batch':>5} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
            f"{'samples/s':>10} {'srv batch':>9} {'offline/s':>10} {'ratio':>6}")
    lines += [head, "-" * len(head)]
    for r in report["results"]:
        lines.append(f"{r['concurrency']:>7} {r['batch']:>5} {r['requests']:>8} {r['errors']:>6} "
                     f"{_fmt(r.get('p50_ms'), '.2f'):>8} {_fmt(r.get('p90_ms'), '.2f'):>8} {_fmt(r.get('p99_ms'), '.2f'):>8} "
                     f"{r['throughput']:>10.1f} {_fmt(r['mean_batch'], '.2f'):>9} "
                     f"{_fmt(r.get('offline_throughput'), '.1f'):>10} {_fmt(r.get('served_vs_offline'), '.2f'):>6}")
        if r["first_error"]:
            lines.append(f"        first error: {r['first_error']}")
    if "serving_cost_ms" in report:
        lines.append(f"serving cost per request at 1 client: {report['serving_cost_ms']:.2f} ms "
                     "(served p50 - direct Engine.predict p50)")
    return "\n".join(lines)

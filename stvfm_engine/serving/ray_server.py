"""``stvfm-engine serve --ray``: start (or join) Ray, deploy the applications of :mod:`ray_app`, say ready
once every model is warm and reachable through Ray's HTTP proxy, and drain on SIGTERM/SIGINT: readiness
false at once, new requests 503 with ``Connection: close``, the applications kept until every accepted
request is answered, then stopped (exit 0, or 3 when ``--drain-timeout`` expires first)."""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from stvfm_engine.errors import ServeError, first_line
from stvfm_engine.serving.lifecycle import StopRequest, check_free, describe, log, loopback, stop_on_signals
from stvfm_engine.serving.models import ServedModel

DRAIN_TIMEOUT_EXIT = 3
LINGER_S = 2.0  # at most this long the proxy's connections (the drain's 503s close them) have to be answered
SO_ATTACH_FILTER = 26  # asm-generic/socket.h (x86, arm)
SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture (the generic syscall table)


@dataclass(frozen=True)
class RayOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    address: Optional[str] = None  # an existing cluster; None or "local": a private instance, stopped at the end
    replicas: int = 1
    max_queue_delay_ms: float = 0.0
    max_queue: Optional[int] = None  # requests waiting in Ray's router per application (None: 8 x max batch)
    request_timeout_ms: float = 30000.0
    drain_timeout_s: float = 30.0
    max_request_mb: float = 64.0
    ready_timeout_s: float = 300.0


def ray_address(flag: Optional[str]) -> Optional[str]:
    """``--ray-address``, else ``RAY_ADDRESS``; None (a private instance) for neither or ``local``."""
    address = flag if flag is not None else os.environ.get("RAY_ADDRESS")
    return None if not address or address == "local" else address


def serve_ray(models: Sequence[ServedModel], options: RayOptions = RayOptions()) -> int:
    """Serve ``models`` on Ray Serve until SIGTERM/SIGINT, then drain; returns the exit code."""
    import ray

    address = ray_address(options.address)
    local = address is None
    if local:  # our proxy binds --host:--http-port; a port somebody else holds is an error before anything starts
        check_free(options.host, [options.http_port])
        os.environ.pop("RAY_ADDRESS", None)  # ray.init would join it instead of starting ours
    with stop_on_signals() as early, _own_process_group():
        log("starting a private Ray instance" if local else f"connecting to Ray at {address}")
        host_ip = options.host if options.host not in ("0.0.0.0", "::", "") else None
        # each replica reserves one CPU (Serve's default): a private instance declares at least that many
        replicas = len({m.directory if m.key is not None else m.name for m in models}) * options.replicas
        ray.init(address="local" if local else address, num_cpus=max(os.cpu_count() or 1, replicas) if local else None,
                 include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 **({"_node_ip_address": host_ip} if local and host_ip else {}))
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    code = 0
    control = None
    deployed: list[str] = []
    try:
        with stop_on_signals() as stop:  # again: ray.init installs its own SIGTERM handler
            if early.is_set():
                stop.signal_name = early.signal_name
                stop.set()
            control, deployed = _deploy(models, options)
            if not stop.is_set() and _wait_ready(models, options, deployed, stop):
                ray.get(control.set_state.remote(True, False))
                host = loopback(options.host)
                log(f"ready: HTTP http://{host}:{options.http_port} (Ray Serve), metrics "
                    f"http://{host}:{options.http_port}/metrics; models: {', '.join(m.name for m in models)}")
                _watch(control, deployed, stop)
            if control is not None:
                try:
                    code = _drain(control, options, stop)
                    # the proxy stops taking connections and answers those it holds before the instance stops
                    if local and _close_listener(options.http_port):
                        log("the proxy's listener is closed (new connections are refused); the connections it "
                            "held were answered")
                except ray.exceptions.RayError as e:
                    log(f"Ray's processes went away during the drain ({first_line(e)[:160]}): accepted requests "
                        "may be lost")
                    code = 1
    finally:
        try:
            if not local:  # a shared cluster keeps running: take our applications and the control actor away
                from ray import serve

                for name in deployed:
                    serve.delete(name)
                if control is not None:
                    ray.kill(control)
        finally:
            ray.shutdown()  # a private instance stops with its proxy, controller and replicas
    log("stopped")
    return code


@contextlib.contextmanager
def _own_process_group() -> Iterator[None]:
    """Start Ray's processes in a process group of their own: a signal sent to the group ``serve`` runs in
    (``timeout``, a supervisor) then reaches ``serve``, which drains, and not the Ray processes that must
    answer the accepted requests. ``serve`` returns to its group (a terminal's Ctrl-C still reaches it);
    where it leads its group already (a shell's job), nothing changes."""
    try:
        before = os.getpgrp()
        if before == os.getpid():
            before = None
        else:
            os.setpgid(0, 0)
    except OSError:
        before = None
    try:
        yield
    finally:
        if before is not None:
            with contextlib.suppress(OSError):
                os.setpgid(0, before)


def _deploy(models: Sequence[ServedModel], options: RayOptions):
    """Start Serve's proxy on --host:--http-port and submit every application (not waiting for them)."""
    from ray import serve

    from stvfm_engine.serving.ray_app import NAMESPACE, Control, Settings, applications

    name = f"stvfm-control-{os.getpid()}"
    control = Control.options(name=name, namespace=NAMESPACE).remote()
    timeout_s = options.request_timeout_ms / 1000
    settings = Settings(control=name, max_queue_delay_s=options.max_queue_delay_ms / 1000,
                        request_timeout_s=timeout_s, max_request_bytes=int(options.max_request_mb * 2 ** 20),
                        served=tuple(sorted(m.name for m in models)))
    apps = applications(models, settings, options.replicas, options.max_queue, timeout_s)
    # Ray's own request timeout (it answers 408) is only a backstop behind the replicas' deadline
    serve.start(http_options={"host": options.host, "port": options.http_port,
                              "request_timeout_s": 2 * timeout_s + 10},
                logging_config={"log_level": "WARNING"})
    log(f"deploying {describe(list(models))} ({options.replicas} replica(s) per engine directory, each the HTTP "
        "ingress of its models; a multi-model directory's models share one replica and backbone)")
    serve.run_many([serve.RunTarget(target=app, name=app_name, route_prefix=prefix) for app_name, prefix, app in apps],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    return control, [app_name for app_name, _, _ in apps]


def _close_listener(port: int) -> bool:
    """Stop the private instance's HTTP proxy listening on ``port`` while it goes on answering the connections
    it accepted. Ray's proxy actor cannot close its listener apart from stopping, which resets every
    connection that carries a request not yet answered (a 503 of the drain), those still waiting in the
    listener's accept queue included. So its listening socket is taken from the proxy process
    (``pidfd_getfd``: Linux 5.6+, allowed on our own descendants) and given a socket filter that drops every
    packet (:func:`_drop_new_connections`): a new connection's SYN goes unanswered (its client retries a
    second later) while the proxy accepts and answers the connections already queued. Once the queue is
    empty and every connection closed (each answer of a drain closes its connection), at most
    :data:`LINGER_S`, the socket is shut down for reading, which stops a TCP listener: the retried
    connections are refused. False where this cannot be done (another OS, an older kernel, ptrace not
    allowed): then the instance stops as before."""
    socks: list[socket.socket] = []
    try:
        inodes = _listening_inodes(port)
        for pid in _descendants(os.getpid()):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes and (sock := _socket_of(pid, int(fd))):
                        socks.append(sock)
                except OSError:
                    continue
        for sock in socks:
            with contextlib.suppress(OSError):  # without the filter: the queue still empties, new ones may join
                _drop_new_connections(sock)
        deadline = time.monotonic() + (LINGER_S if socks else 0)
        while _busy(port) and time.monotonic() < deadline:
            time.sleep(0.02)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
        return bool(socks)
    except OSError:  # no /proc (another OS): nothing done
        return False
    finally:
        for sock in socks:
            sock.close()  # our copy only


def _tcp_rows(port: int) -> list[list[str]]:
    """The rows of ``/proc/net/tcp{,6}`` of the sockets whose local port is ``port`` (field 3: the state,
    ``0A`` listening, ``01`` established; field 4: ``tx_queue:rx_queue``; field 9: the inode)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and int(fields[1].rsplit(":", 1)[1], 16) == port:
                out.append(fields)
    return out


def _busy(port: int) -> bool:
    """Connections are waiting in a listener's accept queue (its ``rx_queue``) or open on ``port`` (every
    answer of a drain closes its connection)."""
    rows = _tcp_rows(port)
    return any(r[3] == "01" or (r[3] == "0A" and int(r[4].split(":")[1], 16)) for r in rows)


def _drop_new_connections(sock: socket.socket) -> None:
    """Attach a classic BPF filter that drops every packet to the listening ``sock``: it runs on what arrives
    for the listener (SYNs, the last ACK of a handshake), not on connections already made."""
    import struct

    drop = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0))  # BPF_RET | BPF_K, return 0
    program = struct.pack("HP", 1, ctypes.addressof(drop))  # struct sock_fprog {len, filter}
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, program)


def _listening_inodes(port: int) -> set[str]:
    return {f"socket:[{fields[9]}]" for fields in _tcp_rows(port) if fields[3] == "0A"}


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _socket_of(pid: int, fd: int) -> Optional[socket.socket]:
    """A copy of socket ``fd`` of process ``pid`` (``pidfd_getfd``), or None."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
    try:
        ours = ctypes.CDLL(None, use_errno=True).syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        return socket.socket(fileno=ours) if ours >= 0 else None
    except OSError:
        return None
    finally:
        os.close(pidfd)


def _statuses(names: Sequence[str]) -> dict[str, tuple[str, str]]:
    from ray import serve

    apps = serve.status().applications
    return {n: (apps[n].status.value, apps[n].message) if n in apps else ("NOT_STARTED", "") for n in names}


def _wait_ready(models: Sequence[ServedModel], options: RayOptions, names: Sequence[str], stop: StopRequest) -> bool:
    """Every application running (its replicas warm), then each model answering through the proxy: its
    ``/ready`` and one batch-1 request. False if a signal came first."""
    deadline = time.monotonic() + options.ready_timeout_s
    base = f"http://{loopback(options.host)}:{options.http_port}"
    pending = list(names)
    while True:
        if stop.wait(0.25):
            return False
        if time.monotonic() > deadline:
            raise ServeError(f"the Ray Serve applications were not ready within {options.ready_timeout_s:.0f} s: "
                             f"{_statuses(names)}")
        if pending:
            statuses = _statuses(pending)
            for name, (status, message) in statuses.items():
                if status == "DEPLOY_FAILED":
                    raise ServeError(f"Ray Serve could not deploy {name}: {message.strip().splitlines()[-1:] or status}")
            pending = [n for n, (status, _) in statuses.items() if status != "RUNNING"]
            continue
        if all(_warm_request(base, m) for m in models):
            return True


def _warm_request(base: str, model: ServedModel) -> bool:
    """One batch-1 request of zeros through the proxy (the route is known and the path warm); an ``M_stream``
    companion (its replica warmed its engine; no stream exists to ask) answers its ``/ready``."""
    if model.streams is not None:
        try:
            with urllib.request.urlopen(f"{base}/v2/models/{model.name}/ready", timeout=30) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False
    inputs = [{"name": t["name"], "datatype": t["datatype"], "shape": [1, *t["dims"]],
               "data": [0] * _size(t["dims"])} for t in model.io()["inputs"]]
    body = json.dumps({"inputs": inputs}).encode()
    request = urllib.request.Request(f"{base}/v2/models/{model.name}/infer", data=body,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _size(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _watch(control, names: Sequence[str], stop: StopRequest) -> None:
    """Until a signal: readiness follows the applications' health (a dead replica turns it false until
    Ray has replaced it, warm)."""
    import ray

    healthy = True
    while not stop.wait(0.5):
        try:
            statuses = _statuses(names)
        except Exception as e:  # noqa: BLE001 - the controller is unreachable: not ready
            statuses = {"controller": ("UNREACHABLE", str(e))}
        bad = {n: s for n, s in statuses.items() if s[0] != "RUNNING"}
        if bool(bad) == healthy:
            healthy = not bad
            ray.get(control.set_state.remote(healthy, False))
            log("all applications running again: ready" if healthy else
                f"not ready: {', '.join(f'{n} {s[0]}' for n, s in bad.items())}")


def _drain(control, options: RayOptions, stop: StopRequest) -> int:
    """Readiness false and new requests refused at once; wait until every live replica has seen the drain
    and holds no accepted request (three polls in a row). Returns 0, or 3 if ``--drain-timeout`` expires."""
    import ray

    from stvfm_engine.serving.ray_app import POLL_S

    t0 = time.time()
    ray.get(control.set_state.remote(False, True))
    log(f"{stop.signal_name or 'stop'}: draining (not ready; new requests answered 503; waiting for the "
        f"accepted ones, at most {options.drain_timeout_s:g} s)")
    deadline = time.monotonic() + options.drain_timeout_s
    quiet, busy = 0, 0
    while True:
        now = time.time()
        live = [r for r in ray.get(control.snapshot.remote()).values() if r["at"] > now - 2.0]
        busy = sum(r["inflight"] for r in live)
        quiet = quiet + 1 if all(r["at"] > t0 + POLL_S for r in live) and busy == 0 else 0
        if quiet >= 3:
            log(f"drained in {time.time() - t0:.2f} s ({sum(r.get('refused', 0) for r in live)} requests refused "
                "while draining)")
            return 0
        if time.monotonic() > deadline:
            log(f"drain timeout of {options.drain_timeout_s:g} s expired with {busy} accepted request(s) unanswered")
            return DRAIN_TIMEOUT_EXIT
        time.sleep(POLL_S)

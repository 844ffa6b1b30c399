"""The `gradient-server` command."""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import warnings

import grpc

from gradient_client.client import DEFAULT_MAX_MESSAGE_MB, check_message_mb

from .admission import MemoryBudget, default_budget
from .auth import TokenError, Tokens, server_credentials
from .calllog import CallLog, JsonFormatter
from .engine import Engine, Limits
from .healthcheck import default_port
from .service import create_server

log = logging.getLogger("gradient_server")


def _message_mb(text: str) -> int:
    try:
        return check_message_mb(int(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _HelpWithDefaults(argparse.HelpFormatter):
    """Help that states every flag's default (unless its text already does)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default {action.default})".lstrip()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradient-server",
        description="Serve gradient.v1.GradientService (with gRPC health and reflection).",
        formatter_class=_HelpWithDefaults,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    parser.add_argument(
        "--port",
        type=int,
        default=default_port(),
        help="port to bind (default $GRADIENT_PORT, else 50051)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port through SO_REUSEPORT (default 1)",
    )
    parser.add_argument("--threads", type=int, default=8, help="request threads per process")
    parser.add_argument(
        "--max-message-mb",
        type=_message_mb,
        default=DEFAULT_MAX_MESSAGE_MB,
        help=f"largest request or response in MiB (default {DEFAULT_MAX_MESSAGE_MB})",
    )
    defaults = Limits()
    parser.add_argument(
        "--max-nodes", type=int, default=defaults.max_nodes, help="nodes in one request's graph"
    )
    parser.add_argument(
        "--max-tensor-elements",
        type=int,
        default=defaults.max_tensor_elements,
        help="elements of any one tensor, fed or computed",
    )
    parser.add_argument(
        "--max-check-evaluations",
        type=int,
        default=defaults.max_check_evaluations,
        help="forward passes one CheckGradient request may run",
    )
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=defaults.max_bytes,
        help="largest estimated memory of one request's values",
    )
    parser.add_argument(
        "--max-flops",
        type=_flops,
        default=defaults.max_flops,
        help="largest estimated work of one request, in flops (a multiply-add counts 2; other "
        "numpy work is charged by its time, about 6e10 flops a second on 2 cores); beyond it "
        "the request is refused with RESOURCE_EXHAUSTED before anything runs (default 1e12)",
    )
    parser.add_argument(
        "--max-op-flops",
        type=_flops,
        default=defaults.max_op_flops,
        help="largest estimated work of any one op, in flops; deadlines and cancellation are "
        "checked between ops, so this bounds how long a request runs past them (default "
        "1e10, about 0.2 s)",
    )
    parser.add_argument(
        "--memory-budget",
        type=_positive,
        default=None,
        metavar="MB",
        help="estimated memory of all the requests running at once, in MiB (default: 70%% of "
        "the cgroup's memory limit, else of physical memory, shared among --workers); a "
        "request that does not fit waits up to 2 s, then is refused with RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--max-concurrent-rpcs",
        type=_positive,
        default=64,
        help="calls at once per process, streams included; beyond it a call is refused at "
        "once with RESOURCE_EXHAUSTED rather than queued (default 64)",
    )
    parser.add_argument(
        "--cache-mb",
        type=_positive,
        default=1024,
        help="memory of the caches of decoded graphs and compiled plans, in MiB (default "
        "1024); a graph larger than a quarter of it is served but not cached",
    )
    parser.add_argument(
        "--max-sessions",
        type=_positive,
        default=16,
        help="Session streams open at once per process; each holds a thread (default 16)",
    )
    parser.add_argument(
        "--grace", type=float, default=10.0, help="seconds in-flight calls get at shutdown"
    )
    parser.add_argument(
        "--max-connection-age",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="ask each client to reconnect after this long (default 0: never), so that "
        "clients balancing over DNS find replicas added since; calls in flight finish",
    )
    security = parser.add_argument_group(
        "security", "TLS, mutual TLS and bearer tokens (see the README's security model)"
    )
    security.add_argument("--tls-cert", metavar="PEM", help="the server's certificate chain")
    security.add_argument("--tls-key", metavar="PEM", help="the server's private key")
    security.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="mutual TLS: refuse clients without a certificate signed by this CA",
    )
    security.add_argument(
        "--token-file",
        metavar="FILE",
        help="bearer tokens, one per line; every call but health checks needs one (read "
        "again on SIGHUP)",
    )
    security.add_argument(
        "--health-port",
        type=int,
        default=0,
        help="also serve the health service alone, in plaintext, on this port (default 0: "
        "none), for probes that speak neither TLS nor tokens",
    )
    security.add_argument(
        "--health-host",
        default="127.0.0.1",
        help="address of the plaintext health port (default 127.0.0.1)",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines, or one JSON object per line (default text)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (default 0: no "
        "metrics); with --workers N, worker i serves them on PORT+i",
    )
    parser.add_argument(
        "--metrics-host",
        default=None,
        help="address the metrics are served on (default: --host)",
    )
    parser.add_argument(
        "--log-calls",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="fraction of successful calls logged, one line each (default 0; failed calls "
        "are always logged)",
    )
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _flops(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (math.isfinite(value) and value >= 1):
        raise argparse.ArgumentTypeError(
            f"expected a number of flops of at least 1, like 1e12, got {text!r}"
        )
    return int(value)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {text!r}")
    return value


def serve(args: argparse.Namespace, slot: int = 0) -> None:
    """Run one server process (worker `slot`) until SIGTERM or SIGINT, then stop
    gracefully."""
    # numpy warns on stderr about requests' values (e.g. the mean of an empty slice is nan);
    # those results are the client's to see, not the operator's log.
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        credentials, tokens = _security(args)
    except (OSError, TokenError) as e:
        log.error("%s", e)
        raise SystemExit(1) from None
    # SIGHUP reads the token file again (and is otherwise ignored, not fatal).
    signal.signal(signal.SIGHUP, lambda *_: _reload(tokens) if tokens is not None else None)
    limits = Limits(
        max_nodes=args.max_nodes,
        max_tensor_elements=args.max_tensor_elements,
        max_bytes=args.max_bytes,
        max_check_evaluations=args.max_check_evaluations,
        max_flops=args.max_flops,
        max_op_flops=args.max_op_flops,
    )
    budget = (
        args.memory_budget << 20 if args.memory_budget is not None else default_budget(args.workers)
    )
    try:
        server, port = create_server(
            f"{args.host}:{args.port}",
            engine=Engine(limits, cache_bytes=args.cache_mb << 20, budget=MemoryBudget(budget)),
            threads=args.threads,
            max_message_mb=args.max_message_mb,
            max_sessions=args.max_sessions,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            reuse_port=args.workers > 1,
            call_log=CallLog(args.log_calls),
            metrics=bool(args.metrics_port),
            credentials=credentials,
            tokens=tokens,
            health_address=f"{args.health_host}:{args.health_port}" if args.health_port else None,
            max_connection_age=args.max_connection_age,
        )
        if args.metrics_port:
            metrics_host = args.metrics_host or args.host
            metrics_port = server.serve_metrics(metrics_host, args.metrics_port + slot)
            log.info("metrics on http://%s:%d/metrics", metrics_host, metrics_port)
    except OSError as e:
        log.error("%s", e)
        raise SystemExit(1) from None
    server.start()
    protection = [
        "mutual TLS" if args.tls_client_ca else "TLS" if credentials else "plaintext",
        *(["bearer tokens"] if tokens is not None else []),
    ]
    log.info(
        "serving gradient.v1.GradientService on %s:%d (pid %d, %s)",
        args.host,
        port,
        os.getpid(),
        ", ".join(protection),
    )
    if server.health_port:
        log.info("health alone, plaintext, on %s:%d", args.health_host, server.health_port)
    stop.wait()
    log.info("shutting down: health NOT_SERVING, in-flight calls get %.0f s", args.grace)
    server.stop(args.grace)


def _security(args: argparse.Namespace) -> tuple[grpc.ServerCredentials | None, Tokens | None]:
    """The TLS credentials and the tokens the flags ask for (None: not asked)."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise OSError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise OSError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    credentials = None
    if args.tls_cert:
        credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    tokens = Tokens(args.token_file) if args.token_file else None
    return credentials, tokens


def _reload(tokens: Tokens) -> None:
    try:
        count = tokens.reload()
    except TokenError as e:
        log.error("%s; the tokens read before stay in force", e)
        return
    log.info("token file read again: %d tokens", count)


RESTART_BACKOFF = (0.1, 10.0)
"""Seconds before a dead worker is restarted: the first wait, doubling up to the second."""

EARLY_DEATH = 5.0
"""A worker that dies within this many seconds of its start died at start."""

EARLY_DEATHS_ALLOWED = 5
"""Consecutive deaths at start of one worker after which the server gives up (exit 1)."""


def _why(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with status {exitcode}"


def _forward(signum: int, workers) -> None:
    for worker in list(workers):
        if worker.pid is not None and worker.is_alive():
            os.kill(worker.pid, signum)


def supervise(args: argparse.Namespace) -> int:
    """Run `args.workers` server processes sharing the port, restarting any that dies, until
    SIGTERM or SIGINT (forwarded to each, which drains); the exit status of the whole."""
    # Workers are forked while this process holds no gRPC object (gRPC is not fork-safe).
    context = multiprocessing.get_context("fork")
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, _frame: stopping.set())
    workers: dict[int, multiprocessing.process.BaseProcess] = {}
    signal.signal(signal.SIGHUP, lambda *_: _forward(signal.SIGHUP, workers.values()))
    started: dict[int, float] = {}
    early_deaths = dict.fromkeys(range(args.workers), 0)
    restarts: dict[int, float] = {}  # slot -> when to start it again

    def start(slot: int) -> None:
        worker = context.Process(target=serve, args=(args, slot), name=f"gradient-worker-{slot}")
        worker.start()
        workers[slot], started[slot] = worker, time.monotonic()

    for slot in range(args.workers):
        start(slot)
    forwarded = False
    while workers or (restarts and not stopping.is_set()):
        if stopping.is_set() and not forwarded:
            log.info("stopping %d workers (each drains its calls)", len(workers))
            for worker in workers.values():
                if worker.pid is not None:
                    os.kill(worker.pid, signal.SIGTERM)
            restarts.clear()
            forwarded = True
        multiprocessing.connection.wait([w.sentinel for w in workers.values()], timeout=0.2)
        now = time.monotonic()
        for slot, worker in list(workers.items()):
            if worker.is_alive():
                continue
            del workers[slot]
            if stopping.is_set():
                if worker.exitcode:
                    log.warning("worker %d (pid %d) %s", slot, worker.pid, _why(worker.exitcode))
                continue
            early = now - started[slot] < EARLY_DEATH
            early_deaths[slot] = early_deaths[slot] + 1 if early else 0
            if early_deaths[slot] >= EARLY_DEATHS_ALLOWED:
                log.error(
                    "worker %d %s at start %d times in a row: giving up",
                    slot,
                    _why(worker.exitcode),
                    early_deaths[slot],
                )
                stopping.set()
                for other in workers.values():
                    if other.pid is not None:
                        os.kill(other.pid, signal.SIGTERM)
                for other in workers.values():
                    other.join()
                return 1
            first, most = RESTART_BACKOFF
            delay = min(first * 2 ** max(early_deaths[slot] - 1, 0), most)
            log.warning(
                "worker %d (pid %d) %s; restarting it in %.1f s",
                slot,
                worker.pid,
                _why(worker.exitcode),
                delay,
            )
            restarts[slot] = now + delay
        for slot, when in list(restarts.items()):
            if now >= when and not stopping.is_set():
                del restarts[slot]
                start(slot)
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of `gradient-server`."""
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler()
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    if args.workers <= 1:
        serve(args)
        return
    raise SystemExit(supervise(args))


if __name__ == "__main__":
    main()

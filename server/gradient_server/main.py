"""The `gradient-server` command."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import threading
import warnings

from gradient_client.client import DEFAULT_MAX_MESSAGE_MB, check_message_mb

from .calllog import CallLog
from .engine import Limits
from .service import create_server

log = logging.getLogger("gradient_server")


def _message_mb(text: str) -> int:
    try:
        return check_message_mb(int(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradient-server",
        description="Serve gradient.v1.GradientService (with gRPC health and reflection).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=50051, help="port to bind (default 50051)")
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
    parser.add_argument("--max-nodes", type=int, default=defaults.max_nodes)
    parser.add_argument("--max-tensor-elements", type=int, default=defaults.max_tensor_elements)
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
        "--max-sessions",
        type=_positive,
        default=16,
        help="Session streams open at once per process; each holds a thread (default 16)",
    )
    parser.add_argument(
        "--grace", type=float, default=10.0, help="seconds in-flight calls get at shutdown"
    )
    parser.add_argument("--log-level", default="INFO")
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


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {text!r}")
    return value


def serve(args: argparse.Namespace) -> None:
    """Run one server process until SIGTERM or SIGINT, then stop gracefully."""
    # numpy warns on stderr about requests' values (e.g. the mean of an empty slice is nan);
    # those results are the client's to see, not the operator's log.
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    limits = Limits(
        args.max_nodes, args.max_tensor_elements, args.max_bytes, args.max_check_evaluations
    )
    try:
        server, port = create_server(
            f"{args.host}:{args.port}",
            limits=limits,
            threads=args.threads,
            max_message_mb=args.max_message_mb,
            max_sessions=args.max_sessions,
            reuse_port=args.workers > 1,
            call_log=CallLog(args.log_calls),
        )
    except OSError as e:
        log.error("%s", e)
        raise SystemExit(1) from None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    log.info("serving gradient.v1.GradientService on %s:%d (pid %d)", args.host, port, os.getpid())
    stop.wait()
    log.info("shutting down: health NOT_SERVING, in-flight calls get %.0f s", args.grace)
    server.stop(args.grace)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `gradient-server`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    if args.workers <= 1:
        serve(args)
        return
    # Fork the workers before any gRPC object exists in this process (gRPC is not fork-safe).
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=serve, args=(args,)) for _ in range(args.workers)]
    for worker in workers:
        worker.start()

    def forward(signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for worker in workers:
        worker.join()


if __name__ == "__main__":
    main()

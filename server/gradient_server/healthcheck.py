"""The `gradient-healthcheck` command: ask a server's grpc.health.v1 service whether it is SERVING.

Exit status 0 when the answer is SERVING, 1 otherwise (not serving, unknown service, connection
refused, timeout, bad arguments), so it can be a container HEALTHCHECK or a readiness probe as is::

    gradient-healthcheck --target 127.0.0.1:50051 --service gradient.v1.GradientService
    python -m gradient_server.healthcheck --target 127.0.0.1:50051

Failures print one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradient_client import security

PORT_ENV = "GRADIENT_PORT"
"""The environment variable of the server's port, read by gradient-server (its --port
overrides it) and by this probe, so that a container sets its port in one place."""

TARGET_ENV = "GRADIENT_HEALTHCHECK_TARGET"
"""The environment variable naming the probe's target outright: a container whose server
speaks TLS points its HEALTHCHECK at the plaintext health port with it (e.g. 127.0.0.1:8081)."""


def default_port() -> int:
    """The port of $GRADIENT_PORT, else 50051."""
    text = os.environ.get(PORT_ENV, "")
    return int(text) if text.isdigit() else 50051


def default_target() -> str:
    """$GRADIENT_HEALTHCHECK_TARGET, else 127.0.0.1 on the server's default port."""
    return os.environ.get(TARGET_ENV) or f"127.0.0.1:{default_port()}"


DEFAULT_TIMEOUT = 3.0

_PROG = "gradient-healthcheck"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors exit 1 (Docker reserves exit status 2)."""

    def error(self, message: str) -> NoReturn:
        """Print the usage and the error on stderr, then exit 1."""
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=_PROG,
        description="Exit 0 if the server's grpc.health.v1 Check answers SERVING, else 1.",
    )
    parser.add_argument(
        "--target",
        default=default_target(),
        help=f"server address host:port (default ${TARGET_ENV}, else 127.0.0.1:${PORT_ENV}, "
        "else 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--service",
        default="",
        help='service name to check; "" (the default) is the whole server',
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT:g})",
    )
    security.add_arguments(parser, token=False)  # health needs no token
    return parser


def check(
    target: str,
    service: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    tls: security.TLS | None = None,
) -> str:
    """Call grpc.health.v1 Health/Check on `target` (over TLS with `tls`) and return the
    status name, e.g. "SERVING".

    Raises grpc.RpcError when the call fails (nothing listening, timeout, unknown service).
    """
    # A probe talks to the server directly: never route it through an http(s)_proxy from the env.
    options: list[tuple[str, object]] = [("grpc.enable_http_proxy", 0)]
    if tls is not None:
        channel = grpc.secure_channel(target, tls.credentials(), options + tls.options())
    else:
        channel = grpc.insecure_channel(target, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `gradient-healthcheck`; returns the exit status (0 healthy, 1 not)."""
    args = _parser().parse_args(argv)
    what = f"{args.target} service {args.service!r}" if args.service else args.target
    try:
        status = check(args.target, args.service, args.timeout, security.tls_of(args))
    except (OSError, ValueError) as e:  # an unreadable or inconsistent TLS file or flag
        print(f"{_PROG}: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        code = e.code() if isinstance(e, grpc.Call) else None
        name = code.name if code is not None else "ERROR"
        details = e.details() if isinstance(e, grpc.Call) else str(e)
        detail = " ".join((details or "").split())
        if not detail and code == grpc.StatusCode.NOT_FOUND:
            detail = "the server does not know this service"
        print(f"{_PROG}: {what}: {name}" + (f": {detail}" if detail else ""), file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"{_PROG}: {what}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

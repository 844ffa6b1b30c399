"""Who may call: TLS (and mutual TLS) credentials, and bearer tokens checked on every call.

Tokens are read from a file of the operator's, one per line (blank lines and lines starting
with # are ignored), and read again on SIGHUP. A call must carry `authorization: Bearer
<token>` metadata matching one of them; each is compared in constant time. The health service
is exempt, so that probes need no secret (it tells only whether the server serves). A refused
call is UNAUTHENTICATED; neither the token sent nor the tokens held appear in any message.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import grpc

log = logging.getLogger("gradient_server")

EXEMPT_PREFIX = "/grpc.health.v1.Health/"
"""Methods callable without a token: the health service, for probes."""

BEARER = "bearer "


class TokenError(Exception):
    """The token file cannot be used (missing, unreadable, or holding no token)."""


class Tokens:
    """The bearer tokens the server accepts, read from a file and read again by `reload`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._tokens: tuple[bytes, ...] = ()
        self._lock = threading.Lock()
        self.reload()

    def reload(self) -> int:
        """Read the file again; returns how many tokens it holds. On TokenError the tokens
        held before stay in force."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenError(f"cannot read the token file {self.path}: {e.strerror or e}") from e
        tokens = tuple(
            _digest(line.strip())
            for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")
        )
        if not tokens:
            raise TokenError(f"the token file {self.path} holds no token")
        with self._lock:
            self._tokens = tokens
        return len(tokens)

    def allows(self, authorization: str | None) -> bool:
        """Whether an `authorization` metadata value carries one of the tokens. Every token
        is compared, by their digests (of one length) and in constant time, so the time taken
        tells nothing of them."""
        if authorization is None or authorization[: len(BEARER)].lower() != BEARER:
            return False
        offered = _digest(authorization[len(BEARER) :].strip())
        with self._lock:
            tokens = self._tokens
        allowed = False
        for token in tokens:
            allowed |= hmac.compare_digest(offered, token)
        return allowed


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _authorization(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


REFUSAL = "missing or invalid bearer token: send `authorization: Bearer <token>` metadata"


def _refuse(request, context: grpc.ServicerContext):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)


def _refuse_stream(request_or_iterator, context: grpc.ServicerContext):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
    yield  # a generator, as a streaming handler is


_REFUSALS: dict[tuple[bool, bool], grpc.RpcMethodHandler] = {
    (False, False): grpc.unary_unary_rpc_method_handler(_refuse),
    (True, False): grpc.stream_unary_rpc_method_handler(_refuse),
    (False, True): grpc.unary_stream_rpc_method_handler(_refuse_stream),
    (True, True): grpc.stream_stream_rpc_method_handler(_refuse_stream),
}


class TokenAuth(grpc.ServerInterceptor):
    """Refuses, UNAUTHENTICATED, every call without a valid bearer token (health exempt)."""

    def __init__(self, tokens: Tokens):
        self.tokens = tokens

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """The method's handler if the call may proceed, else one that refuses it."""
        handler = continuation(handler_call_details)
        method = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(EXEMPT_PREFIX):
            return handler
        metadata = handler_call_details.invocation_metadata  # type: ignore[attr-defined]
        if self.tokens.allows(_authorization(metadata)):
            return handler
        log.warning("refused %s: %s", method, "no valid bearer token")
        return _REFUSALS[(handler.request_streaming, handler.response_streaming)]


def server_credentials(
    cert: str | Path, key: str | Path, client_ca: str | Path | None = None
) -> grpc.ServerCredentials:
    """TLS credentials from PEM files: the server's certificate chain and key, and with
    `client_ca`, mutual TLS (a client must present a certificate signed by that CA; one
    without is refused during the handshake)."""
    try:
        chain = Path(cert).read_bytes()
        private_key = Path(key).read_bytes()
        roots = Path(client_ca).read_bytes() if client_ca else None
    except OSError as e:
        raise OSError(f"cannot read a TLS file: {e.filename}: {e.strerror}") from None
    for path, data, marker, what in (
        (cert, chain, b"-----BEGIN CERTIFICATE-----", "certificate"),
        (key, private_key, b"PRIVATE KEY-----", "private key"),
        (client_ca, roots, b"-----BEGIN CERTIFICATE-----", "CA certificate"),
    ):
        if data is not None and marker not in data:
            raise OSError(f"{path} is not a PEM file holding a {what}")
    return grpc.ssl_server_credentials(
        [(private_key, chain)], root_certificates=roots, require_client_auth=roots is not None
    )

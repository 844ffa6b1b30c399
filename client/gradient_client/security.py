"""A client's side of the server's security: TLS (and mutual TLS) and bearer tokens."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import grpc

PEM = str | Path | bytes
"""A PEM file's path, or its bytes."""


@dataclass(frozen=True)
class TLS:
    """How a client speaks TLS to the server.

    `ca`: the certificate authority the server's certificate must be signed by (None: the
    system's trusted roots). `cert` and `key`: the client's own certificate chain and private
    key, for a server that requires mutual TLS. `server_name`: the name checked in the
    server's certificate, when it is not the target's host (e.g. connecting by IP address).
    """

    ca: PEM | None = None
    cert: PEM | None = None
    key: PEM | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS: a client certificate (cert) and its key go together")

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials of these settings."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca),
            private_key=_read(self.key),
            certificate_chain=_read(self.cert),
        )

    def options(self) -> list[tuple[str, str]]:
        """Channel options these settings need."""
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []


def _read(pem: PEM | None) -> bytes | None:
    if pem is None or isinstance(pem, bytes):
        return pem
    return Path(pem).read_bytes()


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata carrying a bearer token (None: no token)."""
    if token is None:
        return None
    token = token.strip()
    if not token or any(c in token for c in "\r\n"):
        raise ValueError("a token must be one non-empty line")
    return (("authorization", f"Bearer {token}"),)


def read_token(path: str | Path) -> str:
    """The first token in a file (one per line; blank lines and # comments are skipped)."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()
    raise ValueError(f"the token file {path} holds no token")


def add_arguments(
    parser: argparse.ArgumentParser, *, token: bool = True, defaults: bool = True
) -> None:
    """The command-line flags of a client's security (--tls, --tls-ca, --tls-cert, --tls-key,
    --tls-server-name and, if `token`, --token-file). With defaults=False an absent flag
    sets nothing (for a subcommand's parser, not to undo a flag given before it)."""
    unset: dict = {} if defaults else {"default": argparse.SUPPRESS}
    group = parser.add_argument_group("security")
    group.add_argument(
        "--tls", action="store_true", help="speak TLS, trusting the system's roots", **unset
    )
    group.add_argument("--tls-ca", metavar="PEM", help="speak TLS, trusting this CA", **unset)
    group.add_argument(
        "--tls-cert", metavar="PEM", help="client certificate chain (mutual TLS)", **unset
    )
    group.add_argument("--tls-key", metavar="PEM", help="client private key (mutual TLS)", **unset)
    group.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="the name expected in the server's certificate",
        **unset,
    )
    if token:
        group.add_argument(
            "--token-file",
            metavar="FILE",
            help="send the bearer token in this file (its first line) with every call",
            **unset,
        )


def tls_of(args: argparse.Namespace) -> TLS | None:
    """The TLS settings of the flags add_arguments declared (None: plaintext)."""
    ca, cert, key, name = (
        getattr(args, flag, None) for flag in ("tls_ca", "tls_cert", "tls_key", "tls_server_name")
    )
    if not (getattr(args, "tls", False) or ca or cert or key or name):
        return None
    return TLS(ca, cert, key, name)


def token_of(args: argparse.Namespace) -> str | None:
    """The bearer token of the --token-file flag (None: no token)."""
    path = getattr(args, "token_file", None)
    return read_token(path) if path else None

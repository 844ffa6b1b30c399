"""TLS, mutual TLS and bearer tokens: the right credentials pass, each wrong or missing one is
refused with UNAUTHENTICATED, health stays reachable for probes, and no secret is ever
written in a log line or an error message.

Certificates come from a CA made for the test (trustme), with a second CA as the impostor.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from lecture import LECTURE, lecture_graph
from test_service import ServerProcess

from gradient_client import TLS, GradientClient, GradientError
from gradient_client import cli as client_cli
from gradient_server import healthcheck
from gradient_server.auth import Tokens, server_credentials
from gradient_server.service import create_server

TOKENS = ("s3cret-token-one", "s3cret-token-two")
WRONG_TOKEN = "not-the-token"


def assert_lecture(client: GradientClient) -> None:
    result = client.gradient(lecture_graph(), "f", LECTURE)
    assert float(result.values["f"]) == -12.0
    assert [float(result.gradients[n]) for n in "xyz"] == [-4.0, -4.0, 3.0]


class Pki:
    """A CA with server and client certificates, and an impostor CA, as PEM files."""

    def __init__(self, directory: Path):
        self.ca, impostor = trustme.CA(), trustme.CA()
        self.directory = directory
        self.ca_pem = self._write("ca.pem", self.ca.cert_pem.bytes())
        self.impostor_ca_pem = self._write("impostor-ca.pem", impostor.cert_pem.bytes())
        self.server_cert, self.server_key = self._issue(self.ca, "server", "localhost", "127.0.0.1")
        self.client_cert, self.client_key = self._issue(self.ca, "client", "client.example")
        self.impostor_cert, self.impostor_key = self._issue(impostor, "impostor", "client.example")

    def _write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        return str(path)

    def _issue(self, ca: trustme.CA, name: str, *identities: str) -> tuple[str, str]:
        cert = ca.issue_cert(*identities)
        chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
        return (
            self._write(f"{name}.pem", chain),
            self._write(f"{name}.key", cert.private_key_pem.bytes()),
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# the service's tokens\n{TOKENS[0]}\n\n{TOKENS[1]}\n")
    return path


@contextlib.contextmanager
def serving(**settings) -> Iterator[tuple[str, object]]:
    server, port = create_server("127.0.0.1:0", **settings)
    server.start()
    try:
        yield f"127.0.0.1:{port}", server
    finally:
        server.stop(0)


def refused_code(client: GradientClient) -> grpc.StatusCode:
    with pytest.raises(GradientError) as refused:
        client.gradient(lecture_graph(), "f", LECTURE)
    return refused.value.code


# -- TLS ---------------------------------------------------------------------------------------


def test_tls_serves_clients_trusting_its_ca_and_refuses_others(pki):
    credentials = server_credentials(pki.server_cert, pki.server_key)
    with serving(credentials=credentials) as (address, _):
        with GradientClient(address, tls=TLS(ca=pki.ca_pem), timeout=10) as client:
            assert_lecture(client)
        # The CA given as bytes, and a session, work alike.
        with (
            GradientClient(
                address, tls=TLS(ca=Path(pki.ca_pem).read_bytes()), timeout=10
            ) as client,
            client.session(lecture_graph(), "f") as session,
        ):
            assert float(session.gradient(LECTURE).gradients["z"]) == 3.0
        with GradientClient(address, tls=TLS(ca=pki.impostor_ca_pem), timeout=10) as client:
            assert refused_code(client) == grpc.StatusCode.UNAUTHENTICATED
        # A plaintext client cannot talk to a TLS port (gRPC: UNAVAILABLE, no RPC happened).
        with GradientClient(address, timeout=10) as client:
            assert refused_code(client) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_missing_or_foreign_client_certificate(pki):
    credentials = server_credentials(pki.server_cert, pki.server_key, pki.ca_pem)
    with serving(credentials=credentials) as (address, _):
        good = TLS(ca=pki.ca_pem, cert=pki.client_cert, key=pki.client_key)
        with GradientClient(address, tls=good, timeout=10) as client:
            assert_lecture(client)
        for tls in (
            TLS(ca=pki.ca_pem),  # no client certificate
            TLS(ca=pki.ca_pem, cert=pki.impostor_cert, key=pki.impostor_key),  # another CA's
            TLS(ca=pki.impostor_ca_pem, cert=pki.client_cert, key=pki.client_key),
        ):
            with GradientClient(address, tls=tls, timeout=10) as client:
                assert refused_code(client) == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(GradientError) as refused:
                    with client.session(lecture_graph(), "f") as session:
                        session.gradient(LECTURE)
                assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_tls_settings_are_checked():
    with pytest.raises(ValueError):
        TLS(cert="client.pem")  # without its key
    with pytest.raises(ValueError):
        GradientClient("127.0.0.1:1", tls=True, credentials=grpc.ssl_channel_credentials())


# -- tokens ------------------------------------------------------------------------------------


def raw_gradient(address: str, metadata=None, credentials=None) -> grpc.RpcError | bytes:
    from test_observability import lecture_request

    channel = (
        grpc.secure_channel(address, credentials)
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    with channel:
        call = channel.unary_unary("/gradient.v1.GradientService/Gradient")
        try:
            return call(lecture_request().SerializeToString(), metadata=metadata, timeout=10)
        except grpc.RpcError as error:
            return error


def test_tokens_each_pass_and_a_wrong_or_missing_one_is_refused(token_file, caplog):
    caplog.set_level(logging.DEBUG)
    with serving(tokens=Tokens(token_file)) as (address, _):
        for token in TOKENS:
            with GradientClient(address, token=token, timeout=10) as client:
                assert_lecture(client)
                with client.session(lecture_graph(), "f") as session:
                    assert float(session.gradient(LECTURE).gradients["x"]) == -4.0
        for token in (WRONG_TOKEN, None, TOKENS[0] + "x", TOKENS[0][:-1]):
            with GradientClient(address, token=token, timeout=10) as client:
                with pytest.raises(GradientError) as refused:
                    client.gradient(lecture_graph(), "f", LECTURE)
                assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
                for secret in (*TOKENS, WRONG_TOKEN):
                    assert secret not in str(refused.value)
                with pytest.raises(GradientError) as refused:
                    with client.session(lecture_graph(), "f") as session:
                        session.gradient(LECTURE)
                assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        # The scheme is case-insensitive; other schemes are not tokens.
        assert isinstance(raw_gradient(address, (("authorization", f"bearer {TOKENS[1]}"),)), bytes)
        error = raw_gradient(address, (("authorization", f"Basic {TOKENS[1]}"),))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED

        with grpc.insecure_channel(address) as channel:
            # Health needs no token, so probes need no secret ...
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            # ... while reflection (a stream) does.
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.ServerReflectionInfo(iter([request]), timeout=10))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with_token = stub.ServerReflectionInfo(
                iter([request]), metadata=(("authorization", f"Bearer {TOKENS[0]}"),), timeout=10
            )
            services = next(with_token).list_services_response.service
            assert "gradient.v1.GradientService" in {s.name for s in services}

    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "refused /gradient.v1.GradientService/Gradient" in logged
    for secret in (*TOKENS, WRONG_TOKEN):
        assert secret not in logged


def test_tokens_are_read_again_and_a_bad_file_keeps_the_old_ones(token_file):
    tokens = Tokens(token_file)
    assert tokens.allows(f"Bearer {TOKENS[0]}") and not tokens.allows("Bearer new-token")
    token_file.write_text("new-token\n")
    assert tokens.reload() == 1
    assert tokens.allows("Bearer new-token") and not tokens.allows(f"Bearer {TOKENS[0]}")
    token_file.write_text("# nothing\n")
    with pytest.raises(Exception, match="holds no token"):
        tokens.reload()
    assert tokens.allows("Bearer new-token")
    assert not tokens.allows(None) and not tokens.allows("new-token") and not tokens.allows("")


def test_tokens_over_tls_and_the_plaintext_health_port(pki, token_file, monkeypatch):
    credentials = server_credentials(pki.server_cert, pki.server_key, pki.ca_pem)
    tls = TLS(ca=pki.ca_pem, cert=pki.client_cert, key=pki.client_key)
    with serving(
        credentials=credentials, tokens=Tokens(token_file), health_address="127.0.0.1:0"
    ) as (address, server):
        with GradientClient(address, tls=tls, token=TOKENS[1], timeout=10) as client:
            assert_lecture(client)
        with GradientClient(address, tls=tls, token=WRONG_TOKEN, timeout=10) as client:
            assert refused_code(client) == grpc.StatusCode.UNAUTHENTICATED
        # Probes: the plaintext health port, and gradient-healthcheck over mutual TLS.
        health_target = f"127.0.0.1:{server.health_port}"
        assert healthcheck.main(["--target", health_target]) == 0
        monkeypatch.setenv("GRADIENT_HEALTHCHECK_TARGET", health_target)  # the image's way
        assert healthcheck.main([]) == 0
        assert healthcheck.main(["--target", address]) == 1  # plaintext to a TLS port
        mutual = ["--tls-ca", pki.ca_pem, "--tls-cert", pki.client_cert]
        assert healthcheck.main(["--target", address, *mutual, "--tls-key", pki.client_key]) == 0
        # The plaintext health port serves health alone.
        error = raw_gradient(health_target, (("authorization", f"Bearer {TOKENS[0]}"),))
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_client_command_speaks_tls_with_a_token(pki, token_file, tmp_path, capsys):
    credentials = server_credentials(pki.server_cert, pki.server_key)
    mine = tmp_path / "my-token"
    mine.write_text(TOKENS[0] + "\n")
    with serving(credentials=credentials, tokens=Tokens(token_file)) as (address, _):
        base = ["--target", address, "--tls-ca", pki.ca_pem]
        assert client_cli.main([*base, "--token-file", str(mine), "ops", "add"]) == 0
        assert "add" in capsys.readouterr().out
        assert client_cli.main([*base, "ops", "add"]) == 1
        err = capsys.readouterr().err
        assert "UNAUTHENTICATED" in err and TOKENS[0] not in err


def test_the_server_command_reads_its_token_file_again_on_sighup(pki, tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text("first-token\n")
    server = ServerProcess(
        tmp_path / "server.log",
        "--tls-cert",
        pki.server_cert,
        "--tls-key",
        pki.server_key,
        "--token-file",
        str(token_file),
        "--health-port",
        "0",
    )
    tls = TLS(ca=pki.ca_pem)
    try:
        creds = grpc.ssl_channel_credentials(Path(pki.ca_pem).read_bytes())
        with grpc.secure_channel(server.target, creds) as channel:
            server.wait_serving(channel)
        with GradientClient(server.target, tls=tls, token="first-token", timeout=30) as client:
            assert_lecture(client)
        token_file.write_text("second-token\n")
        server.process.send_signal(signal.SIGHUP)
        with GradientClient(server.target, tls=tls, token="second-token", timeout=30) as client:
            deadline_tries = 200
            while deadline_tries:
                try:
                    assert_lecture(client)
                    break
                except GradientError as error:
                    assert error.code == grpc.StatusCode.UNAUTHENTICATED
                    deadline_tries -= 1
                    time.sleep(0.05)
            assert deadline_tries, "the new token was never accepted"
        with GradientClient(server.target, tls=tls, token="first-token", timeout=30) as client:
            assert refused_code(client) == grpc.StatusCode.UNAUTHENTICATED
        assert server.process.poll() is None  # SIGHUP did not stop it
    finally:
        server.process.terminate()
        server.process.wait(timeout=30)
        log = server.close()
    assert "token file read again: 1 tokens" in log and "mutual" not in log
    assert "first-token" not in log and "second-token" not in log


def test_the_server_command_names_a_bad_tls_file(pki, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    for flags, named in (
        (["--tls-cert", str(garbage), "--tls-key", pki.server_key], "garbage.pem"),
        (["--tls-cert", pki.server_cert, "--tls-key", str(garbage)], "private key"),
        (["--tls-cert", pki.server_cert, "--tls-key", pki.client_key], "do not match"),
    ):
        server = ServerProcess(tmp_path / "bad.log", *flags)
        assert server.process.wait(timeout=60) == 1
        log = server.close()
        assert named in log and "Traceback" not in log, log

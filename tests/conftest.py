"""Shared fixtures: one real server on a loopback port, and an SDK client connected to it."""

from __future__ import annotations

import os

# Every op's result is checked against the type its rule promised (the engine's debug mode),
# in this process and in the servers the tests start.
os.environ.setdefault("GRADIENT_CHECK_RESULT_TYPES", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from gradient_client import GradientClient  # noqa: E402
from gradient_server.engine import Engine  # noqa: E402
from gradient_server.service import create_server  # noqa: E402

# CI draws the same hypothesis examples on every run (and keeps no example database), so a
# red run always reproduces; locally the examples vary from run to run.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def server_address():
    """Address of a server started for the test session (bound to a free port)."""
    server, port = create_server("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture(scope="session")
def client(server_address):
    """A GradientClient on the session's server."""
    with GradientClient(server_address, timeout=60) as connected:
        yield connected


@pytest.fixture(scope="session")
def engine() -> Engine:
    """An in-process engine, for the many forward passes of finite differences."""
    return Engine()

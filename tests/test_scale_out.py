"""Scale-out: one SDK client over three server replicas (client-side round-robin and retries,
the SDK's defaults). Calls reach every replica; a replica killed (SIGKILL) or stopped (SIGTERM)
under load from several threads fails no call, and the others go on serving."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from lecture import LECTURE, lecture_graph
from test_service import ServerProcess

from gradient_client import GradientClient, GradientError
from gradient_client.channel import channel_options

REPLICAS = 3


@contextlib.contextmanager
def replicas(tmp_path: Path, count: int = REPLICAS) -> Iterator[list[ServerProcess]]:
    """`count` gradient-server processes on loopback ports, each logging every call."""
    servers = [
        ServerProcess(tmp_path / f"replica-{i}.log", "--log-calls", "1", "--grace", "10")
        for i in range(count)
    ]
    try:
        for server in servers:
            with grpc.insecure_channel(server.target) as channel:
                server.wait_serving(channel)
        yield servers
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.process.terminate()
                server.process.wait(timeout=30)
            server.close()


def target_of(servers: list[ServerProcess]) -> str:
    return "ipv4:" + ",".join(server.target for server in servers)


def answered(server: ServerProcess) -> int:
    """Gradient calls the replica logged as OK."""
    return len(re.findall(r"method=Gradient code=OK", server.log_path.read_text()))


def lecture_call(client: GradientClient) -> None:
    result = client.gradient(lecture_graph(), "f", LECTURE)
    assert float(result.values["f"]) == -12.0
    assert [float(result.gradients[n]) for n in "xyz"] == [-4.0, -4.0, 3.0]


class Load:
    """Threads calling the lecture in a loop on one client until stopped; counts outcomes."""

    def __init__(self, client: GradientClient, threads: int = 4):
        self.client = client
        self.ok = 0
        self.failures: list[GradientError] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                lecture_call(self.client)
            except GradientError as error:
                with self._lock:
                    self.failures.append(error)
            else:
                with self._lock:
                    self.ok += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def wait_for(self, calls: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.ok < calls:
            assert time.monotonic() < deadline, f"only {self.ok} calls in {timeout} s"
            assert not self.failures, self.failures[:3]
            time.sleep(0.01)


def test_calls_are_spread_over_every_replica(tmp_path):
    with replicas(tmp_path) as servers:
        with GradientClient(target_of(servers), timeout=30) as client:
            for _ in range(60):
                lecture_call(client)
        counts = [answered(server) for server in servers]
    assert sum(counts) == 60 and min(counts) >= 10, counts


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_replica_lost_under_load_fails_no_call(tmp_path, how):
    with replicas(tmp_path) as servers:
        with GradientClient(target_of(servers), timeout=30) as client, Load(client) as load:
            load.wait_for(200)
            victim, survivors = servers[0], servers[1:]
            before = [answered(server) for server in survivors]
            victim.process.send_signal(how)
            victim.process.wait(timeout=30)
            at_loss = load.ok
            load.wait_for(at_loss + 300)
        after = [answered(server) for server in survivors]
    assert load.failures == [], [str(f) for f in load.failures[:5]]
    if how == signal.SIGTERM:
        assert victim.process.returncode == 0
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    assert load.ok >= at_loss + 300


def test_channel_defaults_options_and_service_config():
    options = dict(channel_options(1 << 20))
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "gradient.v1.GradientService"}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
    assert options["grpc.per_rpc_retry_buffer_size"] == 1 << 20  # large calls retry too
    assert options["grpc.keepalive_time_ms"] == 60_000
    # options= adds and overrides; service_config= replaces the default (dict or JSON).
    mine = {"loadBalancingConfig": [{"pick_first": {}}]}
    custom = dict(
        channel_options(
            1 << 20,
            service_config=mine,
            options=[("grpc.keepalive_time_ms", 5_000), ("grpc.primary_user_agent", "me")],
        )
    )
    assert json.loads(custom["grpc.service_config"]) == mine
    assert custom["grpc.keepalive_time_ms"] == 5_000 and custom["grpc.primary_user_agent"] == "me"
    assert dict(channel_options(1, service_config='{"a": 1}'))["grpc.service_config"] == '{"a": 1}'


def test_a_pick_first_client_sends_everything_to_one_replica(tmp_path):
    """The contrast that makes round_robin the default: gRPC's own default policy."""
    with replicas(tmp_path) as servers:
        pick_first = {"loadBalancingConfig": [{"pick_first": {}}]}
        with GradientClient(target_of(servers), timeout=30, service_config=pick_first) as client:
            for _ in range(30):
                lecture_call(client)
        counts = sorted(answered(server) for server in servers)
    assert counts == [0, 0, 30]


def test_max_connection_age_makes_clients_reconnect(tmp_path):
    """With --max-connection-age, a client's connection is replaced after that age (a client
    balancing over DNS then resolves the name again); no call fails for it."""
    server = ServerProcess(tmp_path / "aged.log", "--log-calls", "1", "--max-connection-age", "0.5")
    try:
        with grpc.insecure_channel(server.target) as channel:
            server.wait_serving(channel)
        with GradientClient(server.target, timeout=30) as client:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                lecture_call(client)
                time.sleep(0.05)
        peers = set(
            re.findall(r"method=Gradient code=OK .*? peer=(\S+)", server.log_path.read_text())
        )
    finally:
        server.process.terminate()
        server.process.wait(timeout=30)
        server.close()
    assert len(peers) >= 3, peers  # a new connection (a new client port) about every 0.5 s

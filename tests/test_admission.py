"""Admission control: the server-wide memory budget admits a request only while its estimate
fits beside those running; the others wait (briefly, never past their deadline), then are
refused with RESOURCE_EXHAUSTED and a retry hint. Under a burst of large requests the
server's peak memory stays within the budget plus the requests it holds, every call either
answers right or is refused, and the server goes on serving."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from lecture import lecture_graph
from test_service import ServerProcess

from gradient_client import GradientClient, GradientError, Graph
from gradient_server.admission import MemoryBudget, available_memory, default_budget
from gradient_server.errors import DeadlineExceeded, LimitExceeded

MiB = 1 << 20


def no_deadline() -> None:
    pass


def test_work_that_fits_is_admitted_at_once_and_released_after():
    budget = MemoryBudget(100)
    with budget.admitted(60, no_deadline):
        assert budget.used == 60
        with budget.admitted(40, no_deadline):
            assert budget.used == 100
    assert budget.used == 0


def test_work_larger_than_the_budget_is_refused_at_once():
    budget = MemoryBudget(100, max_wait=60)
    started = time.monotonic()
    with pytest.raises(LimitExceeded) as refused:
        with budget.admitted(101, no_deadline):
            pass
    assert time.monotonic() - started < 1
    assert refused.value.limit == "memory_budget" and refused.value.retry_after is None


def test_waiting_work_runs_when_memory_is_released():
    budget = MemoryBudget(100, max_wait=30)
    release = threading.Event()
    order = []

    def holder() -> None:
        with budget.admitted(80, no_deadline):
            order.append("first")
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    while budget.used != 80:
        time.sleep(0.001)
    threading.Timer(0.2, release.set).start()
    with budget.admitted(50, no_deadline):
        order.append("second")
        assert budget.used == 50
    thread.join()
    assert order == ["first", "second"]


def test_work_that_waits_too_long_is_refused_with_a_retry_hint():
    budget = MemoryBudget(100, max_wait=0.2)
    with budget.admitted(80, no_deadline):
        started = time.monotonic()
        with pytest.raises(LimitExceeded) as refused:
            with budget.admitted(50, no_deadline):
                pass
        waited = time.monotonic() - started
    assert 0.2 <= waited < 5
    assert refused.value.retry_after == 1.0 and "busy" in str(refused.value)
    assert budget.used == 0


def test_waiting_ends_at_the_deadline():
    budget = MemoryBudget(100, max_wait=60)
    deadline = time.monotonic() + 0.1

    def check() -> None:
        if time.monotonic() > deadline:
            raise DeadlineExceeded

    with budget.admitted(80, no_deadline):
        with pytest.raises(DeadlineExceeded):
            with budget.admitted(50, check):
                pass
    assert budget.used == 0


def test_the_default_budget_is_a_share_of_the_memory_available():
    memory = available_memory()
    physical = __import__("os").sysconf("SC_PAGE_SIZE") * __import__("os").sysconf("SC_PHYS_PAGES")
    assert 0 < memory <= physical
    assert default_budget() == int(memory * 0.7)
    assert default_budget(4) == int(memory * 0.7) // 4


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_burst_of_large_requests_stays_within_the_budget(tmp_path):
    """Eight concurrent calls, each computing an outer product of 128 MiB and a sum of it
    (whose copy goes into the response): about 384 MiB each by the estimate, against a
    400 MiB budget, so one computes at a time. The peak stays within the memory at rest, the
    budget, responses on their way out (two) and 160 MiB of slack for allocator and gRPC
    buffers; without admission, eight would compute at once (several GiB)."""
    side = 4096  # side x side float64: 128 MiB
    budget_mb = BURST_BUDGET_MB
    server = ServerProcess(
        tmp_path / "server.log", "--memory-budget", str(budget_mb), "--threads", "8"
    )
    g = Graph()
    x = g.input("x")
    g.add(g.matmul(x, g.transpose(x), name="outer"), 1.0, name="z")
    value = np.arange(side, dtype=np.float64).reshape(side, 1) / side
    try:
        with grpc.insecure_channel(server.target) as channel:
            server.wait_serving(channel)
        with GradientClient(server.target, timeout=120, connections=8) as client:
            client.forward(lecture_graph(), {"x": -2.0, "y": 5.0, "z": -4.0})
            at_rest = peak_rss(server.process.pid)

            def call(_: int) -> str:
                try:
                    z = client.forward(g, {"x": value}, fetch=["z"])["z"]
                except GradientError as error:
                    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                    assert error.quota_violations[0][0] == "memory_budget"
                    assert error.retry_after == 1.0
                    return "refused"
                assert z.shape == (side, side) and z[0, 0] == 1.0
                assert z[-1, -1] == value[-1, 0] ** 2 + 1.0
                return "answered"

            with ThreadPoolExecutor(8) as pool:
                outcomes = list(pool.map(call, range(8)))
            peak = peak_rss(server.process.pid)
            # The server goes on serving, the lecture exactly.
            result = client.gradient(lecture_graph(), "f", {"x": -2.0, "y": 5.0, "z": -4.0})
            assert [float(result.gradients[n]) for n in "xyz"] == [-4.0, -4.0, 3.0]
    finally:
        server.process.terminate()
        server.process.wait(timeout=60)
        server.close()
    assert "answered" in outcomes
    response = side * side * 8
    bound = at_rest + budget_mb * MiB + 2 * response + 160 * MiB
    assert peak <= bound, (
        f"peak {peak / MiB:.0f} MiB > {bound / MiB:.0f} MiB (at rest {at_rest / MiB:.0f}), "
        f"outcomes {outcomes}"
    )


BURST_BUDGET_MB = 400

"""Admission control for the whole process: requests run only while their estimated memory
fits, together, in one budget.

Per-request limits (`--max-bytes`) bound one request; this bounds their sum. A request whose
estimate does not fit beside those running waits (a short while, and never past its deadline)
for memory to be released, then is refused with RESOURCE_EXHAUSTED and a retry hint, so that a
burst of large requests slows down or moves to another replica instead of taking the process
past its memory and failing every call in flight.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import LimitExceeded

DEFAULT_FRACTION = 0.7
"""The default budget's share of the memory the process may use."""

RETRY_AFTER = 1.0
"""Seconds a refused request is told to wait before retrying."""


def available_memory() -> int:
    """Bytes this process may use: its cgroup's memory limit, if it has one, else the
    machine's physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < physical:
            return int(text)
    return physical


def default_budget(workers: int = 1) -> int:
    """The default budget of one of `workers` processes: their share of DEFAULT_FRACTION of
    available_memory()."""
    return int(available_memory() * DEFAULT_FRACTION) // max(workers, 1)


class MemoryBudget:
    """Admits work while the estimated bytes of all admitted work fit in `budget` bytes.

    A request that does not fit waits up to `max_wait` seconds (its `check` callback, called
    every few milliseconds, raises when its deadline passes or its client cancels) and is then
    refused with LimitExceeded (limit "memory_budget", with a retry hint). One larger than the
    whole budget is refused at once: it could never run.
    """

    POLL = 0.005

    def __init__(self, budget: int, max_wait: float = 2.0):
        if budget <= 0:
            raise ValueError(f"the memory budget must be positive, got {budget}")
        self.budget = budget
        self.max_wait = max_wait
        self._used = 0
        self._changed = threading.Condition()

    @property
    def used(self) -> int:
        """The estimated bytes of the work admitted now."""
        return self._used

    @contextlib.contextmanager
    def admitted(self, nbytes: int, check: Callable[[], None]) -> Iterator[None]:
        """Run the block once `nbytes` fit beside the work already admitted."""
        if nbytes > self.budget:
            raise LimitExceeded(
                f"the request would need about {nbytes} bytes; the server's memory budget "
                f"(memory_budget) is {self.budget} bytes",
                limit="memory_budget",
            )
        give_up = time.monotonic() + self.max_wait
        with self._changed:
            while self._used + nbytes > self.budget:
                now = time.monotonic()
                if now >= give_up:
                    raise LimitExceeded(
                        f"the server is busy: the request needs about {nbytes} bytes and "
                        f"{self._used} of its {self.budget}-byte memory budget (memory_budget) "
                        f"are in use; retry in {RETRY_AFTER:g} s, or on another replica",
                        limit="memory_budget",
                        retry_after=RETRY_AFTER,
                    )
                self._changed.wait(min(self.POLL, give_up - now))
                check()
            self._used += nbytes
        try:
            yield
        finally:
            with self._changed:
                self._used -= nbytes
                self._changed.notify_all()

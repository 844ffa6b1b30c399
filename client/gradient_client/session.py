"""Sessions: many steps on one graph over one Session stream (blocking and asyncio).

The graph, output, wrt and fetch are sent once, in the stream's first message; each step then
sends only its inputs and gets one result back, in order. Steps submitted while the stream is
busy (from several threads, or as futures) are batched into one message. Tensors larger than
one message are sent, and received, as chunks.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

import grpc

from gradient.v1 import gradient_service_pb2 as service_pb2

from . import wire
from .client import (
    ForwardResult,
    GradientResult,
    decode_response,
    encode_array,
    encode_feeds,
    forward_result,
    gradient_result,
)
from .errors import GradientError
from .wire import WireGraph, WireMessage

__all__ = ["AsyncSession", "Session", "StepFuture"]

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_GRADIENT, _FORWARD = service_pb2.STEP_KIND_GRADIENT, service_pb2.STEP_KIND_FORWARD
_CLOSE = object()

IN_FLIGHT = 2
"""Groups of steps a blocking Session has on their way at once (see Session._pieces)."""


class _Steps:
    """What both kinds of session share: encoding steps, decoding results in order."""

    def __init__(self, graph: WireGraph, start: Any, max_message_bytes: int):
        self.graph = graph
        self.graph_digest = graph.digest
        self.budget = wire.chunk_budget(max_message_bytes)
        self.start = WireMessage(start, raw={"graph": graph.data})
        self.chunks = wire.ChunkAssembler()
        self.pending: deque[tuple[Any, int]] = deque()  # (future, kind) of steps sent, in order

    def step_messages(
        self, kind: int, inputs: Mapping[Any, Any] | None, seed: Any
    ) -> list[WireMessage]:
        """The step's chunks (one message each) and then the step itself."""
        feeds = encode_feeds(self.graph, inputs)
        inline, chunked = wire.split_oversized(feeds, self.budget)
        chunks = []
        for name, array in chunked.items():
            chunks += wire.chunks_of(service_pb2.CHUNK_TARGET_INPUT, name, array, self.budget)
        tensors: dict[str, Any] = {"inputs": inline}
        if seed is not None:
            seed_array = encode_array(seed, what="seed")
            room = self.budget - wire.payload_bytes(inline)
            if wire.payload_bytes({"seed": seed_array}) > room:
                chunks += wire.chunks_of(service_pb2.CHUNK_TARGET_SEED, "", seed_array, self.budget)
            else:
                tensors["seed"] = seed_array
        step = WireMessage(service_pb2.SessionStep(kind=kind), tensors=tensors)  # type: ignore[arg-type]
        return [*chunks, step]

    def requests(self, groups: Iterator[list[Any]]) -> Iterator[bytes]:
        """Request messages from groups of pieces ready together (the start, or a step's
        messages): a group's steps are batched up to the size budget; chunks travel in
        messages of their own."""
        for pieces in groups:
            batch: dict[str, list[WireMessage]] = {"start": [], "steps": []}
            used = 0
            for piece in pieces:
                if isinstance(piece, WireMessage):  # the start
                    batch["start"].append(piece)
                    continue
                *chunks, step = piece
                size = _step_bytes(step)
                if batch["steps"] and (chunks or used + size > self.budget):
                    yield _request(batch)
                    batch, used = {"start": [], "steps": []}, 0
                for chunk in chunks:
                    yield _request({**batch, "chunks": [chunk]})
                    batch = {"start": [], "steps": []}
                batch["steps"].append(step)
                used += size
            if batch["start"] or batch["steps"]:
                yield _request(batch)

    def dispatch(self, data: bytes) -> int:
        """Resolve the futures of the results in one response message; how many it held."""
        message = decode_response(data, "Session")
        for chunk in message.nested.get("chunks", ()):
            self.chunks.add(chunk)
        results = message.nested.get("results", ())
        for result in results:
            future, kind = self.pending.popleft()
            try:
                _resolve(future, self._result(result, kind))
            except GradientError as error:
                _fail(future, error)
        return len(results)

    def _result(self, result: WireMessage, kind: int) -> ForwardResult | GradientResult:
        try:
            chunked = self.chunks.take()
        except (ValueError, TypeError) as e:
            raise GradientError(grpc.StatusCode.INTERNAL, f"a result's chunks: {e}") from None
        if result.error is not None:
            raise GradientError(
                grpc.StatusCode.INTERNAL, f"a result does not parse: {result.error}"
            )
        if result.fields.HasField("error"):
            error = result.fields.error
            raise GradientError(_CODES.get(error.code, grpc.StatusCode.UNKNOWN), error.message)
        tensors = {field: dict(values) for field, values in result.tensors.items()}
        for (target, name), array in chunked.items():
            field = "gradients" if target == service_pb2.CHUNK_TARGET_GRADIENT else "values"
            tensors.setdefault(field, {})[name] = array
        if kind == _FORWARD:
            return forward_result(tensors)
        return gradient_result(tensors, result.fields.skipped)

    def fail_pending(self, error: GradientError) -> None:
        while self.pending:
            _fail(self.pending.popleft()[0], error)


def _step_bytes(step: WireMessage) -> int:
    seed = step.tensors.get("seed")
    extra = {} if seed is None else {"seed": seed}
    return wire.payload_bytes({**step.tensors.get("inputs", {}), **extra})


def _request(batch: Mapping[str, list[WireMessage]]) -> bytes:
    nested = {name: pieces for name, pieces in batch.items() if pieces}
    return wire.encode(WireMessage(service_pb2.SessionRequest(), nested=nested))


def _resolve(future: Any, value: Any) -> None:
    if isinstance(future, StepFuture):
        future._set(value, None)
    elif not future.done():
        future.set_result(value)


def _fail(future: Any, error: GradientError) -> None:
    if isinstance(future, StepFuture):
        future._set(None, error)
    elif not future.done():
        future.set_exception(error)


def _stream_error(error: BaseException, tls: bool, target: str) -> GradientError:
    if isinstance(error, grpc.RpcError):
        return GradientError.from_rpc_error(error, tls=tls, target=target)
    return GradientError(grpc.StatusCode.UNKNOWN, f"the session's stream failed: {error!r}")


class StepFuture:
    """The result of a step sent but not yet read back; result() waits for it."""

    __slots__ = ("_session", "_done", "_value", "_error", "_wake")

    def __init__(self, session: Session):
        self._session = session
        self._done = False
        self._value: Any = None
        self._error: GradientError | None = None
        self._wake = threading.Event()  # set when the result is in, or it is our turn to read

    def done(self) -> bool:
        """Whether the result has arrived."""
        return self._done

    def result(self) -> Any:
        """The step's result (a GradientResult or ForwardResult); raises its GradientError."""
        self._session._wait(self)
        if self._error is not None:
            raise self._error
        return self._value

    def _set(self, value: Any, error: GradientError | None) -> None:
        self._value, self._error, self._done = value, error, True
        self._wake.set()


class Session:
    """A blocking session; build it with GradientClient.session() and use it with `with`.

    Thread-safe: steps from several threads share the stream. One waiting thread at a time
    reads the responses and hands out the results they carry, waking each waiting thread once
    (when its result is in, or when it is its turn to read).
    """

    def __init__(
        self,
        method: Any,
        graph: WireGraph,
        start: Any,
        timeout: float | None,
        max_message_bytes: int,
        *,
        tls: bool = False,
        target: str = "",
    ):
        self._tls = tls
        self._target = target
        self._steps = _Steps(graph, start, max_message_bytes)
        self.graph_digest = graph.digest
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._outbox.put(self._steps.start)
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._waiting: list[StepFuture] = []  # futures a thread waits on (under _send_lock)
        self._failure: GradientError | None = None
        self._closed = False
        # Steps of the groups sent and not yet all answered, oldest first (see _pieces).
        self._unanswered: deque[int] = deque()
        self._answered = threading.Condition()
        self._responses = method(self._steps.requests(self._pieces()), timeout=timeout)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.cancel()

    def _pieces(self) -> Iterator[list[Any]]:
        """What the request stream sends: block for a piece, then take all those ready too.

        At most IN_FLIGHT groups of steps are on their way at once: while they are, the
        steps submitted meanwhile (by other threads, or as futures) gather in the outbox and
        leave together, in one message, as soon as an answer comes back.
        """
        while True:
            with self._answered:
                while len(self._unanswered) >= IN_FLIGHT and self._failure is None:
                    self._answered.wait()
            group = [self._outbox.get()]
            while True:
                try:
                    group.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            closing = _CLOSE in group
            if closing:
                group = group[: group.index(_CLOSE)]
            steps = sum(1 for piece in group if not isinstance(piece, WireMessage))
            if steps:
                with self._answered:
                    self._unanswered.append(steps)
            if group:
                yield group
            if closing:
                return

    # -- steps -----------------------------------------------------------------------------

    def gradient(self, inputs: Mapping[Any, Any] | None = None, seed: Any = None) -> GradientResult:
        """One gradient step: the values of `fetch` and the gradients of `output` for `wrt`."""
        return self.gradient_future(inputs, seed).result()

    def forward(self, inputs: Mapping[Any, Any] | None = None) -> ForwardResult:
        """One forward step: the values of `fetch`."""
        return self.forward_future(inputs).result()

    def gradient_future(
        self, inputs: Mapping[Any, Any] | None = None, seed: Any = None
    ) -> StepFuture:
        """Send a gradient step now and return at once; the future's result() waits for it.

        Sending many steps before waiting lets them travel in a few messages.
        """
        return self._submit(_GRADIENT, inputs, seed)

    def forward_future(self, inputs: Mapping[Any, Any] | None = None) -> StepFuture:
        """Send a forward step now; see gradient_future."""
        return self._submit(_FORWARD, inputs, None)

    def _submit(self, kind: int, inputs: Mapping[Any, Any] | None, seed: Any) -> StepFuture:
        messages = self._steps.step_messages(kind, inputs, seed)
        future = StepFuture(self)
        with self._send_lock:
            if self._failure is not None:
                raise self._failure
            if self._closed:
                raise GradientError(grpc.StatusCode.CANCELLED, "the session is closed")
            self._steps.pending.append((future, kind))
            self._outbox.put(messages)
        return future

    def _wait(self, future: StepFuture) -> None:
        with self._send_lock:
            self._waiting.append(future)
        try:
            while not future._done:
                if self._read_lock.acquire(blocking=False):
                    try:
                        while not future._done:
                            self._read_one()
                    finally:
                        self._read_lock.release()
                    break
                future._wake.wait()
                future._wake.clear()
        finally:
            with self._send_lock:
                self._waiting.remove(future)
                # Whoever still waits for a result takes over the reading.
                successor = next((f for f in self._waiting if not f._done), None)
            if successor is not None:
                successor._wake.set()

    def _read_one(self) -> None:
        try:
            data = next(self._responses)
        except StopIteration:
            self._end(GradientError(grpc.StatusCode.UNAVAILABLE, "the session's stream ended"))
            return
        except Exception as error:  # noqa: BLE001 - grpc.RpcError, or the stream broke
            self._end(_stream_error(error, self._tls, self._target))
            return
        self._count_answers(self._steps.dispatch(data))

    def _count_answers(self, count: int) -> None:
        if not count:
            return
        with self._answered:
            while count and self._unanswered:
                answered = min(count, self._unanswered[0])
                count -= answered
                self._unanswered[0] -= answered
                if not self._unanswered[0]:
                    self._unanswered.popleft()
            self._answered.notify()

    def _end(self, error: GradientError) -> None:
        with self._send_lock:
            if self._failure is None:
                self._failure = error
        self._steps.fail_pending(self._failure)
        with self._answered:
            self._answered.notify()

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Finish the steps in flight, end the stream, and raise its error if it failed."""
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
            self._outbox.put(_CLOSE)
        with self._read_lock:
            try:
                for data in self._responses:
                    self._count_answers(self._steps.dispatch(data))
            except Exception as error:  # noqa: BLE001
                self._end(_stream_error(error, self._tls, self._target))
        if self._failure is not None and self._failure.code != grpc.StatusCode.CANCELLED:
            raise self._failure

    def cancel(self) -> None:
        """End the stream at once; steps in flight fail with CANCELLED."""
        with self._send_lock:
            if not self._closed:
                self._closed = True
                self._outbox.put(_CLOSE)
        self._responses.cancel()
        self._end(GradientError(grpc.StatusCode.CANCELLED, "the session was cancelled"))


class AsyncSession:
    """The asyncio twin of Session; build it with AsyncGradientClient.session(), use it with
    `async with`, and await its steps (concurrent steps share the stream)."""

    def __init__(
        self,
        method: Any,
        graph: WireGraph,
        start: Any,
        timeout: float | None,
        max_message_bytes: int,
        *,
        tls: bool = False,
        target: str = "",
    ):
        self._tls = tls
        self._target = target
        self._steps = _Steps(graph, start, max_message_bytes)
        self.graph_digest = graph.digest
        self._call = method(timeout=timeout)
        self._started = False
        self._write_lock = asyncio.Lock()
        self._reader: asyncio.Task | None = None
        self._failure: GradientError | None = None

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            await self.close()
        else:
            self.cancel()

    async def gradient(
        self, inputs: Mapping[Any, Any] | None = None, seed: Any = None
    ) -> GradientResult:
        """See Session.gradient."""
        return await self._run(_GRADIENT, inputs, seed)

    async def forward(self, inputs: Mapping[Any, Any] | None = None) -> ForwardResult:
        """See Session.forward."""
        return await self._run(_FORWARD, inputs, None)

    async def _run(self, kind: int, inputs: Mapping[Any, Any] | None, seed: Any) -> Any:
        messages = self._steps.step_messages(kind, inputs, seed)
        future = asyncio.get_running_loop().create_future()
        async with self._write_lock:
            if self._failure is not None:
                raise self._failure
            pieces: list[Any] = [messages]
            if not self._started:
                pieces.insert(0, self._steps.start)
                self._started = True
            self._steps.pending.append((future, kind))
            try:
                for data in self._steps.requests(iter([pieces])):
                    await self._call.write(data)
            except Exception as error:  # noqa: BLE001
                self._end(_stream_error(error, self._tls, self._target))
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())
        return await future

    async def _read(self) -> None:
        try:
            while True:
                data = await self._call.read()
                if data is grpc.aio.EOF:
                    break
                self._steps.dispatch(data)
        except Exception as error:  # noqa: BLE001
            self._end(_stream_error(error, self._tls, self._target))
            return
        self._end(GradientError(grpc.StatusCode.UNAVAILABLE, "the session's stream ended"))

    def _end(self, error: GradientError) -> None:
        if self._failure is None:
            self._failure = error
        self._steps.fail_pending(self._failure)

    async def close(self) -> None:
        """Finish the steps in flight, end the stream, and raise its error if it failed."""
        async with self._write_lock:
            try:
                await self._call.done_writing()
            except Exception as error:  # noqa: BLE001
                self._end(_stream_error(error, self._tls, self._target))
        if self._reader is not None:
            await self._reader
        code = await self._call.code()
        if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
            raise GradientError(code, await self._call.details() or "")

    def cancel(self) -> None:
        """End the stream at once; steps in flight fail with CANCELLED."""
        self._call.cancel()
        self._end(GradientError(grpc.StatusCode.CANCELLED, "the session was cancelled"))

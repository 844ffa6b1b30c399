"""The Session stream: many steps on one graph, one result per step, in order.

The first message fixes the graph, output, wrt and fetch; every later one carries steps'
inputs (and the chunks of tensors larger than one message). Each step runs through the
engine exactly as a unary call does (same caches, same limits); a failed step reports its
status in its StepResult and the session goes on, unless the client asked to stop. Results
of the steps of one message go back in as few messages as their size allows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import numpy as np

from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient_client import wire
from gradient_client.tensors import TensorFormatError
from gradient_client.wire import WireFormatError, WireMessage

from .calls import Call, Cancelled, Failure, failure_of, status_of
from .errors import DeadlineExceeded, GraphError, LimitExceeded
from .ir import Graph, did_you_mean

if TYPE_CHECKING:
    from .service import GradientServicer


METHOD = "Session"
MIN_MESSAGE_BYTES = 1 << 16
"""The smallest message size limit a client may state for its session's responses."""
KIND = "BIDI_STREAM"


class _EndStream(Exception):
    """The stream ends with this status (a bad start, a bad message, or stop_on_error, whose
    step failed with `error`)."""

    def __init__(self, code: grpc.StatusCode, details: str, error: BaseException | None = None):
        super().__init__(details)
        self.code = code
        self.details = details
        self.error = error


@dataclass(frozen=True)
class _Spec:
    """What every step of the session computes (from its SessionStart)."""

    graph: Graph
    output: str
    wrt: tuple[str, ...]
    fetch: tuple[str, ...]
    as_lists: bool
    budget: int  # tensor payload bytes one response message may carry
    stop_on_error: bool


def run_session(
    servicer: GradientServicer, requests: Iterator[bytes], context: grpc.ServicerContext
) -> Iterator[bytes]:
    """The Session handler: a raw-bytes stream in, a raw-bytes stream out."""
    call = servicer.started(METHOD, context, kind=KIND)
    if not servicer.sessions.acquire(blocking=False):
        error = LimitExceeded(
            f"too many open sessions: the limit (max_sessions) is {servicer.max_sessions}; "
            "close one, or use unary calls",
            limit="max_sessions",
        )
        failure = failure_of(error, METHOD, call.request_id)
        servicer.finished(call, failure.code, failure.details, KIND)
        context.abort_with_status(failure)
    session = _Session(servicer, call)
    servicer.open_sessions.add(session)
    try:
        yield from session.serve(requests)
    except _EndStream as end:
        failure = Failure(end.code, end.details, end.error, call.request_id)
    except grpc.RpcError:  # the request stream broke: the client cancelled or went away
        failure = failure_of(Cancelled(), METHOD, call.request_id)
    except Exception as error:  # noqa: BLE001 - every failure gets a status
        failure = failure_of(error, METHOD, call.request_id)
    else:
        # The requests ended: the client half-closed, or cancelled (gRPC may report the
        # cancellation just after the end of the requests; the call then counts as OK).
        if context.is_active():
            servicer.finished(call, grpc.StatusCode.OK, "", KIND)
            return
        failure = failure_of(Cancelled(), METHOD, call.request_id)
    finally:
        servicer.open_sessions.discard(session)
        servicer.sessions.release()
    servicer.finished(call, failure.code, failure.details, KIND)
    context.abort_with_status(failure)


class _Session:
    def __init__(self, servicer: GradientServicer, call: Call):
        self.servicer = servicer
        self.engine = servicer.engine
        self.call = call
        self.context = call.context
        self.spec: _Spec | None = None
        self.chunks = wire.ChunkAssembler(self._check_chunked_size)
        self.first_response = True
        self.busy = False  # handling a message (not waiting for the next)

    def end_if_idle(self) -> None:
        """At shutdown: cancel the stream if it waits for its client (a busy one ends itself
        after its current message)."""
        if not self.busy:
            self.context.cancel()

    def serve(self, requests: Iterator[bytes]) -> Iterator[bytes]:
        for data in requests:
            self.busy = True
            self.call.received += len(data)
            yield from self._handle(data)
            self.busy = False
            if self.servicer.shutting_down:
                raise _EndStream(
                    grpc.StatusCode.UNAVAILABLE,
                    "the server is shutting down: open a new session (on another replica)",
                )

    def _handle(self, data: bytes) -> Iterator[bytes]:
        """The responses to one message of the client."""
        try:
            message = wire.decode(data, service_pb2.SessionRequest)
        except (WireFormatError, TensorFormatError) as e:
            raise _EndStream(
                grpc.StatusCode.INVALID_ARGUMENT, f"a session message does not parse: {e}"
            ) from None
        for start in message.nested.get("start", ()):
            self._open(start)
        for chunk in message.nested.get("chunks", ()):
            self.chunks.add(chunk)
        steps = message.nested.get("steps", ())
        if steps and self.spec is None:
            raise _EndStream(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the first message of a session must carry `start` (the graph, output, "
                "wrt and fetch)",
            )
        results = []
        try:
            for step in steps:
                results.append(self._step(step))
        except _EndStream:  # stop_on_error: the steps before the failure are answered
            yield from self._responses(results)
            raise
        yield from self._responses(results)

    # -- the start -------------------------------------------------------------------------

    def _open(self, start: WireMessage) -> None:
        if self.spec is not None:
            raise _EndStream(
                grpc.StatusCode.INVALID_ARGUMENT,
                "a session takes one start; open another session for another graph",
            )
        if start.error is not None:
            raise start.error
        graph = self.servicer.graph_of(start, self.call)
        fields = start.fields
        for what, names in (("wrt", fields.wrt), ("fetch", fields.fetch)):
            for name in names:
                if name not in graph:
                    hint = did_you_mean(name, graph.nodes)
                    raise GraphError(
                        f"{what} names {name!r}, which is not a node of the graph{hint}",
                        field=f"start.{what}",
                    )
        if fields.output and fields.output not in graph:
            hint = did_you_mean(fields.output, graph.nodes)
            raise GraphError(
                f"output names {fields.output!r}, which is not a node of the graph{hint}",
                field="start.output",
            )
        limit = self.servicer.max_message_bytes
        if 0 < fields.max_message_bytes < MIN_MESSAGE_BYTES:
            raise GraphError(
                f"start.max_message_bytes is {fields.max_message_bytes}: give 0 (the server's "
                f"limit) or at least {MIN_MESSAGE_BYTES}",
                field="start.max_message_bytes",
            )
        if fields.max_message_bytes > 0:
            limit = min(limit, fields.max_message_bytes)
        self.spec = _Spec(
            graph,
            fields.output,
            tuple(fields.wrt),
            tuple(fields.fetch),
            fields.response_payload == service_pb2.PAYLOAD_FORM_LISTS,
            wire.chunk_budget(limit),
            fields.stop_on_error,
        )

    # -- the steps -------------------------------------------------------------------------

    def _check_chunked_size(self, what: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        limits = self.engine.limits
        count = math.prod(shape)  # Python ints: no overflow for absurd shapes
        if count > limits.max_tensor_elements:
            raise LimitExceeded(
                f"{what} has {count} elements; the limit (max_tensor_elements) is "
                f"{limits.max_tensor_elements}",
                limit="max_tensor_elements",
            )
        if count * dtype.itemsize > limits.max_bytes:
            raise LimitExceeded(
                f"{what} has {count * dtype.itemsize} bytes; the limit (max_bytes) is "
                f"{limits.max_bytes}",
                limit="max_bytes",
            )

    def _step(self, step: WireMessage) -> WireMessage:
        """The step's StepResult; a failure is reported in it (or ends the stream)."""
        try:
            return self._run(step)
        except (DeadlineExceeded, Cancelled):
            raise
        except Exception as error:  # noqa: BLE001 - every failure gets a status
            code, details = status_of(error, METHOD)
            assert self.spec is not None
            if self.spec.stop_on_error:
                raise _EndStream(code, details, error) from None
        failure = service_pb2.StepError(code=code.value[0], message=details)
        return WireMessage(service_pb2.StepResult(error=failure))

    def _run(self, step: WireMessage) -> WireMessage:
        spec = self.spec
        assert spec is not None
        chunked = self.chunks.take()
        if step.error is not None:
            raise step.error
        inputs = dict(step.tensors.get("inputs", {}))
        seed = step.tensors.get("seed")
        for (target, name), array in chunked.items():
            if target == service_pb2.CHUNK_TARGET_SEED:
                seed = array
            elif target == service_pb2.CHUNK_TARGET_INPUT and name not in inputs:
                inputs[name] = array
            else:
                raise GraphError(f"chunks of {name!r} do not belong in a request, or repeat it")
        if step.fields.kind == service_pb2.STEP_KIND_FORWARD:
            values = self.engine.forward(spec.graph, inputs, spec.fetch, self.call.check)
            return WireMessage(service_pb2.StepResult(), tensors={"values": values})
        if step.fields.kind != service_pb2.STEP_KIND_GRADIENT:
            raise GraphError(f"step kind {step.fields.kind} is not known")
        result = self.engine.gradient(
            spec.graph, inputs, spec.output, seed, spec.wrt, spec.fetch, self.call.check
        )
        skipped = [service_pb2.SkippedNode(name=n, reason=r) for n, r in result.skipped.items()]
        return WireMessage(
            service_pb2.StepResult(skipped=skipped),
            tensors={"values": result.values, "gradients": result.gradients},
        )

    # -- the responses ---------------------------------------------------------------------

    def _responses(self, results: list[WireMessage]) -> Iterator[bytes]:
        """The results as response messages, each within the size budget: a result's tensors
        that do not fit go first, as chunks, each in a message of its own."""
        spec = self.spec
        if spec is None or not results:
            return
        batch: list[WireMessage] = []
        used = 0
        for result in results:
            size = self._size(result)
            chunks = []
            if size > spec.budget:
                chunks = self._chunk(result, spec.budget, spec.as_lists)
                size = self._size(result)
            if batch and (chunks or used + size > spec.budget):
                yield self._encode(batch)
                batch, used = [], 0
            for chunk in chunks:
                yield self._encode([], [chunk])
            batch.append(result)
            used += size
        yield self._encode(batch)

    def _size(self, result: WireMessage) -> int:
        assert self.spec is not None
        as_lists = self.spec.as_lists
        return sum(wire.payload_bytes(t, as_lists=as_lists) for t in result.tensors.values())

    @staticmethod
    def _chunk(result: WireMessage, budget: int, as_lists: bool) -> list[WireMessage]:
        """Move the tensors of `result` that do not fit in one message into chunks."""
        targets = {
            "values": service_pb2.CHUNK_TARGET_VALUE,
            "gradients": service_pb2.CHUNK_TARGET_GRADIENT,
        }
        chunks: list[WireMessage] = []
        remaining = budget
        for field, tensors in result.tensors.items():
            inline, chunked = wire.split_oversized(tensors, remaining, as_lists=as_lists)
            remaining -= wire.payload_bytes(inline, as_lists=as_lists)
            result.tensors[field] = inline
            for name, array in chunked.items():
                chunks += wire.chunks_of(targets[field], name, array, budget)
        return chunks

    def _encode(self, results: list[WireMessage], chunks: list[WireMessage] = ()) -> bytes:
        spec = self.spec
        assert spec is not None
        fields = service_pb2.SessionResponse()
        if self.first_response:
            fields.graph_digest = spec.graph.digest
            self.first_response = False
        nested = {"results": results, "chunks": list(chunks)}
        encoded = wire.encode(WireMessage(fields, nested=nested), as_lists=spec.as_lists)
        self.call.sent += len(encoded)
        return encoded

"""The transport floor of the benchmarks: a bare gRPC echo server built on generic handlers.

Two unary methods, served with the same grpcio as the gradient service:

- ``/bench.Echo/Message`` parses its request as a protobuf message holding one bytes field
  (``google.protobuf.BytesValue``) and serializes it back: the parse and serialize that any
  tensor crossing the wire needs. This is the floor every serving figure is compared with.
- ``/bench.Echo/Raw`` returns the request's bytes untouched (no protobuf at all), printed
  beside the floor for information.

    python benchmarks/echo_server.py --port 50070 [--threads 8]
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures

import grpc
from google.protobuf import wrappers_pb2

SERVICE = "bench.Echo"
MESSAGE_METHOD = f"/{SERVICE}/Message"
RAW_METHOD = f"/{SERVICE}/Raw"
MAX_MESSAGE = 2000 * 1024 * 1024


def _echo(request, context):
    return request


def create_echo_server(address: str, threads: int = 8) -> tuple[grpc.Server, int]:
    """A started-able echo server bound to `address`; returns it and its port."""
    handlers = {
        "Message": grpc.unary_unary_rpc_method_handler(
            _echo,
            request_deserializer=wrappers_pb2.BytesValue.FromString,
            response_serializer=wrappers_pb2.BytesValue.SerializeToString,
        ),
        "Raw": grpc.unary_unary_rpc_method_handler(_echo),
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_insecure_port(address)
    return server, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    server, _ = create_echo_server(f"{args.host}:{args.port}", args.threads)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    stop.wait()
    server.stop(0)


if __name__ == "__main__":
    main()

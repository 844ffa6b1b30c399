"""How the SDK's channels are configured: load balancing, retries, keepalive, message sizes.

Every RPC of gradient.v1.GradientService is idempotent (a call computes from its request
alone; the server keeps nothing but caches), so the SDK retries the failures that mean "this
server could not take the call" and balances calls over every address its target resolves
to. The defaults, and why:

- `round_robin` load balancing: a target that resolves to several servers (a headless
  Kubernetes Service, `dns:///name:port`, or `ipv4:a:p,b:p`) gets a connection to each and
  spreads calls over them; gRPC's default (`pick_first`) would send everything to one.
- A retry policy: UNAVAILABLE (a replica stopping, restarting or unreachable, a connection
  reset) is retried up to 5 attempts in all, backing off from 50 ms to 1 s, always within the
  call's deadline; so is CANCELLED coming from the server, which gRPC answers to a call that
  reached a server just as it stopped accepting calls (a call the client cancels itself is
  never retried). Other codes are answers, never retried. Requests are kept for retrying up
  to the message size limit (gRPC keeps only 256 KiB by default, so large calls would not be
  retried).
- Keepalive: a ping every 60 s (idle connections included) that must be answered within 20 s,
  so a connection to a vanished server or through a dropped NAT/load-balancer entry is
  noticed and replaced rather than failing the next call. The server accepts pings that often.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

SERVICE_NAME = "gradient.v1.GradientService"

DEFAULT_SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": SERVICE_NAME}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
            },
        }
    ],
}
"""The service config the SDK's channels use unless given another (see the module's doc)."""

KEEPALIVE_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000


def channel_options(
    max_message_bytes: int,
    *,
    service_config: Mapping[str, Any] | str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> list[tuple[str, Any]]:
    """The channel arguments of an SDK channel: the defaults above, then `options` (which
    override a default of the same name). `service_config` replaces DEFAULT_SERVICE_CONFIG
    (a dict, or its JSON)."""
    config = DEFAULT_SERVICE_CONFIG if service_config is None else service_config
    defaults: dict[str, Any] = {
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.service_config": config if isinstance(config, str) else json.dumps(config),
        "grpc.enable_retries": 1,
        "grpc.per_rpc_retry_buffer_size": max_message_bytes,
        "grpc.keepalive_time_ms": KEEPALIVE_MS,
        "grpc.keepalive_timeout_ms": KEEPALIVE_TIMEOUT_MS,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.http2.max_pings_without_data": 0,
    }
    defaults.update(dict(options))
    return list(defaults.items())

# Container image of the gradient service (gRPC with health and reflection, on $GRADIENT_PORT:
# 50051 unless set).
#
#   docker build -t gradient-service .
#   docker run --rm -p 50051:50051 gradient-service
#   docker run --rm -p 50051:50051 gradient-service --workers 4 --threads 16
#   docker run --rm -e GRADIENT_PORT=50061 -p 50061:50061 gradient-service
#
# GRADIENT_PORT is the one port setting: gradient-server serves on it and the HEALTHCHECK
# (gradient-healthcheck) asks 127.0.0.1 on it. Arguments after the image name are appended to
# `gradient-server --host 0.0.0.0`; a --port given there overrides GRADIENT_PORT for the server
# only, so change the port with -e GRADIENT_PORT instead. A server with TLS or mutual TLS
# (--tls-cert ...) also serves plaintext health on --health-port 8081 (127.0.0.1 inside the
# container) for it:
#   docker run ... -e GRADIENT_HEALTHCHECK_TARGET=127.0.0.1:8081 gradient-service \
#       --tls-cert /certs/tls.crt --tls-key /certs/tls.key --health-port 8081
#
# The image needs no writable file: it runs with --read-only --cap-drop ALL
# --security-opt no-new-privileges and no tmpfs. `make docker-test` builds and runs it so;
# tests/test_container_run.py does the same without a Docker daemon.

# ---- builder: build the project's two wheels (only those; dependencies come from PyPI below) ----
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
# .dockerignore lets in only pyproject.toml, README.md, LICENSE, client/ and server/.
# Two distributions: gradient-service-client (./client) and gradient-service (.), which needs it.
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ./client .

# ---- runtime: the wheels installed into the system interpreter, run as an unprivileged user ----
FROM python:3.11-slim AS runtime

LABEL org.opencontainers.image.title="gradient-service" \
      org.opencontainers.image.description="gRPC service computing values and reverse-mode gradients of computation graphs with numpy" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# The wheels are bind-mounted from the builder, so they never land in a layer of this image.
# Installed together, so the server's gradient-service-client comes from its wheel, not an index.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir /wheels/*.whl

RUN groupadd --system --gid 10001 gradient \
    && useradd --system --uid 10001 --gid gradient --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gradient

# Numeric so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# The one port setting: gradient-server serves on $GRADIENT_PORT, and gradient-healthcheck asks
# 127.0.0.1:$GRADIENT_PORT. EXPOSE documents the default only.
ENV GRADIENT_PORT=50051
EXPOSE 50051

# No --target: the probe follows GRADIENT_PORT (or GRADIENT_HEALTHCHECK_TARGET, when set).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["gradient-healthcheck", "--timeout", "3"]

# gradient-server turns health NOT_SERVING on SIGTERM and lets in-flight calls finish (--grace,
# 10 s by default): give `docker stop` a longer timeout (-t) than --grace.
STOPSIGNAL SIGTERM

# No --port: the server serves on $GRADIENT_PORT.
ENTRYPOINT ["gradient-server", "--host", "0.0.0.0"]

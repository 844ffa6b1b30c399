# syntax=docker/dockerfile:1
#
# Container image of the gradient service (gRPC on port 50051, with health and reflection).
#
#   docker build -t gradient-service .
#   docker run --rm -p 50051:50051 gradient-service
#   docker run --rm -p 50051:50051 gradient-service --workers 4 --threads 16
#
# Arguments after the image name are appended to `gradient-server --host 0.0.0.0 --port 50051`
# (the last --host/--port given wins). The HEALTHCHECK asks 127.0.0.1:50051, so keep that port
# inside the container and remap it with -p instead. A server with TLS or mutual TLS
# (--tls-cert ...) also serves plaintext health on --health-port 8081 (127.0.0.1 inside the
# container) for it:
#   docker run ... -e GRADIENT_HEALTHCHECK_TARGET=127.0.0.1:8081 gradient-service \
#       --tls-cert /certs/tls.crt --tls-key /certs/tls.key --health-port 8081

# ---- builder: build the project's wheel (only the wheel; dependencies come from PyPI below) ----
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
# .dockerignore lets in only pyproject.toml, README.md, LICENSE, client/ and server/.
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- runtime: the wheel installed into the system interpreter, run as an unprivileged user ----
FROM python:3.11-slim AS runtime

LABEL org.opencontainers.image.title="gradient-service" \
      org.opencontainers.image.description="gRPC service computing values and reverse-mode gradients of computation graphs with numpy" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# The wheel is bind-mounted from the builder, so it never lands in a layer of this image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir /wheels/*.whl

RUN groupadd --system --gid 10001 gradient \
    && useradd --system --uid 10001 --gid gradient --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gradient

# Numeric so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

EXPOSE 50051

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["gradient-healthcheck", "--timeout", "3"]

# gradient-server turns health NOT_SERVING on SIGTERM and lets in-flight calls finish (--grace,
# 10 s by default): give `docker stop` a longer timeout (-t) than --grace.
STOPSIGNAL SIGTERM

ENTRYPOINT ["gradient-server", "--host", "0.0.0.0", "--port", "50051"]

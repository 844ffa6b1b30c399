"""`make docker-test`: build the image with a Docker daemon, run it locked down, and check it.

Steps: `docker info` must answer; the Dockerfile's base image must already be present locally
(nothing is pulled); the image is built with BuildKit; a container is started with host
networking, a read-only root filesystem, every capability dropped and no-new-privileges, on a
free port given by GRADIENT_PORT; its HEALTHCHECK must turn it healthy; a Gradient call is made
from this host with the SDK; `docker stop` must end it with exit status 0.

Without a reachable daemon, or without the base image, it prints why it SKIPPED and exits 0
(1 when DOCKER_TEST_REQUIRED=1): it never reports a pass it did not see. A failure exits 1.
DOCKER names the docker client (default `docker`): the Dockerfile's `RUN --mount` needs
BuildKit, which a client from Docker 23 on runs only through its buildx plugin, and one before
(such as Debian 12's docker.io, DOCKER=/usr/bin/docker) has built in.
tests/test_container_run.py checks the same without any daemon.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKER = os.environ.get("DOCKER", "docker")
IMAGE = os.environ.get("DOCKER_TEST_IMAGE", "gradient-service:docker-test")
STOP_TIMEOUT = 30  # longer than the server's --grace (10 s)
HEALTHY_WITHIN = 90.0


class Skip(Exception):
    """The check cannot run here: said so, never counted as a pass."""


class Failure(Exception):
    """The image failed a check."""


def docker(*args: str, timeout: float = 120, check: bool = True, **kwargs):
    result = subprocess.run(
        [DOCKER, *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if check and result.returncode != 0:
        raise Failure(f"`docker {' '.join(args)}` failed ({result.returncode}):\n{result.stderr}")
    return result


def base_images() -> list[str]:
    """The images the Dockerfile's stages start FROM (not its own stages)."""
    images, stages = [], set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        match = re.match(r"\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            if match.group(1).lower() not in stages and match.group(1) not in images:
                images.append(match.group(1))
            if match.group(2):
                stages.add(match.group(2).lower())
    return images


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return sock.getsockname()[1]


def check_daemon() -> None:
    try:
        info = docker("info", "--format", "{{.ServerVersion}}", timeout=30, check=False)
    except FileNotFoundError:
        raise Skip(f"no `{DOCKER}` command on PATH") from None
    except subprocess.TimeoutExpired:
        raise Skip("`docker info` did not answer within 30 s") from None
    if info.returncode != 0 or not info.stdout.strip():
        why = (info.stderr.strip().splitlines() or ["no answer"])[-1]
        raise Skip(
            f"no Docker daemon reachable ({why}). Start one, e.g. as root: "
            "`dockerd --storage-driver=vfs --iptables=false --bridge=none &`, "
            "then run `make docker-test` again"
        )
    print(f"docker-test: Docker daemon {info.stdout.strip()}")


def check_base_images() -> None:
    for image in base_images():
        if docker("image", "inspect", image, check=False).returncode != 0:
            raise Skip(
                f"the base image {image} is not present locally, and this script pulls no "
                f"image (no registry but the package indexes is reachable here). Load it "
                f"(`docker load -i python-3.11-slim.tar`) or pull it where a registry is "
                f"reachable, then run `make docker-test` again"
            )
        print(f"docker-test: base image {image} is present locally (nothing is pulled)")


def build() -> None:
    print(f"docker-test: building {IMAGE} (BuildKit, host network for pip)")
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    result = subprocess.run(
        [DOCKER, "build", "--network", "host", "--tag", IMAGE, str(ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0 and "buildx component is missing" in result.stderr:
        raise Skip(
            f"`{DOCKER}` runs BuildKit only through the buildx plugin, which is not installed "
            "(the Dockerfile's RUN --mount needs BuildKit). Install the plugin, or name a client "
            "with BuildKit built in: DOCKER=/usr/bin/docker make docker-test (Debian's docker.io)"
        )
    if result.returncode != 0:
        hint = ""
        if "CERTIFICATE_VERIFY_FAILED" in result.stderr:
            hint = (
                "\n(pip in the build could not verify the package index's certificate: behind a "
                "TLS-intercepting proxy, the base image does not trust the proxy's CA)"
            )
        raise Failure(f"docker build failed ({result.returncode}):\n{result.stderr[-4000:]}{hint}")


def state(container: str) -> dict:
    return json.loads(docker("inspect", "--format", "{{json .State}}", container).stdout)


def wait_healthy(container: str) -> None:
    deadline = time.monotonic() + HEALTHY_WITHIN
    while True:
        now = state(container)
        health = (now.get("Health") or {}).get("Status")
        if health == "healthy":
            return
        if not now.get("Running"):
            raise Failure(f"the container exited ({now.get('ExitCode')}) before it was healthy")
        if health == "unhealthy" or time.monotonic() > deadline:
            log = (now.get("Health") or {}).get("Log") or []
            last = log[-1].get("Output", "").strip() if log else "no check ran"
            raise Failure(f"not healthy ({health}): {last}")
        time.sleep(0.5)


def gradient_call(port: int) -> None:
    from gradient_client import GradientClient, Graph

    with GradientClient(f"127.0.0.1:{port}", timeout=30) as client:
        g = Graph()
        x, y, z = g.input("x"), g.input("y"), g.input("z")
        f = (x + y) * z
        r = client.gradient(g, output=f, inputs={"x": -2.0, "y": 5.0, "z": -4.0})
    got = (float(r.values[f.name]), *(float(r.gradients[n]) for n in "xyz"))
    if got != (-12.0, -4.0, -4.0, 3.0):
        raise Failure(f"f = (x + y) * z at (-2, 5, -4): value and gradients {got}")
    print("docker-test: Gradient call from the host: f = -12, df/dx = df/dy = -4, df/dz = 3")


def run_container() -> None:
    port = free_port()
    container = f"gradient-docker-test-{os.getpid()}"
    docker(
        "run",
        "--detach",
        "--name",
        container,
        "--network",
        "host",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--env",
        f"GRADIENT_PORT={port}",
        # The image's HEALTHCHECK command, checked every second instead of every 30 s.
        "--health-interval",
        "1s",
        IMAGE,
    )
    print(
        f"docker-test: started {container}: --network host --read-only --cap-drop ALL "
        f"--security-opt no-new-privileges, GRADIENT_PORT={port}"
    )
    try:
        wait_healthy(container)
        print("docker-test: healthy (the image's HEALTHCHECK, following GRADIENT_PORT)")
        gradient_call(port)
        docker("stop", "--time", str(STOP_TIMEOUT), container, timeout=STOP_TIMEOUT + 30)
        final = state(container)
        if final.get("ExitCode") != 0 or final.get("OOMKilled"):
            raise Failure(f"after docker stop: exit code {final.get('ExitCode')}")
        print("docker-test: docker stop (SIGTERM) ended it with exit status 0")
    except Failure:
        logs = docker("logs", "--tail", "50", container, check=False)
        print(f"--- container log (last 50 lines)\n{logs.stdout}{logs.stderr}", file=sys.stderr)
        raise
    finally:
        docker("rm", "--force", container, check=False)


def main() -> int:
    try:
        check_daemon()
        check_base_images()
        build()
        run_container()
    except Skip as skip:
        print(f"docker-test SKIPPED, nothing was tested: {skip}.")
        return 1 if os.environ.get("DOCKER_TEST_REQUIRED") == "1" else 0
    except Failure as failure:
        print(f"docker-test FAILED: {failure}", file=sys.stderr)
        return 1
    print(f"docker-test passed: {IMAGE} built, served, got healthy and stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())

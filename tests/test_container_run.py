"""The container, run without a Docker daemon: the image's contents are made as the Dockerfile
makes them, and its command lines are run under the restrictions the image is meant to bear.

1. The build context: exactly the files `.dockerignore` admits are copied to a temporary folder
   (the same parsing as test_container.py's; folders are pruned as Docker prunes them).
2. The builder stage: its `pip wheel ...` RUN line, word for word but for the wheel folder, in
   that context, with the stage's ENV. It makes two wheels: the server's (gradient-service) and
   the client's (gradient-service-client), which the server depends on.
3. The runtime stage: a fresh virtual environment (`python -m venv`) stands for the image's
   interpreter, and its `pip install /wheels/*.whl` RUN line installs the wheels into it. The
   dependencies come from the package index this machine's pip is configured with, as the image
   gets them from PyPI: nothing is cached across runs and nothing comes from the project's own
   environment. (The venv is made `--without-pip` and installed into by this interpreter's pip
   with `--python`: the same resolution, without the ~7 s of bootstrapping a pip in it.) The
   whole build takes about 20 s here.
4. The container: the ENTRYPOINT's exact argv is started, with the runtime stage's ENV (and
   GRADIENT_PORT set to a free port), HOME=/nonexistent (the image user's), the venv's bin first
   on PATH, and a working directory that is not the repository, so nothing can be imported from
   its sources. It runs as the image is meant to be run (`docker run --read-only --cap-drop ALL
   --security-opt no-new-privileges`, no tmpfs): in a mount namespace of its own where every
   mount is read-only (`unshare --mount`; `--user --map-root-user` when not root), with no
   capability and no_new_privs (`setpriv`). So the server shows that it needs no writable file,
   not even a temp directory. Where no namespace can be made, it falls back to an unwritable
   working directory and TMPDIR (a weaker check, and a warning says so).
5. The HEALTHCHECK's exact argv is run the same way, as Docker runs it inside the container,
   until it exits 0; with GRADIENT_PORT pointing elsewhere it exits 1, so it follows the port.
   A Gradient call is made with the SDK, from outside, as a client on the host would.
6. SIGTERM (the STOPSIGNAL) stops it with exit status 0.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_container import (
    DOCKERFILE,
    PORT,
    PORT_ENV,
    ROOT,
    Instruction,
    _env,
    _exec_form,
    _ignore_patterns,
    _ignore_rules,
    _ignored,
    _instructions,
    _options,
    _stages,
)

from gradient_client import GradientClient, Graph

# What the python:3.11-slim base image and the image's USER contribute to the environment.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOME = "/nonexistent"  # useradd --home-dir /nonexistent in the Dockerfile; it does not exist

# Run in a private mount namespace: remount every writable mount read-only, check that none is
# left writable, then drop every capability (and forbid gaining any) and exec the command. Of
# mounts stacked on one point (/proc/self/mountinfo lists them in order), the last is visible;
# nsfs mounts (namespace handles, as dockerd leaves) hold no files and are left alone.
READ_ONLY_SCRIPT = r"""
writable() {
    awk '{for (i = 7; $i != "-"; i++) {}; if ($(i + 1) != "nsfs") options[$5] = $6}
         END {for (m in options) if (options[m] ~ /^rw/) print m}' /proc/self/mountinfo
}
writable | while read -r target; do
    mount -o remount,bind,ro "$target" 2>/dev/null
done
if [ -n "$(writable)" ]; then
    echo "still writable:" $(writable) >&2
    exit 97
fi
exec setpriv --no-new-privs --inh-caps=-all --bounding-set=-all -- "$@"
"""


# ---------------------------------------------------------------- the build, as the Dockerfile's


def _copy_context(destination: Path) -> list[str]:
    """Copy the files that .dockerignore admits into `destination`; their relative paths."""
    rules = _ignore_rules()
    exceptions = [pattern for negated, pattern in _ignore_patterns() if negated]

    def may_hold_exceptions(folder: str) -> bool:
        # As Docker: an ignored folder is entered only if an exception pattern could match
        # below it (its literal leading segments agree with the folder's).
        parts = folder.split("/")
        for pattern in exceptions:
            for mine, theirs in zip(parts, pattern.split("/"), strict=False):
                if re.search(r"[*?\[]", theirs):
                    return True
                if mine != theirs:
                    break
            else:
                if len(pattern.split("/")) > len(parts):
                    return True
        return False

    copied = []
    for folder, dirs, files in os.walk(ROOT):
        here = Path(folder).relative_to(ROOT).as_posix()
        prefix = "" if here == "." else here + "/"
        dirs[:] = [
            d
            for d in sorted(dirs)
            if not os.path.islink(os.path.join(folder, d))
            and (not _ignored(prefix + d, rules) or may_hold_exceptions(prefix + d))
        ]
        for name in sorted(files):
            path = prefix + name
            if os.path.isfile(os.path.join(folder, name)) and not _ignored(path, rules):
                target = destination / path
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / path, target)
                copied.append(path)
    return copied


def _runs(stage: list[Instruction], command: str) -> Instruction:
    matching = [i for i in stage if i.keyword == "RUN" and re.search(command, i.args)]
    assert len(matching) == 1, f"expected one RUN with {command!r} in the stage: {matching}"
    return matching[0]


def _env_before(stage: list[Instruction], instruction: Instruction) -> dict[str, str]:
    return _env([i for i in stage if i.line < instruction.line])


def _pip(argv: list[str], where: str) -> list[str]:
    """A RUN line's `pip ...` words, to be run by this interpreter's pip."""
    assert argv[0] in ("pip", "pip3"), f"{where}: expected a pip command: {argv}"
    return [sys.executable, "-m", "pip", *argv[1:]]


def _run_build_step(argv: list[str], env: dict[str, str], cwd: Path) -> None:
    # This machine's pip configuration (index, certificates) applies, as PyPI does in the image.
    result = subprocess.run(
        argv, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{shlex.join(argv)} failed:\n{result.stdout}{result.stderr}"


@dataclass
class Image:
    """What the Dockerfile makes, laid out on this machine."""

    venv: Path
    env: dict[str, str]  # the runtime stage's ENV, PATH and HOME
    entrypoint: list[str]
    healthcheck: list[str]
    stop_signal: signal.Signals


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Image:
    stages = _stages(_instructions(DOCKERFILE.read_text()))
    runtime = stages[-1]
    base = tmp_path_factory.mktemp("image")

    # The runtime stage's pip install, and the builder stage its wheels are mounted from.
    install = _runs(runtime, r"\bpip3? install\b")
    mount_options, install_command = _options(install.args)
    mount = dict(item.split("=", 1) for item in mount_options["mount"].split(","))
    assert mount["type"] == "bind", mount
    aliases = {s[0].args.split()[-1].lower(): s for s in stages if len(s[0].args.split()) == 3}
    builder = aliases[mount["from"].lower()]

    # 1-2. The context, and the builder's pip wheel with its --wheel-dir moved here.
    context, wheels = base / "context", base / "wheels"
    context.mkdir()
    copied = _copy_context(context)
    assert "pyproject.toml" in copied and not any(p.startswith("tests/") for p in copied)
    build = _runs(builder, r"\bpip3? wheel\b")
    argv = _pip(shlex.split(build.args), f"line {build.line}")
    at = argv.index("--wheel-dir")
    assert os.path.normpath(argv[at + 1]) == os.path.normpath(mount["source"]), argv
    argv[at + 1] = str(wheels)
    _run_build_step(argv, _env_before(builder, build), context)
    built = sorted(wheels.glob("*.whl"))
    names = sorted(path.name.split("-")[0] for path in built)
    assert names == ["gradient_service", "gradient_service_client"], f"the builder made {built}"

    # 3. A fresh interpreter, and the runtime's pip install with the mount's files expanded.
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    argv = _pip(shlex.split(install_command), f"line {install.line}")
    target = mount["target"].rstrip("/") + "/"
    words = []
    for word in argv:
        if word.startswith(target):
            expanded = sorted(wheels.glob(word[len(target) :]))
            assert expanded, f"{word} matches nothing among {built}"
            words += [str(path) for path in expanded]
        else:
            words.append(word)
    words[3:3] = ["--python", str(venv / "bin" / "python")]
    _run_build_step(words, _env_before(runtime, install), base)
    # Both distributions came from the builder's wheels (PEP 610's record of where from), so the
    # server's gradient-service-client requirement was never looked up on an index.
    for wheel in built:
        name, version = wheel.name.split("-")[:2]
        (record,) = venv.glob(f"lib/python*/site-packages/{name}-{version}.dist-info")
        origin = json.loads((record / "direct_url.json").read_text())["url"]
        assert origin == wheel.as_uri(), f"{name} was installed from {origin}, not {wheel}"

    entrypoint = next(i for i in reversed(runtime) if i.keyword == "ENTRYPOINT")
    healthcheck = next(i for i in reversed(runtime) if i.keyword == "HEALTHCHECK")
    _, rest = _options(healthcheck.args)
    keyword, _, command = rest.partition(" ")
    assert keyword.upper() == "CMD"
    stop = next(i for i in reversed(runtime) if i.keyword == "STOPSIGNAL").args
    env = {
        "PATH": f"{venv / 'bin'}:{BASE_PATH}",
        "LANG": "C.UTF-8",  # set by the python image
        **_env(runtime),
        "HOME": HOME,
    }
    return Image(
        venv=venv,
        env=env,
        entrypoint=_exec_form(entrypoint),
        healthcheck=_exec_form(Instruction("HEALTHCHECK CMD", command, healthcheck.line)),
        stop_signal=signal.Signals(int(stop)) if stop.isdigit() else signal.Signals[stop],
    )


# ---------------------------------------------------------------- the container's restrictions


@dataclass
class Sandbox:
    prefix: list[str]  # run before the command: the read-only namespace, no capabilities
    cwd: Path  # a working directory that is not the repository, and unwritable
    tmpdir: Path  # what TMPDIR names: unwritable too
    read_only: bool  # whether the whole filesystem is read-only (else only cwd and TMPDIR)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Sandbox:
    base = tmp_path_factory.mktemp("container")
    cwd, tmpdir = base / "workdir", base / "tmp"
    cwd.mkdir()
    tmpdir.mkdir()
    cwd.chmod(0o555)
    tmpdir.chmod(0o555)
    namespace = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        namespace[1:1] = ["--user", "--map-root-user"]
    prefix = [*namespace, "sh", "-c", READ_ONLY_SCRIPT, "read-only"]
    why_not = ""
    if shutil.which("unshare") and shutil.which("setpriv"):
        # The check: writing into the (rw for its owner) temp dir of this test must fail.
        probe = subprocess.run(
            [*prefix, "sh", "-c", f"touch {shlex.quote(str(base / 'probe'))}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if probe.returncode != 0 and "Read-only file system" in probe.stderr:
            return Sandbox(prefix, cwd, tmpdir, read_only=True)
        why_not = f"the read-only namespace failed: {probe.stderr.strip()}"
    else:
        why_not = "unshare or setpriv (util-linux) is missing"
    root = " as root, so the unwritable folders do not hold it back" if os.geteuid() == 0 else ""
    warnings.warn(
        f"the container's read-only filesystem cannot be simulated ({why_not}): the server runs "
        f"with only its working directory and TMPDIR unwritable{root}",
        stacklevel=1,
    )
    return Sandbox([], cwd, tmpdir, read_only=False)


# ---------------------------------------------------------------- the run


def _free_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if str(port) != PORT:  # a port other than the Dockerfile's default, always
            return port


def _run_inside(sandbox: Sandbox, argv: list[str], env: dict[str, str], timeout: float):
    return subprocess.run(
        [*sandbox.prefix, *argv],
        cwd=sandbox.cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


@pytest.mark.parametrize("arguments", [[], ["--workers", "2"]], ids=["entrypoint", "workers-2"])
def test_the_image_serves_gets_healthy_and_stops_cleanly(image, sandbox, tmp_path, arguments):
    """`docker run [-e GRADIENT_PORT=N] gradient-service [ARGUMENTS]`, without Docker."""
    port = _free_port()
    env = {**image.env, PORT_ENV: str(port), "TMPDIR": str(sandbox.tmpdir)}

    # Nothing from the repository: the server's package is the installed wheel.
    code = (
        "import gradient_client, gradient_server as s; print(s.__file__, gradient_client.__file__)"
    )
    where = _run_inside(sandbox, ["python", "-c", code], env, 60)
    assert where.returncode == 0, where.stderr
    for file in where.stdout.split():
        assert Path(file).is_relative_to(image.venv), where.stdout

    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [*sandbox.prefix, *image.entrypoint, *arguments],
            cwd=sandbox.cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # Healthy: the HEALTHCHECK's command, run as Docker runs it (inside, same environment).
        deadline = time.monotonic() + 30
        while True:
            probe = _run_inside(sandbox, image.healthcheck, env, 60)
            if probe.returncode == 0:
                break
            assert server.poll() is None, f"the server exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, (
                f"never healthy: {probe.stderr}\n{log_path.read_text()}"
            )
            time.sleep(0.2)
        assert probe.stderr == "", probe.stderr

        if sandbox.read_only:
            status = _status(server.pid)
            assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0, status
            assert status["NoNewPrivs"].strip() == "1", status
            visible = {}  # mount point: options of the last (visible) mount on it
            for line in Path(f"/proc/{server.pid}/mountinfo").read_text().splitlines():
                fields = line.split()
                if fields[fields.index("-") + 1] != "nsfs":
                    visible[fields[4]] = fields[5]
            assert visible and all(o.startswith("ro") for o in visible.values()), visible

        # The probe follows GRADIENT_PORT: pointed at a port where nothing listens, it fails.
        elsewhere = _run_inside(
            sandbox, image.healthcheck, {**env, PORT_ENV: str(_free_port())}, 60
        )
        assert elsewhere.returncode == 1, elsewhere
        assert "UNAVAILABLE" in elsewhere.stderr, elsewhere.stderr

        # A Gradient call from the host, with the SDK: the lecture's f = (x + y) * z.
        with GradientClient(f"127.0.0.1:{port}", timeout=30) as client:
            g = Graph()
            x, y, z = g.input("x"), g.input("y"), g.input("z")
            f = (x + y) * z
            r = client.gradient(g, output=f, inputs={"x": -2.0, "y": 5.0, "z": -4.0})
        assert float(r.values[f.name]) == -12.0
        assert [float(r.gradients[n]) for n in "xyz"] == [-4.0, -4.0, 3.0]

        server.send_signal(image.stop_signal)
        assert server.wait(timeout=15) == 0, log_path.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    log = log_path.read_text()
    assert f":{port}" in log, log  # it said where it served
    for sign in ("Traceback", "Read-only file system", "Permission denied", " ERROR "):
        assert sign not in log, log
    assert not any(sandbox.cwd.iterdir()) and not any(sandbox.tmpdir.iterdir())

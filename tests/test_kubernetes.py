"""The Kubernetes manifests (deploy/kubernetes): lint, schemas, and agreement with the image
and the server's flags.

No cluster is needed, nor kustomize: each kustomization is built here with what the
manifests use (resources, components, namespace, images, replicas, strategic-merge and JSON
6902 patches; anything else fails loudly), and compared with `kubectl kustomize` where kubectl
is installed. Every resource is then validated against the schemas of kubernetes-validate and
checked against the Dockerfile and `gradient-server`'s own parser.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from gradient_server.main import _parser
from gradient_server.service import SERVICE_NAME

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
KUBERNETES_VERSION = "1.37"

Resource = dict[str, Any]


# ---------------------------------------------------------------- files and yamllint


def _yaml_files() -> list[Path]:
    return sorted(KUBERNETES.rglob("*.yaml"))


def _kustomization_dirs() -> list[Path]:
    return sorted(path.parent for path in KUBERNETES.rglob("kustomization.yaml"))


def _documents(path: Path) -> list[Any]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


def _kustomization(directory: Path) -> Resource:
    found = _documents(directory / "kustomization.yaml")
    assert len(found) == 1, f"{directory}/kustomization.yaml holds {len(found)} documents"
    return found[0]


def _builds() -> list[str]:
    """Every buildable kustomization (components are built as part of the overlays using them)."""
    return [
        str(directory.relative_to(KUBERNETES))
        for directory in _kustomization_dirs()
        if _kustomization(directory)["kind"] == "Kustomization"
    ]


def test_the_layout_has_a_base_and_overlays():
    builds = _builds()
    assert "base" in builds
    assert any(build.startswith("overlays/") for build in builds)
    assert (KUBERNETES / "README.md").is_file()


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_yamllint_finds_nothing(path):
    config = YamlLintConfig(file=str(KUBERNETES / ".yamllint"))
    problems = list(linter.run(path.read_text(), config, str(path)))
    report = "\n".join(f"{p.line}:{p.column} {p.level} {p.desc} ({p.rule})" for p in problems)
    assert not problems, f"yamllint {path.relative_to(ROOT)}:\n{report}"


def test_yamllint_config_is_itself_clean():
    config = YamlLintConfig(file=str(KUBERNETES / ".yamllint"))
    text = (KUBERNETES / ".yamllint").read_text()
    assert not list(linter.run(text, config, ".yamllint"))


def _references(directory: Path) -> list[Path]:
    kustomization = _kustomization(directory)
    paths = [directory / entry for entry in kustomization.get("resources", [])]
    paths += [directory / entry for entry in kustomization.get("components", [])]
    paths += [directory / patch["path"] for patch in kustomization.get("patches", [])]
    return paths


@pytest.mark.parametrize(
    "directory", _kustomization_dirs(), ids=lambda p: str(p.relative_to(KUBERNETES))
)
def test_every_file_a_kustomization_names_exists(directory):
    for path in _references(directory):
        assert path.is_file() or (path / "kustomization.yaml").is_file(), (
            f"{directory.relative_to(ROOT)}/kustomization.yaml names {path.relative_to(directory)}"
            ", which is neither a file nor a directory with a kustomization.yaml"
        )


def test_every_manifest_is_used_by_a_kustomization():
    used = {path.resolve() for d in _kustomization_dirs() for path in _references(d)}
    unused = [
        str(path.relative_to(KUBERNETES))
        for path in _yaml_files()
        if path.name != "kustomization.yaml" and path.resolve() not in used
    ]
    assert not unused, f"no kustomization uses {unused}"


# ---------------------------------------------------------------- a small kustomize

FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "namespace",
    "patches",
    "replicas",
    "images",
}
"""The kustomization fields this builder implements."""
NAMESPACED = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
CLUSTER_SCOPED = {"Namespace"}

MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",  # a container's; a Service's merge on "port"
}
"""Strategic merge: the lists merged item by item on a key, as Kubernetes' patchMergeKey
declares them; other lists (`args` among them) are replaced whole."""


def _build(directory: Path, resources: list[Resource] | None = None) -> list[Resource]:
    """The resources `kustomize build directory` outputs (a component: applied to `resources`)."""
    kustomization = _kustomization(directory)
    unknown = set(kustomization) - FIELDS
    assert not unknown, f"{directory}: teach this test's kustomize the fields {sorted(unknown)}"
    resources = copy.deepcopy(resources or [])
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            assert _kustomization(path)["kind"] == "Kustomization", f"{path} is a Component"
            resources += _build(path)
        else:
            resources += _documents(path)
    for entry in kustomization.get("components", []):
        assert _kustomization(directory / entry)["kind"] == "Component", f"{entry}: no Component"
        resources = _build(directory / entry, resources)
    for patch in kustomization.get("patches", []):
        _patch(directory, patch, resources)
    if "namespace" in kustomization:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = kustomization["namespace"]
    for replicas in kustomization.get("replicas", []):
        _only(resources, {"kind": "Deployment", "name": replicas["name"]})["spec"]["replicas"] = (
            replicas["count"]
        )
    for image in kustomization.get("images", []):
        _set_image(resources, image)
    for resource in resources:
        assert resource["kind"] in NAMESPACED | CLUSTER_SCOPED, f"unknown kind {resource['kind']}"
    return resources


def _matching(resources: list[Resource], target: dict[str, str]) -> list[Resource]:
    unknown = set(target) - {"kind", "name"}
    assert not unknown, f"patch targets by {sorted(unknown)} are not supported here"
    return [
        r
        for r in resources
        if r["kind"] == target["kind"] and r["metadata"]["name"] == target["name"]
    ]


def _only(resources: list[Resource], target: dict[str, str]) -> Resource:
    found = _matching(resources, target)
    assert len(found) == 1, f"{target} matches {len(found)} resources"
    return found[0]


def _patch(directory: Path, entry: dict[str, Any], resources: list[Resource]) -> None:
    assert set(entry) <= {"path", "target"}, f"unsupported patch entry {entry}"
    (patch,) = _documents(directory / entry["path"])
    if isinstance(patch, list):  # JSON 6902 operations, for the resources of `target`
        targets = _matching(resources, entry["target"])
        assert targets, f"{entry['path']}: its target {entry['target']} matches nothing"
        for resource in targets:
            _json6902(resource, patch)
        return
    target = entry.get("target") or {"kind": patch["kind"], "name": patch["metadata"]["name"]}
    targets = _matching(resources, target)
    assert targets, f"{entry['path']}: {target} matches nothing"
    for resource in targets:
        merged = _merge(resource, patch)
        resource.clear()
        resource.update(merged)


def _merge(base: Any, patch: Any) -> Any:
    if not (isinstance(base, dict) and isinstance(patch, dict)):
        return copy.deepcopy(patch)
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        assert not key.startswith("$"), f"patch directive {key} is not supported here"
        if value is None:
            merged.pop(key, None)
        elif key in MERGE_KEYS and key in merged:
            merged[key] = _merge_list(merged[key], value, MERGE_KEYS[key])
        elif key in merged:
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _merge_list(base: list[Any], patch: list[Any], key: str) -> list[Any]:
    merged = copy.deepcopy(base)
    for item in patch:
        if key not in item:  # a Service's ports
            key = "port"
        same = [i for i, existing in enumerate(merged) if existing[key] == item[key]]
        if same:
            merged[same[0]] = _merge(merged[same[0]], item)
        else:
            merged.append(copy.deepcopy(item))
    return merged


def _json6902(document: Resource, operations: list[dict[str, Any]]) -> None:
    for operation in operations:
        op, value = operation["op"], operation.get("value")
        assert op in ("add", "replace", "remove"), f"JSON patch op {op} is not supported here"
        parts = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")]
        *parents, last = parts[1:]
        node: Any = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            if op == "add" and last == "-":
                node.append(value)
            elif op == "add":
                node.insert(int(last), value)
            elif op == "replace":
                node[int(last)] = value
            else:
                del node[int(last)]
        elif op == "remove":
            del node[last]
        else:
            assert op == "add" or last in node, f"replace of missing {operation['path']}"
            node[last] = value


def _image_name(image: str) -> str:
    """An image reference without its tag or digest."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def _set_image(resources: list[Resource], image: dict[str, str]) -> None:
    for resource in resources:
        if resource["kind"] != "Deployment":
            continue
        for container in resource["spec"]["template"]["spec"]["containers"]:
            if _image_name(container["image"]) != image["name"]:
                continue
            old_rest = container["image"][len(image["name"]) :]
            new = image.get("newName", image["name"])
            if "digest" in image:
                container["image"] = f"{new}@{image['digest']}"
            elif "newTag" in image:
                container["image"] = f"{new}:{image['newTag']}"
            else:
                container["image"] = new + old_rest


@functools.cache
def _built(name: str) -> str:
    return json.dumps(_build(KUBERNETES / name))


def test_the_builder_applies_strategic_merge_and_json_patches():
    base = {"spec": {"containers": [{"name": "a", "args": ["x"], "env": [{"name": "E"}]}]}}
    patch = {"spec": {"containers": [{"name": "a", "args": ["y"], "env": [{"name": "F"}]}]}}
    merged = {"name": "a", "args": ["y"], "env": [{"name": "E"}, {"name": "F"}]}
    assert _merge(base, patch) == {"spec": {"containers": [merged]}}
    document = {"a": {"b": [1]}}
    _json6902(document, [{"op": "add", "path": "/a/b/-", "value": 2}])
    _json6902(document, [{"op": "replace", "path": "/a/b/0", "value": 0}])
    assert document == {"a": {"b": [0, 2]}}
    assert _image_name("registry:5000/a/b:1.0") == "registry:5000/a/b"
    assert _image_name("registry:5000/a/b") == "registry:5000/a/b"


@pytest.mark.parametrize("name", _builds())
def test_the_builder_agrees_with_kubectl_kustomize(name):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl on PATH: the builder above stands in for kustomize")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    theirs = [r for r in yaml.safe_load_all(result.stdout) if r is not None]
    ours = json.loads(_built(name))

    def by_name(resources: list[Resource]) -> dict[tuple[str, str], Resource]:
        return {(r["kind"], r["metadata"]["name"]): r for r in resources}

    assert by_name(ours) == by_name(theirs)


# ---------------------------------------------------------------- the built resources


@dataclass
class Build:
    """One built kustomization, with its Deployment's pod and container at hand."""

    name: str
    resources: list[Resource]

    def all(self, kind: str) -> list[Resource]:
        return [r for r in self.resources if r["kind"] == kind]

    def one(self, kind: str) -> Resource:
        found = self.all(kind)
        assert len(found) == 1, f"{self.name}: {len(found)} {kind}s"
        return found[0]

    @property
    def deployment(self) -> Resource:
        return self.one("Deployment")

    @property
    def pod(self) -> Resource:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def container(self) -> Resource:
        containers = self.pod["containers"]
        assert len(containers) == 1, f"{self.name}: {len(containers)} containers"
        return containers[0]

    def port(self, name: str) -> int:
        """The containerPort named `name`."""
        found = [p["containerPort"] for p in self.container["ports"] if p["name"] == name]
        assert len(found) == 1, f"{self.name}: {len(found)} container ports named {name}"
        return found[0]

    def env(self) -> dict[str, str]:
        return {e["name"]: e["value"] for e in self.container.get("env", []) if "value" in e}


def _load(name: str) -> Build:
    return Build(name, json.loads(_built(name)))


@pytest.fixture(params=_builds())
def build(request) -> Build:
    return _load(request.param)


def test_every_resource_validates_against_the_kubernetes_schemas(build):
    failures = []
    for resource in build.resources:
        where = f"{resource['kind']}/{resource['metadata']['name']}"
        try:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            failures.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            failures.append(f"{where}: {e.message}")
    assert not failures, f"{build.name}:\n" + "\n".join(failures)


# ---------------------------------------------------------------- the image (Dockerfile)


@dataclass
class Image:
    entrypoint: list[str]
    env: dict[str, str]
    exposed: list[int]
    user: str


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each instruction, continuations joined and comments dropped."""
    result, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


@functools.cache
def _image() -> Image:
    instructions = _instructions(DOCKERFILE.read_text())
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    runtime = instructions[starts[-1] :]
    entrypoint: list[str] = []
    env: dict[str, str] = {}
    exposed: list[int] = []
    user = ""
    for keyword, args in runtime:
        if keyword == "ENTRYPOINT":
            entrypoint = json.loads(args)  # exec form, so that args are appended to it
        elif keyword == "ENV":
            words = shlex.split(args)
            if "=" in words[0]:
                env.update(word.split("=", 1) for word in words)
            else:
                env[words[0]] = " ".join(words[1:])
        elif keyword == "EXPOSE":
            exposed += [int(word.split("/")[0]) for word in args.split()]
        elif keyword == "USER":
            user = args
    return Image(entrypoint, env, exposed, user)


def _server_flags(monkeypatch, arguments: list[str], env: dict[str, str]) -> argparse.Namespace:
    """gradient-server's settings for these arguments in this environment."""
    monkeypatch.delenv("GRADIENT_PORT", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = _parser()  # its --port default reads $GRADIENT_PORT now
    _, unknown = parser.parse_known_args(arguments)
    assert not unknown, f"gradient-server has no flags {unknown}"
    options = {option for action in parser._actions for option in action.option_strings}
    abbreviated = [a for a in arguments if a.startswith("-") and a.split("=")[0] not in options]
    assert not abbreviated, f"spell out the flags {abbreviated} (argparse accepts prefixes)"
    try:
        return parser.parse_args(arguments)
    except SystemExit:
        pytest.fail(f"gradient-server refuses its arguments {arguments} (see stderr)")


def test_the_image_serves_on_the_port_it_exposes(monkeypatch):
    image = _image()
    assert image.entrypoint[0] == "gradient-server"
    (exposed,) = image.exposed
    if "GRADIENT_PORT" in image.env:
        assert image.env["GRADIENT_PORT"] == str(exposed)
    flags = _server_flags(monkeypatch, image.entrypoint[1:], image.env)
    assert flags.port == exposed
    assert flags.host == "0.0.0.0"


@pytest.fixture
def flags(build, monkeypatch) -> argparse.Namespace:
    """The settings of the server the Deployment starts: the image's ENTRYPOINT, then the
    container's args, in the image's environment updated by the container's."""
    image = _image()
    assert "command" not in build.container, "command would replace the image's ENTRYPOINT"
    arguments = image.entrypoint[1:] + build.container.get("args", [])
    return _server_flags(monkeypatch, arguments, image.env | build.env())


def test_the_grpc_port_agrees_with_the_image_everywhere(build, flags):
    (image_port,) = _image().exposed
    assert build.env().get("GRADIENT_PORT") == str(image_port)
    assert build.port("grpc") == image_port
    assert flags.port == image_port, "the server would bind another port than containerPort"
    assert flags.host == "0.0.0.0", "the pod must serve on its own address"


def test_probes_are_native_grpc_on_the_plaintext_health_port(build, flags):
    assert flags.health_port, "--health-port: the probes need the plaintext health port"
    assert flags.health_host == "0.0.0.0", "the kubelet probes the pod's address"
    assert flags.health_port != flags.port
    assert build.port("health") == flags.health_port
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = build.container[kind]
        assert set(probe) & {"grpc", "exec", "httpGet", "tcpSocket"} == {"grpc"}, kind
        # Also under TLS (--tls-cert): the kubelet's probe speaks plaintext only.
        assert probe["grpc"]["port"] == flags.health_port, kind
        assert probe["grpc"].get("service", "") in ("", SERVICE_NAME), kind
        assert probe.get("timeoutSeconds", 1) <= probe.get("periodSeconds", 10), kind
    assert build.container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    # `kubectl exec <pod> -- gradient-healthcheck` asks the same port.
    target = build.env().get("GRADIENT_HEALTHCHECK_TARGET")
    assert target in (None, f"127.0.0.1:{flags.health_port}")


def test_termination_grace_period_covers_pre_stop_and_server_grace(build, flags):
    assert "--grace" in build.container["args"], "pass --grace explicitly"
    pre_stop = build.container.get("lifecycle", {}).get("preStop", {})
    assert set(pre_stop) <= {"sleep"}
    sleep = pre_stop.get("sleep", {}).get("seconds", 0)
    period = build.pod["terminationGracePeriodSeconds"]
    assert period > sleep + flags.grace, (
        f"terminationGracePeriodSeconds {period} must exceed preStop {sleep} s + --grace "
        f"{flags.grace} s, or calls in flight are killed"
    )


def test_runs_non_root_read_only_without_capabilities(build):
    uid = _image().user.split(":")[0]
    pod, container = build.pod["securityContext"], build.container["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert str(pod["runAsUser"]) == uid
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert container.get("privileged", False) is False
    seccomp = container.get("seccompProfile") or pod.get("seccompProfile")
    assert seccomp == {"type": "RuntimeDefault"}
    assert build.pod["automountServiceAccountToken"] is False
    assert not any(k in build.pod for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert all("hostPath" not in volume for volume in build.pod.get("volumes", []))


def test_files_the_server_reads_come_from_read_only_secret_mounts(build, flags):
    mounts = {m["name"]: m for m in build.container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in build.pod.get("volumes", [])}
    for flag in ("tls_cert", "tls_key", "tls_client_ca", "token_file"):
        path = getattr(flags, flag)
        if path is None:
            continue
        holders = [m for m in mounts.values() if path.startswith(m["mountPath"].rstrip("/") + "/")]
        assert holders, f"--{flag.replace('_', '-')} {path} is in no volume mount"
        (mount,) = holders
        assert mount.get("readOnly") is True, mount
        assert "secret" in volumes[mount["name"]], f"{mount['name']} is not a Secret volume"


def test_metrics_port_is_declared_and_annotated(build, flags):
    assert flags.metrics_port, "--metrics-port: no metrics"
    assert flags.workers == 1, "--workers N serves metrics on N ports: scale with replicas"
    assert build.port("metrics") == flags.metrics_port
    assert (flags.metrics_host or flags.host) == "0.0.0.0"
    annotations = build.deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(flags.metrics_port)
    assert annotations["prometheus.io/scrape"] == "true"


UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


def _bytes(quantity: str | int) -> int:
    match = re.fullmatch(r"(\d+)(|Ki|Mi|Gi|Ti|k|M|G)", str(quantity))
    assert match, f"memory quantity {quantity!r}: this test reads whole numbers with a unit"
    return int(match[1]) * UNITS.get(match[2], 1)


def test_resources_and_the_memory_budget_fit(build, flags):
    resources = build.container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), f"{kind} needs cpu and memory"
    limit_mib = _bytes(resources["limits"]["memory"]) >> 20
    # Without --memory-budget the server takes 70% of the cgroup's memory limit.
    budget_mib = flags.memory_budget or 0.7 * limit_mib
    headroom = limit_mib - budget_mib - flags.cache_mb
    assert headroom >= 256, f"budget {budget_mib} + caches {flags.cache_mb} MiB in {limit_mib}"
    for variable in build.container["env"]:
        if "valueFrom" in variable:  # BLAS threads follow the CPU limit
            assert variable["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"


def _selects_pods(build: Build, selector: dict[str, str]) -> bool:
    labels = build.deployment["spec"]["template"]["metadata"]["labels"]
    return bool(selector) and selector.items() <= labels.items()


def test_the_deployment_selects_its_pods(build):
    assert _selects_pods(build, build.deployment["spec"]["selector"]["matchLabels"])


def test_services_reach_the_grpc_port(build):
    services = build.all("Service")
    assert services
    for service in services:
        assert _selects_pods(build, service["spec"]["selector"]), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            target = build.port(target) if isinstance(target, str) else target
            assert target == build.port("grpc"), service["metadata"]["name"]


def test_a_headless_service_for_client_side_round_robin_and_a_cluster_ip_one(build):
    headless = [s for s in build.all("Service") if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1
    (service,) = headless
    assert service["metadata"]["name"] == "gradient-service"
    # DNS gives pod addresses: clients dial them on the container's port, never remapped.
    assert [p["port"] for p in service["spec"]["ports"]] == [build.port("grpc")]
    assert not service["spec"].get("publishNotReadyAddresses", False)
    others = [s for s in build.all("Service") if s not in headless]
    assert [s["spec"].get("type", "ClusterIP") for s in others] == ["ClusterIP"]


def test_the_disruption_budget_covers_the_deployment_and_lets_drains_proceed(build):
    pdb = build.one("PodDisruptionBudget")["spec"]
    assert pdb["selector"] == build.deployment["spec"]["selector"]
    replicas = build.deployment["spec"]["replicas"]
    if "maxUnavailable" in pdb:
        assert 1 <= pdb["maxUnavailable"] < replicas
    else:
        assert pdb["minAvailable"] < replicas


def test_the_autoscaler_scales_the_deployment_on_cpu(build):
    hpa = build.one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": build.deployment["metadata"]["name"],
    }
    assert hpa["minReplicas"] == build.deployment["spec"]["replicas"] <= hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in build.container["resources"]["requests"], "utilization is of the request"


def test_one_namespace_per_build(build):
    namespaced = [r for r in build.resources if r["kind"] in NAMESPACED]
    namespaces = {r["metadata"].get("namespace") for r in namespaced}
    assert len(namespaces) == 1
    for namespace in build.all("Namespace"):
        assert namespaces == {namespace["metadata"]["name"]}


# ---------------------------------------------------------------- what the overlays change


def test_the_base_deploys_three_replicas_of_the_placeholder_image():
    base = _load("base")
    assert base.deployment["spec"]["replicas"] == 3
    assert base.container["image"] == "gradient-service:0.1.0"
    assert all("namespace" not in r["metadata"] for r in base.resources)


def test_the_production_overlay_sets_its_knobs():
    base, production = _load("base"), _load("overlays/production")
    kustomization = _kustomization(KUBERNETES / "overlays/production")
    (image,) = kustomization["images"]
    assert production.container["image"] == f"{image['newName']}:{image['newTag']}"
    assert production.deployment["spec"]["replicas"] == kustomization["replicas"][0]["count"]
    assert production.deployment["metadata"]["namespace"] == kustomization["namespace"]
    assert production.container["resources"] != base.container["resources"]
    assert production.container["args"] == base.container["args"]


def test_the_tls_overlay_serves_tls_and_tokens_from_secrets(monkeypatch):
    tls = _load("overlays/production-tls")
    flags = _server_flags(monkeypatch, _image().entrypoint[1:] + tls.container["args"], {})
    assert flags.tls_cert and flags.tls_key and flags.token_file
    secrets = {v["secret"]["secretName"] for v in tls.pod["volumes"]}
    assert secrets == {"gradient-service-tls", "gradient-service-tokens"}


# ---------------------------------------------------------------- the README


def test_the_readme_names_the_headless_target_and_real_overlays():
    readme = (KUBERNETES / "README.md").read_text()
    headless = next(s for s in _load("base").all("Service") if s["spec"].get("clusterIP") == "None")
    name, port = headless["metadata"]["name"], headless["spec"]["ports"][0]["port"]
    assert f"dns:///{name}.<namespace>.svc.cluster.local:{port}" in readme
    applied = re.findall(r"kubectl apply -k (\S+)", readme)
    assert applied
    for path in applied:
        assert (ROOT / path / "kustomization.yaml").is_file(), path

"""The contract: generated code is current, and every part of the proto is documented."""

from __future__ import annotations

import filecmp
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import generate_protos  # noqa: E402


def _differences(left: Path, right: Path) -> list[str]:
    comparison = filecmp.dircmp(left, right, ignore=["__pycache__"])
    found = [*comparison.left_only, *comparison.right_only, *comparison.diff_files]
    shallow_equal = [
        f for f in comparison.same_files if (left / f).read_bytes() != (right / f).read_bytes()
    ]
    found += shallow_equal
    for sub in comparison.common_dirs:
        found += [f"{sub}/{d}" for d in _differences(left / sub, right / sub)]
    return found


def test_generated_code_is_current(tmp_path):
    generate_protos.generate(tmp_path)
    stale = _differences(tmp_path / "gradient", ROOT / "client" / "gradient")
    assert not stale, f"client/gradient is stale, run `make proto`: {stale}"


def _descriptor_set(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path / "contract.pb"
    include = Path(protoc.__file__).resolve().parent / "_proto"
    files = [str(p.relative_to(ROOT / "protos")) for p in generate_protos.proto_files()]
    args = [
        "protoc",
        f"-I{ROOT / 'protos'}",
        f"-I{include}",
        "--include_source_info",
        f"--descriptor_set_out={out}",
        *files,
    ]
    assert protoc.main(args) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _documentable(file: descriptor_pb2.FileDescriptorProto):
    """(source path, name) of every message, field, enum, enum value, service and rpc."""
    for m, message in enumerate(file.message_type):
        yield (4, m), message.name
        for f, field in enumerate(message.field):
            yield (4, m, 2, f), f"{message.name}.{field.name}"
        for o, oneof in enumerate(message.oneof_decl):
            if not oneof.name.startswith("_"):  # proto3 `optional` makes a synthetic oneof
                yield (4, m, 8, o), f"{message.name}.{oneof.name}"
    for e, enum in enumerate(file.enum_type):
        yield (5, e), enum.name
        for v, value in enumerate(enum.value):
            yield (5, e, 2, v), f"{enum.name}.{value.name}"
    for s, service in enumerate(file.service):
        yield (6, s), service.name
        for r, rpc in enumerate(service.method):
            yield (6, s, 2, r), f"{service.name}.{rpc.name}"


def test_every_message_field_enum_and_rpc_is_documented(tmp_path):
    undocumented = []
    for file in _descriptor_set(tmp_path).file:
        comments = {
            tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location
        }
        undocumented += [
            f"{file.name}: {name}" for path, name in _documentable(file) if not comments.get(path)
        ]
    assert not undocumented, f"undocumented in the proto: {undocumented}"


def test_package_is_versioned(tmp_path):
    for file in _descriptor_set(tmp_path).file:
        assert file.package == "gradient.v1"
        assert file.name.startswith("gradient/v1/")

"""The committed generated code matches proto/, imports cleanly, and exposes the expected API surface."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["common", "artifacts", "inversion", "keyframes", "propagation", "editor"]
SERVICES = {
    "artifacts": ("Artifacts", ["Upload", "Download", "Get", "List", "Delete"]),
    "inversion": ("Inversion", ["Invert", "Cancel"]),
    "keyframes": ("Keyframes", ["EditKeyframes", "Cancel"]),
    "propagation": ("Propagation", ["Propagate", "Cancel"]),
    "editor": ("Editor", ["Edit"]),
}


def _recorded_versions() -> dict[str, str]:
    first = (ROOT / "tokenflow_pb/v1/common_pb2.py").read_text(encoding="utf-8").splitlines()[0]
    return dict(re.findall(r"(grpcio-tools|mypy-protobuf) ([^,)]+)", first))


def test_generated_code_is_up_to_date() -> None:
    recorded = _recorded_versions()
    installed = {name: importlib.metadata.version(name) for name in recorded}
    if installed != recorded:
        pytest.skip(f"generated with {recorded}, installed {installed}: the check needs the same generators")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "proto/generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout


@pytest.mark.parametrize("name", MODULES)
def test_modules_import(name: str) -> None:
    pb2 = importlib.import_module(f"tokenflow_pb.v1.{name}_pb2")
    importlib.import_module(f"tokenflow_pb.v1.{name}_pb2_grpc")
    assert pb2.DESCRIPTOR.package == "tokenflow.v1"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_services_and_stubs(name: str) -> None:
    service, methods = SERVICES[name]
    pb2 = importlib.import_module(f"tokenflow_pb.v1.{name}_pb2")
    grpc_mod = importlib.import_module(f"tokenflow_pb.v1.{name}_pb2_grpc")
    assert pb2.DESCRIPTOR.services_by_name[service].full_name == f"tokenflow.v1.{service}"
    assert [m.name for m in pb2.DESCRIPTOR.services_by_name[service].methods] == methods
    servicer = getattr(grpc_mod, f"{service}Servicer")
    assert hasattr(grpc_mod, f"{service}Stub")
    assert callable(getattr(grpc_mod, f"add_{service}Servicer_to_server"))
    for method in methods:
        assert callable(getattr(servicer, method))


def test_optional_fields_track_presence() -> None:
    from tokenflow_pb.v1 import common_pb2

    spec = common_pb2.EditSpec(prompt="a cat")
    assert not spec.HasField("guidance_scale") and not spec.HasField("negative_prompt")
    spec.guidance_scale = 0.0
    assert spec.HasField("guidance_scale")
    inv = common_pb2.InversionSpec()
    assert not inv.HasField("steps") and not inv.HasField("reconstruct")
    from tokenflow_pb.v1 import inversion_pb2

    event = inversion_pb2.InvertResponse(
        result=common_pb2.Result(digest="0" * 64, inversion=common_pb2.InversionInfo())
    )
    assert event.WhichOneof("event") == "result" and event.result.WhichOneof("info") == "inversion"
    progress = common_pb2.Progress()
    assert not progress.HasField("eta") and not progress.HasField("elapsed")


def test_streaming_shapes() -> None:
    from tokenflow_pb.v1 import artifacts_pb2, editor_pb2, inversion_pb2

    methods = {m.name: m for m in artifacts_pb2.DESCRIPTOR.services_by_name["Artifacts"].methods}
    assert methods["Upload"].client_streaming and not methods["Upload"].server_streaming
    assert methods["Download"].server_streaming and not methods["Download"].client_streaming
    invert = inversion_pb2.DESCRIPTOR.services_by_name["Inversion"].methods_by_name["Invert"]
    assert invert.server_streaming and invert.output_type.full_name == "tokenflow.v1.InvertResponse"
    edit = editor_pb2.DESCRIPTOR.services_by_name["Editor"].methods_by_name["Edit"]
    assert edit.server_streaming and edit.output_type.full_name == "tokenflow.v1.EditResponse"


def _all_methods() -> list[Any]:
    out = []
    for name in MODULES:
        pb2 = importlib.import_module(f"tokenflow_pb.v1.{name}_pb2")
        for service in pb2.DESCRIPTOR.services_by_name.values():
            out.extend(service.methods)
    return out


def test_every_rpc_has_its_own_request_and_response_types() -> None:
    """Google API design / buf's RPC_REQUEST_RESPONSE_UNIQUE and *_STANDARD_NAME rules."""
    methods = _all_methods()
    inputs = [m.input_type.full_name for m in methods]
    outputs = [m.output_type.full_name for m in methods]
    assert len(set(inputs)) == len(inputs) and len(set(outputs)) == len(outputs)
    assert not set(inputs) & set(outputs)
    for m in methods:
        names = (m.name, m.containing_service.name + m.name)
        assert m.input_type.name in {n + "Request" for n in names}, m.full_name
        assert m.output_type.name in {n + "Response" for n in names}, m.full_name


def test_descriptors_are_registered_under_the_proto_file_names() -> None:
    """Stubs a caller generates from proto/ register the same files, so they load beside ours."""
    from google.protobuf import descriptor_pool

    import tokenflow_pb.v1.editor_pb2  # noqa: F401 - registers the files

    pool = descriptor_pool.Default()
    for name in MODULES:
        file = pool.FindFileByName(f"tokenflow/v1/{name}.proto")
        assert file.package == "tokenflow.v1"
        with pytest.raises(KeyError):
            pool.FindFileByName(f"tokenflow_pb/v1/{name}.proto")
    assert pool.FindMessageTypeByName("tokenflow.v1.EditSpec").file.name == "tokenflow/v1/common.proto"


def test_stubs_generated_by_a_caller_load_beside_ours(tmp_path: Path) -> None:
    """What a caller does: protoc on our proto/ into its own package, imported in the same process."""
    from grpc_tools import protoc

    include = importlib.resources.files("grpc_tools") / "_proto"
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto/tokenflow/v1").glob("*.proto"))
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={tmp_path}", *protos])
    assert rc == 0
    code = (
        "import tokenflow_pb.v1.editor_pb2 as ours\n"
        "import tokenflow.v1.editor_pb2 as theirs\n"
        "assert ours.EditRequest.DESCRIPTOR.full_name == theirs.EditRequest.DESCRIPTOR.full_name\n"
        "print('ok')\n"
    )
    # A separate interpreter whose `tokenflow` package is the caller's generated code, not our library.
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "PATH": os.environ.get("PATH", "")}
    (tmp_path / "tokenflow" / "__init__.py").write_text("")
    (tmp_path / "tokenflow" / "v1" / "__init__.py").write_text("")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def _enum_short_names(enum: Any) -> list[str]:
    from google.protobuf.descriptor import EnumDescriptor

    from services.convert import enum_name

    desc = enum if isinstance(enum, EnumDescriptor) else enum.DESCRIPTOR
    return [enum_name(desc, v.number) for v in desc.values if v.number]


def test_enums_match_the_library_tables() -> None:
    """The closed sets: EditMethod lists exactly tokenflow.methods.METHODS in order; choices fields too."""
    from services.convert import enum_value
    from tokenflow.methods import METHODS
    from tokenflow.specs import EditSpec, spec_fields
    from tokenflow_pb.v1 import common_pb2

    assert _enum_short_names(common_pb2.EditMethod) == list(METHODS)
    for m in METHODS.values():
        assert common_pb2.EditMethod.Value(m.proto_name) == enum_value(common_pb2.EditMethod, m.name)
    for f in spec_fields(EditSpec):
        if f.doc.choices is not None:
            field = common_pb2.EditSpec.DESCRIPTOR.fields_by_name[f.name]
            assert field.enum_type is not None, f.name
            assert _enum_short_names(field.enum_type) == list(f.doc.choices), f.name


def test_artifact_kinds_stages_and_phases_cover_what_the_services_emit() -> None:
    from services.convert import enum_value
    from tokenflow_pb.v1 import common_pb2

    kinds = {"video", "inversion", "keyframes", "propagation", "features"}
    assert set(_enum_short_names(common_pb2.ArtifactKind)) == kinds
    assert _enum_short_names(common_pb2.Stage) == ["inversion", "keyframes", "propagation"]
    for phase in ("queued", "running", "cached", "waiting", "rebuild", "publish"):  # the services' own
        assert enum_value(common_pb2.Phase, phase)
    for phase in ("encode", "invert", "reconstruct", "edit", "keyframes"):  # the library's progress stages
        assert enum_value(common_pb2.Phase, phase)


@pytest.mark.parametrize("spec_name", ["DecodeSpec", "InversionSpec", "EditSpec"])
def test_spec_messages_have_the_library_field_names(spec_name: str) -> None:
    import tokenflow.specs as specs
    from tokenflow_pb.v1 import common_pb2

    library = [f.name for f in specs.spec_fields(getattr(specs, spec_name))]
    proto = [f.name for f in getattr(common_pb2, spec_name).DESCRIPTOR.fields]
    assert proto == library


def test_times_are_well_known_types() -> None:
    from tokenflow_pb.v1 import artifacts_pb2, common_pb2

    fields = common_pb2.Progress.DESCRIPTOR.fields_by_name
    assert fields["eta"].message_type.full_name == "google.protobuf.Duration"
    assert fields["elapsed"].message_type.full_name == "google.protobuf.Duration"
    created = artifacts_pb2.Artifact.DESCRIPTOR.fields_by_name["create_time"]
    assert created.message_type.full_name == "google.protobuf.Timestamp"


def test_buf_lint_is_clean() -> None:
    """The API follows buf's STANDARD lint rules (proto/buf.yaml lists the justified exception)."""
    buf = Path(sys.executable).parent / "buf"
    if not buf.exists():
        found = shutil.which("buf")
        if found is None:
            pytest.skip("buf is not installed (pip install buf-bin)")
        buf = Path(found)
    proc = subprocess.run([str(buf), "lint", "proto"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_client_names_enum_values_as_the_services_do() -> None:
    """The client keeps its own copy of the naming rule (it cannot import services/): they agree."""
    from clients.client import enum_name as client_name
    from clients.client import enum_number
    from services.convert import enum_name, enum_value
    from tokenflow_pb.v1 import common_pb2

    for enum in common_pb2.DESCRIPTOR.enum_types_by_name.values():
        wrapper = getattr(common_pb2, enum.name)
        for value in enum.values:
            name = enum_name(enum, value.number)
            assert client_name(wrapper, value.number) == (name or "")
            if name is not None:
                assert enum_number(wrapper, name) == enum_value(enum, name) == value.number

"""The committed generated code matches proto/, imports cleanly, and exposes the expected API surface."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["common", "artifacts", "inversion", "keyframes", "propagation", "editor"]
SERVICES = {
    "artifacts": ("Artifacts", ["Upload", "Download", "Stat"]),
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
    event = common_pb2.JobEvent(
        result=common_pb2.Result(digest="0" * 64, inversion=common_pb2.InversionInfo())
    )
    assert event.WhichOneof("event") == "result" and event.result.WhichOneof("info") == "inversion"


def test_streaming_shapes() -> None:
    from tokenflow_pb.v1 import artifacts_pb2, editor_pb2, inversion_pb2

    methods = {m.name: m for m in artifacts_pb2.DESCRIPTOR.services_by_name["Artifacts"].methods}
    assert methods["Upload"].client_streaming and not methods["Upload"].server_streaming
    assert methods["Download"].server_streaming and not methods["Download"].client_streaming
    invert = inversion_pb2.DESCRIPTOR.services_by_name["Inversion"].methods_by_name["Invert"]
    assert invert.server_streaming and invert.output_type.full_name == "tokenflow.v1.JobEvent"
    edit = editor_pb2.DESCRIPTOR.services_by_name["Editor"].methods_by_name["Edit"]
    assert edit.server_streaming and edit.output_type.full_name == "tokenflow.v1.EditorEvent"

"""The client installs alone: `pip install ./clients` into a fresh venv, without torch, talks to a server.

Two tests share one idea: what `clients/pyproject.toml` builds is the client, the generated code and
nothing else, and depends on gRPC and protobuf only.
- The wheel's contents and metadata, read from a wheel built from `clients/` (a few seconds).
- A fresh venv (python -m venv, no pip of its own: the main venv's pip installs into it with --python),
  `pip install ./clients` into it (pip fetches the gRPC wheels from the package index), no torch, diffusers,
  av or opencv importable there, and its `tokenflow-client health` against a real server on 127.0.0.1.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import subprocess
import sys
import time
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loopback import tiny_server_config

import clients

ROOT = Path(__file__).resolve().parent.parent
PIP_TIMEOUT = 300  # seconds for one pip run (a cold download of grpcio and protobuf included)
ALLOWED_DEPENDENCIES = {
    "grpcio",
    "grpcio-health-checking",
    "grpcio-status",
    "protobuf",
    "googleapis-common-protos",
}
HEAVY_MODULES = ("torch", "diffusers", "transformers", "av", "cv2", "tqdm", "tokenflow", "services")


def _pip(*args: str, timeout: float = PIP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """The main venv's pip, quiet, with the version check off; fails the test with pip's output."""
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def _clean_env() -> dict[str, str]:
    """The environment without anything that would let the fresh venv see the repository or main venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(ROOT / "clients"))
    (path,) = out.glob("tokenflow_client-*.whl")
    return path


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_wheel_holds_the_client_and_the_generated_code_only(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = email.parser.Parser().parsestr(
            z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        )
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    packaged = {n for n in names if ".dist-info/" not in n}

    client_files = {f"clients/{p.name}" for p in (ROOT / "clients").iterdir() if p.suffix == ".py"}
    generated = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "tokenflow_pb").rglob("*")
        if p.suffix in (".py", ".pyi") and "__pycache__" not in p.parts
    }
    expected = client_files | generated | {"clients/py.typed", "tokenflow_pb/py.typed"}
    assert packaged == expected, (sorted(packaged - expected), sorted(expected - packaged))
    assert all((ROOT / n).read_bytes() == zipfile.ZipFile(wheel).read(n) for n in sorted(client_files)[:3])

    assert metadata["Name"] == "tokenflow-client"
    assert metadata["Version"] == clients.__version__
    requires = metadata.get_all("Requires-Dist") or []
    names_required = {_canonical(re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0]) for r in requires}
    assert names_required == ALLOWED_DEPENDENCIES, requires
    assert all(re.search(r"<\d", r) for r in requires), f"every dependency needs an upper bound: {requires}"
    assert re.search(r"^tokenflow-client\s*=\s*clients\.cli:main$", entry_points, re.MULTILINE), entry_points


def test_client_dependency_ranges_match_the_servers() -> None:
    """The client's pins are the server's for the packages both use: one stub generation serves both."""
    import tomllib

    client = tomllib.loads((ROOT / "clients" / "pyproject.toml").read_text())["project"]["dependencies"]
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]

    def ranges(deps: list[str]) -> dict[str, str]:
        out = {}
        for dep in deps:
            name = re.split(r"[\s<>=!~;\[(]", dep, maxsplit=1)[0]
            out[_canonical(name)] = dep[len(name) :].replace(" ", "")
        return out

    client_ranges, server_ranges = ranges(client), ranges(server)
    for name, spec in client_ranges.items():
        if name in server_ranges:
            assert spec == server_ranges[name], (name, spec, server_ranges[name])


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A new venv (no system site-packages) with `pip install ./clients` done; yields its bin/ dir."""
    root = tmp_path_factory.mktemp("client-venv") / "venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=False, clear=True).create(root)
    python = root / "bin" / "python"
    _pip("--python", str(python), "install", "--quiet", str(ROOT / "clients"))
    yield root / "bin"


def _run(command: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from services.server import build_server

    running = build_server(tiny_server_config(tmp_path_factory.mktemp("cache")))
    yield running
    running.stop(grace=0)


def _wait_serving(target: str, timeout: float = 180.0) -> None:
    """Health is truthful: NOT_SERVING until the model is loaded and warmed. Wait for it (bounded)."""
    from clients import ClientError, TokenFlowClient

    deadline = time.monotonic() + timeout
    status = ""
    with TokenFlowClient(target) as client:
        while time.monotonic() < deadline:
            try:
                status = client.health(timeout=5)
            except ClientError as e:
                status = str(e)
            if status == "SERVING":
                return
            time.sleep(0.2)
    pytest.fail(f"the server at {target} did not turn SERVING within {timeout:.0f} s (last: {status})")


def test_client_installed_alone_has_no_ml_stack_and_checks_health(
    fresh_venv: Path, server: Any, tmp_path: Path
) -> None:
    python = str(fresh_venv / "python")
    probe = (
        "import importlib.util, json, clients, grpc_status, google.rpc.status_pb2;"
        "import tokenflow_pb.v1.editor_pb2 as e;"
        f"print(json.dumps({{'heavy': [m for m in {HEAVY_MODULES!r} if importlib.util.find_spec(m)],"
        "'clients': clients.__file__, 'pb': e.__file__}))"
    )
    proc = _run([python, "-c", probe], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["heavy"] == [], f"importable in the client-only venv: {found['heavy']}"
    venv_root = str(fresh_venv.parent)
    assert found["clients"].startswith(venv_root) and found["pb"].startswith(venv_root), found

    script = str(fresh_venv / "tokenflow-client")
    version = _run([script, "--version"], cwd=tmp_path)
    assert (version.returncode, version.stdout.strip()) == (0, f"tokenflow-client {clients.__version__}")

    target = f"127.0.0.1:{server.port}"
    _wait_serving(target)
    health = _run([script, "--target", target, "health"], cwd=tmp_path)
    assert (health.returncode, health.stdout, health.stderr) == (0, "SERVING\n", "")
    unreachable = _run([script, "--target", "127.0.0.1:1", "--timeout", "3", "health"], cwd=tmp_path)
    assert unreachable.returncode == 1 and "Traceback" not in unreachable.stderr, unreachable.stderr

"""Build hook of the `tokenflow-client` distribution: puts the generated code beside the client.

The generated package `tokenflow_pb/` lives at the repository's top level, shared with the server, so it
is not under this distribution's root (`clients/`). In a checkout it is taken from `../tokenflow_pb`; an
sdist built here carries its own copy at its root, so a wheel built from that sdist finds it there.
The files are listed one by one (sources, stubs, `py.typed`) so caches such as `__pycache__` never ship.
The client's own modules go under `clients/` in the wheel; in an sdist they keep their place, so a new
module ships without a change here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SHIPPED_SUFFIXES = (".py", ".pyi")
MARKER = "py.typed"


def _shipped(directory: Path) -> list[Path]:
    """The files of a package tree that belong in a distribution, in a stable order."""
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and (p.suffix in SHIPPED_SUFFIXES or p.name == MARKER)
    )


class ClientBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        generated = root.parent / "tokenflow_pb"
        if not (generated / "__init__.py").is_file():
            generated = root / "tokenflow_pb"  # building from an sdist made by this hook
        if not (generated / "__init__.py").is_file():
            raise RuntimeError(f"tokenflow_pb/ is neither in {root.parent} nor in {root}")
        force_include = build_data["force_include"]
        for path in _shipped(generated):
            force_include[str(path)] = f"tokenflow_pb/{path.relative_to(generated).as_posix()}"
        prefix = "clients/" if self.target_name == "wheel" else ""
        for path in _shipped(root):
            relative = path.relative_to(root)
            if relative.parts[0] not in ("_build", "tokenflow_pb"):
                force_include[str(path)] = prefix + relative.as_posix()

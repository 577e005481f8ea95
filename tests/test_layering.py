"""Import rules of the package (ARCHITECTURE.md), checked on the AST of every module.

- `sidecar.protocol` and `sidecar.dataplane` are shared by both sides: they import neither
  `sidecar.worker` nor `sidecar.host`;
- `sidecar.host` (the reference host) never imports `sidecar.worker` (worker code, torch).

Imports inside functions count as much as those at the top of a module: a lazy import still runs.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RULES: dict[str, tuple[str, ...]] = {
    "sidecar.protocol": ("sidecar.worker", "sidecar.host"),
    "sidecar.dataplane": ("sidecar.worker", "sidecar.host"),
    "sidecar.host": ("sidecar.worker",),
}


def module_name(path: Path, package_root: Path) -> str:
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, package_root: Path) -> list[tuple[int, list[str]]]:
    """(line, modules it may load) of every import statement in the file, relative imports resolved;
    `from a import b` may load `a` and `a.b` (b may be a submodule)."""
    name = module_name(path, package_root)
    is_package = path.name == "__init__.py"
    found: list[tuple[int, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, [module] + [f"{module}.{alias.name}" for alias in node.names]))
    return found


def violations(package_root: Path) -> list[str]:
    """One line per import statement that breaks a rule."""
    out: list[str] = []
    for path in sorted(package_root.rglob("*.py")):
        name = module_name(path, package_root)
        forbidden = [bad for owner, bads in RULES.items() if name == owner or name.startswith(owner + ".")
                     for bad in bads]
        for line, modules in imports(path, package_root):
            hit = next((m for m in modules for bad in forbidden if m == bad or m.startswith(bad + ".")), None)
            if hit is not None:
                out.append(f"{path.relative_to(package_root.parent)}:{line} ({name}) imports {hit}")
    return out


def test_the_package_keeps_its_import_rules() -> None:
    assert violations(ROOT / "sidecar") == []


@pytest.mark.parametrize("source, module", [
    ("from sidecar.worker.calls import Placement\n", "sidecar/host/client.py"),
    ("import sidecar.worker.lifecycle\n", "sidecar/host/template.py"),
    ("def f():\n    from sidecar.worker import lifecycle\n", "sidecar/host/template.py"),
    ("from sidecar import worker\n", "sidecar/host/pool.py"),
    ("from ..worker import registry\n", "sidecar/protocol/codec.py"),
    ("from sidecar.host.client import Client\n", "sidecar/dataplane/arena.py"),
])
def test_a_forbidden_import_is_found(tmp_path: Path, source: str, module: str) -> None:
    """The checker itself: each of these (the imports the rules were written against, lazy and
    relative ones included) is reported."""
    target = tmp_path / module
    target.parent.mkdir(parents=True)
    for package in (tmp_path / "sidecar", target.parent):
        (package / "__init__.py").touch()
    target.write_text(source)
    (found,) = violations(tmp_path / "sidecar")
    assert found.startswith(module) and "imports sidecar." in found


def test_allowed_imports_are_not_reported(tmp_path: Path) -> None:
    package = tmp_path / "sidecar"
    for sub in ("host", "worker", "protocol"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").touch()
    (package / "__init__.py").touch()
    (package / "host" / "client.py").write_text("from sidecar.protocol import calls\nfrom . import pool\n")
    (package / "worker" / "dispatcher.py").write_text("from sidecar.host import client\n")  # not a rule
    (package / "protocol" / "calls.py").write_text("from sidecar.protocol.refs import TensorRef\n")
    assert violations(package) == []

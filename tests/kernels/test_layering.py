"""The layering the package promises: kernels import no method, a method imports no other method."""

from __future__ import annotations

import ast
from pathlib import Path

import stf_pipeline

PACKAGE = Path(stf_pipeline.__file__).parent


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_kernels_import_no_method():
    for path in sorted((PACKAGE / "kernels").glob("*.py")):
        bad = sorted(name for name in _imports(path) if name.startswith("stf_pipeline.methods"))
        assert not bad, f"{path.name} imports {bad}"


#: modules of ``methods/`` that every method may import: the protocol and the shared training settings
SHARED = ("stf_pipeline.methods._base", "stf_pipeline.methods._training")


def test_shared_method_modules_import_no_method():
    for module in SHARED:
        path = PACKAGE / "methods" / f"{module.rsplit('.', 1)[1]}.py"
        bad = sorted(n for n in _imports(path) if n.startswith("stf_pipeline.methods") and not n.startswith(SHARED))
        assert not bad, f"{path.name} imports {bad}"


def test_a_method_subpackage_imports_only_itself_the_protocol_and_lower_layers():
    methods = sorted(p for p in (PACKAGE / "methods").iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert {"delta", "starfm", "estarfm", "fsdaf", "biastf", "stfdcnn"} <= {p.name for p in methods}
    for package in methods:
        own = f"stf_pipeline.methods.{package.name}"
        for path in sorted(package.glob("*.py")):
            others = sorted(
                name for name in _imports(path)
                if name.startswith("stf_pipeline.methods") and not name.startswith((own, *SHARED))
            )
            assert not others, f"{package.name}/{path.name} imports {others}"

"""The layering the package promises: kernels import no method, a method imports no other method, the
orchestration (config -> comparison -> runner -> cli) imports downwards at the top of its modules, and
no module's imports form a cycle."""

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


#: the orchestration modules, lowest first: each may import those before it, none imports one after it,
#: and no other module of the package imports any of them
ORCHESTRATION = ("stf_pipeline.config", "stf_pipeline.comparison", "stf_pipeline.runner", "stf_pipeline.cli")
#: the one package module the orchestration imports inside a function: it imports matplotlib
LAZY = ("stf_pipeline.plots",)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_or_under(name: str, modules: tuple[str, ...]) -> bool:
    return any(name == m or name.startswith(f"{m}.") for m in modules)


def _function_imports(path: Path) -> set[str]:
    """Modules of the package imported inside a function or method of ``path``."""
    names: set[str] = set()
    for func in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    names.update(a.name for a in node.names if a.name.startswith("stf_pipeline"))
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stf_pipeline"):
                    names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_orchestration_imports_point_down():
    modules = _modules()
    for i, module in enumerate(ORCHESTRATION):
        above = sorted(n for n in _imports(modules[module]) if _is_or_under(n, ORCHESTRATION[i + 1:]))
        assert not above, f"{module} imports {above}"
    for module, path in modules.items():
        if module not in ORCHESTRATION:
            up = sorted(n for n in _imports(path) if _is_or_under(n, ORCHESTRATION))
            assert not up, f"{module} imports the orchestration module(s) {up}"


def test_orchestration_imports_the_package_at_the_top():
    modules = _modules()
    for module in ORCHESTRATION:
        hidden = sorted(n for n in _function_imports(modules[module]) if not _is_or_under(n, LAZY))
        assert not hidden, f"{module} imports {hidden} inside a function; import it at the top of the module"


def _top_level_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that ``path`` imports when it is imported (statements outside functions
    and outside ``if TYPE_CHECKING``); ``from package import module`` counts as the module."""
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                submodules = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
                found.update(submodules or {node.module})  # `from package import module` needs only the module
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
            elif isinstance(node, ast.ClassDef):
                visit(node.body)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return {name for name in found if name in modules}


def _cycle(graph: dict[str, set[str]]) -> tuple[str, ...] | None:
    """A cycle of ``graph`` (module -> modules it imports) as ``(a, b, ..., a)``, or None."""
    done: set[str] = set()

    def visit(module: str, chain: tuple[str, ...]) -> tuple[str, ...] | None:
        if module in chain:
            return (*chain[chain.index(module):], module)
        if module in done:
            return None
        for name in sorted(graph.get(module, ())):
            found = visit(name, (*chain, module))
            if found:
                return found
        done.add(module)
        return None

    for module in sorted(graph):
        found = visit(module, ())
        if found:
            return found
    return None


def test_cycle_finder():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ("a", "b", "c", "a")


def test_the_package_has_no_import_cycle():
    modules = _modules()
    # a module's own packages are initialised before it anyway: importing them adds no edge
    graph = {
        module: {n for n in _top_level_imports(path, modules) if not _is_or_under(module, (n,))}
        for module, path in modules.items()
    }
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or ())}"

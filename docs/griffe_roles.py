"""Griffe extension (``extensions:`` of the mkdocstrings handler in ``mkdocs.yml``): Sphinx roles in docstrings.

The package's docstrings cite code the Sphinx way, ``:func:`stf_pipeline.fuse``` or
``:class:`~stf_pipeline.nn.FittedModel```, which mkdocstrings would print as they are. Each role
becomes inline code (the last component only after ``~``, as Sphinx shows it), and a link to the
API reference when it names a public object of :data:`stf_pipeline.__all__` (the page renders
those under the path of their defining module, which is the link target).
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType
from typing import Any

from griffe import Extension, Object

ROLE = re.compile(r":(?:func|meth|class|exc|mod|data|attr|obj|const):`(~?)([\w.]+)`")


def public_targets() -> dict[int, str]:
    """``id(object)`` -> the path the API reference renders it under, for every public name."""
    import stf_pipeline

    targets = {}
    for name in stf_pipeline.__all__:
        value = getattr(stf_pipeline, name)
        if isinstance(value, ModuleType):  # a submodule of the same name shadows the public function
            value = getattr(value, name)
        module = getattr(value, "__module__", None)
        if module:
            targets[id(value)] = f"{module}.{name}"
    return targets


def resolve(path: str) -> Any:
    """The object at a dotted ``path`` (module, then attributes), or None."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            value: Any = importlib.import_module(".".join(parts[:split]))
        except (ImportError, TypeError, ValueError):  # not a module, or not an absolute name
            continue
        for part in parts[split:]:
            value = getattr(value, part, None)
            if value is None:
                return None
        return value
    return None


def convert(text: str, module: str, targets: dict[int, str]) -> str:
    """Replace every role of ``text`` (a docstring of ``module``) by code, linked where public."""

    def replace(match: re.Match[str]) -> str:
        short, path = match.groups()
        path = path.lstrip(".")  # ``.name``: Sphinx's "look in this module first", which is done anyway
        shown = f"`{path.rsplit('.', 1)[-1] if short else path}`"
        for candidate in (f"{module}.{path}", path, f"stf_pipeline.{path}"):
            value = resolve(candidate)
            if value is not None and id(value) in targets:
                return f"[{shown}][{targets[id(value)]}]"
        return shown

    return ROLE.sub(replace, text)


class SphinxRoles(Extension):
    """Rewrite Sphinx roles of every loaded docstring (see :func:`convert`)."""

    def __init__(self) -> None:
        super().__init__()
        self._targets: dict[int, str] | None = None

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is None or ":`" not in obj.docstring.value:
            return
        if self._targets is None:
            self._targets = public_targets()
        obj.docstring.value = convert(obj.docstring.value, obj.module.path, self._targets)

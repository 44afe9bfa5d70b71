"""MkDocs hooks of the documentation site (``hooks:`` in ``mkdocs.yml``).

* :func:`on_config` builds the navigation from the Markdown files that exist under ``docs/``, so
  a page added by anyone appears without editing ``mkdocs.yml``, and a page that is not written
  yet is simply absent (the build never points at a missing file). Known pages come in reading
  order (:data:`ORDER`); others follow in alphabetical order; a folder becomes a section.
* :func:`on_page_markdown` fills two reference pages from the code, so they cannot drift from it:
  in ``api.md`` a line ``::: stf_pipeline.NAME`` for a public name is pointed at the module that
  defines it (the package imports its public names lazily, which static analysis cannot follow);
  in ``cli.md`` the marker :data:`CLI_MARKER` becomes the ``--help`` text of every ``stf`` command.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

#: Reading order of the pages we know of; a folder entry (``"methods/"``) places that section.
ORDER = [
    "index.md",
    "getting-started.md",
    "cube.md",
    "architecture.md",
    "ingest.md",
    "stores.md",
    "cli.md",
    "methods/",
    "study.md",
    "adding-a-method.md",
    "benchmarks.md",
    "api.md",
]
#: Order of the pages inside a section (by file stem); others follow alphabetically.
SECTION_ORDER = {"methods": ["index", "delta", "starfm", "estarfm", "fsdaf", "stfdcnn", "biastf"]}
#: Pages that close the navigation; pages we do not know of go before them.
LAST = ("benchmarks.md", "api.md")
#: Replaced in ``cli.md`` by the help of every ``stf`` command.
CLI_MARKER = "<!-- stf-commands -->"

_API_LINE = re.compile(r"^::: stf_pipeline\.(\w+)[ \t]*$", re.MULTILINE)


def _is_page(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return path.suffix == ".md" and not any(part.startswith((".", "_")) for part in parts)


def _rank(key: str, order: list[str]) -> tuple[int, str]:
    return (order.index(key) if key in order else len(order), key)


def _section(folder: Path, root: Path) -> dict[str, list[Any]]:
    """The nav section of one folder: its pages (and sub-folders), ordered."""
    order = SECTION_ORDER.get(folder.name, ["index"])
    entries: list[tuple[tuple[int, str], Any]] = []
    for child in folder.iterdir():
        if child.is_dir():
            sub = _section(child, root)
            if next(iter(sub.values())):
                entries.append(((len(order) + 1, child.name), sub))
        elif _is_page(child, root):
            entries.append((_rank(child.stem, order), child.relative_to(root).as_posix()))
    title = folder.name.replace("-", " ").replace("_", " ").capitalize()
    return {title: [entry for _, entry in sorted(entries, key=lambda item: item[0])]}


def build_nav(docs_dir: str | os.PathLike[str]) -> list[Any]:
    """The navigation of every page under ``docs_dir``, in :data:`ORDER`, unknown pages before :data:`LAST`.

    Entries are paths (MkDocs takes the title from the page's first heading) and, for a folder
    holding pages, ``{title: [...]}`` sections. Folders without pages (``benchmarks/`` holds JSON)
    are left out.
    """
    root = Path(docs_dir)
    known, unknown, last = [], [], []
    for child in root.iterdir():
        key = f"{child.name}/" if child.is_dir() else child.name
        if child.is_dir():
            entry: Any = _section(child, root)
            if not next(iter(entry.values())):
                continue
        elif _is_page(child, root):
            entry = child.name
        else:
            continue
        if key in LAST:
            last.append((ORDER.index(key), entry))
        elif key in ORDER:
            known.append((ORDER.index(key), entry))
        else:
            unknown.append((key, entry))
    return (
        [entry for _, entry in sorted(known, key=lambda item: item[0])]
        + [entry for _, entry in sorted(unknown, key=lambda item: item[0])]
        + [entry for _, entry in sorted(last, key=lambda item: item[0])]
    )


def public_paths(markdown: str) -> str:
    """Point each ``::: stf_pipeline.NAME`` line (``NAME`` in ``stf_pipeline.__all__``) at NAME's module."""
    import stf_pipeline

    def resolve(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in stf_pipeline.__all__:
            return match.group(0)
        value = getattr(stf_pipeline, name)
        if isinstance(value, ModuleType):  # a submodule of the same name, imported since, shadows it
            value = getattr(value, name)
        return f"::: {value.__module__}.{name}"

    return _API_LINE.sub(resolve, markdown)


@contextlib.contextmanager
def _columns(width: int) -> Iterator[None]:
    """Help text wrapped at ``width`` columns whatever terminal builds the site."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def command_help(parser: argparse.ArgumentParser | None = None, *, width: int = 100) -> str:
    """Markdown: one section per ``stf`` command with its one-line summary and its ``--help`` text."""
    if parser is None:
        from stf_pipeline.cli import build_parser

        parser = build_parser()
    parts = []
    with _columns(width):
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                continue
            summaries = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                usage = sub.format_help().rstrip()
                parts.append(f"### `{parser.prog} {name}`\n\n{summaries.get(name) or ''}\n\n```text\n{usage}\n```\n")
    return "\n".join(parts)


def on_config(config: Any) -> Any:
    """Navigation from the pages that exist (see :func:`build_nav`)."""
    config["nav"] = build_nav(config["docs_dir"])
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Public API paths in ``api.md``; the commands' help in ``cli.md``."""
    if page.file.src_uri == "api.md":
        return public_paths(markdown)
    if page.file.src_uri == "cli.md" and CLI_MARKER in markdown:
        return markdown.replace(CLI_MARKER, command_help())
    return markdown

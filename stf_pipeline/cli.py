"""The ``stf`` command: a thin argparse layer over the library.

``stf run PIPELINE``, ``stf info CUBE.zarr``, ``stf ingest CATALOG -o CUBE.zarr`` (or ``--fine GLOB
--coarse GLOB``), ``stf export FUSED.zarr -o DIR``,
``stf compare PIPELINE`` (:func:`stf_pipeline.pipeline.run_compare`) and ``stf bench NAME [ARGS...]``
(``benchmarks/NAME.py`` of a clone, :func:`load_benchmark`); ``stf --version``. ``-v``/``-q`` (before or after the
command) show more or less of the ``stf_pipeline`` log on stderr (:mod:`stf_pipeline.log`).

Errors of the library (:class:`~stf_pipeline.STFError`) and of the file system are printed as one
line ``stf: error: ...`` worded for the command line (``--overwrite``, not ``overwrite=True``) and
exit with status 2, as argparse does for bad arguments; ``-v`` adds the traceback. Ctrl-C prints
one line, ``interrupted: rerun the same command to resume``, and exits with 130 (128 + SIGINT):
every output is written so that the same command continues where it stopped.

The command turns on JAX's persistent compilation cache (:func:`compilation_cache_dir`), for itself
and the Dask workers it starts: a second ``stf`` run reuses the compiled networks and kernels instead
of compiling them again (H100, BiaSTF 2000 x 2000 x 6 Zarr to Zarr, 1024-pixel chunks: 10.6 s in a
fresh process, 2.1 s with the cache filled by an earlier run).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from stf_pipeline.exceptions import STFError

#: exit status of an error (argparse uses 2 for bad arguments) and of Ctrl-C (128 + SIGINT)
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
INTERRUPTED = "interrupted: rerun the same command to resume"

#: library wording (Python arguments) -> the command's options, applied to error messages (the
#: first letter keeps its case; a hint already given in brackets is dropped)
_CLI_WORDS: tuple[tuple[str, str], ...] = (
    (r"(p)ass overwrite=True(?: \((?:stf \w+ )?--overwrite\))?", r"\1ass --overwrite"),
    (r"(p)ass output= another folder", r"\1ass --out with another folder"),
    (r"(c)hoose another out= path", r"\1hoose another --out folder"),
    (r"\(root= in Python, --root on the command line\)", "(--root DIR)"),
)

logger = logging.getLogger("stf_pipeline.cli")


def cli_message(err: BaseException) -> str:
    """The error's message on one line, with Python argument names replaced by the command's options."""
    text = " ".join(str(err).split())
    for pattern, words in _CLI_WORDS:
        text = re.sub(pattern, words, text, flags=re.IGNORECASE)
    return text


def _csv(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _run(args: argparse.Namespace) -> int:
    from stf_pipeline.pipeline import run

    result = run(
        args.pipeline, output=args.out, methods=args.methods, targets=args.targets, root=args.root,
        overwrite=args.overwrite,
    )
    print(result.summary())
    return 0


def _info(args: argparse.Namespace) -> int:
    from stf_pipeline.info import describe_cube

    print(describe_cube(args.cube))
    return 0


#: the benchmarks of a clone: the folder ``benchmarks/`` beside the package's folder (wheels do not ship it)
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
#: the name the benchmarks folder is imported under (its modules import ``benchmarks._common``)
BENCHMARK_PACKAGE = "benchmarks"


def benchmark_names(folder: Path | None = None) -> list[str]:
    """Names of the benchmarks in ``folder`` (default :data:`BENCHMARKS`): its modules without a leading underscore.

    Raises
    ------
    STFError
        When the folder is missing, as in an installed wheel: benchmarks run from a clone.
    """
    folder = BENCHMARKS if folder is None else folder
    if not (folder / "__init__.py").is_file():
        raise STFError(
            f"benchmarks run from a clone of the repository: no benchmarks folder at {folder}. Clone the "
            "repository, install it with pip install -e . and run stf bench there."
        )
    return sorted(path.stem for path in folder.glob("*.py") if not path.stem.startswith("_"))


def load_benchmark(name: str, folder: Path | None = None) -> ModuleType:
    """Import benchmark ``name`` from ``folder`` (default :data:`BENCHMARKS`) by its path.

    The folder is imported as the package ``benchmarks`` (replacing one imported from another
    folder), so the benchmark's own imports of ``benchmarks._common`` resolve to the same folder.

    Raises
    ------
    STFError
        When the folder is missing (see :func:`benchmark_names`) or holds no benchmark ``name``.
    """
    folder = BENCHMARKS if folder is None else folder
    names = benchmark_names(folder)
    if name not in names:
        raise STFError(f"unknown benchmark {name!r}; available: {names}.")
    package = sys.modules.get(BENCHMARK_PACKAGE)
    if package is None or list(getattr(package, "__path__", [])) != [str(folder)]:
        for loaded in [m for m in sys.modules if m == BENCHMARK_PACKAGE or m.startswith(f"{BENCHMARK_PACKAGE}.")]:
            del sys.modules[loaded]
        spec = importlib.util.spec_from_file_location(
            BENCHMARK_PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        if spec is None or spec.loader is None:
            raise STFError(f"cannot import the benchmarks folder {folder}.")
        package = importlib.util.module_from_spec(spec)
        sys.modules[BENCHMARK_PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{BENCHMARK_PACKAGE}.{name}")


def _bench(args: argparse.Namespace) -> int:
    if args.name is None:
        raise STFError(f"name a benchmark: stf bench NAME [ARGS]; available: {', '.join(benchmark_names())}.")
    return int(load_benchmark(args.name).main(list(args.args)) or 0)


def _bench_epilog() -> str:
    try:
        return f"benchmarks: {', '.join(benchmark_names())}"
    except STFError as err:
        return str(err)


def _compare(args: argparse.Namespace) -> int:
    from stf_pipeline import comparison

    return comparison.run_from_args(args)


def _version() -> str:
    from stf_pipeline import __version__

    return f"stf (stf_pipeline) {__version__}"


def _logging_flags() -> argparse.ArgumentParser:
    """``-v``/``-q``, accepted before and after the command (SUPPRESS: a later default does not reset them)."""
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_argument_group("logging")
    group.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                       help="show more of the log (-v: debug messages and tracebacks)")
    group.add_argument("-q", "--quiet", action="count", default=argparse.SUPPRESS,
                       help="show less (-q: warnings and errors only, -qq: errors only)")
    return flags


def build_parser() -> argparse.ArgumentParser:
    """The ``stf`` argument parser."""
    flags = _logging_flags()
    parser = argparse.ArgumentParser(
        prog="stf", description="Spatio-temporal fusion of satellite images.", parents=[flags],
        epilog="Run 'stf COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run", parents=[flags], help="run a pipeline (cube -> fusion -> scores -> figures)",
        description="Run a pipeline: build or open the cube, fuse its targets with each method, score and draw "
        "them. Rerunning the same command reuses finished outputs and resumes an interrupted one.",
    )
    p.add_argument("pipeline", help="pipeline YAML file, or the name of a shipped pipeline (e.g. demo)")
    p.add_argument("-o", "--out", type=Path, default=None, metavar="DIR",
                   help="output folder (default: the pipeline's output, out/<name>)")
    p.add_argument("--methods", type=_csv, default=None, metavar="A,B",
                   help="run only these methods (the pipeline's, or any registered method with its defaults)")
    p.add_argument("--targets", type=_csv, default=None, metavar="DATE,...",
                   help="fuse these dates (ISO, e.g. 2004-05-02) instead of the pipeline's targets")
    p.add_argument("--root", type=Path, default=None, metavar="DIR", help="data root of a catalog cube")
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs that hold something else (by default that is an error)")
    p.set_defaults(func=_run)

    p = sub.add_parser(
        "info", parents=[flags], help="describe a cube store: dates, bands, grid, CRS, pairs, missing data"
    )
    p.add_argument("cube", type=Path, help="cube store (*.zarr)")
    p.set_defaults(func=_info)

    from stf_pipeline import _export, _ingest  # `stf ingest` and `stf export`: parsers beside their code

    _ingest.add_parser(sub, parents=[flags])
    _export.add_parser(sub, parents=[flags])

    from stf_pipeline import comparison

    p = sub.add_parser(
        "compare",
        parents=[flags],
        help="compare the methods of a pipeline on its targets: table + figures",
        description=comparison.DESCRIPTION,
    )
    comparison.add_arguments(p)
    p.set_defaults(func=_compare)

    p = sub.add_parser(
        "bench", parents=[flags], help="run a benchmark of the clone: benchmarks/NAME.py",
        description="Run a benchmark of the clone's benchmarks/ folder; 'stf bench NAME --help' lists its options.",
        epilog=_bench_epilog(),
    )
    p.add_argument("name", nargs="?", default=None, help="benchmark name")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark (see stf bench NAME --help)")
    p.set_defaults(func=_bench)
    return parser


def compilation_cache_dir() -> str:
    """Where ``stf`` keeps JAX's compiled programs: ``$JAX_COMPILATION_CACHE_DIR`` when set, else
    ``$XDG_CACHE_HOME/stf_pipeline/jax`` (``~/.cache/stf_pipeline/jax``). Set the variable to another
    folder to move it; delete the folder to clear it."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "stf_pipeline", "jax")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stf`` console script; returns the exit status."""
    from stf_pipeline.log import level_from_flags, setup

    # read by JAX when it is imported, here and in the worker processes that inherit the environment
    os.environ["JAX_COMPILATION_CACHE_DIR"] = compilation_cache_dir()
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", 0)
    setup(level_from_flags(verbose, getattr(args, "quiet", 0)))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED
    except (STFError, OSError) as err:
        logger.debug("traceback of the error below", exc_info=True)
        print(f"stf: error: {cli_message(err)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

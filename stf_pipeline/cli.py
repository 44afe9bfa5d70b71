"""The ``stf`` command: a thin argparse layer over the library.

``stf run PIPELINE``, ``stf info CUBE.zarr``, ``stf ingest CATALOG -o CUBE.zarr`` (or ``--fine GLOB
--coarse GLOB``), ``stf export FUSED.zarr -o DIR``,
``stf compare PIPELINE`` (:func:`stf_pipeline.pipeline.run_compare`) and ``stf bench NAME [ARGS...]``
(``stf_pipeline.benchmarks.NAME.main``); ``stf --version``. ``-v``/``-q`` (before or after the
command) show more or less of the ``stf_pipeline`` log on stderr (:mod:`stf_pipeline.log`).

Errors of the library (:class:`~stf_pipeline.STFError`) and of the file system are printed as one
line ``stf: error: ...`` worded for the command line (``--overwrite``, not ``overwrite=True``) and
exit with status 2, as argparse does for bad arguments; ``-v`` adds the traceback. Ctrl-C prints
one line, ``interrupted: rerun the same command to resume``, and exits with 130 (128 + SIGINT):
every output is written so that the same command continues where it stopped.

The command turns on JAX's persistent compilation cache (:mod:`stf_pipeline._compile_cache`, as the
Python API does; ``STF_JAX_CACHE=0`` turns it off), for itself and the Dask workers it starts: a
second ``stf`` run reuses the compiled networks and kernels instead of compiling them again
(measured in docs/benchmarks.md, "Compilation").
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import pkgutil
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from stf_pipeline._compile_cache import enable_compilation_cache
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


def _benchmarks() -> list[str]:
    import stf_pipeline.benchmarks as package

    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def _bench(args: argparse.Namespace) -> int:
    if args.name is None:
        raise STFError(f"name a benchmark: stf bench NAME [ARGS]; available: {', '.join(_benchmarks())}.")
    module = f"stf_pipeline.benchmarks.{args.name}"
    if not args.name.isidentifier() or importlib.util.find_spec(module) is None:
        raise STFError(f"unknown benchmark {args.name!r}; available: {_benchmarks()}.")
    return int(importlib.import_module(module).main(list(args.args)) or 0)


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
        "bench", parents=[flags], help="run a benchmark: stf_pipeline.benchmarks.NAME",
        description="Run a benchmark module of stf_pipeline.benchmarks; 'stf bench NAME --help' lists its options.",
        epilog=f"benchmarks: {', '.join(_benchmarks())}",
    )
    p.add_argument("name", nargs="?", default=None, help="benchmark name")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark (see stf bench NAME --help)")
    p.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stf`` console script; returns the exit status."""
    from stf_pipeline.log import level_from_flags, setup

    # read by JAX when it is imported, here and in the worker processes that inherit the environment
    enable_compilation_cache()
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

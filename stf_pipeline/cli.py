"""The ``stf`` command: a thin argparse layer over the library.

Every parser of the command lives here, each handler calls one library function:
``stf run PIPELINE`` (:func:`stf_pipeline.runner.run`), ``stf info CUBE.zarr``
(:func:`stf_pipeline.info.describe_cube`), ``stf ingest CATALOG -o CUBE.zarr`` (or ``--fine GLOB
--coarse GLOB``; :func:`stf_pipeline.open_catalog`, :func:`stf_pipeline.ingest`), ``stf export
FUSED.zarr -o DIR`` (:func:`stf_pipeline.export`), ``stf compare PIPELINE``
(:func:`stf_pipeline.runner.run_compare`) and ``stf bench NAME [ARGS...]`` (``benchmarks/NAME.py``
of a clone, :func:`load_benchmark`); ``stf --version``. ``-v``/``-q`` (before or after the
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
import gc
import importlib
import importlib.util
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from stf_pipeline import __version__, runner
from stf_pipeline._compile_cache import enable_compilation_cache
from stf_pipeline._export import DTYPES, FORMATS, export
from stf_pipeline._ingest import DEFAULT_CHUNKS, GLOB_CHARS, RESAMPLING, ingest
from stf_pipeline.catalog import open_catalog
from stf_pipeline.cube import write_cube
from stf_pipeline.exceptions import CatalogError, STFError
from stf_pipeline.info import describe_cube
from stf_pipeline.log import level_from_flags, setup
from stf_pipeline.sensors import SENSORS, AnySensor, DatePattern, SensorFamily, get_sensor

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
    result = runner.run(
        args.pipeline, output=args.out, methods=args.methods, targets=args.targets, root=args.root,
        overwrite=args.overwrite,
    )
    print(result.summary())
    return 0


def _info(args: argparse.Namespace) -> int:
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


#: what ``stf compare --help`` says
COMPARE_DESCRIPTION = (
    "Run several fusion methods on the same tasks, score them against the held-out truth, and write a table "
    "(CSV, Markdown, JSON) and figures (PNG)."
)


def _compare(args: argparse.Namespace) -> int:
    result = runner.run_compare(
        args.pipeline, out=args.out, figures=not args.no_figures, methods=args.methods, targets=args.targets,
        root=args.root, overwrite=args.overwrite,
    )
    print(result.to_markdown())
    return 0


#: first bytes of raster formats a user may pass where a catalog YAML is expected
_RASTER_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"\x0e\x03\x13\x01", b"\x89HDF")
_RASTER_SUFFIXES = (".tif", ".tiff", ".hdf", ".h5", ".nc", ".img", ".bil", ".bsq", ".jp2", ".vrt")


def _check_catalog_argument(text: str) -> None:
    """A raster (or any non-text file) passed as the catalog gets an error that shows the files form."""
    path = Path(text)
    head = path.read_bytes()[:4096] if path.is_file() else b""
    looks_raster = path.suffix.lower() in _RASTER_SUFFIXES or head.startswith(_RASTER_MAGIC)
    if not looks_raster and head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as err:
            looks_raster = err.start < len(head) - 4  # not just a character cut at the 4096-byte boundary
    if looks_raster or GLOB_CHARS.search(text):
        raise CatalogError(
            f"{text!r} is an image (or a pattern of images), not a catalog YAML; to ingest your own files run "
            f"stf ingest --fine {text!r} --coarse 'MOD09GA*.tif' --sensor-fine landsat_c2_l2 --sensor-coarse mod09ga "
            "-o cube.zarr (sensors: stf ingest --list-sensors)."
        )


def _masked_sensor(name: str, rules: str | None, dilation: int | None) -> AnySensor:
    sensor = get_sensor(name)
    if rules is None and dilation is None:
        return sensor
    use = [r.strip() for r in rules.split(",") if r.strip()] if rules is not None else None
    return sensor.with_mask(use, dilation=dilation)


def describe_sensors() -> str:
    """One line per sensor preset: name, cube bands, quality band and rules (what ``stf ingest --list-sensors``
    prints)."""
    lines = []
    for name, sensor in SENSORS.items():
        if isinstance(sensor, SensorFamily):
            lines.append(
                f"{name}: any of {[m.name for m in sensor.members]} (by file name); bands {list(sensor.cube_bands)}"
            )
            continue
        qa = sensor.qa
        rules = (
            ""
            if qa is None
            else (
                f"; quality {qa.asset if isinstance(qa.asset, str) else 'per band'}: rules "
                f"{[r.name for r in qa.rules]}, masked by default {list(qa.use or ())}"
            )
        )
        lines.append(f"{name}: bands {list(sensor.cube_bands)}{rules}")
    return "\n".join(lines)


def _ingest_command(args: argparse.Namespace) -> int:
    """``stf ingest``: a catalog, or ``--fine``/``--coarse`` files, to a cube store."""
    if args.list_sensors:
        print(describe_sensors())
        return 0
    if args.output is None:
        raise CatalogError("stf ingest needs -o CUBE.zarr, the cube store to write.")
    own = args.fine is not None or args.coarse is not None
    if args.catalog is not None and own:
        raise CatalogError("give either a catalog or --fine/--coarse files, not both.")
    if not own:
        if args.catalog is None:
            raise CatalogError(
                "nothing to ingest: give a catalog (stf ingest lgc -o cube.zarr) or --fine/--coarse files."
            )
        _check_catalog_argument(args.catalog)
        cube, task = open_catalog(args.catalog, root=args.root)
        path = write_cube(cube, args.output, overwrite=args.overwrite)
        print(describe_cube(path))
        print(f"task: target {task.to_attrs()['target']}, pairs {task.to_attrs()['pairs']}")
        return 0
    missing = [
        flag
        for flag, value in (
            ("--fine", args.fine),
            ("--coarse", args.coarse),
            ("--sensor-fine", args.sensor_fine),
            ("--sensor-coarse", args.sensor_coarse),
        )
        if value is None
    ]
    if missing:
        raise CatalogError(
            f"stf ingest with your own files needs {', '.join(missing)} (sensors: stf ingest --list-sensors)."
        )
    fine_sensor = _masked_sensor(args.sensor_fine, args.mask_fine, args.dilate_fine)
    coarse_sensor = _masked_sensor(args.sensor_coarse, args.mask_coarse, args.dilate_coarse)
    cube = ingest(
        args.fine,
        args.coarse,
        truth=args.truth,
        fine_sensor=fine_sensor,
        coarse_sensor=coarse_sensor,
        bands=[b.strip() for b in args.bands.split(",")] if args.bands else None,
        date_pattern=DatePattern(args.date_regex, args.date_format) if args.date_regex else None,
        coarse_factor=args.coarse_factor,
        resampling=args.resampling,
        mask=not args.no_mask,
        chunks={"y": args.chunk, "x": args.chunk},
    )
    path = write_cube(cube, args.output, overwrite=args.overwrite, chunks={"y": args.chunk, "x": args.chunk})
    print(describe_cube(path))
    return 0


def _export_command(args: argparse.Namespace) -> int:
    """``stf export``: the dates of a store to GeoTIFFs, one path printed per file."""
    written = export(
        args.store,
        args.output,
        dates=args.dates,
        variable=args.variable,
        format=args.format,
        dtype=args.dtype,
        prefix=args.prefix,
        overwrite=args.overwrite,
    )
    for path in written:
        print(path)
    return 0


def _add_ingest(sub: Any, flags: argparse.ArgumentParser) -> None:
    """``stf ingest``: a catalog, or the user's own fine/coarse files, to a cube store."""
    p = sub.add_parser(
        "ingest",
        parents=[flags],
        help="read a catalog's files, or your own fine/coarse images, into a cube store",
        description=(
            "stf ingest CATALOG -o CUBE.zarr reads a catalog (catalogs/NAME.yaml or a YAML path). "
            "stf ingest --fine GLOB --coarse GLOB --sensor-fine S --sensor-coarse S -o CUBE.zarr reads your own "
            "files: dates from the file names, bands and scale from the sensor presets, quality bands to NaN, "
            "coarse images reprojected onto the fine grid."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("catalog", nargs="?", help="catalog name (catalogs/NAME.yaml) or path to a catalog YAML")
    p.add_argument("-o", "--output", type=Path, help="cube store to write (*.zarr)")
    p.add_argument(
        "--root", type=Path, default=None, help="data root of a catalog (default $STF_DATA_ROOT or ../shared/data/real)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing cube store")
    files = p.add_argument_group("your own files (instead of a catalog)")
    files.add_argument(
        "--fine", nargs="+", metavar="GLOB", help="fine images: paths or quoted globs, e.g. 'LC08*_SR_B*.TIF'"
    )
    files.add_argument("--coarse", nargs="+", metavar="GLOB", help="coarse images, e.g. 'MOD09GA*.tif'")
    files.add_argument("--truth", nargs="+", metavar="GLOB", help="held-out fine images (read with the fine sensor)")
    files.add_argument("--sensor-fine", help="fine sensor preset (see --list-sensors)")
    files.add_argument("--sensor-coarse", help="coarse sensor preset")
    files.add_argument("--bands", help="comma-separated cube bands (default: every band both sensors provide)")
    files.add_argument(
        "--date-regex", help="regex whose first group is the date in a file name (default: the preset's)"
    )
    files.add_argument("--date-format", default="%Y%m%d", help="strptime format of --date-regex's group")
    files.add_argument("--resampling", default="nearest", choices=RESAMPLING, help="coarse -> fine grid resampling")
    files.add_argument("--coarse-factor", type=int, help="native coarse pixel in fine pixels (default: from the grids)")
    files.add_argument("--no-mask", action="store_true", help="ignore the quality bands (no cloud masking)")
    for role in ("fine", "coarse"):
        files.add_argument(
            f"--mask-{role}",
            metavar="RULES",
            help=f"comma-separated quality rules of the {role} sensor to mask (default: the preset's)",
        )
        files.add_argument(
            f"--dilate-{role}", type=int, metavar="PX", help=f"grow the {role} quality mask by PX pixels"
        )
    files.add_argument("--chunk", type=int, default=DEFAULT_CHUNKS["y"], help="chunk size (pixels) of the store")
    p.add_argument(
        "--list-sensors", action="store_true", help="list the sensor presets (bands, quality rules) and exit"
    )
    p.set_defaults(func=_ingest_command)


def _add_export(sub: Any, flags: argparse.ArgumentParser) -> None:
    """``stf export``: dates of a store to GeoTIFFs."""
    p = sub.add_parser(
        "export",
        parents=[flags],
        help="write dates of a fused store (or any cube store) as Cloud-Optimized GeoTIFFs, one per date",
    )
    p.add_argument("store", type=Path, help="fused store (stf.fuse_series / stf run output) or cube store (*.zarr)")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder of the GeoTIFFs")
    p.add_argument("--dates", help="comma-separated ISO dates, or 'all' (default: the fused dates)")
    p.add_argument("--format", default="cog", choices=FORMATS, help="file format")
    p.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="float32 reflectance or int16 x 10000 (scale 1e-4)"
    )
    p.add_argument("--variable", default="fine", help="data variable to write")
    p.add_argument("--prefix", help="file name prefix (default: the store's name)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(func=_export_command)


def _version() -> str:
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

    _add_ingest(sub, flags)
    _add_export(sub, flags)

    p = sub.add_parser(
        "compare",
        parents=[flags],
        help="compare the methods of a pipeline on its targets: table + figures",
        description=COMPARE_DESCRIPTION,
    )
    p.add_argument(
        "pipeline", help="pipeline YAML file or the name of a shipped pipeline (see pipelines/compare-*.yaml)"
    )
    p.add_argument("-o", "--out", type=Path, default=None, metavar="DIR",
                   help="output folder (default: the pipeline's output)")
    p.add_argument("--methods", type=_csv, default=None, metavar="A,B", help="compare only these methods")
    p.add_argument("--targets", type=_csv, default=None, metavar="DATE,...",
                   help="targets (ISO dates) instead of the pipeline's")
    p.add_argument("--root", type=Path, default=None, metavar="DIR", help="data root of a catalog cube")
    p.add_argument("--overwrite", action="store_true", help="replace a cube.zarr written from another cube")
    p.add_argument("--no-figures", action="store_true", help="write the table only")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stf`` console script; returns the exit status.

    Without ``argv`` (the console script, ``python -m stf_pipeline.cli``) the command is the whole
    process: once it has run, every object is moved out of the garbage collector's reach
    (``gc.freeze``), so the interpreter's final collections, which would traverse every object of
    NumPy, xarray, Dask and Numba to free nothing the command still needs, are skipped. The
    command's files and stores are closed by then; ``atexit`` handlers still run.
    """
    try:
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
    finally:
        if argv is None:
            gc.freeze()


if __name__ == "__main__":
    sys.exit(main())

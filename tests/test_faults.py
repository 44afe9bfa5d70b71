"""Fault injection: SIGKILL at every kind of write point, concurrent writers, readers during an overwrite,
flipped bits and truncated chunks. Each case must end in a valid store or a named error, never mixed data.

A child process runs ``fuse_series`` or ``write_cube`` with a hook that SIGKILLs it at the N-th
occurrence of one write point:

- ``chunk-partial``: a chunk's temporary ``*.partial`` file is written, not yet renamed;
- ``chunk-written``: a fused-series chunk is in place, its progress record not yet made;
- ``progress-record``: just after a progress record is made;
- ``root-metadata``: the store's root metadata (creation, the complete mark, consolidation) is
  in its temporary file, not yet renamed;
- ``journal``: the swap journal is written, no rename done;
- ``aside``: the old store is renamed aside, the new one not yet in place (the path is empty);
- ``swapped``: the new store is in place, the old one not yet deleted.

After the kill the store is opened (a reader must see the old store, the new one, or a named
error) and the call is repeated; the result must equal an uninterrupted run byte for byte.
``pytest -m slow tests/test_faults.py`` runs every point at several N; the default run one kill
at each of three points. docs/stores.md lists the counts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import stf_pipeline as stf
from stf_pipeline.testing import series_cube, tree_bytes

CHUNKS = (16, 16)
TESTS = str(Path(__file__).parent)


def fault_cube(shift: float = 0.0):
    """4 dates on a 32 x 40 grid, fine missing on dates 1 and 2 (the targets)."""
    return series_cube(seed=3, offset=shift)


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import dask
    import stf_pipeline as stf
    from test_faults import fault_cube

    kind, out, point, nth = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    seen = 0

    def hit(name):
        global seen
        if name == point:
            seen += 1
            if seen == nth:
                os.kill(os.getpid(), signal.SIGKILL)

    real_replace, real_touch = os.replace, Path.touch

    def replace(src, dst, *a, **k):
        src, dst = str(src), str(dst)
        if src.endswith(".partial"):
            root = Path(dst).parent
            is_root = Path(dst).name == "zarr.json" and (root == out or root.name.startswith(f".{{out.name}}.tmp-"))
            hit("root-metadata" if is_root else "chunk-partial" if "/c/" in dst else "")
        if dst.endswith(".stf-swap"):
            real_replace(src, dst, *a, **k)
            return hit("journal")
        if ".old-" in dst:
            real_replace(src, dst, *a, **k)
            return hit("aside")
        if ".tmp-" in src:
            real_replace(src, dst, *a, **k)
            return hit("swapped")
        return real_replace(src, dst, *a, **k)

    def touch(self, *a, **k):
        if ".stf_progress" in str(self):
            hit("chunk-written")
            real_touch(self, *a, **k)
            return hit("progress-record")
        return real_touch(self, *a, **k)

    os.replace = replace
    Path.touch = touch
    with dask.config.set(scheduler="threads", num_workers=2):
        if kind == "series":
            stf.fuse_series(fault_cube(), method="delta", out=out, chunks=(16, 16), progress=False, overwrite=True)
        else:
            stf.write_cube(fault_cube(0.25), out, chunks={{"y": 16, "x": 16}}, overwrite=True)
    print("finished without reaching the kill point", flush=True)
    """
).format(tests=TESTS)


def _run_killed(kind: str, out: Path, point: str, nth: int) -> bool:
    """Run the child; True when it was killed at the point (False: it finished first)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, kind, str(out), point, str(nth)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    if result.returncode == -signal.SIGKILL:
        return True
    assert result.returncode == 0, result.stderr[-3000:]
    return False


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    series_ref = root / "series.zarr"
    stf.fuse_series(fault_cube(), method="delta", out=series_ref, chunks=CHUNKS, progress=False)
    window3 = stf.fuse_series(fault_cube(), method="delta", out=root / "w3.zarr", chunks=CHUNKS, progress=False,
                              window=3)
    return {
        "series": tree_bytes(series_ref),
        "series_fine": stf.open_cube(series_ref)["fine"].values,
        "window3_fine": window3["fine"].values,
        "old": fault_cube(),
        "new": fault_cube(0.25),
    }


def _no_litter(path: Path) -> None:
    names = sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))
    assert names == [f".{path.name}.stf-lock"], names


def _check_series_kill(tmp_path: Path, references, point: str, nth: int, *, over_old: bool) -> bool:
    out = tmp_path / "f.zarr"
    if over_old:  # an existing store of another request, replaced with overwrite=True
        stf.fuse_series(fault_cube(), method="delta", out=out, chunks=CHUNKS, progress=False, window=3)
    killed = _run_killed("series", out, point, nth)
    # a reader sees a whole complete store (the old one or the new one) or a named error; never a mix
    try:
        values = stf.open_cube(out)["fine"].values  # every chunk read, checksums checked
    except stf.CubeError as err:
        assert "not finished yet" in str(err) or (not over_old and "no cube store" in str(err)), err
    else:
        wholes = [references["series_fine"], *([references["window3_fine"]] if over_old else [])]
        assert any(np.array_equal(values, w, equal_nan=True) for w in wholes), "the store mixes two requests"
    stf.fuse_series(fault_cube(), method="delta", out=out, chunks=CHUNKS, progress=False, overwrite=True)
    assert tree_bytes(out) == references["series"]
    _no_litter(out)
    return killed


def _check_write_kill(tmp_path: Path, references, point: str, nth: int) -> bool:
    out = stf.write_cube(references["old"], tmp_path / "c.zarr", chunks={"y": 16, "x": 16})
    killed = _run_killed("write", out, point, nth)
    seen = stf.open_cube(out)  # never an empty path: the old store or the new one, whole
    values = seen["fine"].values
    matches = [n for n in ("old", "new") if np.array_equal(values, references[n]["fine"].values, equal_nan=True)]
    assert len(matches) == 1, "the store holds neither the old nor the new cube"
    stf.write_cube(references["new"], out, chunks={"y": 16, "x": 16}, overwrite=True)
    np.testing.assert_array_equal(stf.open_cube(out)["fine"].values, references["new"]["fine"].values)
    _no_litter(out)
    return killed


SERIES_POINTS = ["chunk-partial", "chunk-written", "progress-record", "root-metadata", "journal", "swapped"]
PER_CHUNK = ("chunk-partial", "chunk-written", "progress-record")
OVERWRITE_POINTS = ["journal", "aside", "swapped"]
WRITE_POINTS = ["chunk-partial", "root-metadata", "journal", "aside", "swapped"]


@pytest.mark.parametrize(
    ("kind", "point", "nth"),
    [("series", "chunk-partial", 7), ("overwrite", "aside", 1), ("write", "aside", 1)],
)
def test_kill_at_a_write_point(tmp_path, references, kind, point, nth):
    if kind == "write":
        assert _check_write_kill(tmp_path, references, point, nth)
    else:
        assert _check_series_kill(tmp_path, references, point, nth, over_old=kind == "overwrite")


@pytest.mark.slow
def test_kill_at_every_write_point(tmp_path_factory, references):
    cases = (
        [("series", p, n) for p in SERIES_POINTS for n in ((1, 2, 5, 11, 20) if p in PER_CHUNK else (1, 2, 3))]
        + [("overwrite", p, 1) for p in OVERWRITE_POINTS]
        + [("write", p, n) for p in WRITE_POINTS for n in ((1, 3, 9) if p == "chunk-partial" else (1, 2))]
    )
    killed = {}
    for kind, point, nth in cases:
        tmp = tmp_path_factory.mktemp(f"{kind}-{point}-{nth}")
        if kind == "write":
            hit = _check_write_kill(tmp, references, point, nth)
        else:
            hit = _check_series_kill(tmp, references, point, nth, over_old=kind == "overwrite")
        killed[(kind, point)] = killed.get((kind, point), 0) + int(hit)
    print("kills per point:", killed)
    assert all(killed[(kind, point)] >= 1 for kind, point, _ in cases), killed


def test_a_worker_killed_mid_chunk_write_leaves_no_orphan(tmp_path, references, monkeypatch):
    """A worker killed inside a chunk write leaves Zarr's ``*.partial`` file beside the chunk while
    the run goes on (the task is retried on another worker): the finished store must not keep it.
    The kill is simulated by dropping such a file in the store before the first region is written."""
    from stf_pipeline import series

    original = series._write_region
    orphans = []

    def write_after_a_killed_try(block, store, var, t, iy, ix, ys, xs):
        if not orphans:
            orphan = Path(store, var, "c", str(t), "0", str(iy), f"{ix}.{'0' * 31}1.partial")
            orphan.parent.mkdir(parents=True, exist_ok=True)
            orphan.write_bytes(b"torn")
            orphans.append(orphan)
        original(block, store, var, t, iy, ix, ys, xs)

    monkeypatch.setattr(series, "_write_region", write_after_a_killed_try)
    out = tmp_path / "f.zarr"
    stf.fuse_series(fault_cube(), method="delta", out=out, chunks=CHUNKS, progress=False)
    assert orphans and not orphans[0].exists()
    assert tree_bytes(out) == references["series"]


def test_write_cube_keeps_no_orphan_of_a_killed_chunk_write(tmp_path, monkeypatch):
    import xarray as xr

    original = xr.Dataset.to_zarr

    def to_zarr_with_a_killed_try(self, store, *args, **kwargs):
        result = original(self, store, *args, **kwargs)  # the chunk writes may still be to come (compute=False)
        chunks = Path(store) / "fine" / "c"
        chunks.mkdir(parents=True, exist_ok=True)
        (chunks / f"0.{'0' * 31}1.partial").write_bytes(b"torn")  # what a killed worker leaves
        return result

    monkeypatch.setattr(xr.Dataset, "to_zarr", to_zarr_with_a_killed_try)
    path = stf.write_cube(fault_cube(), tmp_path / "c.zarr", chunks={"y": 16, "x": 16})
    assert not list(path.rglob("*.partial"))


# --------------------------------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import stf_pipeline as stf
    from stf_pipeline import series
    from test_faults import fault_cube

    original = series._write_region

    def slow(*args):
        time.sleep(0.02)
        return original(*args)

    series._write_region = slow
    window = int(sys.argv[2])
    try:
        stf.fuse_series(fault_cube(), method="delta", out=sys.argv[1], chunks=(16, 16), progress=False,
                        overwrite=True, window=window)
    except stf.StoreError as err:
        print("refused:", err, flush=True)
        sys.exit(3)
    """
).format(tests=TESTS)


def test_two_concurrent_writers_never_mix(tmp_path):
    out = tmp_path / "f.zarr"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(out), str(w)], env=env, stdout=subprocess.PIPE, text=True)
        for w in (3, 5)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) in ([0, 0], [0, 3]), (codes, outputs)
    if 3 in codes:
        assert "is being written by another fuse_series" in outputs[codes.index(3)]
    result = stf.open_cube(out)
    window = '"window": 3' if '"window": 3' in result.attrs["stf_params"] else '"window": 5'
    ref = stf.fuse_series(fault_cube(), method="delta", out=tmp_path / "ref.zarr", chunks=CHUNKS, progress=False,
                          window=int(window[-1]))
    np.testing.assert_array_equal(result["fine"].values, ref["fine"].values)


def test_readers_during_overwrites_see_a_whole_store_or_an_error(tmp_path):
    old, new = fault_cube(), fault_cube(0.25)
    path = stf.write_cube(old, tmp_path / "c.zarr", chunks={"y": 16, "x": 16})
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(4):
                stf.write_cube(new if i % 2 == 0 else old, path, chunks={"y": 16, "x": 16}, overwrite=True)
        except BaseException as err:  # noqa: BLE001  (re-raised in the test thread)
            errors.append(err)
        finally:
            stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    outcomes = {"old": 0, "new": 0, "error": 0}
    while not stop.is_set() or sum(outcomes.values()) < 3:
        try:
            values = stf.open_cube(path)["fine"].values
        except stf.CubeError as err:
            assert "replaced by another writer while it was being read" in str(err), err
            outcomes["error"] += 1
            continue
        if np.array_equal(values, old["fine"].values, equal_nan=True):
            outcomes["old"] += 1
        elif np.array_equal(values, new["fine"].values, equal_nan=True):
            outcomes["new"] += 1
        else:
            raise AssertionError("a reader saw a mix of two stores")
    thread.join()
    if errors:
        raise errors[0]
    assert sum(outcomes.values()) >= 3


def test_a_store_swapped_while_it_is_opened_is_opened_again(tmp_path, monkeypatch):
    """The eager reads of an open (metadata, coordinates) come from one generation, never two."""
    old, new = fault_cube(), fault_cube(0.25)
    new = new.assign_coords(time=new["time"] + np.timedelta64(1, "D"))
    path = stf.write_cube(old, tmp_path / "c.zarr", chunks={"y": 16, "x": 16})
    real_open_zarr = xr.open_zarr
    swapped = []

    def open_then_swap(*args, **kwargs):
        result = real_open_zarr(*args, **kwargs)
        if not swapped:  # another writer replaces the store right after the first open
            swapped.append(True)
            stf.write_cube(new, path, chunks={"y": 16, "x": 16}, overwrite=True)
        return result

    monkeypatch.setattr(xr, "open_zarr", open_then_swap)
    cube = stf.open_cube(path)
    np.testing.assert_array_equal(cube["time"].values, new["time"].values)
    np.testing.assert_array_equal(cube["fine"].values, new["fine"].values)


def test_a_store_replaced_on_every_open_is_a_named_error(tmp_path, monkeypatch):
    from stf_pipeline import store

    path = stf.write_cube(fault_cube(), tmp_path / "c.zarr", chunks={"y": 16, "x": 16})
    generations = iter(range(1000))
    monkeypatch.setattr(store, "read_generation", lambda _: str(next(generations)))
    with pytest.raises(stf.CubeError, match="replaced by another writer while it was being read, 5 times"):
        stf.open_cube(path)


@pytest.mark.parametrize(
    ("damage", "every"),
    [("flip", 6), ("truncate", 6), pytest.param("flip", 1, marks=pytest.mark.slow),
     pytest.param("truncate", 1, marks=pytest.mark.slow)],
)
def test_every_damaged_chunk_is_detected(tmp_path, damage, every):
    """Damage each chunk in turn (every ``every``-th in the default run, all of them when slow)."""
    cube = fault_cube()
    path = stf.write_cube(cube, tmp_path / "c.zarr", chunks={"y": 16, "x": 16})
    chunks = sorted(p for p in (path / "fine" / "c").rglob("*") if p.is_file())
    assert len(chunks) == 4 * 2 * 3  # dates x y blocks x x blocks
    chunks = chunks[::every]
    rng = np.random.default_rng(0)
    detected = 0
    for chunk in chunks:
        good = chunk.read_bytes()
        data = bytearray(good)
        if damage == "flip":
            bit = int(rng.integers(0, 8 * len(data)))
            data[bit // 8] ^= 1 << (bit % 8)
        else:
            data = data[: int(rng.integers(0, len(data)))]
        chunk.write_bytes(bytes(data))
        key = "/".join(chunk.relative_to(path).parts)
        with pytest.raises(stf.CubeError, match=f"chunk {key} of .* is damaged"):
            stf.open_cube(path)["fine"].load()
        detected += 1
        chunk.write_bytes(good)
    assert detected == len(chunks)

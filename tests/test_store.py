"""Stores never lose or mix data: input protection, writer locks, fingerprints, checksums, swaps, value checks."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

import stf_pipeline as stf
from stf_pipeline import _atomic, series, store
from stf_pipeline.progress import DaskProgress, Progress, display_kind
from stf_pipeline.testing import series_cube, tree_bytes

CHUNKS = (16, 16)


def interrupt_at_date(monkeypatch, date: int):
    """Ctrl-C (``KeyboardInterrupt``) when ``fuse_series`` writes a region of date index ``date``;
    returns the original region writer (to put back)."""
    original = series._write_region

    def crash(*args):
        if args[3] == date:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(series, "_write_region", crash)
    return original


def gappy_cube():
    return series_cube()


# --------------------------------------------------------------------------------------------
# never destroy an input


def test_fuse_series_refuses_to_write_over_its_own_input(tmp_path):
    path = stf.write_cube(gappy_cube(), tmp_path / "a.zarr", chunks={"y": 16, "x": 16})
    before = tree_bytes(path)
    opened = stf.open_cube(path)
    derived = opened.sel(band=opened.band.values).chunk({"y": 8})  # the graph still leads to the store
    plain = xr.open_zarr(path)  # opened without stf_pipeline: found through xarray's backend array
    for cube in (opened, derived, plain):
        with pytest.raises(stf.StoreError, match=rf"would write over {path}, which the input is read from"):
            stf.fuse_series(cube, method="delta", out=path, overwrite=True, progress=False)
    os.symlink(path, tmp_path / "link")  # another name of the same store
    with pytest.raises(stf.StoreError, match="the input is read from"):
        stf.fuse_series(opened, method="delta", out=tmp_path / "link", overwrite=True, progress=False)
    with pytest.raises(stf.StoreError, match="cube.load()"):
        stf.write_cube(opened, path, overwrite=True)
    assert tree_bytes(path) == before
    # loaded into memory, the input no longer depends on the store
    stf.write_cube(opened.load(), path, overwrite=True)
    np.testing.assert_array_equal(stf.open_cube(path)["fine"].values, opened["fine"].values)


def test_pipeline_whose_cube_is_its_own_output_is_refused(tmp_path):
    from stf_pipeline.runner import run

    out = tmp_path / "run"
    stf.write_cube(gappy_cube(), out / "fused_delta.zarr")
    (tmp_path / "p.yaml").write_text(textwrap.dedent(f"""
        name: self
        cube: {{zarr: {out / 'fused_delta.zarr'}}}
        methods: [delta]
        write_cube: false
        evaluate: false
        figures: false
    """))
    before = tree_bytes(out / "fused_delta.zarr")
    with pytest.raises(stf.StoreError, match="would write over"):
        run(tmp_path / "p.yaml", output=out)
    assert tree_bytes(out / "fused_delta.zarr") == before


# --------------------------------------------------------------------------------------------
# one writer per store

_HOLD = textwrap.dedent(
    """
    import sys, time
    from stf_pipeline.store import WriterLock
    with WriterLock(sys.argv[1], action="test holder"):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def test_second_writer_is_refused_and_a_killed_holder_is_taken_over(tmp_path, caplog):
    path = tmp_path / "f.zarr"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        match = rf"being written by another test holder \(pid {holder.pid} on host {socket.gethostname()}, since "
        with pytest.raises(stf.StoreError, match=match):
            stf.fuse_series(gappy_cube(), method="delta", out=path, progress=False)
        with pytest.raises(stf.StoreError, match="wait for it to finish"):
            stf.write_cube(gappy_cube(), path)
        assert not path.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    with caplog.at_level(logging.WARNING, logger="stf_pipeline"):
        out = stf.fuse_series(gappy_cube(), method="delta", out=path, progress=False, chunks=CHUNKS)
    assert f"stale writer lock of {path} left by pid {holder.pid}" in caplog.text
    assert out.attrs["stf_series_complete"]
    assert not (tmp_path / ".f.zarr.stf-lock.json").exists()  # the holder record goes with the lock


def test_writer_lock_in_one_process_excludes_a_second_call():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.zarr"
        with store.WriterLock(path, action="first"):
            with pytest.raises(stf.StoreError, match=rf"another first \(pid {os.getpid()}"):
                store.WriterLock(path, action="second").__enter__()
        with store.WriterLock(path, action="again"):
            pass


# --------------------------------------------------------------------------------------------
# fingerprints


def test_resume_with_other_data_params_or_model_says_what_changed(tmp_path, monkeypatch):
    from stf_pipeline.nn.model import FittedModel

    cube = gappy_cube()
    path = tmp_path / "f.zarr"
    model_a = FittedModel(method="biastf", config={}, params={"G": {"w": np.zeros(3, np.float32)}}, bands=("a",),
                          coarse_factor=None)
    model_b = FittedModel(method="biastf", config={}, params={"G": {"w": np.array([0, 0, 1e-7], np.float32)}},
                          bands=("a",), coarse_factor=None)
    assert store.model_digest(model_a) != store.model_digest(model_b)
    assert store.model_digest(model_a) == store.model_digest(
        FittedModel(method="biastf", config={}, params={"G": {"w": np.zeros(3, np.float32)}}, bands=("a",),
                    coarse_factor=None))

    original = interrupt_at_date(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        stf.fuse_series(cube, method="delta", out=path, chunks=CHUNKS, progress=False, model=model_a)
    monkeypatch.setattr(series, "_write_region", original)
    with pytest.raises(stf.StoreError, match=r": the model changed\. Pass overwrite=True"):
        stf.fuse_series(cube, method="delta", out=path, chunks=CHUNKS, progress=False, model=model_b)
    coarse = cube["coarse"].values.copy()
    coarse[2, 0, 31, 39] *= 1.01  # the last pixel of a target's coarse image
    with pytest.raises(stf.StoreError, match=r": the input data changed\."):
        stf.fuse_series(cube.copy(data={"fine": cube["fine"].values, "coarse": coarse}), method="delta", out=path,
                        chunks=CHUNKS, progress=False, model=model_a)
    with pytest.raises(stf.StoreError, match=r": the method or parameters changed\."):
        stf.fuse_series(cube, method="delta", out=path, chunks=CHUNKS, progress=False, model=model_a, window=3)
    out = stf.fuse_series(cube, method="delta", out=path, chunks=CHUNKS, progress=False, model=model_a)
    assert out.encoding["stf_action"] == "resumed"


def test_content_digest_is_independent_of_chunking_and_detects_any_pixel():
    rng = np.random.default_rng(0)
    a = rng.random((3, 40, 50), dtype=np.float32)
    import dask.array as da

    reference = store.content_digest({"a": a}, (3, 16, 16))
    assert store.content_digest({"a": da.from_array(a, chunks=(1, 7, 9))}, (3, 16, 16)) == reference
    b = a.copy()
    b[2, 39, 49] = np.nextafter(b[2, 39, 49], 2)  # one ulp of the last pixel
    assert store.content_digest({"a": b}, (3, 16, 16)) != reference
    assert store.content_digest({"b": a}, (3, 16, 16)) != reference  # the name is part of it


class StopAfterDigest(Exception):
    """Raised in place of a series' region writes: these tests need only its input digest."""


def _spy_digests(monkeypatch) -> list[tuple[str, frozenset, frozenset]]:
    """Record each series input digest, its inputs and those whose block digests a store supplied;
    the series stops there."""
    seen: list[tuple[str, frozenset, frozenset]] = []
    real = series.content_digest

    def spy(arrays, chunks, known=None):
        digest = real(arrays, chunks, known=known)
        seen.append((digest, frozenset(arrays), frozenset(known or ())))
        return digest

    def stop(*args, **kwargs):
        raise StopAfterDigest

    monkeypatch.setattr(series, "content_digest", spy)
    monkeypatch.setattr(series, "_region_writes", stop)
    return seen


def test_a_series_fingerprints_a_cube_store_from_its_recorded_chunk_digests(tmp_path, monkeypatch):
    """A store written by write_cube records its chunks' value digests: a series over it reads no
    chunk for its input digest, which equals the digest of the same values in memory."""
    cube = series_cube(seed=3)
    path = stf.write_cube(cube, tmp_path / "c.zarr", chunks={"y": 16, "x": 16})
    reads: list = []
    real_read = store.CheckedChunks.__getitem__
    monkeypatch.setattr(store.CheckedChunks, "__getitem__", lambda self, key: reads.append(key) or real_read(self, key))
    real_digest = series.content_digest
    reads_in_digest = []

    def counted(*args, **kwargs):
        before = len(reads)
        digest = real_digest(*args, **kwargs)
        reads_in_digest.append(len(reads) - before)
        return digest

    monkeypatch.setattr(series, "content_digest", counted)
    seen = _spy_digests(monkeypatch)
    with pytest.raises(StopAfterDigest):
        stf.fuse_series(stf.open_cube(path), method="delta", out=tmp_path / "f.zarr", chunks=(16, 16), progress=False)
    ((from_store, inputs, known),) = seen
    assert known == inputs and len(inputs) >= 4
    assert reads_in_digest == [0]  # not one chunk read to fingerprint the inputs
    seen.clear()
    with pytest.raises(StopAfterDigest):
        stf.fuse_series(cube, method="delta", out=tmp_path / "g.zarr", chunks=(16, 16), progress=False)
    ((in_memory, _, none),) = seen
    assert from_store == in_memory and none == frozenset()


def test_a_chunk_written_again_is_read_for_the_digest_not_taken_from_the_record(tmp_path, monkeypatch):
    """A chunk rewritten in place with other values (by another tool) no longer matches the
    record (size and checksum of its file): the digest reads the values and sees the change."""
    import zarr

    cube = series_cube(seed=3)
    path = stf.write_cube(cube, tmp_path / "c.zarr", chunks={"y": 16, "x": 16})
    seen = _spy_digests(monkeypatch)
    array = zarr.open_array(path / "fine", mode="r+")
    array[0, 0, 0, 0] = array[0, 0, 0, 0] + np.float32(0.001)
    first = f"fine@{str(cube.time.values[0])[:10]}"
    with pytest.raises(StopAfterDigest):
        stf.fuse_series(stf.open_cube(path), method="delta", out=tmp_path / "f.zarr", chunks=(16, 16), progress=False)
    ((from_store, inputs, known),) = seen
    assert first in inputs and first not in known and len(known) == len(inputs) - 1
    changed = cube.copy(deep=True)
    changed["fine"].values[0, 0, 0, 0] += np.float32(0.001)
    seen.clear()
    with pytest.raises(StopAfterDigest):
        stf.fuse_series(changed, method="delta", out=tmp_path / "g.zarr", chunks=(16, 16), progress=False)
    assert seen[0][0] == from_store


def test_a_corrupt_chunk_record_means_reading_the_inputs(tmp_path, monkeypatch):
    cube = series_cube(seed=3)
    path = stf.write_cube(cube, tmp_path / "c.zarr", chunks={"y": 16, "x": 16})
    (path / store.MANIFEST_FILE).write_text("{not json")
    seen = _spy_digests(monkeypatch)
    with pytest.raises(StopAfterDigest):
        stf.fuse_series(stf.open_cube(path), method="delta", out=tmp_path / "f.zarr", chunks=(16, 16), progress=False)
    with pytest.raises(StopAfterDigest):
        stf.fuse_series(cube, method="delta", out=tmp_path / "g.zarr", chunks=(16, 16), progress=False)
    (from_store, _, known), (in_memory, _, _) = seen
    assert known == frozenset() and from_store == in_memory


# --------------------------------------------------------------------------------------------
# checksums, truncation, temporary files


def _a_chunk(path: Path) -> Path:
    return path / "fine" / "c" / "1" / "0" / "0" / "1"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_chunk_raises_a_cube_error_naming_it(tmp_path, damage):
    cube = gappy_cube()
    path = stf.write_cube(cube, tmp_path / "c.zarr", chunks={"y": 16, "x": 16})
    chunk = _a_chunk(path)
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[len(data) // 3] ^= 0x10
    else:
        data = data[: len(data) // 2]
    chunk.write_bytes(bytes(data))
    opened = stf.open_cube(path)  # metadata and accounting are fine
    np.testing.assert_array_equal(opened["fine"].isel(time=0).values, cube["fine"].isel(time=0).values)
    with pytest.raises(stf.CubeError, match=rf"chunk fine/c/1/0/0/1 of {path} is damaged"):
        opened["fine"].load()


@pytest.fixture(scope="module")
def nan_edged_store(tmp_path_factory):
    """A cube with NaN gaps on a grid that its 16-px chunks do not divide (edge chunks are cut)."""
    cube = gappy_cube()
    return cube, stf.write_cube(cube, tmp_path_factory.mktemp("direct") / "c.zarr", chunks={"y": 16, "x": 16})


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_checked_reads_equal_the_written_values_for_any_window(nan_edged_store, data):
    """Keys within one chunk are decoded from the chunk file (checksum, Blosc); any other key by
    xarray and Zarr: both give the written values, NaN included, for any window."""
    cube, path = nan_edged_store
    opened = stf.open_cube(path)
    reader = store.checked_reader(opened["fine"].data)
    assert reader is not None and reader.direct is not None
    assert reader.direct.chunk_shape == (1, cube.sizes["band"], 16, 16)
    key = []
    for size in reader.shape:
        start = data.draw(st.integers(0, size - 1))
        key.append(slice(start, data.draw(st.integers(start + 1, size))))
    expected = cube["fine"].values[tuple(key)]
    np.testing.assert_array_equal(reader[tuple(key)], expected)


def test_stores_of_other_encodings_are_read_through_zarr(tmp_path):
    cube = gappy_cube()
    cube.to_zarr(tmp_path / "plain.zarr", zarr_format=3)  # Zarr's default codecs: no checksum, no Blosc
    from stf_pipeline.cube import open_store

    opened = open_store(tmp_path / "plain.zarr")
    reader = store.checked_reader(opened["fine"].data)
    assert reader is not None and reader.direct is None
    np.testing.assert_array_equal(opened["fine"].values, cube["fine"].values)


def test_chunks_coded_here_are_zarrs_bytes(tmp_path):
    """DirectCodec writes, byte for byte, the chunk files Zarr writes with the cube encoding (edge
    chunks padded with NaN), and reads them back."""
    import shutil

    import zarr

    from stf_pipeline.cube import chunk_encoding

    values = np.random.default_rng(0).random((2, 3, 20, 30), dtype=np.float32)
    values[0, 0, :3] = np.nan
    array = zarr.create_array(tmp_path / "z", shape=values.shape, chunks=(1, 3, 16, 16), dtype="float32",
                              compressors=chunk_encoding((1, 3, 16, 16))["compressors"], fill_value=np.nan,
                              zarr_format=3, config={"write_empty_chunks": True})
    array[:] = values
    codec = store.DirectCodec.of(tmp_path, "z")
    assert codec is not None
    shutil.copytree(tmp_path / "z", tmp_path / "y")
    for index in np.ndindex(2, 1, 2, 2):
        extent = codec.extent(index)
        codec.write(codec.path(tmp_path, "y", index), values[extent])
        assert codec.path(tmp_path, "y", index).read_bytes() == codec.path(tmp_path, "z", index).read_bytes()
        within = tuple(slice(0, e.stop - e.start) for e in extent)
        np.testing.assert_array_equal(codec.read(codec.path(tmp_path, "y", index))[within], values[extent])
    assert not list((tmp_path / "y").rglob("*.partial"))


def test_fused_series_regions_are_written_by_the_direct_codec(tmp_path, monkeypatch):
    written = []
    real = store.DirectCodec.write
    monkeypatch.setattr(store.DirectCodec, "write", lambda self, file, values: written.append(file) or real(
        self, file, values))
    cube = gappy_cube()
    out = stf.fuse_series(cube, method="delta", out=tmp_path / "f.zarr", chunks=CHUNKS, progress=False)
    chunk_files = {p for p in (tmp_path / "f.zarr" / "fine" / "c").rglob("*") if p.is_file()}
    assert sorted(written) == sorted(chunk_files)  # every region, once
    np.testing.assert_array_equal(out["fine"].values, xr.open_zarr(tmp_path / "f.zarr")["fine"].values)


def test_partial_files_are_not_chunks_and_a_resume_cleans_them(tmp_path, monkeypatch):
    cube = gappy_cube()
    path = tmp_path / "f.zarr"
    original = interrupt_at_date(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        stf.fuse_series(cube, method="delta", out=path, chunks=CHUNKS, progress=False)
    monkeypatch.setattr(series, "_write_region", original)
    stray = path / "fine" / "c" / "3" / "0" / "0" / "0.5d41402a.partial"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"half a chunk")
    out = stf.fuse_series(cube, method="delta", out=path, chunks=CHUNKS, progress=False)
    assert not stray.exists()
    assert not list(path.rglob("*.partial"))
    ref = stf.fuse_series(cube, method="delta", out=tmp_path / "ref.zarr", chunks=CHUNKS, progress=False)
    np.testing.assert_array_equal(out["fine"].values, ref["fine"].values)


# --------------------------------------------------------------------------------------------
# swaps


@pytest.mark.parametrize("killed_after", ["journal", "first_rename", "second_rename"])
def test_a_swap_killed_at_any_step_recovers_without_an_empty_path(tmp_path, killed_after):
    old_cube = gappy_cube()
    new_cube = old_cube.assign(fine=old_cube.fine + np.float32(0.5))
    path = stf.write_cube(old_cube, tmp_path / "c.zarr")
    # what a writer killed inside swap_into_place leaves behind
    new = stf.write_cube(new_cube, tmp_path / "elsewhere" / "new.zarr").rename(tmp_path / ".c.zarr.tmp-0badc0de")
    old = tmp_path / ".c.zarr.old-0badc0de"
    _atomic._write_json_atomically(_atomic.journal_path(path), {"new": new.name, "old": old.name})
    if killed_after in ("first_rename", "second_rename"):
        os.replace(path, old)
    if killed_after == "second_rename":
        os.replace(new, path)
    reopened = stf.open_cube(path)  # a reader finishes the swap (no writer holds the lock)
    expected = old_cube if killed_after == "journal" else new_cube
    np.testing.assert_array_equal(reopened["fine"].values, expected["fine"].values)
    assert not _atomic.journal_path(path).exists()
    # the next writer removes the hidden full-size leftovers
    stf.write_cube(new_cube, path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.zarr.stf-lock", "c.zarr", "elsewhere"]


def test_reader_of_a_replaced_store_gets_an_error_not_mixed_data(tmp_path):
    cube = gappy_cube()
    path = stf.write_cube(cube, tmp_path / "c.zarr", chunks={"y": 16, "x": 16})
    reader = stf.open_cube(path)
    first = reader["fine"].isel(time=0).values
    stf.write_cube(cube.assign(fine=cube.fine + np.float32(0.25)), path, overwrite=True)
    with pytest.raises(stf.CubeError, match="was replaced by another writer while it was being read"):
        reader["fine"].isel(time=3).load()
    np.testing.assert_array_equal(first, cube["fine"].isel(time=0).values)


def test_write_to_a_dangling_symlink_fails_before_writing(tmp_path):
    link = tmp_path / "out.zarr"
    os.symlink(tmp_path / "missing" / "target.zarr", link)
    with pytest.raises(stf.StoreError, match="is a symlink to .*which does not exist"):
        stf.write_cube(gappy_cube(), link)
    with pytest.raises(stf.StoreError, match="which does not exist"):
        stf.fuse_series(gappy_cube(), method="delta", out=link, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]
    # a live symlink is followed: the store is replaced at its target, the link stays
    target = stf.write_cube(gappy_cube(), tmp_path / "real" / "c.zarr")
    os.symlink(target, tmp_path / "live.zarr")
    changed = gappy_cube().assign(fine=gappy_cube().fine + np.float32(0.5))
    stf.write_cube(changed, tmp_path / "live.zarr", overwrite=True)
    assert (tmp_path / "live.zarr").is_symlink()
    np.testing.assert_array_equal(stf.open_cube(target)["fine"].values, changed["fine"].values)


# --------------------------------------------------------------------------------------------
# value checks


def test_value_checks_name_the_scale_factor_and_inf():
    cube = gappy_cube()
    scaled = cube.assign(fine=cube.fine * np.float32(10000))
    with pytest.raises(stf.CubeError, match=r"outside the plausible reflectance range.*x 1e-4.*2\.75e-5"):
        stf.validate_cube(scaled)
    fine = cube["fine"].values.copy()
    fine[3, 0, 16, 20] = np.inf
    with pytest.raises(stf.CubeError, match="holds ±inf values"):
        stf.validate_cube(cube.copy(data={"fine": fine, "coarse": cube["coarse"].values}))
    fine[3, 0, 16, 20] = -np.inf
    with pytest.raises(stf.CubeError, match="holds ±inf values"):
        stf.validate_cube(cube.copy(data={"fine": fine, "coarse": cube["coarse"].values}))
    fine[3, 0, 16, 20] = -0.6  # below the range (the sampled date 2 is all NaN, and passes)
    with pytest.raises(stf.CubeError, match=r"values from -0\.6 to .* outside the plausible reflectance range"):
        stf.validate_cube(cube.copy(data={"fine": fine, "coarse": cube["coarse"].values}))
    # lazy cubes are only sampled when asked (fuse_series, open_cube and write_cube ask)
    lazy = scaled.chunk({"y": 16, "x": 16})
    stf.validate_cube(lazy)
    with pytest.raises(stf.CubeError, match="scale factor"):
        stf.validate_cube(lazy, check_values=True)


def test_open_cube_takes_write_cubes_value_check_while_the_chunks_are_as_written(tmp_path, monkeypatch):
    """A store written by write_cube (which checks the values) opens without reading an image chunk;
    once a sampled chunk is written again by another tool, or in a store without a manifest, opening
    checks the values again and names the problem."""
    import zarr

    path = stf.write_cube(gappy_cube(), tmp_path / "c.zarr", chunks={"y": 16, "x": 16})
    reads = []
    real_read = store.DirectCodec.read
    monkeypatch.setattr(store.DirectCodec, "read", lambda self, file: reads.append(file) or real_read(self, file))
    cube = stf.open_cube(path)
    assert reads == []
    np.testing.assert_array_equal(cube["fine"].values, gappy_cube()["fine"].values)  # the data is read as before
    fine = zarr.open_array(str(path / "fine"), mode="r+")
    fine[0] = fine[0] * np.float32(10000)  # the first date (a sampled one) written again, out of range
    reads.clear()
    with pytest.raises(stf.CubeError, match="scale factor"):
        stf.open_cube(path)
    assert reads  # checked by reading
    other = tmp_path / "other.zarr"
    scaled = gappy_cube().assign(fine=gappy_cube().fine * np.float32(10000))
    scaled.chunk({"y": 16, "x": 16}).to_zarr(other, zarr_format=3, consolidated=True)
    with pytest.raises(stf.CubeError, match="scale factor"):
        stf.open_cube(other)


def _nearest_coarse(native: int, shape=(2, 3, 120, 100), seed=0):
    rng = np.random.default_rng(seed)
    small = rng.random((shape[0], shape[1], shape[2] // native + 1, shape[3] // native + 1), dtype=np.float32)
    big = small.repeat(native, axis=2).repeat(native, axis=3)
    return big[:, :, 3 : 3 + shape[2], 5 : 5 + shape[3]]  # offset: coarse pixels need not start at the origin


@pytest.mark.parametrize("factor", [7, 1, 40])
def test_coarse_factor_contradicting_nearest_resampled_data_is_refused(factor):
    coarse = _nearest_coarse(20)
    cube = stf.make_cube(coarse * 0.9, coarse, time=["2020-01-01", "2020-02-01"], band=["r", "g", "b"],
                         y=np.arange(120.0), x=np.arange(100.0), coarse_factor=20)
    with pytest.raises(stf.CubeError, match=r"blockwise constant in blocks of 20 fine pixels"):
        stf.validate_cube(cube.assign_attrs(coarse_factor=factor))


def test_coarse_factor_is_not_judged_on_smooth_coarse_data():
    from scipy.ndimage import zoom

    rng = np.random.default_rng(1)
    smooth = zoom(rng.random((2, 3, 7, 6), dtype=np.float32), (1, 1, 20, 20), order=1)[:, :, :120, :100]
    cube = stf.make_cube(smooth, smooth, time=["2020-01-01", "2020-02-01"], band=["r", "g", "b"],
                         y=np.arange(120.0), x=np.arange(100.0), coarse_factor=7)
    stf.validate_cube(cube)  # bilinear coarse data cannot prove a factor wrong


# --------------------------------------------------------------------------------------------
# progress


def test_progress_log_mode_writes_lines_without_waiting(caplog):
    import dask

    assert display_kind() == "log"  # pytest captures stderr: not a terminal
    with caplog.at_level(logging.INFO, logger="stf_pipeline"):
        start = time.perf_counter()
        with Progress(4, desc="job", unit="region", interval=0.0) as bar, DaskProgress(bar, "count-"):
            dask.compute(*[dask.delayed(lambda i: i)(i, dask_key_name=f"count-{i}") for i in range(4)])
        assert time.perf_counter() - start < 1.0
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("job: 4/4 region (100%)")
    assert any(line.startswith("job: 1/4 region (25%)") for line in lines)


def test_progress_resumes_from_initial_and_logs_the_postfix(caplog):
    with caplog.at_level(logging.INFO, logger="stf_pipeline"):
        with Progress(10, desc="fit", unit="step", initial=4, kind="log") as bar:
            bar.set_postfix(loss="0.012")
            bar.update(2)
    assert caplog.records[-1].getMessage().startswith("fit: 6/10 step (60%)")
    assert caplog.records[-1].getMessage().endswith("; loss=0.012")


def test_fuse_series_progress_in_a_non_terminal_costs_no_wait(tmp_path):
    cube = gappy_cube()
    start = time.perf_counter()
    stf.fuse_series(cube, method="delta", out=tmp_path / "a.zarr", chunks=CHUNKS, progress=False)
    quiet = time.perf_counter() - start
    start = time.perf_counter()
    stf.fuse_series(cube, method="delta", out=tmp_path / "b.zarr", chunks=CHUNKS, progress=True)
    shown = time.perf_counter() - start
    assert shown < quiet + 1.0  # a fixed wait (the old 15 s ProgressBar) would show here


# --------------------------------------------------------------------------------------------
# what a fused store holds


def test_fused_store_holds_fine_and_provenance_and_info_reads_it(tmp_path):
    from stf_pipeline.info import describe_cube

    cube = gappy_cube()
    path = tmp_path / "f.zarr"
    out = stf.fuse_series(cube, method="delta", out=path, chunks=CHUNKS, progress=False)
    assert sorted(out.data_vars) == ["fine", "fusion_method", "fusion_pairs", "model_digest", "source"]
    assert not (path / "coarse").exists()
    text = describe_cube(path)
    assert "fused cube: 2 fused date(s), 2 observed date(s)" in text
    meta = json.loads((path / "fine" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]][-1] == "crc32c"

"""What keeps stores from losing or mixing data: writer locks, input checks, fingerprints, checked reads.

- :class:`WriterLock`: one writer per store, an OS lock (``filelock``) on the hidden sibling
  ``.NAME.stf-lock``, held for a whole write or resume. The kernel releases it when its process
  dies, so the lock of a killed writer is taken over at once; the holder's pid, host and start
  time (in ``.NAME.stf-lock.json``) name it to a second writer, and a record left by a dead
  process is reported as a stale lock taken over.
- :func:`check_not_an_input`: a call never writes over a store that one of its inputs is read
  from (found in the Dask graph of the inputs, paths resolved).
- :func:`content_digest` / :func:`model_digest`: fingerprints of what decides an output, the
  full content of the inputs (hashed chunk by chunk, so memory stays bounded) and the weights
  of a trained model. A cube store records the digest of each chunk's values as it is written
  (:func:`write_manifest`), so a later fingerprint of its unmodified variables reads no chunk
  (:func:`recorded_digests`).
- :class:`CheckedChunks`: the lazy reader of stores opened by :func:`stf_pipeline.open_cube`,
  which turns a damaged chunk (checksum mismatch, truncated, undecodable) into a
  :class:`~stf_pipeline.exceptions.CubeError` naming the chunk, and refuses data from a store
  that was replaced while it was being read (its ``.stf_generation`` changed).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from stf_pipeline.exceptions import CubeError, StoreError

logger = logging.getLogger("stf_pipeline")

#: file inside every store written by stf_pipeline: a fresh id per write, so a reader notices a swap
GENERATION_FILE = ".stf_generation"
#: file inside a cube store: the content digest of each chunk's values, recorded when it was written
MANIFEST_FILE = ".stf_manifest"
#: suffix of the temporary files Zarr's local store writes a chunk into before renaming it
PARTIAL_SUFFIX = ".partial"
#: polls (50 ms apart) a refused writer makes for the holder's record, which the holder writes
#: just after it takes the lock, so that the refusal can name the holder
HOLDER_WAIT_POLLS = 20


# --------------------------------------------------------------------------------------------
# writer lock


def lock_path(path: Path) -> Path:
    """The lock file of store ``path`` (a sibling, so it survives the store being swapped)."""
    return path.with_name(f".{path.name}.stf-lock")


def _holder_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.stf-lock.json")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: Mapping[str, Any] | None) -> str:
    if not holder:
        return "a process that has not recorded itself yet"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('start')}"


class WriterLock:
    """Exclusive writer lock of one store, held as a context manager.

    Parameters
    ----------
    path : path-like
        The store (it need not exist yet).
    action : str
        What the holder does, shown to other writers (``"fuse_series"``, ``"write_cube"``).

    Raises
    ------
    StoreError
        On entry, when another process (or another call in this one) holds the lock: the
        message names the holder and the fix.
    """

    def __init__(self, path: str | os.PathLike[str], *, action: str) -> None:
        import filelock

        self.path = Path(path)
        self.action = action
        self._lock = filelock.FileLock(str(lock_path(self.path)), timeout=0)

    def __enter__(self) -> WriterLock:
        import filelock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder_file = _holder_path(self.path)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            holder = _read_holder(holder_file)
            for _ in range(HOLDER_WAIT_POLLS):  # the holder writes its record just after taking the lock
                if holder:
                    break
                time.sleep(0.05)
                holder = _read_holder(holder_file)
            raise StoreError(
                f"{self.path} is being written by another {holder.get('action', 'writer') if holder else 'writer'} "
                f"({_describe(holder)}); wait for it to finish, or choose another output path."
            ) from None
        previous = _read_holder(holder_file)
        if previous and previous.get("host") == socket.gethostname() and not _pid_alive(int(previous.get("pid", 0))):
            logger.warning(
                "took over the stale writer lock of %s left by %s (no longer running)", self.path, _describe(previous)
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "action": self.action,
        }
        tmp = holder_file.with_name(f"{holder_file.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, holder_file)
        return self

    def __exit__(self, *exc: object) -> None:
        _holder_path(self.path).unlink(missing_ok=True)
        self._lock.release()


def _read_holder(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def is_locked(path: Path) -> bool:
    """Whether some writer holds ``path``'s lock right now (tries and releases it)."""
    import filelock

    if not lock_path(path).exists():
        return False
    probe = filelock.FileLock(str(lock_path(path)), timeout=0)
    try:
        probe.acquire()
    except filelock.Timeout:
        return True
    probe.release()
    return False


def remove_partial_files(store: Path) -> int:
    """Delete the ``*.partial`` chunk files a killed chunk write left inside ``store``; return how many.

    Only the writer-lock holder calls this (a live writer's partial files are in use).
    """
    count = 0
    for root, _, files in os.walk(store):
        for name in files:
            if name.endswith(PARTIAL_SUFFIX):
                os.unlink(os.path.join(root, name))
                count += 1
    if count:
        logger.info("removed %d unfinished chunk file(s) of a killed write in %s", count, store)
    return count


def new_generation(store: Path, generation: str | None = None) -> None:
    """Give ``store`` (being written, before it is swapped into place) its generation id.

    Default a fresh random id; a fused series passes its request digest, so the same request
    gives the same store byte for byte while any other request is another generation.
    """
    (store / GENERATION_FILE).write_text(generation or uuid.uuid4().hex)


def read_generation(store: Path) -> str | None:
    try:
        return (store / GENERATION_FILE).read_text()
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# inputs of a call


def input_stores(*objects: xr.Dataset | xr.DataArray | None) -> set[Path]:
    """Real paths of the stores and files the lazy data of ``objects`` is read from.

    Looks at the Dask graphs (the readers of :func:`stf_pipeline.open_cube` and xarray's
    backend arrays know their store) and at xarray's ``encoding["source"]``.
    """
    found: set[Path] = set()
    for obj in objects:
        if obj is None:
            continue
        ds = obj if isinstance(obj, xr.Dataset) else obj.to_dataset(name="_")
        for var in ds.variables.values():
            if var._in_memory:  # loaded: no longer read from anywhere
                continue
            for source in (var.encoding.get("source"), ds.encoding.get("source")):
                if source:
                    found.add(Path(os.path.realpath(source)))
            if isinstance(var.data, da.Array):
                for value in var.data.dask.values():
                    found.update(_paths_in(value))
    return found


def _paths_in(value: Any, depth: int = 0) -> Iterable[Path]:
    """Store paths held by one graph value (a reader, a backend array, or a task wrapping one)."""
    if depth > 8:
        return
    if isinstance(value, CheckedChunks):
        yield Path(os.path.realpath(value.store))
        return
    for attr in ("value", "array", "_array", "args"):
        inner = getattr(value, attr, None)
        if inner is None or isinstance(inner, (np.ndarray, str, bytes, int, float)):
            continue
        if isinstance(inner, (tuple, list)):
            for item in inner:
                yield from _paths_in(item, depth + 1)
        else:
            yield from _paths_in(inner, depth + 1)
    store = getattr(value, "store", None)
    root = getattr(store, "root", None)
    if root is not None and hasattr(value, "shape"):  # a zarr.Array on a local store
        yield Path(os.path.realpath(str(root)))


def check_not_an_input(out: Path, inputs: Iterable[Path], *, what: str) -> None:
    """Refuse to write ``out`` when an input is read from it (or from inside or above it).

    Raises
    ------
    StoreError
        Naming the output, the input and the fix.
    """
    target = Path(os.path.realpath(out))
    for source in inputs:
        if source == target or target in source.parents or source in target.parents:
            raise StoreError(
                f"{what} would write over {out}, which the input is read from ({source}); writing there would "
                "destroy the input. Choose another output path, or load the input into memory first "
                "(cube = cube.load())."
            )


# --------------------------------------------------------------------------------------------
# fingerprints


def _block_digest(block: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(block, dtype=np.float32).data).digest()


def content_digest(
    arrays: Mapping[str, Any], chunks: tuple[int, ...], known: Mapping[str, Sequence[bytes]] | None = None
) -> str:
    """SHA-256 over the content of ``arrays`` (as float32), hashed block by block.

    Every array is cut into blocks of ``chunks`` (the same for NumPy and Dask input, so the same
    values give the same digest however they are held or chunked); each block is hashed in its
    own task, so memory stays at a few blocks per worker whatever the size of the arrays.
    ``known`` gives the block digests of some arrays (in row-major block order), which are then
    not read: those a store recorded when it was written (:func:`recorded_digests`).
    """
    names = sorted(arrays)
    known = known or {}
    blocks: list[Sequence[Any]] = []
    for name in names:
        if name in known:
            blocks.append(known[name])
            continue
        array = arrays[name]
        lazy = (
            array.rechunk(chunks) if isinstance(array, da.Array)
            else da.from_array(np.asarray(array), chunks=chunks, name=False)  # name=False: no hash of the whole array
        )
        delayed = lazy.to_delayed().ravel()
        blocks.append([dask.delayed(_block_digest, pure=True)(b) for b in delayed])
    (computed,) = dask.compute(blocks)
    total = hashlib.sha256()
    for name, group in zip(names, computed, strict=True):
        total.update(name.encode())
        for digest in group:
            total.update(digest)
    return total.hexdigest()


def _chunk_identity(file: Path) -> list[int] | None:
    """Size and trailing CRC32C (every chunk of a cube store ends with it) of a chunk file: what
    changes when the chunk is written again with other values; None if it cannot be read."""
    try:
        with open(file, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(size - 4, 0))
            return [size, int.from_bytes(fh.read(4), "little")]
    except OSError:
        return None


def chunk_key(index: Sequence[int]) -> str:
    """Zarr v3's default key of chunk ``index`` within its variable (``c/0/0/1/2``)."""
    return "c/" + "/".join(map(str, index))


def _write_and_hash(block: np.ndarray, file: Path, codec: DirectCodec) -> bytes:
    codec.write(file, np.asarray(block, dtype=np.float32))
    return _block_digest(block)


def write_chunks(store: Path, arrays: Mapping[str, tuple[da.Array, DirectCodec]]) -> dict[str, dict[str, Any]]:
    """Lazy: write every block of each array (Dask, chunked as its variable in ``store``, whose
    metadata exists) as its chunk file with the variable's :class:`DirectCodec`. Each task
    returns the block's :func:`content_digest` digest, by chunk key, for :func:`write_manifest`:
    the values are hashed while they are at hand."""
    out: dict[str, dict[str, Any]] = {}
    for name, (array, codec) in arrays.items():
        blocks = array.to_delayed()
        out[name] = {
            chunk_key(index): dask.delayed(_write_and_hash, pure=False)(
                blocks[index], codec.path(store, name, index), codec
            )
            for index in np.ndindex(blocks.shape)
        }
    return out


def write_manifest(store: Path, digests: Mapping[str, Mapping[str, bytes]]) -> None:
    """Record in ``store`` (written, not yet swapped into place) each chunk's value digest with
    the identity of its chunk file (size, trailing checksum), by variable and chunk key."""
    manifest: dict[str, dict[str, list[Any]]] = {}
    for name, chunks in digests.items():
        entries = {}
        for key, digest in chunks.items():
            identity = _chunk_identity(store / name / key)
            if identity is not None:
                entries[key] = [digest.hex(), *identity]
        manifest[name] = entries
    (store / MANIFEST_FILE).write_text(json.dumps(manifest, sort_keys=True))


def recorded_digests(reader: CheckedChunks, keys: Sequence[str]) -> list[bytes] | None:
    """The value digests ``reader``'s store recorded for chunks ``keys`` of its variable, or None
    when any is missing, its chunk file was written again since (size or checksum differ) or the
    store is another generation than the reader's: then the values must be read and hashed."""
    if reader.generation is None or read_generation(reader.store) != reader.generation:
        return None
    entries = _manifest(reader.store, reader.generation).get(reader.name, {})
    found = []
    for key in keys:
        entry = entries.get(key)
        if entry is None or _chunk_identity(reader.store / reader.name / key) != entry[1:]:
            return None
        found.append(bytes.fromhex(entry[0]))
    return found


@functools.lru_cache(maxsize=4)
def _manifest(store: Path, generation: str) -> dict[str, dict[str, list[Any]]]:
    """The manifest of ``store`` at ``generation`` (fixed once written: a new write is a new
    generation), read once for all the images a fingerprint takes from it; empty if unreadable."""
    try:
        manifest = json.loads((store / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def checked_reader(array: Any) -> CheckedChunks | None:
    """The reader behind ``array`` if it is a variable of a store opened by
    :func:`stf_pipeline.open_cube` exactly as read (no selection, arithmetic or rechunking)."""
    name = getattr(array, "name", None)
    if not isinstance(array, da.Array) or not str(name).startswith("stf-read-"):
        return None
    reader = array.dask.get(f"original-{name}")
    return reader if isinstance(reader, CheckedChunks) else None


def model_digest(model: Any) -> str:
    """SHA-256 of a trained model's weights and of everything else that shapes its predictions."""
    import jax

    if hasattr(model, "to_json") and hasattr(model, "params"):
        digest = hashlib.sha256(json.dumps(model.to_json(), sort_keys=True, default=str).encode())
        leaves = jax.tree_util.tree_flatten_with_path(model.params)[0]
        for key_path, leaf in leaves:
            leaf = np.asarray(leaf)
            digest.update(f"{jax.tree_util.keystr(key_path)}:{leaf.dtype.str}:{leaf.shape}".encode())
            digest.update(np.ascontiguousarray(leaf).data)
        return digest.hexdigest()
    from dask.base import tokenize

    return hashlib.sha256(f"{type(model).__qualname__}:{tokenize(model)}".encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# checked reads


#: the chunk encoding of cube images (:func:`stf_pipeline.cube.chunk_encoding`) that
#: :class:`DirectCodec` reads and writes itself: little-endian values, Blosc, then a CRC32C checksum
_DIRECT_CODECS = ("bytes", "blosc", "crc32c")
_BLOSC_SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


@dataclasses.dataclass(frozen=True)
class DirectCodec:
    """The chunks of one float32 store variable encoded as :data:`_DIRECT_CODECS`, read and
    written without Zarr's codec pipeline, which runs every chunk of a process through one event
    loop (reads barely gained from more threads: docs/stores.md). The bytes are Zarr's: Blosc
    as configured in the variable's metadata, then the CRC32C of the Blosc stream."""

    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    blosc: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, store: Path, name: str) -> DirectCodec | None:
        """The codec of variable ``name`` of ``store`` if its chunks can be coded here: Zarr v3,
        float32 stored as is (no scale, offset or fill value but NaN), chunks encoded as
        :data:`_DIRECT_CODECS` under default keys; None otherwise (xarray and Zarr code them)."""
        try:
            meta = json.loads((store / name / "zarr.json").read_text())
            codecs = meta["codecs"]
            encoded = meta.get("chunk_key_encoding", {})
            shape = tuple(int(n) for n in meta["shape"])
            chunk_shape = tuple(int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"])
            blosc = dict(codecs[1].get("configuration", {}))
            direct = (
                meta.get("zarr_format") == 3
                and meta.get("data_type") == "float32"
                and tuple(c["name"] for c in codecs) == _DIRECT_CODECS
                and codecs[0].get("configuration", {}).get("endian", "little") == "little"
                and np.little_endian
                and encoded.get("name") == "default"
                and encoded.get("configuration", {}).get("separator", "/") == "/"
                and not meta.get("storage_transformers")
                and not {"scale_factor", "add_offset"} & set(meta.get("attributes", {}))
                and meta.get("fill_value") == "NaN"
                and blosc.get("shuffle", "shuffle") in _BLOSC_SHUFFLES
            )
        except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
            return None
        return cls(shape, chunk_shape, tuple(sorted(blosc.items()))) if direct else None

    def _codec(self) -> Any:
        from numcodecs import Blosc

        config = dict(self.blosc)
        return Blosc.from_config({
            "cname": config.get("cname", "lz4"), "clevel": int(config.get("clevel", 5)),
            "shuffle": _BLOSC_SHUFFLES[config.get("shuffle", "shuffle")], "blocksize": int(config.get("blocksize", 0)),
            "typesize": int(config.get("typesize", 4)),
        })

    def extent(self, index: Sequence[int]) -> tuple[slice, ...]:
        """The part of the variable that chunk ``index`` holds (cut at the far edges)."""
        return tuple(
            slice(i * n, min((i + 1) * n, size)) for i, n, size in zip(index, self.chunk_shape, self.shape, strict=True)
        )

    def path(self, store: Path, name: str, index: Sequence[int]) -> Path:
        """The file of chunk ``index`` of variable ``name``."""
        return store / name / chunk_key(index)

    def read(self, file: Path) -> np.ndarray:
        """The chunk in ``file``, its checksum checked (ValueError if it does not match)."""
        import google_crc32c

        data = file.read_bytes()
        if len(data) < 4 or google_crc32c.value(data[:-4]) != int.from_bytes(data[-4:], "little"):
            raise ValueError("Stored and computed checksum do not match")
        chunk = np.empty(self.chunk_shape, dtype=np.float32)
        self._codec().decode(data[:-4], out=chunk)
        return chunk

    def write(self, file: Path, values: np.ndarray) -> None:
        """Write ``values`` (the chunk's :meth:`extent`) as chunk ``file``: padded with NaN to the
        chunk shape at the far edges, through a ``*.partial`` file renamed into place, as Zarr's
        local store writes."""
        import google_crc32c

        chunk = np.full(self.chunk_shape, np.nan, dtype=np.float32)
        chunk[tuple(slice(0, n) for n in values.shape)] = values
        encoded = self._codec().encode(chunk.view(np.uint8).ravel())
        data = bytes(encoded) + google_crc32c.value(bytes(encoded)).to_bytes(4, "little")
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, file)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class CheckedChunks:
    """A lazily indexed store variable whose reads fail loudly.

    ``x[key]`` of a cube image (float32, encoded as :func:`stf_pipeline.cube.chunk_encoding`
    writes it) within one chunk reads that chunk's file through :class:`DirectCodec`, in the
    calling thread; any other read goes through xarray's decoding (``variable[key]``). A
    decoding or checksum error becomes a :class:`CubeError` that names the store, the variable
    and the chunk, and data read after the store was replaced (another generation) is refused.
    """

    def __init__(self, variable: xr.Variable, store: Path, name: str, chunks: tuple[int, ...], generation: str | None):
        self.variable = variable
        self.store = Path(store)
        self.name = name
        self.chunks = chunks
        self.generation = generation
        self.shape = variable.shape
        self.dtype = variable.dtype
        self.ndim = variable.ndim
        codec = DirectCodec.of(self.store, name)
        self.direct = codec if codec is not None and len(codec.chunk_shape) == self.ndim else None

    def _within_one_chunk(self, key: Any) -> tuple[tuple[int, ...], tuple[slice, ...]] | None:
        """The index of the one chunk that ``key`` (unit-step slices) lies in and ``key`` relative
        to that chunk; None for any other key or a variable not decoded here."""
        if self.direct is None or not isinstance(key, tuple) or len(key) != self.ndim:
            return None
        index, within = [], []
        for k, size, chunk in zip(key, self.shape, self.direct.chunk_shape, strict=True):
            if not isinstance(k, slice):
                return None
            start, stop, step = k.indices(size)
            if step != 1 or stop <= start or start // chunk != (stop - 1) // chunk:
                return None
            index.append(start // chunk)
            within.append(slice(start % chunk, start % chunk + stop - start))
        return tuple(index), tuple(within)

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            found = self._within_one_chunk(key)
            if found is not None and self.direct is not None:
                index, within = found
                values = self.direct.read(self.direct.path(self.store, self.name, index))[within]
            else:
                values = np.asarray(self.variable[key].values)
        except Exception as err:
            self._check_generation()  # a chunk file gone or changed under a swap: the store was replaced
            raise CubeError(
                f"chunk {self._chunk_name(key)} of {self.store} is damaged ({type(err).__name__}: {err}); "
                "the store was corrupted on disk: re-create it (stf.write_cube / `stf ingest`, or rerun "
                "stf.fuse_series with overwrite=True)."
            ) from err
        self._check_generation()
        return values

    def _check_generation(self) -> None:
        if self.generation is not None and read_generation(self.store) != self.generation:
            raise CubeError(
                f"{self.store} was replaced by another writer while it was being read; open it again "
                "(stf.open_cube) to read the new version."
            )

    def _chunk_name(self, key: Any) -> str:
        keys = key if isinstance(key, tuple) else (key,)
        parts = []
        for k, size in zip(keys, self.chunks, strict=False):  # an integer key may index fewer dims
            if isinstance(k, slice):
                first = (k.start or 0) // size
                last = max(first, ((k.stop if k.stop is not None else first * size + 1) - 1) // size)
                parts.append(str(first) if first == last else f"{first}-{last}")
            else:
                parts.append(str(int(k) // size))
        return f"{self.name}/c/{'/'.join(parts)}"

    def __dask_tokenize__(self) -> Any:
        return (type(self).__name__, str(self.store), self.name, self.generation, self.shape)

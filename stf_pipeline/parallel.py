"""The one place where methods meet Dask: map a block kernel over overlapping chunks.

:func:`map_overlapping` extends every spatial chunk of the pair and target images by the
method's halo (``dask.array.overlap`` with ``boundary='none'``: blocks at the scene edge simply
end, as the unchunked image does), applies the kernel block by block and trims the halo. So a
chunked result equals the unchunked one, bitwise for deterministic kernels. The fine, coarse and
target images are overlapped each on its own, so the pairs' overlapped blocks do not depend on
the target: graphs of several dates fused from the same pairs share them.

Memory: a block's inputs stay in memory until the blocks below it have read their halo from
them, so about two and a half rows of input blocks are alive at any time, i.e. roughly
``2.5 * width * chunk_height * (2 * pairs + 1) * bands * 4`` bytes, plus the kernel's
temporaries for one block per thread. Peak memory therefore grows with the scene's width and the
chunk height, not with its area: halving the chunk halves it (``stf bench scale --tile``).
:func:`stf_pipeline.fuse_series` bounds it by the worker count instead: it maps the kernel over one
tile's window at a time (``block_chunks``: the tile's blocks plus a halo strip each side).

Device blocks: a GPU runs one block at a time, and every block recomputes a halo on each inner
side (BiaSTF's is 60 pixels: four 1024-px blocks of a 2000² scene compute 21 % more pixels than the
scene has). So where the kernel is a jitted program on the one GPU of this process and the caller
gave no chunks, a scene that fits on the device (:func:`default_device_block_pixels`, or
``STF_DEVICE_BLOCK_PIXELS``) runs as one block without a halo, for a kernel that takes device
arrays (``MethodSpec.device_inputs``): :func:`map_on_device` sends each stored chunk to the device
in its own task as soon as it is read and assembles the block there, and the result comes back in
the cube's chunks. Where ``STF_DEVICE_BLOCK_PIXELS`` is set, other scenes and kernels get the
cube's chunks merged on the host into blocks of up to that many pixels (:func:`device_chunks`);
that is off by default, since a block concatenated on the host no longer overlaps its reads with
another block's device work (docs/architecture.md, "Blocks on a GPU").

One shape per scene: a jitted kernel compiles once per block shape, and the edge blocks are
smaller. For a method that asks for it (``MethodSpec.block_padding``) every block is padded at its
far ends to the scene's largest block shape, with NaN by the engine (``"nan"``) or by the kernel,
told the shape as ``pad_to`` (``"kernel"``), and the result is cropped back.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from stf_pipeline._dask import is_dask_array
from stf_pipeline.kernels.padding import crop_block, pad_block

if TYPE_CHECKING:
    from stf_pipeline.methods._base import SceneStatistics

P = TypeVar("P")

log = logging.getLogger(__name__)


def local_scheduler() -> Callable[..., Any] | None:
    """The scheduler for a ``dask.compute`` in this package: Dask's threaded scheduler
    (``dask.threaded.get``) when no scheduler is configured and no distributed Client is active
    (:func:`tasks_run_here`), else ``None`` (Dask's own choice, e.g. the active Client).

    The scheduler Dask would pick for arrays anyway, passed as a function because Dask, given
    none or a name, imports ``distributed`` (a quarter of a second) to look for a Client.
    """
    import dask
    import dask.threaded

    if dask.config.get("scheduler", None) is not None or not tasks_run_here():
        return None
    return dask.threaded.get


#: ``dask.config`` ``scheduler`` values that run the tasks in this process
_IN_PROCESS_SCHEDULERS = ("threads", "threading", "sync", "synchronous", "single-threaded")


def tasks_run_here() -> bool:
    """Whether Dask would run this process's tasks on its own threads: no other scheduler is
    configured and no distributed Client is active (``distributed`` may be imported anyway: Dask
    imports it to look for a Client on every ``compute``)."""
    import dask

    chosen = dask.config.get("scheduler", None)
    if chosen is not None and chosen not in _IN_PROCESS_SCHEDULERS:
        return False
    if "distributed" not in sys.modules:
        return True
    from distributed import default_client

    try:
        default_client()
    except ValueError:  # no Client
        return True
    return False


def _spatial_chunks(length: int, nominal: int, *, halo: int, align: int) -> tuple[int, ...]:
    """Regular chunks of ``nominal`` pixels (at least ``halo`` and a multiple of ``align``).

    A trailing remainder smaller than the halo is merged into the previous chunk, since an
    overlap cannot reach further than its neighbouring chunk.
    """
    size = max(nominal, halo, 1)
    size = int(math.ceil(size / align) * align)
    if size >= length:
        return (length,)
    chunks = [size] * (length // size)
    rest = length - size * len(chunks)
    if rest:
        if rest < max(halo, 1) or rest < align:
            chunks[-1] += rest
        else:
            chunks.append(rest)
    return tuple(chunks)


#: Environment variable: the largest block on a GPU, in pixels (``0``: the cube's chunks always)
DEVICE_BLOCK_VARIABLE = "STF_DEVICE_BLOCK_PIXELS"

#: Device memory a pixel of a whole-scene block is allowed: BiaSTF's paper-size networks (128
#: filters, four orientations, both directions) fuse a 2000² scene as one block on an 80 GB GPU;
#: a block that needs more falls back to tiles (docs/architecture.md, "Blocks on a GPU")
DEVICE_BYTES_PER_PIXEL = 16 * 1024


def device_block_pixels() -> int | None:
    """The largest block, in pixels, that a GPU kernel is given, as ``STF_DEVICE_BLOCK_PIXELS``
    asks (e.g. ``4194304``, a 2048² block; ``0``: the cube's chunks), ``None`` when unset (then
    :func:`default_device_block_pixels`).

    Raises
    ------
    ValueError
        If ``STF_DEVICE_BLOCK_PIXELS`` is not a whole number of at least 0.
    """
    text = os.environ.get(DEVICE_BLOCK_VARIABLE, "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise ValueError(
            f"{DEVICE_BLOCK_VARIABLE}={text!r} is not a whole number of pixels; set it to e.g. "
            f"{2048 * 2048} (a 2048² block) or 0 to keep the cube's chunks."
        )
    return int(text)


#: whole-scene blocks (pixels) the device ran out of memory for in this process
_TOO_LARGE: list[int] = []


def _device_memory_bytes() -> int:
    """The memory of JAX's default device, 0 where it does not report it."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("bytes_limit", 0))


def default_device_block_pixels() -> int:
    """Pixels of the largest whole-scene block for JAX's default device: its memory over
    :data:`DEVICE_BYTES_PER_PIXEL` (0 where the device does not report its memory), and less
    than any scene block it ran out of memory for in this process (those then start with the
    cube's chunks instead of failing again: :func:`_apply_scene_block`)."""
    budget = _device_memory_bytes() // DEVICE_BYTES_PER_PIXEL
    return min(budget, min(_TOO_LARGE) - 1) if _TOO_LARGE else budget


def device_chunks(shape: tuple[int, int], chunks: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """Nominal chunks for a GPU kernel: ``chunks`` merged, a whole number of them along each axis,
    into the largest block of at most ``max_pixels`` pixels (``chunks`` themselves when even two
    do not fit), the squarest of equal size.

    A block made of whole chunks reads each stored chunk in one task; a block as large as the
    scene along an axis needs no halo along it (:func:`map_overlapping`).
    """
    height, width = shape
    counts = (max(-(-height // max(chunks[0], 1)), 1), max(-(-width // max(chunks[1], 1)), 1))
    best = (1, 1)
    best_key = (-1, 0)
    for ky in range(1, counts[0] + 1):
        by = min(ky * chunks[0], height)
        kx = counts[1] if by * width <= max_pixels else min(max_pixels // by // max(chunks[1], 1), counts[1])
        if kx < 1:
            break
        bx = min(kx * chunks[1], width)
        key = (by * bx, -abs(by - bx))  # largest, then squarest
        if key > best_key:
            best, best_key = (ky, kx), key
    if best_key[0] < 0 or best_key[0] <= min(chunks[0], height) * min(chunks[1], width):
        return chunks
    return (best[0] * chunks[0], best[1] * chunks[1])


def plan_chunks(
    shape: tuple[int, int],
    nominal: tuple[int, int],
    *,
    halo: int,
    align: int = 1,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Spatial chunking the engine will use for a ``(y, x)`` scene of ``shape``."""
    return (
        _spatial_chunks(shape[0], nominal[0], halo=halo, align=align),
        _spatial_chunks(shape[1], nominal[1], halo=halo, align=align),
    )


def _apply_block(
    fine: np.ndarray,
    coarse: np.ndarray,
    coarse_target: np.ndarray,
    *extra_blocks: np.ndarray,
    kernel: Callable[..., np.ndarray],
    extra_names: tuple[str, ...] = (),
    padding: Literal["none", "nan", "kernel"] = "none",
    pad_to: tuple[int, int] | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """:func:`_run_kernel` on one Dask block of ``fine``, ``coarse`` and the target."""
    images = (fine, coarse, coarse_target)
    return _run_kernel(kernel, images, extra_blocks, extra_names=extra_names, padding=padding, pad_to=pad_to, **kwargs)


def _run_kernel(
    kernel: Callable[..., np.ndarray],
    images: tuple[np.ndarray, np.ndarray, np.ndarray],
    extra_blocks: tuple[np.ndarray, ...],
    *,
    extra_names: tuple[str, ...],
    padding: Literal["none", "nan", "kernel"],
    pad_to: tuple[int, int] | None,
    **kwargs: Any,
) -> np.ndarray:
    """``kernel(fine, coarse, coarse_target)`` of one block, padded to ``pad_to`` as ``padding``
    says and cropped back to the block's extent, float32."""
    extent = images[-1].shape[-2:]
    if padding == "nan" and pad_to is not None:
        images = tuple(pad_block(a, pad_to) for a in images)  # type: ignore[assignment]
        extra_blocks = tuple(pad_block(b, pad_to) for b in extra_blocks)
    elif padding == "kernel":
        kwargs["pad_to"] = pad_to
    if extra_names:
        kwargs["extra"] = dict(zip(extra_names, extra_blocks, strict=True))
    out = kernel(*images, **kwargs)
    return np.asarray(crop_block(out, extent), dtype=np.float32)


def map_overlapping(
    kernel: Callable[..., np.ndarray],
    fine: Any,
    coarse: Any,
    coarse_target: Any,
    *,
    halo: int,
    align: int = 1,
    chunks: tuple[int, int] | None = None,
    block_chunks: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    extra: Mapping[str, Any] | None = None,
    padding: Literal["none", "nan", "kernel"] = "none",
    **kernel_kwargs: Any,
) -> Any:
    """Apply ``kernel`` to overlapping spatial blocks of the inputs.

    Parameters
    ----------
    kernel : callable
        ``kernel(fine, coarse, coarse_target, **kernel_kwargs) -> (band, y, x)``.
    fine, coarse : array ``(pair, band, y, x)``
        NumPy (the kernel runs once on the whole scene) or Dask (the kernel is mapped).
    coarse_target : array ``(band, y, x)``
    halo : int
        Context pixels each side; blocks overlap by this much.
    align : int, default 1
        Chunk sizes and halo are rounded up to multiples of it, so every block starts on a
        multiple of ``align`` (native coarse pixels).
    chunks : (int, int), optional
        Nominal spatial chunk size; default: the first chunk of ``fine`` (Dask input).
    block_chunks : (tuple of int, tuple of int), optional
        The blocks themselves, ``(y sizes, x sizes)``, instead of ``chunks``: each at least the
        (aligned) halo and, but for the last, a multiple of ``align``. A caller fusing a window of
        a scene passes the scene's blocks that lie in the window plus a strip of one halo each
        side, so every block sees exactly the input it sees in the whole scene.
    extra : mapping of str to array ``(y, x)``, optional
        Further per-pixel inputs (e.g. a class map), overlapped like the images and passed to
        the kernel as ``extra={name: block}``.
    padding : {"none", "nan", "kernel"}, default "none"
        How blocks get one shape (the largest block's), so a jitted kernel compiles once: padded
        at their far ends with NaN here (``"nan"``; float ``extra`` inputs too), or by the kernel,
        passed ``pad_to=(y, x)`` (``"kernel"``; ``None`` for NumPy input, one whole-scene call).
        The result is cropped to the block either way.

    Returns
    -------
    array ``(band, y, x)`` float32
        Lazy Dask array for Dask input, NumPy otherwise.
    """
    extra = dict(extra or {})
    extra_names = tuple(extra)
    lazy = any(is_dask_array(a) for a in (fine, coarse, coarse_target, *extra.values()))
    if not lazy:  # one whole-scene call on the arrays as given (float32 without a copy where they are)
        images = tuple(np.asarray(a).astype(np.float32, copy=False) for a in (fine, coarse, coarse_target))
        return _run_kernel(
            kernel,
            images,  # type: ignore[arg-type]
            tuple(np.asarray(a) for a in extra.values()),
            extra_names=extra_names,
            padding=padding,
            pad_to=None,
            **kernel_kwargs,
        )
    import dask.array as da

    halo = int(math.ceil(halo / align) * align) if halo else 0
    fine, coarse, coarse_target = (da.asarray(a) for a in (fine, coarse, coarse_target))
    if block_chunks is not None:
        ychunks, xchunks = block_chunks
    else:
        if chunks is None:
            chunks = (fine.chunks[2][0], fine.chunks[3][0])
        ychunks, xchunks = plan_chunks(fine.shape[2:], chunks, halo=halo, align=align)
    # an axis held in one chunk needs no overlap (and a halo may exceed a small scene)
    ydepth = halo if len(ychunks) > 1 else 0
    xdepth = halo if len(xchunks) > 1 else 0
    halo = max(ydepth, xdepth)

    def extend(images: Any) -> Any:
        # each input overlapped on its own: the pairs' blocks keep their keys whatever the target, so
        # dates fused from the same pairs in one graph (fuse_series) read and overlap them once
        images = images.astype(np.float32).rechunk((*images.shape[:-2], ychunks, xchunks))
        depth = {**dict.fromkeys(range(images.ndim - 2), 0), images.ndim - 2: ydepth, images.ndim - 1: xdepth}
        return da.overlap.overlap(images, depth=depth, boundary="none") if halo else images

    extended = [extend(images) for images in (fine, coarse, coarse_target)]
    extra_extended = []
    for values in extra.values():
        values = da.asarray(values).rechunk((ychunks, xchunks))
        if halo:
            values = da.overlap.overlap(values, depth={0: ydepth, 1: xdepth}, boundary="none")
        extra_extended.append(values)
    out_chunks = extended[-1].chunks
    pad_to = (max(out_chunks[1]), max(out_chunks[2]))
    mapped = da.map_blocks(
        _apply_block,
        *extended,
        *extra_extended,
        kernel=kernel,
        extra_names=extra_names,
        padding=padding,
        pad_to=pad_to,
        drop_axis=0,
        chunks=out_chunks,
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
        token=f"stf-{getattr(kernel, '__name__', 'kernel')}",
        **kernel_kwargs,
    )
    if not halo:
        return mapped
    return da.overlap.trim_internal(mapped, {0: 0, 1: ydepth, 2: xdepth}, boundary="none")


def _chunk_to_device(chunk: np.ndarray) -> Any:
    """One stored chunk as a float32 array on JAX's default device (the copy starts at once, so it
    runs while other tasks read the next chunks)."""
    import jax

    return jax.device_put(np.asarray(chunk, np.float32))


@functools.lru_cache(maxsize=1)
def _joiner() -> Callable[[list[Any]], list[Any]]:
    """Jitted: each array's chunks (nested lists as ``dask.array.Array.to_delayed`` lays them out)
    joined into one array on the device; all the inputs in one program, so a scene's first run
    compiles (or loads from JAX's disk cache) one program, not one per input."""
    import jax
    import jax.numpy as jnp

    def join_chunks(arrays: list[Any]) -> list[Any]:  # the name JAX's compile logs and disk cache show
        return [jnp.block(pieces) for pieces in arrays]

    return jax.jit(join_chunks)


def _join_on_device(*arrays: list[Any]) -> list[Any]:
    """The inputs, each given as its chunks on the device, joined there (:func:`_joiner`)."""
    return _joiner()(list(arrays))


def _sent(array: Any) -> list[Any]:
    """``dask.delayed`` of ``array``'s chunks sent to JAX's device one task each, as each is read,
    in nested lists laid out as the chunks."""
    import dask

    chunks = array.to_delayed()
    sent = np.empty(chunks.shape, dtype=object)
    for index in np.ndindex(chunks.shape):
        sent[index] = dask.delayed(_chunk_to_device, pure=True)(chunks[index])
    return sent.tolist()


def _out_of_device_memory(err: Exception) -> bool:
    """Whether ``err`` is XLA's report of a device out of memory."""
    return "RESOURCE_EXHAUSTED" in str(err)


def _tiled(arrays: list[Any], *, kernel: Callable[..., np.ndarray], halo: int, align: int, parts: int,
           **kwargs: Any) -> np.ndarray:
    """:func:`_apply_block` on overlapping tiles of the whole-scene ``arrays`` (about ``parts`` per
    axis, cut as :func:`map_overlapping` cuts blocks: aligned, ``halo`` of context each side,
    none beyond the scene), the tiles' predictions joined on the host."""
    height, width = arrays[2].shape[-2:]
    ychunks, xchunks = plan_chunks((height, width), (-(-height // parts), -(-width // parts)), halo=halo, align=align)
    out = np.empty((arrays[2].shape[0], height, width), np.float32)
    y0 = 0
    for ny in ychunks:
        x0 = 0
        for nx in xchunks:
            ya, xa = max(y0 - halo, 0), max(x0 - halo, 0)
            window = (..., slice(ya, min(y0 + ny + halo, height)), slice(xa, min(x0 + nx + halo, width)))
            block = _apply_block(*(a[window] for a in arrays), kernel=kernel, **kwargs)
            out[:, y0 : y0 + ny, x0 : x0 + nx] = block[:, y0 - ya : y0 - ya + ny, x0 - xa : x0 - xa + nx]
            x0 += nx
        y0 += ny
    return out


def _apply_scene_block(arrays: list[Any], *, kernel: Callable[..., np.ndarray], halo: int, align: int,
                       **kwargs: Any) -> np.ndarray:
    """:func:`_apply_block` on the whole scene on the device; where the device runs out of memory
    (another process holds part of it, or the method needs more than
    :data:`DEVICE_BYTES_PER_PIXEL`), on overlapping tiles of the scene, halved along each axis
    until they fit: the numbers of the engine's chunked run. The block's size is remembered, so
    later scenes as large start with the cube's chunks (:func:`default_device_block_pixels`)."""
    parts = 1
    while True:
        try:
            if parts == 1:
                return _apply_block(*arrays, kernel=kernel, **kwargs)
            return _tiled(arrays, kernel=kernel, halo=halo, align=align, parts=parts, **kwargs)
        except Exception as err:  # XLA's runtime error; its type moved between JAX versions
            side = max(arrays[2].shape[-2:])
            if not _out_of_device_memory(err) or -(-side // parts) <= max(2 * halo, align):
                raise
        if parts == 1:
            _TOO_LARGE.append(math.prod(arrays[2].shape[-2:]))
        parts *= 2
        log.warning(
            "the device ran out of memory for a block of %d x %d pixels; fusing it in %d x %d tiles "
            "(set %s to fewer pixels, or 0, to start with the cube's chunks)",
            *arrays[2].shape[-2:], parts, parts, DEVICE_BLOCK_VARIABLE,
        )


def map_on_device(
    kernel: Callable[..., np.ndarray],
    fine: Any,
    coarse: Any,
    coarse_target: Any,
    *,
    extra: Mapping[str, Any] | None = None,
    out_chunks: tuple[tuple[int, ...], tuple[int, ...]],
    halo: int,
    align: int = 1,
    **kernel_kwargs: Any,
) -> Any:
    """Apply ``kernel`` to the whole scene as one block on JAX's device, without a halo.

    Each chunk of the Dask inputs goes to the device in its own task as soon as it is read, so
    the copies overlap the reads of the others, and the block is assembled there: no host
    concatenation, and no halo recomputed between blocks. For a kernel that takes device arrays
    (``MethodSpec.device_inputs``) on this process's GPU, for a scene that fits on it; where the
    device runs out of memory all the same, the task fuses overlapping tiles of the scene
    (:func:`_apply_scene_block`).

    Parameters
    ----------
    kernel, fine, coarse, coarse_target, extra, kernel_kwargs
        As for :func:`map_overlapping` (``kernel_kwargs`` may hold ``dask.delayed`` values).
    out_chunks : (tuple of int, tuple of int)
        The result's ``(y, x)`` chunks (e.g. the cube's, so a write runs one task per stored chunk).
    halo, align : int
        As for :func:`map_overlapping`: how the scene is cut into tiles where the device runs out
        of memory for it whole (:func:`_apply_scene_block`).

    Returns
    -------
    dask.array.Array ``(band, y, x)`` float32
        Lazy: building it reads and computes nothing.
    """
    import dask
    import dask.array as da

    extra = dict(extra or {})
    joined = dask.delayed(_join_on_device, pure=True)(
        *(_sent(da.asarray(a)) for a in (fine, coarse, coarse_target, *extra.values()))
    )
    block = dask.delayed(_apply_scene_block, pure=True)(
        joined, kernel=kernel, halo=halo, align=align, extra_names=tuple(extra), padding="none", pad_to=None,
        **kernel_kwargs,
    )
    shape = (coarse_target.shape[0], *coarse_target.shape[-2:])
    whole = da.from_delayed(block, shape, dtype=np.float32, meta=np.empty((0, 0, 0), np.float32))
    return whole.rechunk({0: -1, 1: out_chunks[0], 2: out_chunks[1]})


def fill_statistics(
    statistics: SceneStatistics[P] | None, fine: Any, coarse: Any, coarse_target: Any, params: P
) -> P | Any:
    """A method's parameters with its scene-wide statistics filled in (``MethodSpec.statistics``).

    The method's ``summarize`` reduces the whole arrays (lazily for Dask); its NumPy ``fit`` then
    runs now for NumPy input, or as one ``dask.delayed`` task for Dask input (the return value is
    then a ``Delayed`` params, passed to every block), so building the graph computes nothing.
    """
    if statistics is None:
        return params
    summaries = statistics.summarize(fine, coarse, coarse_target, params)
    if summaries is None:
        return params
    if any(is_dask_array(a) for a in summaries):
        import dask

        return dask.delayed(statistics.fit, pure=True)(params, *summaries)
    return statistics.fit(params, *summaries)

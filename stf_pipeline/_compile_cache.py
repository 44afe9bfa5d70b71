"""JAX's persistent compilation cache, on for every use of the package (``stf`` and the Python API).

A jitted kernel or network compiles the first time it meets a shape in a process. With the cache on,
JAX stores each compiled program on disk and a later process loads it instead of compiling again.
:func:`enable_compilation_cache` turns it on and is called where the package first uses JAX (a
jitted backend chosen for :func:`stf_pipeline.fuse`, training a learned method, asking JAX for the
device), before JAX is imported where possible, so ``import stf_pipeline`` never imports JAX.

Where: ``$JAX_COMPILATION_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/stf_pipeline/jax``
(``~/.cache/stf_pipeline/jax``); delete the folder to clear it. ``STF_JAX_CACHE=0`` turns it off
(a compilation cache set up by the user is never replaced).

JAX writes only programs that took at least ``jax_persistent_cache_min_compile_time_secs`` to
compile, 1 s by JAX's default. Many of a scene's programs compile in less (on a CPU, STARFM's and
ESTARFM's; on a GPU, some of their Pallas programs), so a new process compiled them again; where
the package sets the cache up it lowers that minimum to :data:`MIN_COMPILE_SECONDS`
(``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` set by the user wins). Measurements:
``docs/benchmarks.md``, "Compilation".
"""

from __future__ import annotations

import os
import sys

#: Environment variable that turns the cache off when set to ``0`` (or ``false``, ``no``, ``off``).
OPT_OUT_VARIABLE = "STF_JAX_CACHE"
#: JAX's variable for the shortest compile time of a program it writes to the cache
MIN_COMPILE_VARIABLE = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
#: the package's value of :data:`MIN_COMPILE_VARIABLE`: programs that compile in 0.1 s or more are
#: kept (a scene's kernels), the many trivial ones of eager array operations are not
MIN_COMPILE_SECONDS = 0.1


def compilation_cache_dir() -> str:
    """Where the package keeps JAX's compiled programs: ``$JAX_COMPILATION_CACHE_DIR`` when set, else
    ``$XDG_CACHE_HOME/stf_pipeline/jax`` (``~/.cache/stf_pipeline/jax``)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "stf_pipeline", "jax")


def cache_wanted() -> bool:
    """False when ``STF_JAX_CACHE`` is ``0``, ``false``, ``no`` or ``off`` (any case), else True."""
    return os.environ.get(OPT_OUT_VARIABLE, "1").strip().lower() not in ("0", "false", "no", "off")


def enable_compilation_cache() -> str | None:
    """Turn JAX's persistent compilation cache on (idempotent); the folder in use, or ``None`` when off.

    Before JAX is imported this only sets ``JAX_COMPILATION_CACHE_DIR`` (unless already set), which
    JAX reads on import, here and in the worker processes started later. Once JAX is imported it sets
    ``jax_compilation_cache_dir`` if nothing else did, and makes JAX check for the cache again at the
    next compilation (JAX decides once per process, at its first compilation). A folder the user
    configured through ``jax.config`` is kept, and then neither the minimum compile time nor the
    environment (which later Dask workers inherit) is changed. With ``STF_JAX_CACHE=0`` nothing
    is changed.
    """
    if not cache_wanted():
        return None
    path = compilation_cache_dir()
    current = None
    if "jax" in sys.modules:
        import jax

        current = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]  # a flag, set at run time
        if current and current != path:  # the user's own cache, its minimum and the workers' environment alone
            return str(current)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", path)
    user_minimum = MIN_COMPILE_VARIABLE in os.environ
    os.environ.setdefault(MIN_COMPILE_VARIABLE, str(MIN_COMPILE_SECONDS))
    if "jax" not in sys.modules:
        return path
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if not user_minimum:  # JAX read its variables when imported, before this one was set
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    if current:  # JAX took the folder from $JAX_COMPILATION_CACHE_DIR when imported
        return path
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()
    return path

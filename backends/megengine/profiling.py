"""MegEngine fastrun: convolution and matmul algorithms chosen by timing the candidates on this
machine (execution strategy PROFILE, `megengine.config.benchmark_kernel`) instead of MegEngine's
heuristic.

Profiled choices are kept in MegEngine's persistent cache, which MegEngine registers when it is
imported: the file `$MGE_FASTRUN_CACHE_DIR/cache.bin` (default
`~/.cache/megengine/persistent_cache/cache.bin`, under `$MGE_HOME` or `$XDG_CACHE_HOME` when set),
or memory only with `MGE_FASTRUN_CACHE_TYPE=MEMORY`. `fastrun()` flushes it when it ends, so each
convolution shape is profiled once per machine: the first fastrun call of a new shape pays the
profiling (seconds to minutes for a whole model on a small CPU), later calls and later processes
do not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from .layers import mge

PROFILE = "PROFILE"


def flush_profile_cache() -> None:
    """Write MegEngine's persistent cache (profiled algorithm choices) to its file now."""
    mge._persistent_cache.flush()


@contextlib.contextmanager
def fastrun(enabled: bool = True) -> Iterator[None]:
    """Within the block, eager MegEngine ops (and graphs traced inside it) select their
    algorithms by profiling; the previous setting is restored and the cache flushed on exit.
    `enabled=False` changes nothing. (MegEngine clears its in-process algorithm choices when
    the setting changes; they are re-read from the persistent cache, not re-profiled.)"""
    if not enabled:
        yield
        return
    previous = mge.config.benchmark_kernel
    mge.config.benchmark_kernel = True
    try:
        yield
    finally:
        mge.config.benchmark_kernel = previous
        flush_profile_cache()


def profile_graph(outputs: Sequence[object]) -> None:
    """Set the algorithm strategy of every operator of a loaded graph (its output vars) to
    PROFILE in place, before the graph is compiled."""
    from megengine.core.tensor import megbrain_graph as G

    G.modify_opr_algo_strategy_inplace(list(outputs), PROFILE)


__all__ = ["fastrun", "flush_profile_cache", "profile_graph", "PROFILE"]

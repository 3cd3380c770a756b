"""A small pass manager: runs `Graph -> Graph` passes in order, times them, can verify
after each and dump the IR after a named pass, and names the failing pass and the ones
that ran before it.

    >>> g = run_passes(graph, [remove_noops, eliminate_dead_code], verify_each=True)  # doctest: +SKIP
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

from autopar.compiler.ir import Graph
from autopar.compiler.verify import verify

Pass = Callable[[Graph], Graph]


class PassError(Exception):
    """A pass raised or left an invalid graph."""


def run_passes(graph: Graph, passes: Sequence[Pass], verify_each: bool = False,
               dump_after: str | None = None, timings: dict | None = None) -> Graph:
    done: list[str] = []
    for p in passes:
        name = p.__name__
        t0 = time.perf_counter()
        try:
            graph = p(graph)
            if verify_each:
                verify(graph)
        except Exception as e:
            before = ", ".join(done) or "nothing"
            raise PassError(f"pass '{name}' failed (after {before}): {type(e).__name__}: {e}") from e
        if timings is not None:
            timings[name] = time.perf_counter() - t0
        done.append(name)
        if dump_after == name:
            print(f"# IR after {name}\n{graph}")
    return graph

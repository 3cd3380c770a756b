"""Gradient buckets: which gradients are reduced together, and the order the program lists them.

Standard library only: the overlap pass (passes/overlap.py) plans with it and the runtime
(backends/runtime/overlap.py) rebuilds the same buckets from the program's GRAD_ORDER, so
the prediction and the program cannot disagree.

`fill` walks gradients in the order backward finishes them and closes a bucket when the next
gradient would overflow it: the first bucket of each group (one dtype, one set of axes) holds
up to `first_cap` bytes, later ones `cap` (DDP's 1 MiB and 25 MiB). A gradient larger than
the cap gets a bucket of its own.

`fold` writes that order compactly: a run of blocks of one module list (`transformer.h.3.*`,
`transformer.h.2.*`, ...) whose gradients come in the same order with the same axes becomes
one row `("transformer.h.*", [rest, ...], axes)` meaning "every block, last first"; `expand`
undoes it.
"""
from __future__ import annotations

import re

# A model whose gradients fill fewer than MIN_BUCKETS buckets of the plan's size would reduce
# nearly all of them in one bucket at the very end of backward, hiding nothing: its buckets
# are a MIN_BUCKETS-th of all gradients instead (the first one no larger).
MIN_BUCKETS = 4


def caps(total: int, bucket_bytes: int, first_bucket_bytes: int) -> tuple[int, int]:
    """(first bucket's cap, the others' cap) for `total` bytes of gradients.

        >>> caps(400 << 10, 25 << 20, 1 << 20)      # a small model: four buckets of 100 KiB
        (102400, 102400)
        >>> caps(16 << 20, 25 << 20, 1 << 20)       # 4 MiB buckets, DDP's small first one
        (1048576, 4194304)
        >>> caps(1 << 30, 25 << 20, 1 << 20)        # DDP's sizes
        (1048576, 26214400)
    """
    cap = max(1, min(int(bucket_bytes), -(-int(total) // MIN_BUCKETS)))
    return min(int(first_bucket_bytes), cap), cap


def fill(items, first_cap: int, cap: int) -> list[list[int]]:
    """`items`: (group key, bytes) in backward order -> buckets as lists of item indices,
    ordered by when each bucket closes (the order the program launches them)."""
    open_: dict = {}
    size: dict = {}
    started: set = set()
    closed: list[tuple[int, list[int]]] = []       # (index of the item that completes it, members)
    for i, (key, b) in enumerate(items):
        limit = cap if key in started else first_cap
        if open_.get(key) and size[key] + b > limit:
            members = open_.pop(key)
            closed.append((members[-1], members))
            started.add(key)
            size[key] = 0
        open_.setdefault(key, []).append(i)
        size[key] = size.get(key, 0) + b
    closed += [(m[-1], m) for m in open_.values()]
    closed.sort(key=lambda c: c[0])
    return [m for _, m in closed]


_BLOCK = re.compile(r"^(?P<list>.+)\.(?P<index>\d+)\.(?P<rest>.+)$")


def fold(order: list[tuple], block_lists: list[str]) -> list[tuple]:
    """(name, axes[, kind]) rows -> rows where a run of whole blocks, last block first, is
    one `(f"{list}.*", [(rest, axes[, kind]), ...], count)` row."""
    out: list[tuple] = []
    i = 0
    while i < len(order):
        name = order[i][0]
        m = _BLOCK.match(name)
        if not m or m["list"] not in block_lists:
            out.append(order[i])
            i += 1
            continue
        lst, first = m["list"], int(m["index"])

        def block_at(j, index):
            rows = []
            while j < len(order):
                mm = _BLOCK.match(order[j][0])
                if not mm or mm["list"] != lst or int(mm["index"]) != index:
                    break
                rows.append((mm["rest"], *order[j][1:]))
                j += 1
            return rows, j
        template, j = block_at(i, first)
        index, count = first - 1, 1
        while index >= 0:
            rows, k = block_at(j, index)
            if rows != template:
                break
            j, index, count = k, index - 1, count + 1
        if count > 1 and index == -1 and template:
            out.append((f"{lst}.*", template, first + 1))
            i = j
        else:
            out.extend(order[i:i + len(template)])
            i += len(template)
    return out


def expand(rows) -> list[tuple]:
    """Inverse of `fold`: `(f"{list}.*", [(rest, axes[, kind]), ...], n)` -> blocks n-1 ... 0."""
    out = []
    for row in rows:
        if isinstance(row[1], list):
            pattern, template, n = row
            lst = pattern[:-2]
            for index in range(n - 1, -1, -1):
                out += [(f"{lst}.{index}.{e[0]}", tuple(e[1]), *e[2:]) for e in template]
        else:
            out.append((row[0], tuple(row[1]), *row[2:]))
    return out


__all__ = ["fill", "fold", "expand"]

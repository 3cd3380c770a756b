"""The collective table: how one mesh axis of a value goes from the layout its producer
gives to the layout a consumer needs, and what each collective moves, forward and backward.

This module is the one place that knows it. The placement algebra (`sharding.reshard`,
what the cost model prices), plan application (the collective nodes of a rank's program),
the code generator (the `rt.*` calls and their comments) and the runtime (the autograd
Functions the program calls, and the bytes they record) all read the tables below, so the
bytes the plan predicts are the bytes the program moves by construction. It imports
nothing (the runtime reads it without loading the compiler).

One axis at a time (`n` ranks on it), a value placed `src` goes to `dst`; `split` says the
consuming op divides its work over this axis, so an operand it reads replicated gets a
partial-sum gradient there (data-parallel gradient reduction and Megatron's f/g pairs):

    src -> dst   consumer splits    program step                      backward
    R    -> R    yes                copy_to                           all_reduce
    R    -> S(d)                    scatter(dim=d)                    all_gather
    S(d) -> R    no / yes           all_gather(dim=d, partial_grad)   slice / reduce_scatter
    S(a) -> S(b)                    all_to_all(split_dim=b, concat=a) all_to_all back
    P    -> R    no / yes           all_reduce (+ copy_to)            identity (all_reduce)
    P    -> S(d)                    reduce_scatter(dim=d)             all_gather

    >>> transition("S(1)", "R", split=True, needs_grad=True)
    [('all_gather', (('dim', 1), ('partial_grad', True)))]
    >>> [m.kind for m in moves("all_gather", {"dim": 1, "partial_grad": True})]
    ['all_gather', 'reduce_scatter']

Byte convention: a collective moving data records S, the bytes of the tensor unsharded
along its axis -- the input of an all_reduce, reduce_scatter or all_to_all, the output of
an all_gather (`ACTION_BYTES`). A step's forward action reads the step's input `x` and
writes its output `y`; its backward action reads the gradient of `y` and writes that of
`x`, so forward and backward bytes follow from the sizes of `x` and `y` alone.
"""
from __future__ import annotations

from dataclasses import dataclass

# what a data-moving action records: the size of its "in"put or its "out"put tensor
ACTION_BYTES = {"all_reduce": "in", "all_gather": "out", "reduce_scatter": "in", "all_to_all": "in"}
KINDS = tuple(ACTION_BYTES)


@dataclass(frozen=True)
class Move:
    """One direction of a collective step: `action` is identity | slice | all_reduce |
    all_gather | reduce_scatter | all_to_all; `dims` name the step's attributes that give
    the action's dims (`("dim",)`, or `("split_dim", "concat_dim")` for all_to_all, in the
    action's order)."""
    action: str
    dims: tuple[str, ...] = ()

    @property
    def kind(self) -> str | None:
        """The traffic kind this move records, None when it moves no data."""
        return self.action if self.action in ACTION_BYTES else None

    def dim_values(self, attrs: dict) -> tuple[int, ...]:
        return tuple(attrs[d] for d in self.dims)


@dataclass(frozen=True)
class CollectiveOp:
    """A program step: its attributes (after `x, mesh, axis`), what it does forward and
    backward, and the words the generated program comments it with."""
    name: str
    attrs: tuple[str, ...]
    forward: Move
    backward: Move
    why: str
    backward_partial: Move | None = None     # all_gather with partial_grad=True


IDENTITY = Move("identity")

OPS: dict[str, CollectiveOp] = {op.name: op for op in [
    CollectiveOp("copy_to", (), IDENTITY, Move("all_reduce"),
                 "the gradient is a partial sum: all_reduce it in backward"),
    CollectiveOp("all_reduce", (), Move("all_reduce"), IDENTITY, "sum the partial results"),
    CollectiveOp("all_gather", ("dim", "partial_grad"), Move("all_gather", ("dim",)),
                 Move("slice", ("dim",)), "gather the shards",
                 backward_partial=Move("reduce_scatter", ("dim",))),
    CollectiveOp("scatter", ("dim",), Move("slice", ("dim",)), Move("all_gather", ("dim",)),
                 "keep this rank's slice"),
    CollectiveOp("reduce_scatter", ("dim",), Move("reduce_scatter", ("dim",)),
                 Move("all_gather", ("dim",)), "sum the partial results, keep this rank's slice"),
    CollectiveOp("all_to_all", ("split_dim", "concat_dim"),
                 Move("all_to_all", ("split_dim", "concat_dim")),
                 Move("all_to_all", ("concat_dim", "split_dim")), "re-shard on another dim"),
]}


def moves(op: str, attrs: dict) -> tuple[Move, Move]:
    """(forward, backward) of a program step."""
    d = OPS[op]
    back = d.backward_partial if d.backward_partial is not None and attrs.get("partial_grad") else d.backward
    return d.forward, back


def shard_dim(p: str) -> int | None:
    return int(p[2:-1]) if p.startswith("S(") else None


class ReshardError(ValueError):
    """No step turns one placement into the other (a partial-sum target)."""


def transition(src: str, dst: str, split: bool, needs_grad: bool) -> list[tuple[str, tuple]]:
    """The program steps that take one axis of a value from placement `src` to `dst`:
    a list of (op, attrs) with attrs as (name, value) pairs in the op's order. `split`: the
    consumer divides its work over this axis; without a gradient there is nothing to
    reduce, so no copy_to is needed and an all_gather's backward is never partial."""
    split = split and needs_grad
    sd, dd = shard_dim(src), shard_dim(dst)
    if src == dst:
        return [("copy_to", ())] if dst == "R" and split else []
    if src == "R" and dd is not None:
        return [("scatter", (("dim", dd),))]
    if sd is not None and dst == "R":
        return [("all_gather", (("dim", sd), ("partial_grad", split)))]
    if sd is not None and dd is not None:
        return [("all_to_all", (("split_dim", dd), ("concat_dim", sd)))]
    if src == "P" and dst == "R":
        return [("all_reduce", ())] + ([("copy_to", ())] if split else [])
    if src == "P" and dd is not None:
        return [("reduce_scatter", (("dim", dd),))]
    if dst == "P":
        raise ReshardError("no consumer takes a partial-sum operand")
    raise ReshardError(f"cannot reshard {src} -> {dst}")


def traffic(op: str, attrs: dict, x_bytes: int, y_bytes: int,
            needs_grad: bool) -> list[tuple[str, str, int]]:
    """(kind, phase, bytes) that one program step records, given the bytes of its input `x`
    and output `y` on this rank: the forward move always, the backward move when the value
    needs a gradient. A move that moves no data records nothing."""
    fwd, bwd = moves(op, attrs)
    out = []
    if fwd.kind:
        out.append((fwd.kind, "forward", x_bytes if ACTION_BYTES[fwd.kind] == "in" else y_bytes))
    if needs_grad and bwd.kind:
        # backward reads the gradient of y (sized like y) and writes the gradient of x
        out.append((bwd.kind, "backward", y_bytes if ACTION_BYTES[bwd.kind] == "in" else x_bytes))
    return out


def call_source(op: str, x: str, axis: str, attrs: dict) -> str:
    """The generated program's call of a step: `rt.all_gather(h, mesh, "tp", dim=1)`."""
    args = []
    for name in OPS[op].attrs:
        v = attrs[name]
        if name == "partial_grad":
            if v:
                args.append("partial_grad=True")
            continue
        args.append(f"{name}={v}")
    return f'rt.{op}({x}, mesh, "{axis}"{"".join(", " + a for a in args)})'


__all__ = ["OPS", "CollectiveOp", "Move", "ACTION_BYTES", "KINDS", "moves", "transition", "traffic",
           "call_source", "shard_dim", "ReshardError"]

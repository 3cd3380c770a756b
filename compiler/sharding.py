"""The placement algebra shared by the search, the cost model and the code generators.

A mesh is an ordered mapping of axis names to sizes (`{"dp": 2, "tp": 4}`). A layout is
one placement per axis in mesh order: `"R"` (replicate), `"P"` (partial sum) or `"S(d)"`
(shard on dim d). A strategy of a node is one dim label (or None) per axis: the label
that axis splits.

    >>> anno = dims.parse("b k+, n k+, n -> b n")
    >>> input_layout(anno, ("b", "n"), 0)      # dp splits the batch, tp the output features
    ('S(0)', 'R')
    >>> output_layout(anno, (None, "k"), 0)    # tp splits the contraction: partial sums
    ('R', 'P')

Resharding a value from the layout its producer gives to the layout a consumer needs is a
list of program steps, one or two per axis that differs, in mesh order; which step, its
backward and its bytes come from the collective table (`compiler/collectives.py`). An
operand consumed as `R` on an axis that the consumer splits gets a partial-sum gradient
there: an all_reduce in backward (data-parallel gradient reduction is this rule applied to
parameters). Bytes are S, the tensor unsharded along the step's axis and sharded as the
layout reached so far says along the others (all_to_all: this rank's S/n).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from math import prod
from typing import Iterable, Sequence

from autopar.compiler import collectives
from autopar.compiler.dims import DimAnno
from autopar.compiler.errors import InputError

Mesh = dict  # ordered: axis -> size
Layout = tuple  # tuple[str, ...], one placement per axis
Strategy = tuple  # tuple[str | None, ...], one label per axis


def parse_mesh(text: str) -> dict[str, int]:
    """`"dp=2,tp=4"` -> {"dp": 2, "tp": 4}."""
    mesh = {}
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if "=" not in part:
            raise InputError(f"mesh axis '{part}' needs a size: write it as {part}=N (e.g. dp=2,tp=4)")
        name, size = part.split("=", 1)
        if not name.isidentifier():
            raise InputError(f"mesh axis name '{name}' must be an identifier like dp or tp")
        if not size.isdigit() or int(size) < 1:
            raise InputError(f"mesh axis {name}={size}: the size must be a positive integer")
        if name in mesh:
            raise InputError(f"mesh axis '{name}' is given twice")
        mesh[name] = int(size)
    if not mesh:
        raise InputError("empty mesh: give axes like dp=2,tp=4")
    return mesh


def format_mesh(mesh: dict[str, int]) -> str:
    return ",".join(f"{a}={n}" for a, n in mesh.items())


def shard(d: int) -> str:
    return f"S({d})"


shard_dim = collectives.shard_dim


def replicated_layout(mesh: dict[str, int]) -> Layout:
    return tuple("R" for _ in mesh)


def format_layout(mesh: dict[str, int], layout: Layout) -> str:
    return "{" + ", ".join(f"{a}:{p}" for a, p in zip(mesh, layout)) + "}"


# ---- strategies -----------------------------------------------------------------------

# An axis with this name is the expert axis: an op with experts (a joint label, the
# mixture-of-experts op) is expert-parallel on it, its experts and their tokens split there,
# as a user naming the axis asks; every other op may use it like any axis.
EXPERT_AXIS = "ep"


def enumerate_strategies(anno: DimAnno, in_shapes, out_shapes, mesh: dict[str, int]) -> list[Strategy]:
    """Every assignment of at most one splittable label per axis such that each label is
    split by at most one axis and the axis size divides every size the label takes.
    Axes of size 1 never split; on EXPERT_AXIS an op with experts splits its experts
    (InputError when the axis size does not divide them). The all-replicated strategy
    comes first."""
    sizes = anno.label_sizes(in_shapes, out_shapes)
    cand = [lab for lab in anno.splittable()]
    per_axis = []
    for axis, n in mesh.items():
        opts: list = [None]
        if n > 1:
            opts += [lab for lab in cand if all(s % n == 0 and s >= n for s in sizes.get(lab, [0]))]
        if axis == EXPERT_AXIS and n > 1 and anno.joint:
            opts = [lab for lab, _ in anno.joint if lab in opts]
            if not opts:
                experts = [sizes.get(lab, [0])[0] for lab, _ in anno.joint]
                raise InputError(f"mesh axis {axis}={n} is the expert axis, but it does not divide "
                                 f"the {experts[0]} experts (and their tokens, sizes "
                                 f"{sorted(set(sizes.get(anno.joint[0][1], [])))}) of this op; "
                                 f"use an {axis} size that divides both, or name the axis otherwise")
        per_axis.append(opts)
    out = []
    for combo in itertools.product(*per_axis):
        labs = [c for c in combo if c is not None]
        if len(labs) != len(set(labs)) or any(anno.partner(c) in labs for c in labs):
            continue
        out.append(tuple(combo))
    return out


def source_annotation(shape: Sequence[int]) -> DimAnno:
    """Inputs and parameters: any dim may be split, the value is its own output."""
    labs = tuple(f"d{i}" for i in range(len(shape)))
    return DimAnno((), (labs,))


def input_layout(anno: DimAnno, strategy: Strategy, i: int) -> Layout:
    labs = anno.inputs[i]
    return tuple("R" if (d := split_dim(anno, labs, lab)) is None else shard(d) for lab in strategy)


def split_dim(anno: DimAnno, labs, lab) -> int | None:
    """Which of a tensor's dims (labelled `labs`) the strategy label `lab` splits: its
    own, else its joint partner's (`DimAnno.joint`), else None."""
    if lab is None:
        return None
    if lab in labs:
        return labs.index(lab)
    partner = anno.partner(lab)
    return labs.index(partner) if partner is not None and partner in labs else None


def output_layout(anno: DimAnno, strategy: Strategy, j: int) -> Layout:
    labs = anno.outputs[j]
    out = []
    for lab in strategy:
        d = split_dim(anno, labs, lab)
        if lab is None:
            out.append("R")
        elif d is not None:
            out.append(shard(d))
        elif lab in anno.reduce:
            out.append("P")
        else:
            out.append("R")   # a label only on inputs that is not contracted: cannot occur
    return tuple(out)


def split_axes(strategy: Strategy) -> frozenset[int]:
    """Mesh axis positions this strategy splits (the op's work is divided over them)."""
    return frozenset(i for i, lab in enumerate(strategy) if lab is not None)


def local_shape(shape: Sequence[int], layout: Layout, mesh: dict[str, int]) -> tuple[int, ...]:
    out = list(shape)
    for p, n in zip(layout, mesh.values()):
        d = shard_dim(p)
        if d is not None:
            out[d] //= n
    return tuple(out)


# ---- resharding -----------------------------------------------------------------------

@dataclass(frozen=True)
class Collective:
    """One collective on one axis. `bytes` per the module's convention."""
    kind: str            # all_reduce | all_gather | reduce_scatter | all_to_all
    axis: str
    bytes: int
    phase: str           # forward | backward (| recompute | optimizer, from the cost model)
    dim: int | None = None
    dim2: int | None = None

    def __str__(self) -> str:
        return f"{self.kind}({self.axis}) {self.bytes}B {self.phase}"


@dataclass(frozen=True)
class Step:
    """One program step of a reshard (collectives.OPS): on `axis`, from layout `before` to
    `after`; `x_bytes` / `y_bytes` are its input / output bytes on one rank."""
    axis: str
    op: str
    attrs: tuple
    before: Layout
    after: Layout
    x_bytes: int
    y_bytes: int

    def collectives(self, needs_grad: bool) -> list[Collective]:
        at = dict(self.attrs)
        dims = [v for k, v in self.attrs if k != "partial_grad"]
        return [Collective(kind, self.axis, b, phase, *dims[:2])
                for kind, phase, b in collectives.traffic(self.op, at, self.x_bytes, self.y_bytes,
                                                          needs_grad)]


def reshard_steps(src: Layout, dst: Layout, shape: Sequence[int], itemsize: int,
                  mesh: dict[str, int], consumer_splits: frozenset[int] = frozenset(),
                  needs_grad: bool = True) -> list[Step]:
    """The program steps turning `src` into `dst`, one axis at a time in mesh order
    (collectives.transition), each with the bytes of its input and output on the layout
    reached so far. `consumer_splits` are the axes the consuming op divides its work over."""
    cur = list(src)
    out: list[Step] = []
    axes = list(mesh.items())

    def step(i: int, op: str, attrs: tuple, placement: str) -> None:
        before = tuple(cur)
        x_bytes = prod(local_shape(shape, before, mesh)) * itemsize
        cur[i] = placement
        after = tuple(cur)
        out.append(Step(axes[i][0], op, attrs, before, after, x_bytes,
                        prod(local_shape(shape, after, mesh)) * itemsize))

    for i, (a, n) in enumerate(axes):
        s, d = cur[i], dst[i]
        if n == 1 or s == d and not (d == "R" and i in consumer_splits and needs_grad):
            cur[i] = d
            continue
        try:
            ops = collectives.transition(s, d, i in consumer_splits, needs_grad)
        except collectives.ReshardError as e:
            raise ValueError(f"{e} on axis {a}") from None
        # Where several axes split one dim, the chunks nest in mesh order (the earlier axis
        # outside). Splitting or gathering a dim on this axis while a later axis already splits
        # it would nest them the wrong way round: that later axis gathers first, and splits
        # again (a free slice) when the loop reaches it.
        touched = {x for x in (shard_dim(s), shard_dim(d)) if x is not None}
        for j in range(i + 1, len(axes)):
            if axes[j][1] > 1 and shard_dim(cur[j]) in touched:
                (op, attrs), = collectives.transition(cur[j], "R", False, needs_grad)
                step(j, op, attrs, "R")
        for op, attrs in ops:
            step(i, op, attrs, "R" if op == "all_reduce" else d)
        cur[i] = d
    return out


def reshard(src: Layout, dst: Layout, shape: Sequence[int], itemsize: int,
            mesh: dict[str, int], consumer_splits: frozenset[int] = frozenset(),
            needs_grad: bool = True) -> list[Collective]:
    """Collectives turning `src` into `dst` (forward) and the gradient back (backward):
    what `reshard_steps` records, step by step."""
    return [c for step in reshard_steps(src, dst, shape, itemsize, mesh, consumer_splits, needs_grad)
            for c in step.collectives(needs_grad)]


def collective_bytes(cols: Iterable[Collective]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for c in cols:
        out[(c.kind, c.axis)] = out.get((c.kind, c.axis), 0) + c.bytes
    return out


# ---- the vocab-parallel loss ----------------------------------------------------------------

# the loss reduces its rows' statistics in fp32 whatever the logits' dtype
LOSS_STAT_ITEMSIZE = 4


def split_class_axis(op: str, anno: DimAnno, strategy: Strategy, mesh: dict[str, int]) -> str | None:
    """The axis that splits a cross-entropy's class dim under `strategy` (its logits stay
    split and the vocab-parallel loss runs), else None.

        >>> split_class_axis("cross_entropy_loss", anno, ("n", "c"), {"dp": 2, "tp": 2})  # doctest: +SKIP
        'tp'
    """
    if op != "cross_entropy_loss" or "c" not in anno.reduce:
        return None
    return next((a for lab, a in zip(strategy, mesh) if lab == "c" and mesh[a] > 1), None)


def split_expert_axis(op: str, anno: DimAnno, strategy: Strategy, mesh: dict[str, int]) -> str | None:
    """The axis that splits a `moe_experts` op's experts with its tokens (the joint label
    "x") under `strategy`: the op runs expert-parallel there, else None."""
    if op != "moe_experts":
        return None
    return next((a for lab, a in zip(strategy, mesh) if lab == "x" and mesh[a] > 1), None)


# the per-expert row counts an expert-parallel layer exchanges first
COUNT_ITEMSIZE = 8


def expert_collectives(axis: str, experts: int, rows: int, row_bytes: int,
                       grads: int = 2) -> list[Collective]:
    """What an expert-parallel layer moves inside the op on `axis`: its (token, expert)
    rows' counts per expert (`experts` int64s, all_to_all), the `rows` rows to the experts'
    ranks and their results back (two all_to_alls in forward), and in backward the results'
    gradient out and, when the tokens need one, the rows' gradient back (`grads`). Each is counted by this rank's own rows, the side whose size routing does
    not change: the rows it sends, then the rows it gets back (backends/runtime/moe.py)."""
    b = rows * row_bytes
    cols = [Collective("all_to_all", axis, experts * COUNT_ITEMSIZE, "forward"),
            Collective("all_to_all", axis, b, "forward"), Collective("all_to_all", axis, b, "forward")]
    return cols + [Collective("all_to_all", axis, b, "backward") for _ in range(grads)]


def split_class_collectives(axis: str, rows: int) -> list[Collective]:
    """What the vocab-parallel loss moves inside the op on `axis` for `rows` local rows: one
    all_reduce(max) and one all_reduce(sum) of one fp32 value per row, in forward only (its
    backward needs no communication; backends/runtime/losses.py)."""
    b = rows * LOSS_STAT_ITEMSIZE
    return [Collective("all_reduce", axis, b, "forward"), Collective("all_reduce", axis, b, "forward")]


# ---- whole-graph derivation -------------------------------------------------------------

def producer_key(node) -> str:
    """Plans key a node's strategy by its first output's name."""
    return node.outputs[0].name


def node_annotations(graph) -> dict:
    from autopar.compiler.ops import node_anno
    return {producer_key(n): node_anno(n) for n in graph.nodes}


def derive_layouts(graph, mesh: dict[str, int], strategies: dict[str, Strategy],
                   annos: dict | None = None) -> dict[str, Layout]:
    """Value name -> layout, given a strategy for every producer. Sources (inputs,
    parameters) use `source_annotation`; a missing strategy means all-replicated."""
    annos = annos or node_annotations(graph)
    rep = tuple(None for _ in mesh)
    out: dict[str, Layout] = {}
    for v in (*graph.inputs, *graph.params):
        out[v.name] = output_layout(source_annotation(v.shape), tuple(strategies.get(v.name, rep)), 0)
    for n in graph.nodes:
        key = producer_key(n)
        s = tuple(strategies.get(key, rep))
        for j, v in enumerate(n.outputs):
            out[v.name] = output_layout(annos[key], s, j)
    return out


# ---- pins (hard constraints on layouts) ---------------------------------------------------

@dataclass(frozen=True)
class Pin:
    """A hard constraint for the search: value `value` must have `layout` (one entry per
    mesh axis: "R", "P", "S(d)" or None = free). `origin` says where it came from (a plan
    file line, a CLI flag) so an infeasible set of pins can be named."""
    value: str
    layout: tuple
    origin: str = ""

    def matches(self, layout: Sequence[str]) -> bool:
        return all(want is None or want == got for want, got in zip(self.layout, layout))

    def __str__(self) -> str:
        lay = ", ".join("*" if p is None else p for p in self.layout)
        return f"%{self.value} = ({lay})" + (f" [{self.origin}]" if self.origin else "")

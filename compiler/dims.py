"""Dim annotations: which tensor dims of an op may be split across a mesh axis.

An annotation names every dim of every input and output with a label, nnScaler-style:

    linear:  "b* k+, n k+, n -> b* n"

A label shared by an input and an output can be split consistently (each rank computes
its slice). `+` marks a contracted label: splitting it leaves each rank a partial sum
(`P`). `^` marks a label that must not be split (softmax's dim, a reshape's inner dim).
`None` (printed `1`) is a broadcast dim of size 1 that takes no label: the input is
replicated along any axis that splits the label it broadcasts against.

`mean` labels are contracted labels whose partial result must be divided by the number
of shards (a mean over a split dim): the sharding rewrite scales by 1/n.

`joint` pairs (label, partner) name a label whose split also splits every dim labelled
`partner`: the experts' dim of a mixture-of-experts layer splits together with its tokens
(expert parallelism, compiler/moe.py), while the tokens alone may still split without it.
"""
from __future__ import annotations

from dataclasses import dataclass

Labels = tuple  # tuple[str | None, ...]


@dataclass(frozen=True)
class DimAnno:
    inputs: tuple[Labels, ...]
    outputs: tuple[Labels, ...]
    reduce: frozenset[str] = frozenset()
    frozen: frozenset[str] = frozenset()
    mean: frozenset[str] = frozenset()
    joint: tuple[tuple[str, str], ...] = ()

    def partner(self, lab: str) -> str | None:
        """The label `lab` splits along with it (`joint`), else None."""
        return next((p for j, p in self.joint if j == lab), None)

    def labels(self) -> list[str]:
        """Every label, in first-appearance order (deterministic)."""
        seen: dict[str, None] = {}
        for dims in (*self.inputs, *self.outputs):
            for lab in dims:
                if lab is not None:
                    seen.setdefault(lab, None)
        return list(seen)

    def splittable(self) -> list[str]:
        outs = {lab for dims in self.outputs for lab in dims}
        return [lab for lab in self.labels()
                if lab not in self.frozen and (lab in outs or lab in self.reduce
                                               or self.partner(lab) in outs)]

    def label_sizes(self, in_shapes, out_shapes) -> dict[str, list[int]]:
        """Every size a label takes (reshapes map one label onto dims of several sizes)."""
        sizes: dict[str, list[int]] = {}
        for dims, shape in zip((*self.inputs, *self.outputs), (*in_shapes, *out_shapes)):
            for lab, s in zip(dims, shape):
                if lab is not None:
                    sizes.setdefault(lab, []).append(s)
        for lab, partner in self.joint:
            sizes.setdefault(lab, []).extend(sizes.get(partner, []))
        return sizes

    def __str__(self) -> str:
        def one(dims):
            return " ".join(
                "1" if lab is None else lab + ("+" if lab in self.reduce else "")
                + ("^" if lab in self.frozen else "") for lab in dims)
        text = ", ".join(one(d) for d in self.inputs) + " -> " + ", ".join(one(d) for d in self.outputs)
        return text + "".join(f"; {lab} splits {partner}" for lab, partner in self.joint)


def parse(text: str) -> DimAnno:
    """Parse nnScaler-style text: `parse("m k+, k+ n -> m n")`."""
    lhs, rhs = text.split("->")
    reduce, frozen = set(), set()

    def side(s):
        out = []
        for t in s.split(","):
            dims = []
            for tok in t.split():
                if tok == "1":
                    dims.append(None)
                    continue
                lab = tok.rstrip("+^*")
                if "+" in tok:
                    reduce.add(lab)
                if "^" in tok:
                    frozen.add(lab)
                dims.append(lab)
            out.append(tuple(dims))
        return tuple(out) if s.strip() else ((),)
    ins, outs = side(lhs), side(rhs)
    return DimAnno(ins, outs, frozenset(reduce), frozenset(frozen))


class Namer:
    """Hands out labels d0, d1, ... so annotations built from shapes stay deterministic."""

    def __init__(self, prefix: str = "d"):
        self.prefix, self.n = prefix, 0

    def __call__(self) -> str:
        self.n += 1
        return f"{self.prefix}{self.n - 1}"


def replicated(in_shapes, out_shapes) -> DimAnno:
    """Fallback for ops without a rule: every dim frozen, so only `R` is possible."""
    new = Namer("r")
    ins = tuple(tuple(new() for _ in s) for s in in_shapes)
    outs = tuple(tuple(new() for _ in s) for s in out_shapes)
    frozen = frozenset(lab for dims in (*ins, *outs) for lab in dims)
    return DimAnno(ins, outs, frozen=frozen)


def broadcast(in_shapes, out_shape, frozen_dims=()) -> DimAnno:
    """Elementwise ops with numpy broadcasting; `frozen_dims` are output dims not to split."""
    rank = len(out_shape)
    labels = [f"d{i}" for i in range(rank)]
    ins = []
    for shape in in_shapes:
        off = rank - len(shape)
        ins.append(tuple(None if (s == 1 and out_shape[off + i] != 1) else labels[off + i]
                         for i, s in enumerate(shape)))
    frozen = frozenset(labels[d % rank] for d in frozen_dims) if rank else frozenset()
    return DimAnno(tuple(ins), (tuple(labels),), frozen=frozen)


def reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of dims whose products match: ([0,1],[0]) for (B,T,C)->(B*T,C)."""
    groups, i, j = [], 0, 0
    while i < len(src) and j < len(dst):
        gi, gj, pi, pj = [i], [j], src[i], dst[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= src[i]; gi.append(i); i += 1
            else:
                pj *= dst[j]; gj.append(j); j += 1
        groups.append((gi, gj))
    if not groups:
        groups.append(([], []))
    groups[-1][0].extend(range(i, len(src)))   # trailing size-1 dims
    groups[-1][1].extend(range(j, len(dst)))
    return groups


def reshape(src, dst) -> DimAnno:
    """A view keeps the outermost non-1 dim of each merged/split group splittable: cutting
    (B*T) into n contiguous blocks is cutting B into n blocks when n divides B."""
    new = Namer("d")
    ins: list = [None] * len(src)
    outs: list = [None] * len(dst)
    frozen = set()
    for gi, gj in reshape_groups(tuple(src), tuple(dst)):
        big_i = [i for i in gi if src[i] != 1]
        big_j = [j for j in gj if dst[j] != 1]
        if big_i and big_j:
            lab = new()
            ins[big_i[0]] = lab
            outs[big_j[0]] = lab
            for i in big_i[1:]:
                ins[i] = new(); frozen.add(ins[i])
            for j in big_j[1:]:
                outs[j] = new(); frozen.add(outs[j])
        for i in gi:
            if ins[i] is None:
                ins[i] = new(); frozen.add(ins[i])
        for j in gj:
            if outs[j] is None:
                outs[j] = new(); frozen.add(outs[j])
    return DimAnno((tuple(ins),), (tuple(outs),), frozen=frozenset(frozen))


def permute(rank: int, order) -> DimAnno:
    labels = tuple(f"d{i}" for i in range(rank))
    return DimAnno((labels,), (tuple(labels[i] for i in order),))


__all__ = ["DimAnno", "parse", "replicated", "broadcast", "reshape", "reshape_groups",
           "permute", "Namer"]

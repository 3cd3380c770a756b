"""autopar's IR: a `Graph` of immutable `Node`s over `Value`s, and its printer.

A graph holds user inputs, parameters/buffers (named by their state-dict names), nodes in
topological order and outputs. Values are compared by identity; names are unique in a
graph and stable across runs, so the printed form is deterministic and golden-testable:

    >>> print(graph)                                      # doctest: +SKIP
    graph mlp(%x: f32[8,64], %target: f32[8,64]) {
      param %net.0.weight: f32[1024,64]
      %linear: f32[8,1024] = linear(%x, %net.0.weight, %net.0.bias)   # net.0
      ...
      return %mse_loss
    }
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

DTYPE_SHORT = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "bool", torch.complex64: "c64",
}


def dtype_short(dtype: torch.dtype) -> str:
    return DTYPE_SHORT.get(dtype, str(dtype).replace("torch.", ""))


class SymInt(int):
    """A size that came from the batch: its value in the example (an int everywhere the
    compiler computes with it) and its expression over the inputs' symbolic dims (`s0*s1`,
    from tracing with symbolic sizes), so the generated program can read it from the input
    (`B * T`) instead of hard-coding the example's."""

    def __new__(cls, value: int, expr: str):
        obj = super().__new__(cls, value)
        obj.expr = expr
        return obj

    def __reduce__(self):
        return (SymInt, (int(self), self.expr))

    def scaled(self, divisor: int) -> "SymInt":
        """This size split `divisor` ways (a rank's share of a sharded dim)."""
        return SymInt(int(self) // divisor, f"({self.expr})/{divisor}") if divisor != 1 else self


@dataclass(frozen=True, slots=True, eq=False)
class Value:
    """A tensor in the graph. `kind` is input | param | buffer | act.

    Params and buffers are named by their state-dict names; `requires_grad` is the
    user's flag for params (False for buffers and inputs)."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    kind: str = "act"
    requires_grad: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype, device="meta").element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def type_str(self) -> str:
        return f"{dtype_short(self.dtype)}[{','.join(str(s) for s in self.shape)}]"

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type_str()}"


@dataclass(frozen=True, slots=True)
class NodeMeta:
    """Where a node came from: the module path (e.g. `transformer.h.3.mlp.c_fc`, '' for
    the root), the front-end node it was lowered from, and the line of the user's code that
    made it (`q, k, v = self.c_attn(x).split(self.n_embd, dim=2)`; the generated program
    names values after it)."""
    module: str = ""
    source: str = ""
    line: str = ""


@dataclass(frozen=True, slots=True, eq=False)
class Node:
    """One op application. `inputs` are the tensor operands in schema order, `attrs` the
    non-tensor arguments (name -> python value, schema order), `outputs` its results."""
    op: str
    inputs: tuple[Value, ...]
    attrs: tuple[tuple[str, Any], ...]
    outputs: tuple[Value, ...]
    meta: NodeMeta = NodeMeta()

    @property
    def attr(self) -> dict[str, Any]:
        return dict(self.attrs)

    @property
    def output(self) -> Value:
        assert len(self.outputs) == 1, f"{self.op} has {len(self.outputs)} outputs"
        return self.outputs[0]

    def replace(self, **changes) -> "Node":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Piece:
    """Rows `start:stop` along `dim` of the state-dict tensor `source` (a fused QKV
    weight cut into its q, k and v parts so each can be sharded on its own)."""
    source: str
    dim: int
    start: int
    stop: int
    index: int
    count: int

    def cut(self, t):
        return t.narrow(self.dim, self.start, self.stop - self.start)


@dataclass
class Graph:
    """A whole model step: inputs, params, nodes (topological order), outputs.

    `aliases` maps a tied state-dict name to the parameter that holds it
    (`lm_head.weight -> transformer.wte.weight`); `notes` records what passes did."""
    name: str
    inputs: list[Value]
    params: list[Value]
    nodes: list[Node]
    outputs: list[Value]
    aliases: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # a parameter cut out of a fused state-dict tensor: name -> Piece
    pieces: dict[str, "Piece"] = field(default_factory=dict)
    # tensors torch.export lifted out of forward (buffers without a module), by name
    constants: dict[str, Any] = field(default_factory=dict)
    # input name -> its dims as symbols (`s0`) where tracing kept them symbolic, else ints
    input_sizes: dict[str, tuple] = field(default_factory=dict)

    def values(self) -> Iterator[Value]:
        yield from self.inputs
        yield from self.params
        for n in self.nodes:
            yield from n.outputs

    def param(self, name: str) -> Value:
        name = self.aliases.get(name, name)
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def producers(self) -> dict[Value, Node]:
        return {v: n for n in self.nodes for v in n.outputs}

    def users(self) -> dict[Value, list[Node]]:
        out: dict[Value, list[Node]] = {v: [] for v in self.values()}
        for n in self.nodes:
            for v in n.inputs:
                if n not in out[v]:
                    out[v].append(n)
        return out

    def copy(self, **changes) -> "Graph":
        g = Graph(self.name, list(self.inputs), list(self.params), list(self.nodes),
                  list(self.outputs), dict(self.aliases), list(self.notes), dict(self.pieces),
                  self.constants, dict(self.input_sizes))
        for extra in ("pass_counts", "trace_seconds", "trace_cached"):
            if hasattr(self, extra):
                setattr(g, extra, getattr(self, extra))
        for k, v in changes.items():
            setattr(g, k, v)
        return g

    def __str__(self) -> str:
        return print_graph(self)


# ---- printer -------------------------------------------------------------------------

def namer(taken: set[str]):
    """`fresh(base)` -> `base`, or `base_1`, `base_2`, ... : the first name not in `taken`
    (which it joins), for values a pass adds to a graph."""
    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name
    return fresh


def format_attr(v: Any) -> str:
    if isinstance(v, SymInt):
        return str(int(v))
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_attr(x) for x in v) + "]"
    if isinstance(v, torch.dtype):
        return dtype_short(v)
    if isinstance(v, (torch.device, torch.layout, torch.memory_format)):
        return str(v).replace("torch.", "")
    return repr(v) if isinstance(v, str) else str(v)


def format_node(node: Node, annotation: str = "") -> str:
    """`%y: f32[8,64] = linear(%x, %w, %b)   # module` (multi-output ops list all)."""
    lhs = ", ".join(repr(o) for o in node.outputs)
    args = [f"%{v.name}" for v in node.inputs]
    args += [f"{k}={format_attr(v)}" for k, v in node.attrs]
    line = f"{lhs}{annotation} = {node.op}({', '.join(args)})"
    if node.meta.module:
        line = f"{line:<80}  # {node.meta.module}"
    return line


def print_graph(graph: Graph, node_note=None, value_note=None) -> str:
    """Deterministic text form. `node_note(node) -> str` and `value_note(value) -> str`
    let analyses (costs, layouts, gradients) decorate lines without touching the IR."""
    lines = [f"# {n}" for n in graph.notes]
    ins = ", ".join(repr(v) for v in graph.inputs)
    lines.append(f"graph {graph.name}({ins}) {{")
    tied = {}
    for alias, target in sorted(graph.aliases.items()):
        tied.setdefault(target, []).append(alias)
    for p in graph.params:
        flag = "" if p.kind == "buffer" else (" trainable" if p.requires_grad else " frozen")
        extra = f"  (tied: {', '.join(tied[p.name])})" if p.name in tied else ""
        if p.name in graph.pieces:
            pc = graph.pieces[p.name]
            extra += f"  (piece {pc.index + 1}/{pc.count} of {pc.source}, dim {pc.dim} {pc.start}:{pc.stop})"
        note = value_note(p) if value_note else ""
        lines.append(f"  {p.kind} {p!r}{flag}{extra}{note}")
    for node in graph.nodes:
        ann = value_note(node.outputs[0]) if value_note and len(node.outputs) == 1 else ""
        line = "  " + format_node(node, ann)
        if node_note:
            extra = node_note(node)
            if extra:
                line += f"  [{extra}]"
        lines.append(line)
    lines.append(f"  return {', '.join('%' + v.name for v in graph.outputs)}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def topo_ok(nodes: Iterable[Node], defined: Iterable[Value]) -> bool:
    seen = set(defined)
    for n in nodes:
        if any(v not in seen for v in n.inputs):
            return False
        seen.update(n.outputs)
    return True

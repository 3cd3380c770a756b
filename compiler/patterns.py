"""Module-path patterns and what they select in a traced graph.

A pattern is a dotted path with wildcards: `*` matches within one path component,
`**` across any number of them, `?` one character, `[0-3]` / `[!0]` a character class.

    >>> matches("transformer.h.*.mlp.c_fc.weight", "transformer.h.11.mlp.c_fc.weight")
    True
    >>> matches("transformer.h.*", "transformer.h.0.mlp")        # one component only
    False
    >>> matches("transformer.**.bias", "transformer.h.0.mlp.c_fc.bias")
    True

`ModelIndex` lists what a plan can name in a graph: parameters and buffers (state-dict
names, tied aliases included), inputs, IR values, and modules with the value each outputs.
"""
from __future__ import annotations

import difflib
import re
from functools import lru_cache

from autopar.compiler.errors import UserError
from autopar.compiler.ir import Graph, Value


class PatternError(UserError, ValueError):
    """The pattern is malformed (empty, or an unclosed `[`)."""


@lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> re.Pattern:
    if not pattern:
        raise PatternError("the pattern is empty")
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^.]*")
        elif c == "?":
            out.append("[^.]")
        elif c == "[":
            j = pattern.find("]", i + 2)
            if j == -1:
                raise PatternError(f"the '[' at position {i + 1} is not closed")
            body = pattern[i + 1:j]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\").replace("[", "\\[") + "]")
            i = j + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    try:
        return re.compile("".join(out) + r"\Z")
    except re.error as e:
        raise PatternError(f"the character class is malformed ({e})") from None


def matches(pattern: str, name: str) -> bool:
    return compile_pattern(pattern).match(name) is not None


def is_pattern(text: str) -> bool:
    return any(c in text for c in "*?[")


def generalize(name: str) -> str:
    """Block indices become wildcards: transformer.h.3.mlp -> transformer.h.*.mlp."""
    return ".".join("*" if part.isascii() and part.isdigit() else part for part in name.split("."))


def closest(pattern: str, names, n: int = 1) -> list[str]:
    """Names (or their generalized patterns, if the user wrote a pattern) closest to
    `pattern`; the generalized form is offered when it is as close as a concrete name."""
    names = list(dict.fromkeys(names))
    pool = names + sorted({generalize(x) for x in names} - set(names)) if is_pattern(pattern) else names
    return difflib.get_close_matches(pattern, pool, n=n, cutoff=0.45)


class ModelIndex:
    """What a plan file can name in `graph`, computed once."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.params: dict[str, Value] = {p.name: p for p in graph.params}
        self.aliases: dict[str, str] = {a: t for a, t in graph.aliases.items() if t in self.params}
        # a fused parameter cut into pieces (passes/unfuse.py): its name selects the pieces
        self.cut: dict[str, list[str]] = {}
        for name, piece in getattr(graph, "pieces", {}).items():
            if name in self.params and piece.source not in self.params:
                self.cut.setdefault(piece.source, []).append(name)
        self.inputs: dict[str, Value] = {v.name: v for v in graph.inputs}
        self.values: dict[str, Value] = {v.name: v for v in graph.values()}
        self.modules: dict[str, Value] = module_outputs(graph)
        # each value -> the deepest module whose output it is (how printers name it)
        self.output_of: dict[str, str] = {}
        for path, v in self.modules.items():
            cur = self.output_of.get(v.name)
            if cur is None or path.count(".") > cur.count("."):
                self.output_of[v.name] = path

    def param_names(self) -> list[str]:
        return list(self.params) + list(self.aliases) + list(self.cut)

    def select_params(self, pattern: str) -> list[Value]:
        rx = compile_pattern(pattern)
        out = {}
        for name in self.param_names():
            if rx.match(name):
                for real in self.cut.get(name) or [self.aliases.get(name, name)]:
                    out[real] = self.params[real]
        return list(out.values())

    def select_modules(self, pattern: str) -> list[str]:
        rx = compile_pattern(pattern)
        return [m for m in self.modules if rx.match(m)]

    def select_outputs(self, pattern: str) -> list[Value]:
        out = {}
        for m in self.select_modules(pattern):
            v = self.modules[m]
            out[v.name] = v
        return list(out.values())

    def select_inputs(self, pattern: str) -> list[Value]:
        rx = compile_pattern(pattern)
        return [v for n, v in self.inputs.items() if rx.match(n)]

    def select_values(self, pattern: str) -> list[Value]:
        rx = compile_pattern(pattern)
        return [v for n, v in self.values.items() if rx.match(n)]

    def select(self, kind: str, pattern: str) -> list[Value]:
        return {"param": self.select_params, "output": self.select_outputs,
                "input": self.select_inputs, "value": self.select_values}[kind](pattern)

    def names(self, kind: str) -> list[str]:
        return {"param": self.param_names, "output": lambda: list(self.modules),
                "input": lambda: list(self.inputs), "value": lambda: list(self.values)}[kind]()

    def describe(self, v: Value) -> str:
        """How a plan file names `v`: a parameter, an input, a module's output or a value."""
        if v.name in self.params:
            return f'"{v.name}"'
        if v.name in self.inputs:
            return f'input "{v.name}"'
        if v.name in self.output_of:
            return f'output of "{self.output_of[v.name]}"'
        return f'value "{v.name}"'


def module_outputs(graph: Graph) -> dict[str, Value]:
    """Module path -> the value it outputs: the last value (in graph order) computed inside
    the module's subtree and used outside it (or returned). Ancestors of the recorded
    module paths (`transformer.h`, `transformer`) are modules too."""
    users: dict[Value, list[str]] = {}
    for n in graph.nodes:
        for v in n.inputs:
            users.setdefault(v, []).append(n.meta.module)
    returned = set(graph.outputs)
    out: dict[str, Value] = {}
    last: dict[str, Value] = {}
    for n in graph.nodes:
        path = n.meta.module
        if not path:
            continue
        parts = path.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for v in n.outputs:
            consumers = users.get(v, [])
            for pre in prefixes:
                last[pre] = v
                inside = pre + "."
                if v in returned or any(c != pre and not c.startswith(inside) for c in consumers):
                    out[pre] = v
    for pre, v in last.items():        # a module whose values all stay inside (dead ends)
        out.setdefault(pre, v)
    order = {p: i for i, p in enumerate(last)}
    return dict(sorted(out.items(), key=lambda kv: order[kv[0]]))


_indexes: dict[tuple, tuple[Graph, ModelIndex]] = {}


def model_index(graph: Graph) -> ModelIndex:
    """`ModelIndex(graph)`, reused while the same graph object is asked for again."""
    key = (id(graph), len(graph.nodes), len(graph.params), len(graph.inputs))
    hit = _indexes.get(key)
    if hit is not None and hit[0] is graph:
        return hit[1]
    if len(_indexes) >= 16:
        _indexes.clear()
    index = ModelIndex(graph)
    _indexes[key] = (graph, index)
    return index


# ---- module paths, repeated blocks and recompute regions ---------------------------------------------------

def under(module: str, path: str) -> bool:
    """`module` is `path` or lies inside it (`transformer.h.0.attn` is under `transformer.h.0`)."""
    return bool(path) and (module == path or module.startswith(path + "."))


def module_paths(graph: Graph) -> list[str]:
    """Every module path the nodes were traced in, with its ancestors, in graph order."""
    seen: dict[str, None] = {}
    for n in graph.nodes:
        parts = n.meta.module.split(".") if n.meta.module else []
        for i in range(1, len(parts) + 1):
            seen.setdefault(".".join(parts[:i]), None)
    return list(seen)


def resolve_modules(graph: Graph, patterns) -> list[str]:
    """The module instances a list of patterns selects (`transformer.h.*` -> every block),
    outermost only (a module inside another selected one is part of it), in graph order.
    A pattern that selects nothing is an error naming the closest module path."""
    paths = module_paths(graph)
    chosen: dict[str, None] = {}
    for pat in patterns:
        rx = compile_pattern(pat)
        hits = [p for p in paths if rx.match(p)]
        if not hits:
            near = closest(pat, paths)
            raise PatternError(f"recompute pattern '{pat}' matches no module of {graph.name}"
                               + (f"; did you mean '{near[0]}'?" if near else ""))
        chosen.update(dict.fromkeys(hits))
    outer = [p for p in chosen if not any(under(p, q) and p != q for q in chosen)]
    order = {p: i for i, p in enumerate(paths)}
    return sorted(outer, key=order.__getitem__)


def fold_modules(paths, graph: Graph) -> list[str]:
    """Module paths as few patterns for printing: block indices folded to `*` where every
    instance is in the list (`transformer.h.0`, `transformer.h.1` -> `transformer.h.*`)."""
    chosen = list(paths)
    every = module_paths(graph)
    out: list[str] = []
    for m in chosen:
        pat = generalize(m)
        if pat in out or m in out:
            continue
        rx = compile_pattern(pat)
        if pat != m and {p for p in every if rx.match(p)} <= set(chosen):
            out.append(pat)
        else:
            out.append(m)
    return out


def region_of(module: str, paths) -> str | None:
    """The recompute module (one of `paths`) that a node of `module` belongs to."""
    for p in paths:
        if under(module, p):
            return p
    return None


def recompute_runs(nodes, paths) -> list[tuple[str, int, int]]:
    """Recompute regions of a node list: maximal runs [start, end) of consecutive nodes in
    one module of `paths` (a module whose nodes are not consecutive makes several runs).
    The cost model prices exactly these runs and the program checkpoints exactly these."""
    out: list[tuple[str, int, int]] = []
    cur, start = None, 0
    for i, n in enumerate([*nodes, None]):
        r = region_of(n.meta.module, paths) if n is not None else None
        if r != cur:
            if cur is not None:
                out.append((cur, start, i))
            cur, start = r, i
    return out


BLOCK_RE = re.compile(r"^((?:[^.]+\.)*?[^.]+)\.(\d+)(?:\.|$)")


def block_of(path: str) -> tuple[str, str] | None:
    """The repeated block a module path lies in: `transformer.h.3.attn.c_attn` ->
    ("transformer.h", "transformer.h.3") -- a module list's name and the instance."""
    m = BLOCK_RE.match(path)
    if not m:
        return None
    return m.group(1), f"{m.group(1)}.{m.group(2)}"


def repeated_blocks(graph: Graph) -> dict[str, list[str]]:
    """Module lists with more than one instance, in graph order: `transformer.h` ->
    [`transformer.h.0`, `transformer.h.1`, ...]. These are the block kinds the sharding
    search links (one set of variables per repeated block) and the unit its recompute
    decision is made for."""
    lists: dict[str, dict[str, None]] = {}
    for n in graph.nodes:
        b = block_of(n.meta.module) if n.meta.module else None
        if b is not None:
            lists.setdefault(b[0], {})[b[1]] = None
    return {name: list(insts) for name, insts in lists.items() if len(insts) > 1}

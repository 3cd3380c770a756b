"""The overlap pass: rewrite one rank's communication schedule so that it hides behind compute.

Plan application (passes/apply.py) reduces a replicated parameter's gradient where the plan
puts it: a `copy_to` step on every use, whose backward all-reduces that use's gradient --
one synchronous collective per parameter use, inside autograd. This pass takes those steps
out of the graph and reduces the gradients the way DDP does:

- a parameter whose every use is a `copy_to` chain over the same axes (its gradient is a
  partial sum over them) joins a **gradient bucket** instead;
- buckets fill in the order backward finishes the gradients (reverse order of first use in
  forward), the first one small (`first_bucket_bytes`, so the last layers start reducing
  early), the others up to `bucket_bytes` -- or a quarter of all gradients when that is
  less (`MIN_BUCKETS`: a small model would otherwise reduce everything in one bucket at the
  end of backward); a bucket holds gradients of one dtype reduced over the same axes;
- the program launches a bucket's all_reduce asynchronously the moment its last gradient is
  accumulated (a post-accumulate-grad hook) and waits for all of them right before the
  optimizer step (`backends/runtime/overlap.py`).

The sum is the same, so parity stays exact; the bytes are the same (each gradient is reduced
once, as the per-use steps did after collective CSE); only the call count drops, to one per
bucket and axis. Frozen parameters have no gradient and join no bucket. A parameter that has
a use whose gradient is already whole (no `copy_to`) keeps its per-use steps: reducing its
accumulated gradient would count that use n times.

    >>> sharded = overlap(apply_plan(graph, plan))                  # doctest: +SKIP
    >>> [b.params for b in sharded.overlap.buckets]                 # doctest: +SKIP
    [('lm_head.bias', 'transformer.ln_f.weight', ...), ...]
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from autopar.compiler import buckets, patterns
from autopar.compiler.ir import Value
from autopar.compiler.plan import OVERLAP_DEFAULTS, check_overlap
from autopar.compiler.sharded import Region, ShardedGraph, nbytes, zero_chunk


MIN_BUCKETS = buckets.MIN_BUCKETS


@dataclass(frozen=True)
class GradBucket:
    """Gradients reduced together by one collective per axis, launched in backward."""
    index: int
    kind: str                       # "all_reduce": the gradients are partial sums over `axes`
    axes: tuple[str, ...]           # reduced over each, in this order
    dtype: str
    params: tuple[str, ...]         # parameter names, in the order backward finishes them
    nbytes: int                     # bytes of the flat bucket (the runtime's accounting, per axis)
    ready: int                      # node index whose backward completes the bucket's last gradient


@dataclass
class Overlap:
    """The communication schedule the program runs (`ShardedGraph.overlap`)."""
    enabled: bool = True
    bucket_bytes: int = OVERLAP_DEFAULTS["bucket_bytes"]
    first_bucket_bytes: int = OVERLAP_DEFAULTS["first_bucket_bytes"]
    prefetch: int = OVERLAP_DEFAULTS["prefetch"]
    buckets: list[GradBucket] = field(default_factory=list)
    cap: int = 0                    # the bucket size used: bucket_bytes, or less (MIN_BUCKETS)
    first_cap: int = 0              # the first bucket's: first_bucket_bytes, or cap if smaller
    # ZeRO-3 (FSDP's schedule): gather nodes run through rt.gather_param (output value names),
    # the module lists whose blocks are the units, and the weights gathered again in backward
    gathers: set[str] = field(default_factory=set)
    zero3_axis: str | None = None
    zero3_blocks: list[str] = field(default_factory=list)
    regathered: list[tuple[str, int]] = field(default_factory=list)     # (parameter, bytes)
    # parameter -> its flat gather: a unit (block, or "" for the root) and a dtype; the
    # runtime gathers each unit's weights of one dtype in one all_gather
    gather_groups: dict[str, str] = field(default_factory=dict)
    # copy_to output -> axis: a linear's input whose gradient all_reduce runs while the
    # linear's weight gradient is computed (rt.copy_to_linear)
    async_inputs: dict[str, str] = field(default_factory=dict)
    # async TP (rt.all_gather_linears, rt.linear_reduce_scatter): an all_gather feeding
    # linears, or a reduce_scatter of a linear's output, run as a collective matmul (its
    # ring steps behind the matmul). Collective output name -> (axis, dim).
    collective_matmuls: bool = False
    async_tp: dict[str, tuple[str, int]] = field(default_factory=dict)

    def scattered(self) -> set[str]:
        """ZeRO-2 parameters whose reduce_scatter runs in a bucket (not after backward)."""
        return {p for b in self.buckets if b.kind == "reduce_scatter" for p in b.params}

    def bucket_of(self, param: str) -> GradBucket | None:
        return next((b for b in self.buckets if param in b.params), None)

    def traffic(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k, b in self.call_list() + self.per_microbatch():
            out[k] = out.get(k, 0) + b
        return out

    def calls(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k, _ in self.call_list() + self.per_microbatch():
            out[k] = out.get(k, 0) + 1
        return out

    def call_list(self) -> list[tuple[str, int]]:
        """(`kind:axis`, bytes) of the buckets' collectives, in launch order (once a step:
        after the last microbatch)."""
        return [(f"{b.kind}:{a}", b.nbytes) for b in self.buckets for a in b.axes]

    def per_microbatch(self) -> list[tuple[str, int]]:
        """ZeRO-3's gathers again in backward (every microbatch), one per block and dtype."""
        groups: dict[str, int] = {}
        for p, b in self.regathered:
            g = self.gather_groups.get(p, p)
            groups[g] = groups.get(g, 0) + b
        return [(f"all_gather:{self.zero3_axis}", b) for b in groups.values()]


def settings(plan_overlap: dict | None) -> Overlap:
    check_overlap(plan_overlap, "Plan.overlap")
    s = {**OVERLAP_DEFAULTS, **(plan_overlap or {})}
    return Overlap(bool(s["enabled"]), int(s["bucket_bytes"]), int(s["first_bucket_bytes"]), int(s["prefetch"]),
                   collective_matmuls=s.get("async_tp") is True)


def overlap(s: ShardedGraph) -> ShardedGraph:
    """`s` with parameter-gradient reduction moved into asynchronous buckets (see the module
    docstring); unchanged (but for an empty schedule) when the plan turns overlap off."""
    sched = settings(s.plan.overlap)
    if not sched.enabled:
        return replace(s, overlap=sched)
    zero3(s, sched)
    chains = grad_chains(s)
    via = through_op(s, chains)
    scattered = zero2_params(s)
    if not chains and not via and not scattered:
        sched.async_inputs = async_input_grads(s)
        sched.async_tp = async_tp(s) if sched.collective_matmuls else {}
        return replace(s, overlap=sched)
    dropped: dict[Value, Value] = {}            # removed copy_to output -> what it copied
    for p, nodes in chains.items():
        for n in nodes:
            dropped[n.outputs[0]] = p
    for p, (y, nodes) in via.items():
        for n in nodes:
            dropped[n.outputs[0]] = y
        chains[p] = nodes
    keep, index = [], {}
    for i, n in enumerate(s.nodes):
        if n.op == "copy_to" and n.outputs[0] in dropped:
            continue
        index[i] = len(keep)
        keep.append(n.replace(inputs=tuple(dropped.get(v, v) for v in n.inputs)))
    regions = []
    for r in s.regions:
        inside = [index[i] for i in range(r.start, r.end) if i in index]
        if inside:
            regions.append(Region(r.module, inside[0], inside[-1] + 1))
    g = s.graph.copy(nodes=keep)
    g.notes = list(s.graph.notes) + [f"overlap: {len(chains)} parameter gradients reduced in buckets"]
    out = replace(s, graph=g, regions=regions)
    axes_of = {p.name: tuple(n.attr["axis"] for n in chain_axes(nodes)) for p, nodes in chains.items()}
    kinds = {name: "all_reduce" for name in axes_of}
    for p in scattered:
        axes_of[p.name], kinds[p.name] = (s.zero.axis,), "reduce_scatter"
    # a small model's buckets are a quarter of its gradients (buckets.caps: MIN_BUCKETS)
    total = sum(grad_bytes(out, p.name, kinds[p.name]) for p in [*chains, *scattered])
    sched.first_cap, sched.cap = buckets.caps(total, sched.bucket_bytes, sched.first_bucket_bytes)
    sched.buckets = assign_buckets(out, axes_of, sched.cap, sched.first_cap, kinds)
    sched.async_inputs = async_input_grads(out)
    sched.async_tp = async_tp(out) if sched.collective_matmuls else {}
    out.overlap = sched
    return out


def zero3(s: ShardedGraph, sched: Overlap) -> None:
    """ZeRO-3's gathers run FSDP's schedule when every dp-sharded trainable parameter is
    gathered whole right before its use (an all_gather of the parameter itself): blocks are gathered a block ahead, freed after
    forward and gathered again in backward (recorded in `sched.regathered`); the gradients'
    reduce_scatters run asynchronously. Plans with recompute regions keep the plain gathers
    (a recomputed block would gather inside backward's own schedule)."""
    axis = s.zero.axis
    if s.plan.zero != 3 or axis is None or s.mesh.get(axis, 1) == 1 or s.regions:
        return
    i = list(s.mesh).index(axis)
    gathers = [n for n in s.nodes if n.op == "all_gather" and n.attr["axis"] == axis
               and n.inputs[0].kind == "param"]
    gathered = {n.inputs[0].name for n in gathers}
    sharded = [p for p in s.params if p.kind == "param" and p.requires_grad
               and str(s.layouts[p.name][i]).startswith("S(")]
    if not sharded or any(p.name not in gathered for p in sharded):
        return
    blocks: list[str] = []
    for n in gathers:
        b = patterns.block_of(n.inputs[0].name)
        if b and b[0] not in blocks:
            blocks.append(b[0])
    sched.gathers = {n.outputs[0].name for n in gathers}
    sched.zero3_axis, sched.zero3_blocks = axis, blocks
    n_ax = s.mesh[axis]
    sched.regathered = [(p.name, nbytes(p) * n_ax) for p in sharded if in_blocks(p.name, blocks)]
    sched.gather_groups = {p.name: f"{unit_of(p.name, blocks)}|{p.dtype}" for p in sharded}


def async_input_grads(s: ShardedGraph) -> dict[str, str]:
    """`copy_to` steps whose backward all_reduce can hide behind the weight gradients of the
    linears they feed (Megatron-LM's asynchronous input-gradient all-reduce): the step's
    input feeds nothing else, its output only linears (as their input: one, or the query,
    key and value projections) whose weights need a gradient (the compute to hide behind)
    and whose other operands exist before the first of them (the program runs them there
    as one step, rt.copy_to_linears). copy_to output name -> its axis."""
    users = users_of(s)
    made = {v: i for i, n in enumerate(s.nodes) for v in n.outputs}
    out = {}
    for n in s.nodes:
        y = n.outputs[0] if n.op == "copy_to" else None
        if y is None or y.name not in s.needs_grad or len(users.get(n.inputs[0], [])) != 1:
            continue
        lins = users.get(y, [])
        if not lins or not all(m.op == "linear" and m.inputs[0] is y and y not in m.inputs[1:]
                               and m.inputs[1].name in s.needs_grad for m in lins):
            continue
        first = min(made[m.outputs[0]] for m in lins)
        if all(made.get(v, -1) < first for m in lins for v in m.inputs[1:]):
            out[y.name] = n.attr["axis"]
    return out


def async_tp(s: ShardedGraph) -> dict[str, tuple[str, int]]:
    """The collectives the program runs as collective matmuls (async TP; Plan.overlap's
    `async_tp` True -- "auto" is the search's to resolve, and unresolved runs none): an
    activation's all_gather (its gradient reduce_scattered: `partial_grad`) whose output
    feeds only linears, as their input, their other operands made before the first of them
    (rt.all_gather_linears, one call for the query, key and value projections); and a
    reduce_scatter of the output of a linear that feeds nothing else
    (rt.linear_reduce_scatter). The dim must not be the features' (rows are what moves),
    and the collective must lie in the same recompute region as its linears.
    Collective output name -> (axis, dim)."""
    users = users_of(s)
    made = {v: i for i, n in enumerate(s.nodes) for v in n.outputs}
    at = {id(n): i for i, n in enumerate(s.nodes)}
    region = {i: k for k, r in enumerate(s.regions) for i in range(r.start, r.end)}
    outputs = set(s.graph.outputs)

    def rows(v: Value, d: int) -> bool:
        return 0 <= d < len(v.shape) - 1
    out: dict[str, tuple[str, int]] = {}
    fused: set[int] = set()                  # the linears of the all_gathers taken
    for i, n in enumerate(s.nodes):
        if n.op != "all_gather" or not n.attr.get("partial_grad"):
            continue
        x, y, axis, d = n.inputs[0], n.outputs[0], n.attr["axis"], n.attr["dim"]
        lins = users.get(y, [])
        if (s.mesh.get(axis, 1) == 1 or x.kind != "act" or y in outputs or not rows(x, d) or not lins
                or not all(m.op == "linear" and m.inputs[0] is y and y not in m.inputs[1:] for m in lins)):
            continue
        first = min(made[m.outputs[0]] for m in lins)
        if any(made.get(v, -1) >= first for m in lins for v in m.inputs[1:]):
            continue
        if any(region.get(at[id(m)]) != region.get(i) for m in lins):
            continue
        out[y.name] = (axis, d)
        fused.update(at[id(m)] for m in lins)
    for i, n in enumerate(s.nodes):
        if n.op != "reduce_scatter":
            continue
        x, axis, d = n.inputs[0], n.attr["axis"], n.attr["dim"]
        k = made.get(x)
        if k is None or k in fused or s.nodes[k].op != "linear" or len(users.get(x, [])) != 1 or x in outputs:
            continue
        fed = made.get(s.nodes[k].inputs[0])
        if fed is not None and s.nodes[fed].op == "copy_to":
            continue                         # rt.copy_to_linears runs this linear
        if s.mesh.get(axis, 1) == 1 or not rows(x, d) or region.get(k) != region.get(i):
            continue
        out[n.outputs[0].name] = (axis, d)
    return out


def unit_of(name: str, blocks: list[str]) -> str:
    """The ZeRO-3 unit of parameter `name`: its block `list.<index>` in one of the module
    lists (the runtime's rule: `list.<index>.rest`), or "" for the root."""
    for lst in blocks:
        if name.startswith(lst + "."):
            head, _, rest = name[len(lst) + 1:].partition(".")
            if head.isdigit() and rest:
                return f"{lst}.{head}"
    return ""


def in_blocks(name: str, blocks: list[str]) -> bool:
    """Whether parameter `name` belongs to a block of one of the module lists."""
    return unit_of(name, blocks) != ""


def chain_axes(nodes):
    """The copy_to nodes of one parameter, one per axis in chain order (a chain repeated in
    several recompute regions is listed once)."""
    seen, out = set(), []
    for n in nodes:
        if n.attr["axis"] not in seen:
            seen.add(n.attr["axis"])
            out.append(n)
    return out


def grad_chains(s: ShardedGraph) -> dict[Value, list]:
    """Trainable parameters whose every use goes through `copy_to` steps, all with the same
    axis sequence: parameter -> those copy_to nodes (chain order)."""
    users = users_of(s)
    out = {}
    for p in s.params:
        if p.kind != "param" or not p.requires_grad or p.name not in s.needs_grad:
            continue
        chain = walk_chain(users, p)
        if chain:
            out[p] = chain
    return out


def users_of(s: ShardedGraph) -> dict[Value, list]:
    users: dict[Value, list] = {}
    for n in s.nodes:
        for v in n.inputs:
            users.setdefault(v, []).append(n)
    return users


def through_op(s: ShardedGraph, taken: dict) -> dict[Value, tuple[Value, list]]:
    """Trainable parameters whose gradient is reduced one op further down: the parameter's
    only use is an op whose inputs are all replicated over the axes of the `copy_to` chain
    its output goes through (a GPT's position embedding, `wpe(arange(T))`, added to a
    batch-split activation). The op computes the same on every rank of those axes, so its
    backward is the same linear map of the output's gradient on each: reducing the
    parameter's gradient equals reducing the output's. When the parameter is no larger than
    that output, it joins a bucket (asynchronous, in backward) instead of a synchronous
    all_reduce of the output's gradient on backward's critical path -- DDP's choice.
    parameter -> (the op's output, its copy_to chain)."""
    users = users_of(s)
    axes = list(s.mesh)
    out = {}
    for p in s.params:
        if p in taken or p.kind != "param" or not p.requires_grad or p.name not in s.needs_grad:
            continue
        uses = users.get(p, [])
        if len(uses) != 1 or uses[0].op == "copy_to" or len(uses[0].outputs) != 1:
            continue
        op, y = uses[0], uses[0].outputs[0]
        if any(v is not p and v.name in s.needs_grad for v in op.inputs) or nbytes(p) > nbytes(y):
            continue
        chain = walk_chain(users, y)
        if not chain:
            continue
        on = [axes.index(n.attr["axis"]) for n in chain_axes(chain)]
        if all(str(s.layouts[v.name][i]) == "R" for v in (*op.inputs, y) for i in on):
            out[p] = (y, chain)
    return out


def walk_chain(users: dict, start: Value) -> list:
    """The copy_to nodes below `start`, level by level while every use at a level is a
    copy_to over one axis (chain order); [] when a first use is not a copy_to -- that use's
    gradient is whole, and reducing the sum would count it n times. Deeper down, the axes
    the chain has so far are common to every use (the steps that follow stay in the graph,
    per use)."""
    chain, frontier = [], [start]
    while frontier:
        level = [n for v in frontier for n in users.get(v, [])]
        if not (level and all(n.op == "copy_to" for n in level) and len({n.attr["axis"] for n in level}) == 1):
            break
        chain.extend(level)
        frontier = [n.outputs[0] for n in level]
    return chain


def first_use(s: ShardedGraph) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, n in enumerate(s.nodes):
        for v in n.inputs:
            if v.kind == "param":
                out.setdefault(v.name, i)
    return out


def grad_order(s: ShardedGraph, axes_of: dict[str, tuple[str, ...]]) -> list[tuple[str, tuple]]:
    """(parameter, axes) in the order backward finishes the gradients: a gradient is whole
    once backward has passed the parameter's first use in forward, so latest first use first."""
    first = first_use(s)
    return [(name, axes_of[name]) for name in sorted(axes_of, key=lambda n: (-first.get(n, -1), n))]


def assign_buckets(s: ShardedGraph, axes_of: dict[str, tuple[str, ...]], bucket_bytes: int,
                   first_bucket_bytes: int, kinds: dict[str, str] | None = None) -> list[GradBucket]:
    """Fill buckets in backward order (compiler/buckets.fill, which the runtime runs too);
    a bucket holds one kind of reduction over one set of axes, of one dtype."""
    kinds = kinds or {}
    first = first_use(s)
    by_name = {p.name: p for p in s.params}
    order = grad_order(s, axes_of)
    kind = [kinds.get(n, "all_reduce") for n, _ in order]
    items = [((axes, by_name[n].dtype, k), grad_bytes(s, n, k)) for (n, axes), k in zip(order, kind)]
    out = []
    for i, members in enumerate(buckets.fill(items, first_bucket_bytes, bucket_bytes)):
        names = tuple(order[k][0] for k in members)
        axes, dtype, k = items[members[0]][0]
        out.append(GradBucket(i, k, axes, dtype, names, sum(items[j][1] for j in members),
                              min(first.get(n, 0) for n in names)))
    return out


def grad_bytes(s: ShardedGraph, name: str, kind: str) -> int:
    """Bytes a gradient adds to its bucket: its size, or for a ZeRO-2 reduce_scatter its
    flattened size padded to equal chunks (the runtime's accounting: the whole input)."""
    p = next(v for v in s.params if v.name == name)
    if kind == "reduce_scatter":
        n = s.mesh[s.zero.axis]
        return zero_chunk(p.numel, n) * n * p.itemsize
    return nbytes(p)


def zero2_params(s: ShardedGraph) -> list[Value]:
    """ZeRO-2's parameters whose gradient is reduce_scattered after backward (every use
    splits dp): they join reduce_scatter buckets launched during backward instead."""
    z = s.zero
    if not z.reduce_scatter or z.axis is None or s.mesh.get(z.axis, 1) == 1:
        return []
    return [p for p in s.params if p.name in z.reduce_scatter]


def format_buckets(o: Overlap) -> list[str]:
    """One line per bucket, for the explanation and the program header."""
    from autopar.compiler.sharded import format_bytes
    lines = []
    for b in o.buckets:
        axes = ", ".join(b.axes)
        lines.append(f"bucket {b.index}: {b.kind} over {axes}, {format_bytes(b.nbytes)}, "
                     f"{len(b.params)} gradients ({b.params[0]} ... {b.params[-1]})"
                     if len(b.params) > 2 else
                     f"bucket {b.index}: {b.kind} over {axes}, {format_bytes(b.nbytes)}, "
                     f"{', '.join(b.params)}")
    return lines


__all__ = ["overlap", "Overlap", "GradBucket", "assign_buckets", "grad_chains", "format_buckets",
           "settings"]

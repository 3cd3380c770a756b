"""The cost model: step time and memory per device of a sharding plan.

Everything here is a plain function of (graph, cluster, strategies, ZeRO stage); the
search (passes/shard.py) builds its CP-SAT tables from the same pieces, so the objective
the solver minimises is exactly `evaluate(...).step_time` up to integer rounding.

    >>> model = CostModel(graph, Cluster({"dp": 2, "tp": 2}, load_profile("h100")))
    >>> report = model.evaluate(plan.strategies, zero=plan.zero)       # doctest: +SKIP
    >>> report.step_time, report.memory["total"]                       # doctest: +SKIP

The facts (DESIGN.md, "Cost model"):

- compute of an op per device = max(flops / (efficiency * peak), bytes / HBM) plus the
  profile's per-op host overhead (measured on cpu, 0 on the GPU profiles), flops and
  bytes divided by the product of the axis sizes its strategy splits. Views move nothing.
- backward = 2x forward flops for nodes whose outputs need a gradient; for a matmul-like
  op (linear, matmul, mm, bmm) 1x per operand that needs a gradient, so a frozen weight
  saves its weight-gradient flops (and an input that needs no gradient its input-gradient
  flops). Backward bytes = 2x forward bytes.
- collectives are alpha-beta on the axis's link: all_reduce 2(n-1)a + 2(n-1)/n S/B;
  all_gather, reduce_scatter (n-1)a + (n-1)/n S/B; all_to_all (n-1)a + (n-1)/n S_local/B.
  `Collective.bytes` follows sharding.py (S; S/n for all_to_all), so the bytes predicted
  here are the bytes the runtime counts.
- every edge costs `sharding.reshard(producer layout -> consumer layout)`, forward and
  backward (backward only when the value needs a gradient).
- a cross-entropy whose class dim an axis splits (the vocab-parallel loss: logits stay
  split, no gather) costs its compute / split plus two all_reduces of one fp32 value per
  local row on that axis, inside the op (`op_collectives`): the search sees them in the
  node's forward time, the report as communication into the node.
- the step time is the makespan of the step's schedule (compiler/schedule.py): gradient
  buckets reduced during backward, ZeRO-3 weights gathered `prefetch` blocks ahead, the
  other collectives synchronous, as passes/overlap.py has the program run them. With
  overlap off (`overlap=False` or Plan.overlap enabled=False) it is compute +
  communication, every collective synchronous.

The search's CP-SAT objective stays linear: with overlap on it prices a parameter's
gradient reduction at GRAD_EXPOSED of its bandwidth time (buckets amortise the latency,
backward hides part of the rest) and a ZeRO-3 weight gather at GATHER_EXPOSED of its time
(twice for a block's weights: gathered again in backward); the search then re-ranks the
solver's best candidates per mesh shape and ZeRO stage by the simulated makespan.

Byte sizes. A floating value is counted at the training dtype: 2 bytes under "mixed"
precision (bf16 activations, gradients and collectives), its own dtype size under "fp32"
(the graph's dtype: what the CPU runtime moves). Integer values keep their dtype size.
Parameter state per element: mixed 2 (bf16 copy) + 2 (grad) + 12 (fp32 master, Adam m, v);
fp32 4 + 4 + 8. Frozen parameters hold only the first.

ZeRO over the data-parallel axis (params whose layout is R on dp; `n` = dp size), matched
in bytes by the code generator:

- z=0: gradients reduced by the per-edge rule of sharding.reshard (an R operand consumed
  by an op that splits dp gets a backward all_reduce, one per use).
- z=1: as z=0, optimizer state / n, and after the step one all_gather over dp of the
  param's local bytes ("optimizer" phase).
- z=2: the per-edge backward all_reduces on dp of a param are replaced by one
  reduce_scatter (the param's local bytes; only if at least one existed); gradients and
  optimizer state / n; the all_gather after the step as z=1.
- z=3: params are stored S(d) on dp: the param's own source strategy splits a dim on dp
  and the per-edge rule gives a forward all_gather and backward reduce_scatter per use;
  every state is / n because the param is. A param no dim of which divides by n stays
  R on dp and is treated as z=2.

The optimizer step (the programs' fused torch.optim.AdamW) is memory-bound: per element of
a trainable parameter's local state (/ n under ZeRO >= 1) it streams ADAMW_BYTES, plus
MASTER_BYTES under mixed precision (the bf16 gradient widened onto its fp32 master, the bf16
weight rounded from it), and it costs a few of the profile's op overheads per tensor. It is
compute after backward in the schedule, the parameters of the gradient buckets already
reduced first where the program steps them so (`GradBuckets.step`), and a per-parameter
unary term of the search's objective. (`--optimizer sgd` programs are priced as AdamW.)

Memory per device = params + grads + optimizer state + saved activations:
outputs of nodes whose outputs need a gradient (views are free), the graph inputs, and
the operand copies a forward collective makes for a consumer that runs a backward (an
all-gathered weight under ZeRO-3, an all-gathered activation under sequence splits).
Under ZeRO-3 with overlap on (FSDP's reshard after forward; no recompute regions), a
block's gathered weights are alive only while `prefetch + 1` blocks are: each block's
saved copy is counted at (prefetch + 1) / blocks, so the total is the window's.
A recompute region (Plan.recompute pattern, one per matching module instance) saves
only its inputs and costs one extra forward of its nodes, including the forward
collectives into them (phase "recompute", run during the backward). Which blocks to
recompute is the search's choice when no plan file names them (passes/shard.py `search`,
candidates ordered by `recompute_savings`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from math import prod
from typing import Any, Iterable

from autopar.compiler import sharding
from autopar.compiler.cluster import Cluster, DeviceProfile, format_bytes, format_time
from autopar.compiler.errors import InputError
from autopar.compiler.dims import DimAnno
from autopar.compiler.ir import Graph, Node, Value, print_graph
from autopar.compiler.ops import REGISTRY, node_anno, node_flops
from autopar.compiler.patterns import recompute_runs
from autopar.compiler.sharding import Collective, Strategy

MATMUL_OPS = {"linear", "matmul", "mm", "bmm"}
# One fused torch.optim.AdamW step (the programs' optimizer) per element: it reads the
# parameter, its gradient and both moments and writes back all but the gradient (fp32: 28 B),
# and costs two op overheads per tensor of host work (measured on the 2-core CPU: 0.18 ms for
# the small GPT's 28 tensors, 110k elements -- 4.5 us a tensor beyond the bytes; 2.7 us op
# overhead)
ADAMW_BYTES, ADAMW_OPS = 28, 2
# mixed precision (runtime/precision.py): the bf16 gradient widened onto the fp32 master
# (2 + 4) and the bf16 weight copied from it after the step (4 + 2), one op each
MASTER_BYTES, MASTER_OPS = 12, 2
PHASES = ("forward", "backward", "recompute", "optimizer")
# the solver's linear prices of communication the schedule overlaps (see the docstring)
GRAD_EXPOSED = 0.5
GATHER_EXPOSED = 0.5


def overlap_settings(overlap) -> dict:
    """Plan.overlap from `overlap`: None/True = DDP's defaults, False = off, or a dict."""
    from autopar.compiler.plan import OVERLAP_DEFAULTS
    if overlap is None or overlap is True:
        return dict(OVERLAP_DEFAULTS)
    if overlap is False:
        return {**OVERLAP_DEFAULTS, "enabled": False}
    return {**OVERLAP_DEFAULTS, **overlap}


def collective_time(kind: str, n: int, nbytes: float, link) -> float:
    """Alpha-beta time of one collective over `n` ranks moving `nbytes` (sharding.py's
    convention: S for all_reduce/all_gather/reduce_scatter, S/n for all_to_all)."""
    if n <= 1 or kind == "slice":
        return 0.0
    if kind == "all_reduce":
        return 2 * (n - 1) * link.alpha + 2 * (n - 1) / n * nbytes / link.bandwidth
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) * link.alpha + (n - 1) / n * nbytes / link.bandwidth
    if kind in ("send", "recv"):
        return link.alpha + nbytes / link.bandwidth
    raise ValueError(f"unknown collective kind {kind}")


@lru_cache(maxsize=200_000)
def _steps_cached(src, dst, shape, itemsize, mesh_items, splits, needs_grad):
    return tuple(sharding.reshard_steps(src, dst, shape, itemsize, dict(mesh_items), splits, needs_grad))


@lru_cache(maxsize=200_000)
def _reshard_cached(src, dst, shape, itemsize, mesh_items, splits, needs_grad):
    return tuple(sharding.reshard(src, dst, shape, itemsize, dict(mesh_items), splits, needs_grad))


# ---- recompute regions ------------------------------------------------------------------

def recompute_regions(graph: Graph, modules: Iterable[str]) -> dict[str, str]:
    """Node key -> recompute region id (`module#run`): the runs of
    `patterns.recompute_runs`, the same runs plan application checkpoints. `modules` are
    module paths (patterns are resolved to paths with `patterns.resolve_modules` first)."""
    out: dict[str, str] = {}
    for k, (path, start, end) in enumerate(recompute_runs(graph.nodes, list(modules))):
        for n in graph.nodes[start:end]:
            out[sharding.producer_key(n)] = f"{path}#{k}"
    return out


def recompute_savings(graph: Graph, modules: Iterable[str], needs_grad: set[str],
                      itemsize=lambda v: v.itemsize) -> float:
    """Activation bytes (whole graph, nothing split) that recomputing `modules` stops
    saving: the non-view outputs inside them that backward needs, less the inputs each
    region must keep instead (values made outside it and read inside). The search orders
    its recompute candidates by this; the plan's own memory comes from `evaluate`."""
    regions = recompute_regions(graph, modules)
    if not regions:
        return 0.0
    made_in: dict[Value, str | None] = {}
    saved = kept = 0.0
    for n in graph.nodes:
        r = regions.get(sharding.producer_key(n))
        for v in n.outputs:
            made_in[v] = r
        if r is None:
            continue
        if not REGISTRY[n.op].view:
            saved += sum(v.numel * itemsize(v) for v in n.outputs if v.name in needs_grad)
    seen: set[tuple[str, str]] = set()
    for n in graph.nodes:
        r = regions.get(sharding.producer_key(n))
        if r is None:
            continue
        for v in n.inputs:
            if v in made_in and made_in[v] != r and (r, v.name) not in seen:
                seen.add((r, v.name))
                kept += v.numel * itemsize(v)
    return saved - kept


# ---- the members of a graph: sources and nodes ----------------------------------------------

@dataclass
class Member:
    """One strategy decision: a source (input / param / buffer) or a node."""
    index: int
    key: str                      # producer key: a source's name, a node's first output
    kind: str                     # input | param | buffer | node
    anno: DimAnno
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]
    module: str
    node: Node | None = None

    @property
    def is_source(self) -> bool:
        return self.node is None

    @property
    def trainable(self) -> bool:
        return self.kind == "param" and self.outputs[0].requires_grad


@dataclass(frozen=True)
class Edge:
    """Value `value` = output `out` of member `src`, read as operand `arg` of member `dst`."""
    src: int
    out: int
    dst: int
    arg: int
    value: Value


@dataclass
class NodeCost:
    fwd_time: float = 0.0
    bwd_time: float = 0.0
    recompute_time: float = 0.0
    flops: float = 0.0           # forward, per device
    bwd_flops: float = 0.0
    bytes: float = 0.0           # forward bytes read + written, per device
    collectives: list = field(default_factory=list)   # (Collective, seconds) into this node


@dataclass
class CostReport:
    """The breakdown of one plan. Times in seconds per training step, bytes per rank."""
    step_time: float
    compute_time: float
    comm_time: float
    compute: dict[str, float]                 # forward / backward / recompute / optimizer
    comm_by_axis: dict[str, float]
    bytes: dict[str, int]                     # "kind:axis" -> bytes per step per rank
    bytes_by_phase: dict[str, dict[str, int]]
    memory: dict[str, float]                  # params / grads / optimizer / activations / total
    flops: float                              # model flops (fwd + bwd) / devices, per step
    nodes: dict[str, NodeCost]                # per member key
    zero_collectives: list = field(default_factory=list)   # (param, Collective, seconds)
    # every collective: (Collective, seconds, consumer member, source member)
    comms: list = field(default_factory=list)
    additive_time: float = 0.0                # compute + communication, nothing overlapped
    exposed: dict[str, float] = field(default_factory=dict)   # per axis (schedule)
    hidden: dict[str, float] = field(default_factory=dict)
    schedule: Any = None                      # compiler/schedule.Schedule
    optimizer: dict[str, float] = field(default_factory=dict)   # param key -> its step's seconds

    def tflops_per_device(self) -> float:
        return self.flops / self.step_time / 1e12 if self.step_time > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "step_time": self.step_time,
            "compute_time": self.compute_time,
            "compute": dict(self.compute),
            "comm_time": self.comm_time,
            "communication": dict(self.comm_by_axis),
            "memory": {k: int(round(v)) for k, v in self.memory.items()},
            "bytes": dict(self.bytes),
            "bytes_by_phase": {p: dict(b) for p, b in self.bytes_by_phase.items()},
            "flops_per_device": self.flops,
            "tflops_per_device": self.tflops_per_device(),
            "additive_step_time": self.additive_time,
            "exposed_comm": dict(self.exposed),
            "hidden_comm": dict(self.hidden),
            "overlap": bool(self.schedule is not None and self.schedule.overlap),
            "async_tp": bool(self.schedule is not None and self.schedule.async_tp),
        }


class CostModel:
    """Costs of one graph on one cluster, per member strategy and per edge.

    `needs_grad` defaults to gradients.grad_info(graph).needs_grad; `precision` to the
    profile's; `dp_axis` to "dp" when the mesh has it (the axis ZeRO shards over);
    `overlap` to Plan's OVERLAP_DEFAULTS (False: the synchronous, additive model)."""

    def __init__(self, graph: Graph, cluster: Cluster, precision: str | None = None,
                 recompute: Iterable[str] = (), needs_grad: set[str] | None = None,
                 dp_axis: str | None = None, overlap=None):
        from autopar.compiler.gradients import grad_info
        self.graph = graph
        self.cluster = cluster
        self.mesh = dict(cluster.mesh)
        self.mesh_items = tuple(self.mesh.items())
        self.axes = list(self.mesh)
        self.profile: DeviceProfile = cluster.profile
        self.precision = precision or self.profile.precision
        self.needs_grad = set(needs_grad) if needs_grad is not None else grad_info(graph).needs_grad
        self.dp_axis = dp_axis if dp_axis is not None else ("dp" if "dp" in self.mesh else None)
        self.recompute = list(recompute)
        self.regions = recompute_regions(graph, self.recompute)
        self.members: list[Member] = []
        self._annos: dict[DimAnno, DimAnno] = {}
        self._layout_cache: dict = {}
        self.by_key: dict[str, Member] = {}
        self.producer: dict[Value, tuple[int, int]] = {}
        for v in graph.inputs:
            self._add(v.name, "input", sharding.source_annotation(v.shape), (), (v,), "")
        for p in graph.params:
            self._add(p.name, p.kind, sharding.source_annotation(p.shape), (), (p,),
                      p.name.rsplit(".", 1)[0] if "." in p.name else "")
        for n in graph.nodes:
            self._add(sharding.producer_key(n), "node", node_anno(n), n.inputs, n.outputs,
                      n.meta.module, n)
        self.edges: list[Edge] = []
        self.in_edges: list[list[Edge]] = [[] for _ in self.members]
        self.out_edges: list[list[Edge]] = [[] for _ in self.members]
        for m in self.members:
            for i, v in enumerate(m.inputs):
                src, j = self.producer[v]
                e = Edge(src, j, m.index, i, v)
                self.edges.append(e)
                self.in_edges[m.index].append(e)
                self.out_edges[src].append(e)
        self._strategies: dict[int, list[Strategy]] = {}
        self._out_layouts: dict[tuple[int, Strategy], tuple] = {}
        self._compute: dict[tuple[int, Strategy], NodeCost] = {}
        self._region_inputs = self._find_region_inputs()
        self.overlap = overlap_settings(overlap)
        self.overlapped = bool(self.overlap["enabled"])
        # how solver_time prices (the search also solves with the additive prices, for
        # candidates the schedule re-ranks)
        self.overlap_prices = self.overlapped
        # ZeRO-3 blocks: parameter member -> (prefetch + 1) / blocks of its module list
        self._window: dict[int, float] = {}
        if self.overlapped and not self.regions:
            from autopar.compiler.patterns import block_of
            lists: dict[str, set] = {}
            of: dict[int, str] = {}
            for m in self.members:
                if m.kind == "param" and m.module:
                    b = block_of(m.module)
                    if b:
                        lists.setdefault(b[0], set()).add(b[1])
                        of[m.index] = b[0]
            window = int(self.overlap["prefetch"]) + 1
            for mi, lst in of.items():
                self._window[mi] = min(1.0, window / len(lists[lst]))

    def _add(self, key, kind, anno, inputs, outputs, module, node=None):
        anno = self._annos.setdefault(anno, anno)      # one object per distinct annotation
        m = Member(len(self.members), key, kind, anno, tuple(inputs), tuple(outputs), module, node)
        self.members.append(m)
        self.by_key[key] = m
        for j, v in enumerate(outputs):
            self.producer[v] = (m.index, j)

    # ---- sizes --------------------------------------------------------------------------

    def itemsize(self, v: Value) -> int:
        if self.precision == "mixed" and v.dtype.is_floating_point:
            return 2
        return v.itemsize

    def nbytes(self, v: Value) -> int:
        return v.numel * self.itemsize(v)

    def local_bytes(self, v: Value, layout) -> int:
        return prod(sharding.local_shape(v.shape, layout, self.mesh)) * self.itemsize(v)

    def state_bytes(self) -> tuple[int, int, int]:
        """(param, grad, optimizer) bytes per element of a floating parameter."""
        return (2, 2, 12) if self.precision == "mixed" else (4, 4, 8)

    def split_factor(self, strategy: Strategy) -> int:
        return prod(n for lab, n in zip(strategy, self.mesh.values()) if lab is not None)

    # ---- strategies and layouts --------------------------------------------------------

    def strategies(self, mi: int) -> list[Strategy]:
        """Every strategy of member `mi` (sharding.enumerate_strategies), replicated first."""
        s = self._strategies.get(mi)
        if s is None:
            m = self.members[mi]
            try:
                s = sharding.enumerate_strategies(m.anno, [v.shape for v in m.inputs],
                                                  [v.shape for v in m.outputs], self.mesh)
            except InputError as e:
                where = f" (module {m.module})" if m.module else ""
                raise InputError(f"{m.node.op if m.node is not None else m.kind} {m.key}{where}: {e}") from None
            self._strategies[mi] = s
        return s

    def out_layouts(self, mi: int, s: Strategy) -> tuple:
        m = self.members[mi]
        k = (id(m.anno), s, len(m.outputs))
        lay = self._out_layouts.get(k)
        if lay is None:
            lay = tuple(sharding.output_layout(m.anno, s, j) for j in range(len(m.outputs)))
            self._out_layouts[k] = lay
        return lay

    def in_layout(self, mi: int, s: Strategy, i: int):
        anno = self.members[mi].anno
        k = (id(anno), s, i)
        lay = self._layout_cache.get(k)
        if lay is None:
            lay = self._layout_cache[k] = sharding.input_layout(anno, s, i)
        return lay

    def dp_index(self) -> int | None:
        if self.dp_axis is None or self.mesh.get(self.dp_axis, 1) <= 1:
            return None
        return self.axes.index(self.dp_axis)

    # ---- per member --------------------------------------------------------------------

    def has_backward(self, mi: int) -> bool:
        m = self.members[mi]
        return not m.is_source and any(v.name in self.needs_grad for v in m.outputs)

    def compute(self, mi: int, s: Strategy) -> NodeCost:
        """Forward, backward and recompute time of a node under strategy `s`."""
        k = (mi, s)
        c = self._compute.get(k)
        if c is not None:
            return c
        m = self.members[mi]
        c = NodeCost()
        if not m.is_source:
            od = REGISTRY[m.node.op]
            split = self.split_factor(s)
            flops = node_flops(m.node) / split
            nbytes = 0.0 if od.view else sum(v.numel * self.itemsize(v) for v in (*m.inputs, *m.outputs)) / split
            peak = self.profile.efficiency * self.profile.peak_flops
            hbm = self.profile.hbm_bandwidth
            c.flops, c.bytes = flops, nbytes
            c.fwd_time = max(flops / peak, nbytes / hbm)
            # host overhead per op (measured on cpu; views cost no kernel)
            overhead = 0.0 if od.view else self.profile.op_overhead
            c.fwd_time += overhead
            # communication inside the op (the vocab-parallel loss): synchronous, on the
            # compute stream, so the search prices it with the node's forward
            inner = self.op_collectives(mi, s)
            c.fwd_time += sum(self.time_of(col) for col in inner if col.phase == "forward")
            if self.has_backward(mi):
                if m.node.op in MATMUL_OPS and len(m.inputs) >= 2:
                    ways = sum(1 for v in m.inputs[:2] if v.name in self.needs_grad)
                    bwd = flops * ways
                else:
                    bwd = 2 * flops
                c.bwd_flops = bwd
                c.bwd_time = max(bwd / peak, 2 * nbytes / hbm) + overhead
                c.bwd_time += sum(self.time_of(col) for col in inner if col.phase == "backward")
            if m.key in self.regions:
                c.recompute_time = c.fwd_time
        self._compute[k] = c
        return c

    def op_collectives(self, mi: int, s: Strategy) -> list[Collective]:
        """Collectives a node runs inside itself under `s`: a cross-entropy whose class dim
        an axis splits (the vocab-parallel loss) all_reduces its local rows' max and sum of
        exp on that axis (`sharding.split_class_collectives`); an expert-parallel layer
        exchanges its rows with all_to_all (`sharding.expert_collectives`); forward ones
        again when recomputed."""
        m = self.members[mi]
        if m.is_source:
            return []
        axis = sharding.split_class_axis(m.node.op, m.anno, s, self.mesh)
        ep = sharding.split_expert_axis(m.node.op, m.anno, s, self.mesh)
        if axis is not None:
            rows = sharding.local_shape(m.inputs[1].shape, self.in_layout(mi, s, 1), self.mesh)[0]
            cols = sharding.split_class_collectives(axis, rows)
        elif ep is not None:
            # an expert-parallel layer: its (token, expert) rows to the experts' ranks and back
            T, k = sharding.local_shape(m.inputs[1].shape, self.in_layout(mi, s, 1), self.mesh)
            hidden = m.inputs[0]
            cols = sharding.expert_collectives(ep, m.inputs[3].shape[0], T * k, hidden.shape[1] * hidden.itemsize,
                                               grads=2 if self.has_backward(mi) else 0)
        else:
            return []
        if m.key in self.regions:
            cols += [Collective(c.kind, c.axis, c.bytes, "recompute") for c in cols if c.phase == "forward"]
        return cols

    def activation_bytes(self, mi: int, s: Strategy) -> float:
        """Saved activations attributable to member `mi` alone (edges add their copies)."""
        m = self.members[mi]
        if m.kind == "input":
            return float(self.local_bytes(m.outputs[0], self.out_layouts(mi, s)[0]))
        if m.is_source:
            return 0.0
        total = 0.0
        lays = self.out_layouts(mi, s)
        in_region = m.key in self.regions
        view = REGISTRY[m.node.op].view
        for j, v in enumerate(m.outputs):
            saved = (not in_region and not view and v.name in self.needs_grad) or v in self._region_inputs
            if saved:
                total += self.local_bytes(v, lays[j])
        return total

    def _find_region_inputs(self) -> set[Value]:
        """Values read inside a recompute region and made outside it that nothing else saves."""
        out = set()
        if not self.regions:
            return out
        for m in self.members:
            r = self.regions.get(m.key)
            if r is None:
                continue
            for v in m.inputs:
                src = self.members[self.producer[v][0]]
                if src.is_source:
                    continue
                if self.regions.get(src.key) == r:
                    continue
                already = (src.key not in self.regions and not REGISTRY[src.node.op].view
                           and v.name in self.needs_grad)
                if not already:
                    out.add(v)
        return out

    def param_state(self, mi: int, s: Strategy, zero: int) -> tuple[float, float, float]:
        """(params, grads, optimizer) bytes per device of a source under strategy `s`."""
        m = self.members[mi]
        if m.kind not in ("param", "buffer"):
            return 0.0, 0.0, 0.0
        v = m.outputs[0]
        lay = self.out_layouts(mi, s)[0]
        elems = prod(sharding.local_shape(v.shape, lay, self.mesh))
        pb, gb, ob = self.state_bytes()
        if not v.dtype.is_floating_point:
            return float(elems * v.itemsize), 0.0, 0.0
        if not m.trainable:
            return float(elems * pb), 0.0, 0.0
        g, o = float(elems * gb), float(elems * ob)
        d = self.dp_index()
        if d is not None and lay[d] == "R":
            n = self.mesh[self.dp_axis]
            if zero >= 2:
                g /= n
            if zero >= 1:
                o /= n
        return float(elems * pb), g, o

    def zero_applies(self, mi: int, s: Strategy, zero: int) -> bool:
        """A trainable param kept R on dp whose optimizer state ZeRO shards."""
        d = self.dp_index()
        m = self.members[mi]
        return (zero >= 1 and d is not None and m.trainable and m.outputs[0].dtype.is_floating_point
                and self.out_layouts(mi, s)[0][d] == "R")

    def optimizer_gather(self, mi: int, s: Strategy, zero: int) -> Collective | None:
        """z>=1: the all_gather over dp of the updated param after the step."""
        if not self.zero_applies(mi, s, zero):
            return None
        v = self.members[mi].outputs[0]
        return Collective("all_gather", self.dp_axis, self.local_bytes(v, self.out_layouts(mi, s)[0]), "optimizer")

    def optimizer_time(self, mi: int, s: Strategy, zero: int) -> float:
        """Seconds of the optimizer step for a trainable parameter under `s` (see the module
        docstring): its local elements (/ n when ZeRO shards its state), memory-bound."""
        m = self.members[mi]
        if m.kind != "param" or not m.trainable or not m.outputs[0].dtype.is_floating_point:
            return 0.0
        v = m.outputs[0]
        elems = prod(sharding.local_shape(v.shape, self.out_layouts(mi, s)[0], self.mesh))
        if self.zero_applies(mi, s, zero):
            elems /= self.mesh[self.dp_axis]
        nbytes, ops = elems * ADAMW_BYTES, ADAMW_OPS
        if self.precision == "mixed":
            nbytes, ops = nbytes + elems * MASTER_BYTES, ops + MASTER_OPS
        return nbytes / self.profile.hbm_bandwidth + ops * self.profile.op_overhead

    def grad_reduce_scatter(self, mi: int, s: Strategy) -> Collective:
        """z>=2: the one reduce_scatter replacing a param's per-edge gradient all_reduces."""
        v = self.members[mi].outputs[0]
        return Collective("reduce_scatter", self.dp_axis, self.local_bytes(v, self.out_layouts(mi, s)[0]), "backward")

    # ---- per edge ----------------------------------------------------------------------

    def edge_collectives(self, e: Edge, sp: Strategy, sc: Strategy) -> tuple[Collective, ...]:
        """Forward and backward collectives of an edge (recompute repeats of the forward
        ones carry phase "recompute")."""
        splits = frozenset(i for i, lab in enumerate(sc) if lab is not None)
        return self.layout_collectives(e, self.out_layouts(e.src, sp)[e.out],
                                       self.in_layout(e.dst, sc, e.arg), splits)

    def layout_collectives(self, e: Edge, src, dst, splits: frozenset) -> tuple[Collective, ...]:
        """`edge_collectives` from the layouts (what the edge's cost depends on)."""
        cols = _reshard_cached(src, dst, e.value.shape, self.itemsize(e.value), self.mesh_items,
                               splits, e.value.name in self.needs_grad)
        if cols and self.recomputed_edge(e):
            cols = cols + tuple(Collective(c.kind, c.axis, c.bytes, "recompute", c.dim, c.dim2)
                                for c in cols if c.phase == "forward")
        return cols

    def time_of(self, c: Collective) -> float:
        return collective_time(c.kind, self.mesh[c.axis], c.bytes, self.cluster.link(c.axis))

    def time_of_bytes(self, kind: str, axis: str, nbytes: float) -> float:
        return collective_time(kind, self.mesh[axis], nbytes, self.cluster.link(axis))

    def window_fraction(self, mi: int) -> float:
        """The share of a ZeRO-3 block parameter's gathered copy counted as alive (1 for
        everything else; see the module docstring)."""
        return self._window.get(mi, 1.0)

    def is_weight_gather(self, src: int, c: Collective) -> bool:
        return (c.kind == "all_gather" and c.phase == "forward" and c.axis == self.dp_axis
                and self.members[src].kind == "param")

    def solver_time(self, c: Collective, src: int) -> float:
        """The CP-SAT objective's linear price of collective `c` on a value of member
        `src`: its time, or with overlap on the exposed share of parameter communication
        (gradient reductions: GRAD_EXPOSED of the bandwidth time, the latency amortised by
        buckets; ZeRO-3 weight gathers: GATHER_EXPOSED, twice for a block's)."""
        t = self.time_of(c)
        if not self.overlap_prices:
            return t
        m = self.members[src]
        if m.trainable and c.phase == "backward" and c.kind == "all_reduce":
            n = self.mesh[c.axis]
            return GRAD_EXPOSED * max(t - 2 * (n - 1) * self.cluster.link(c.axis).alpha, 0.0)
        if m.trainable and c.phase == "backward" and c.kind == "reduce_scatter":
            return GRAD_EXPOSED * t
        if not self.regions and self.is_weight_gather(src, c):
            return GATHER_EXPOSED * t * (2 if src in self._window else 1)
        return t

    def grad_through(self, mi: int, strat: list[Strategy], steps) -> tuple[int, int] | None:
        """(param member, its local bytes) when the program reduces that parameter's gradient
        in a bucket instead of the gradient of member `mi`'s output (passes/overlap.py's
        `through_op`): `mi`'s output is only all_reduced in backward (it is replicated on
        those axes, so `mi` computes the same on every rank), its one input that needs a
        gradient is a trainable parameter used by `mi` alone as stored, no larger than the
        output. The solver still prices the output's all_reduce (a small overestimate)."""
        m = self.members[mi]
        if m.is_source or len(m.outputs) != 1 or not steps:
            return None
        if any(c.kind != "all_reduce" or c.phase != "backward"
               for st, _, _, g in steps for c in st.collectives(g)):
            return None
        grads = [k for k, v in enumerate(m.inputs) if v.name in self.needs_grad]
        if len(grads) != 1:
            return None
        p, _ = self.producer[m.inputs[grads[0]]]
        if not self.members[p].trainable or len(self.out_edges[p]) != 1:
            return None
        lay = self.out_layouts(p, strat[p])[0]
        if self.in_layout(mi, strat[mi], grads[0]) != lay:
            return None
        pb = self.local_bytes(self.members[p].outputs[0], lay)
        if pb > self.local_bytes(m.outputs[0], self.out_layouts(mi, strat[mi])[0]):
            return None
        return p, pb

    def hiding_linears(self, c: Collective, dst: int, src: int) -> list[int]:
        """The linears whose weight gradients collective `c` (into member `dst`, on a value
        of `src`) runs behind in the program (passes/overlap.py's `async_input_grads`): the
        backward all_reduce of an input that feeds only linears (as their input; one, or
        the query, key and value projections), each weight needing a gradient. [] when it
        is synchronous."""
        if c.kind != "all_reduce" or c.phase != "backward":
            return []
        m = self.members[dst]
        p = self.producer.get(m.inputs[0]) if not m.is_source and m.inputs else None
        if p is None or p[0] != src:
            return []
        out = []
        for e in self.out_edges[src]:
            if e.out != p[1]:
                continue
            n = self.members[e.dst]
            if (e.arg != 0 or n.node.op != "linear" or len(n.inputs) < 2 or n.inputs[0] in n.inputs[1:]
                    or n.inputs[1].name not in self.needs_grad):
                return []
            out.append(e.dst)
        return out

    def is_param_grad_reduce(self, e: Edge, c: Collective) -> bool:
        """The per-edge dp gradient all_reduce of a trainable param (ZeRO-2 replaces it)."""
        return (c.kind == "all_reduce" and c.phase == "backward" and c.axis == self.dp_axis
                and self.members[e.src].trainable)

    def edge_memory(self, e: Edge, sc: Strategy, cols) -> float:
        """The operand copy a forward collective makes, saved when the consumer runs a
        backward (and is not recomputed)."""
        return self.layout_edge_memory(e, self.in_layout(e.dst, sc, e.arg), cols)

    def layout_edge_memory(self, e: Edge, dst, cols) -> float:
        if not any(c.phase == "forward" for c in cols):
            return 0.0
        if not self.has_backward(e.dst) or self.recomputed_edge(e):
            return 0.0
        b = float(self.local_bytes(e.value, dst))
        if any(self.is_weight_gather(e.src, c) for c in cols):
            b *= self.window_fraction(e.src)
        return b

    def recomputed_edge(self, e: Edge) -> bool:
        """The edge's reshard runs inside a recompute region (so again in backward), as plan
        application places it."""
        return self.regions.get(self.members[e.dst].key) is not None and self.reshard_inside(e)

    def reshard_inside(self, e: Edge) -> bool:
        """An edge into a recompute region is resharded inside it when its value is a
        parameter (gathered again when recomputed) or made in the same region."""
        src = self.members[e.src]
        return src.kind in ("param", "buffer") or (
            self.regions.get(src.key) == self.regions.get(self.members[e.dst].key))

    # ---- whole plans -----------------------------------------------------------------------

    def full_strategies(self, strategies: dict) -> list[Strategy]:
        rep = tuple(None for _ in self.mesh)
        return [tuple(strategies.get(m.key, rep)) for m in self.members]

    def value_chains(self, mi: int, j: int, strat: list[Strategy], rs_params: set[int]):
        """The distinct program steps that reshard output `j` of member `mi` for all its
        consumers under `strat` (collective CSE, as plan application shares them): a list of
        (Step, region id, first consumer, needs_grad) -- one entry per step shared by every
        consumer whose chain starts with it -- and the saved operand copies (consumer, bytes),
        one per distinct resharded result a consumer with a backward keeps."""
        lay = self.out_layouts(mi, strat[mi])[j]
        steps, saved, seen, kept = [], [], set(), set()
        dp = self.dp_axis
        for e in self.out_edges[mi]:
            if e.out != j:
                continue
            sc = strat[e.dst]
            splits = frozenset(i for i, lab in enumerate(sc) if lab is not None)
            dst = self.in_layout(e.dst, sc, e.arg)
            grad = e.value.name in self.needs_grad
            # a value made outside the consumer's recompute region is resharded outside it
            region = self.regions.get(self.members[e.dst].key)
            if region is not None and not self.reshard_inside(e):
                region = None
            chain = _steps_cached(lay, dst, e.value.shape, self.itemsize(e.value), self.mesh_items,
                                  splits, grad)
            if mi in rs_params:      # ZeRO-2: the dp gradient all_reduce becomes one reduce_scatter
                chain = tuple(st for st in chain if not (st.op == "copy_to" and st.axis == dp))
            prefix: tuple = (region,)
            for st in chain:
                prefix = prefix + ((st.axis, st.op, st.attrs),)
                if prefix not in seen:
                    seen.add(prefix)
                    steps.append((st, region, e.dst, grad))
            fwd_cols = [c for st in chain for c in st.collectives(grad) if c.phase == "forward"]
            if fwd_cols and region is None and self.has_backward(e.dst) and prefix not in kept:
                kept.add(prefix)
                b = float(self.local_bytes(e.value, dst))
                if any(self.is_weight_gather(mi, c) for c in fwd_cols):
                    b *= self.window_fraction(mi)
                saved.append((e.dst, b))
        return steps, saved

    def rs_params(self, strat: list[Strategy], zero: int) -> set[int]:
        """ZeRO-2/3: trainable params kept R on dp whose every use splits dp (each use's
        gradient is a partial sum there): one reduce_scatter replaces their all_reduces."""
        d = self.dp_index()
        out = set()
        if zero < 2 or d is None:
            return out
        for m in self.members:
            if not self.zero_applies(m.index, strat[m.index], zero) or not self.out_edges[m.index]:
                continue
            if all(strat[e.dst][d] is not None and self.in_layout(e.dst, strat[e.dst], e.arg)[d] == "R"
                   for e in self.out_edges[m.index]):
                out.add(m.index)
        return out

    def evaluate(self, strategies: dict[str, Strategy], zero: int = 0, schedule: bool = True) -> CostReport:
        """The step time, bytes per collective and memory of a plan (missing keys are
        all-replicated). Collectives are counted as the program runs them: a step shared by
        several consumers of a value once (collective CSE). The step time is the simulated
        schedule's makespan (compiler/schedule.py), `additive_time` compute + communication.
        `schedule=False`: no simulation, the step is the additive time (all of it exposed)."""
        strat = self.full_strategies(strategies)
        nodes: dict[str, NodeCost] = {}
        comp = {"forward": 0.0, "backward": 0.0, "recompute": 0.0, "optimizer": 0.0}
        optimizer: dict[str, float] = {}
        comm_axis = {a: 0.0 for a in self.axes}
        by_kind: dict[str, int] = {}
        by_phase: dict[str, dict[str, int]] = {p: {} for p in PHASES}
        mem = {"params": 0.0, "grads": 0.0, "optimizer": 0.0, "activations": 0.0}
        flops = 0.0
        zcols = []
        comms = []

        def count(c: Collective) -> float:
            t = self.time_of(c)
            k = f"{c.kind}:{c.axis}"
            by_kind[k] = by_kind.get(k, 0) + int(c.bytes)
            by_phase[c.phase][k] = by_phase[c.phase].get(k, 0) + int(c.bytes)
            comm_axis[c.axis] += t
            return t

        for m in self.members:
            s = strat[m.index]
            c = self.compute(m.index, s)
            # the op's own collectives are priced in its compute (what the search sees); the
            # report lists them as communication into the node, run just before its compute
            inner = [(col, count(col)) for col in self.op_collectives(m.index, s)]
            t_fwd = sum(t for col, t in inner if col.phase == "forward")
            t_re = sum(t for col, t in inner if col.phase == "recompute")
            t_bwd = sum(t for col, t in inner if col.phase == "backward")
            nodes[m.key] = NodeCost(c.fwd_time - t_fwd, c.bwd_time - t_bwd, c.recompute_time - t_re, c.flops,
                                    c.bwd_flops, c.bytes, list(inner))
            comms += [(col, t, m.index, m.index) for col, t in inner]
            comp["forward"] += c.fwd_time - t_fwd
            comp["backward"] += c.bwd_time - t_bwd
            comp["recompute"] += c.recompute_time - t_re
            flops += (c.flops + c.bwd_flops) * self.split_factor(s) / self.cluster.devices
            mem["activations"] += self.activation_bytes(m.index, s)
            t_opt = self.optimizer_time(m.index, s, zero)
            if t_opt:
                optimizer[m.key] = t_opt
                comp["optimizer"] += t_opt
            p, g, o = self.param_state(m.index, s, zero)
            mem["params"] += p
            mem["grads"] += g
            mem["optimizer"] += o
        rs = self.rs_params(strat, zero)
        for m in self.members:
            for j in range(len(m.outputs)):
                steps, saved = self.value_chains(m.index, j, strat, rs)
                via = self.grad_through(m.index, strat, steps) if self.overlapped else None
                for st, region, consumer, grad in steps:
                    cols = st.collectives(grad)
                    if region is not None:
                        cols += [Collective(c.kind, c.axis, c.bytes, "recompute", c.dim, c.dim2)
                                 for c in cols if c.phase == "forward"]
                    target = nodes[self.members[consumer].key]
                    for col in cols:
                        src = m.index
                        if via is not None:       # the parameter's gradient, bucketed
                            src, col = via[0], Collective(col.kind, col.axis, via[1], col.phase)
                        t = count(col)
                        target.collectives.append((col, t))
                        comms.append((col, t, consumer, src))
                for _, b in saved:
                    mem["activations"] += b
        for m in self.members:
            s = strat[m.index]
            cols = []
            if m.index in rs:
                cols.append(self.grad_reduce_scatter(m.index, s))
            g = self.optimizer_gather(m.index, s, zero)
            if g is not None:
                cols.append(g)
            for col in cols:
                t = count(col)
                zcols.append((m.key, col, t))
                comms.append((col, t, m.index, m.index))
                nodes[m.key].collectives.append((col, t))
        mem["total"] = sum(mem.values())
        compute_time = sum(comp.values())
        comm_time = sum(comm_axis.values())
        report = CostReport(compute_time + comm_time, compute_time, comm_time, comp, comm_axis,
                            dict(sorted(by_kind.items())),
                            {p: dict(sorted(b.items())) for p, b in by_phase.items()},
                            mem, flops, nodes, zcols, comms, compute_time + comm_time, optimizer=optimizer)
        if not schedule:
            report.exposed, report.hidden = dict(comm_axis), {a: 0.0 for a in self.axes}
            return report
        return self.reschedule(report, zero)

    def reschedule(self, report: CostReport, zero: int = 0) -> CostReport:
        """`report` (an `evaluate` of this model) with its schedule simulated again under
        the current `self.overlap` -- the bucket size and async TP change the schedule only,
        not the collectives, bytes or memory `evaluate` priced (the ZeRO-3 prefetch depth
        does change memory: this model's window was fixed when it was made), so tuning them
        needs no new evaluation. A new report; `report` is left as it was."""
        from autopar.compiler.schedule import simulate
        sched = simulate(self, report, zero, self.overlap)
        return replace(report, exposed=dict(sched.exposed), hidden=dict(sched.hidden), schedule=sched,
                       step_time=sched.makespan if sched.overlap else report.additive_time)


# ---- annotated IR -------------------------------------------------------------------------

def format_flops(f: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("KFLOP", 1e3)):
        if f >= scale:
            return f"{f / scale:.3g} {unit}"
    return f"{f:.0f} FLOP"


def annotate_costs(graph: Graph, plan, profile: DeviceProfile | str | None = None,
                   report: CostReport | None = None) -> str:
    """The IR with each node's cost: per-device FLOPs, compute time, bytes moved and the
    collectives feeding it, and each value's layout.

        >>> print(annotate_costs(graph, plan))                    # doctest: +SKIP
        %linear: f32[8,1024] {dp:S(0), tp:S(1)} = linear(...)  [fwd 2.1 MFLOP 12.0 us, 40 KiB; ...]
    """
    from autopar.compiler.cluster import load_profile
    if profile is None or isinstance(profile, str):
        profile = load_profile(profile or plan.device)
    model = CostModel(graph, Cluster(dict(plan.mesh), profile), recompute=plan.recompute,
                      dp_axis=plan.dp_axis, overlap=plan.overlap)
    report = report or model.evaluate({k: tuple(v) for k, v in plan.strategies.items()}, plan.zero)
    mesh = dict(plan.mesh)

    def node_note(node: Node) -> str:
        nc = report.nodes.get(sharding.producer_key(node))
        if nc is None:
            return ""
        parts = [f"fwd {format_flops(nc.flops)} {format_time(nc.fwd_time)}, {format_bytes(nc.bytes)}"]
        if nc.bwd_time:
            parts.append(f"bwd {format_time(nc.bwd_time)}")
        for col, t in nc.collectives:
            parts.append(f"{col.kind}({col.axis}) {col.phase} {format_bytes(col.bytes)} {format_time(t)}")
        return "; ".join(parts)

    def value_note(v: Value) -> str:
        lay = plan.layouts.get(v.name)
        return f" {sharding.format_layout(mesh, tuple(lay))}" if lay else ""
    text = print_graph(graph, node_note=node_note, value_note=value_note)
    extra = []
    for key, col, t in report.zero_collectives:
        extra.append(f"# zero: {col.kind}({col.axis}) {col.phase} {format_bytes(col.bytes)} "
                     f"{format_time(t)}  %{key}")
    return text + ("\n".join(extra) + "\n" if extra else "")


__all__ = ["CostModel", "CostReport", "NodeCost", "Member", "Edge", "collective_time",
           "annotate_costs", "recompute_regions", "recompute_savings", "PHASES", "GRAD_EXPOSED", "GATHER_EXPOSED",
           "overlap_settings", "ADAMW_BYTES", "MASTER_BYTES"]

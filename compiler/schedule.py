"""The predicted training step as a schedule: one compute stream, one communication stream
per mesh axis, the collectives placed where the program runs them.

The cost model (compiler/cost.py) prices every op and collective; this module decides what
runs at the same time. Its makespan is the step time the search ranks plans by, and its
per-axis split of communication time into *exposed* (the compute stream waits) and
*hidden* (compute runs meanwhile) is what the explanation and `autopar plan --timeline`
show.

    >>> sched = simulate(model, report, zero=0, overlap=OVERLAP_DEFAULTS)   # doctest: +SKIP
    >>> sched.makespan, sched.exposed, sched.hidden                        # doctest: +SKIP
    (0.0123, {'dp': 0.0004}, {'dp': 0.0031})
    >>> json.dump(trace(sched), open("step.json", "w"))                    # doctest: +SKIP

How the program runs a step (passes/overlap.py, backends/runtime/overlap.py), and so how
it is simulated:

- forward: nodes in program order on the compute stream; backward: the nodes in reverse,
  each taking its backward time (2x forward, as the cost model prices it) plus its
  recompute time when it lies in a recompute region;
- a collective into a node that is not parameter communication (an activation reshard, a
  tensor-parallel reduction) is synchronous in the program: the compute stream waits for it
  (forward collectives before the node's forward, backward ones after its backward) --
  except the backward all_reduce of the input of linears (`CostModel.hiding_linears`),
  which the program launches once the input's gradient is made, half-way through the
  linears' backward, and waits for after the weights' gradients;
- gradient buckets: parameters whose gradient is reduced (the per-use dp/tp all_reduce of
  a replicated parameter, ZeRO-2's reduce_scatter) are grouped with `buckets.fill` in the
  order backward finishes them (latest first use first), the first bucket small; a bucket
  is one collective per axis, launched on that axis's stream when its last gradient is
  produced (after the backward of the earliest first use of its parameters) and waited for
  before its parameters step (a parameter whose gradient the program reduces one op down,
  `CostModel.grad_through`, counts as that parameter's);
- the optimizer step (`CostModel.optimizer_time`, memory-bound AdamW) is compute after
  backward: a ZeRO-0 fp32 program with buckets still in flight steps the parameters of the
  longest reduced prefix of them first (and those in no bucket), waits for the rest, then
  steps theirs; otherwise every collective is waited for first. ZeRO-1/2's all_gather of
  the updated parameters follows it;
- ZeRO-3 (FSDP's schedule, when the overlap pass applies it: no recompute regions): a
  block's parameters are gathered by one all_gather per dtype (their bytes summed, one
  latency: the runtime's flat gather), issued when the compute stream enters the block
  `prefetch` blocks earlier (parameters outside blocks at the start), gathered again in
  backward in reverse block order the same way; a block's gradients are reduce_scattered
  by one asynchronous call per dtype when backward leaves the block (the root's at the end);
- async TP (Plan.overlap's `async_tp`; "auto": simulated both ways, the faster kept): a
  sequence-parallel all_gather into linears and a linear's reduce_scatter run as their
  ring's n - 1 steps (each 1/(n-1) of the collective's time) beside the linear's n pieces of
  rows -- a step's transfer is waited for before the next piece; the gather's backward
  reduce_scatter runs beside the linears' weight gradients, a reduce_scatter's backward
  gather around the ring beside the input gradient's pieces (rt.all_gather_linears,
  rt.linear_reduce_scatter);
- optimizer-phase collectives (ZeRO-1/2's all_gather of updated parameters) run after the
  optimizer step, synchronously;
- hiding is not free: compute beside a collective runs slower (the profile's
  `overlap_slowdown`), so the makespan adds that fraction of the hidden time (`interference`;
  the trace's events are not stretched).

With overlap off every collective is synchronous and the makespan is the additive sum of
compute and communication, the cost model without a schedule.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from autopar.compiler import buckets
from autopar.compiler.patterns import block_of

# Bucket caps, as passes/overlap.py sets them: gradients that would fill fewer than
MIN_BUCKETS = buckets.MIN_BUCKETS
# A peer's schedule, for pricing other systems' programs on the same streams (not a plan
# setting: the programs autopar writes overlap). With this key true in `overlap`, nothing is
# overlapped -- every collective synchronous, ZeRO-3 weights gathered per use, no collective
# matmuls -- but gradients are reduced as one collective per buffer (kind, axes, dtype) after
# backward ends, not one per parameter use: Megatron-LM's own DDP of 2021
# (benchmarks/plan_quality.py prices the paper's runs so).
PEER_UNOVERLAPPED = "peer_unoverlapped"
AFTER_BACKWARD = -1                     # launch_after's key for "when backward has ended"


def bucket_caps(total: int, bucket_bytes: int, first_bucket_bytes: int) -> tuple[int, int]:
    """(first bucket's cap, the others' cap): the overlap pass's rule, `buckets.caps`."""
    return buckets.caps(total, bucket_bytes, first_bucket_bytes)


@dataclass
class Event:
    """One interval on one stream ("compute" or "comm:<axis>"). Times in seconds."""
    stream: str
    name: str
    start: float
    dur: float
    phase: str                      # forward | backward | recompute | optimizer
    kind: str = "compute"           # compute, or the collective kind
    axis: str | None = None
    hidden: float = 0.0             # seconds of it that compute overlaps (communication)
    behind: tuple[str, str] | None = None   # first and last compute event it hides behind

    @property
    def end(self) -> float:
        return self.start + self.dur


@dataclass
class Bucket:
    """A gradient bucket as the simulator launches it."""
    index: int
    kind: str                       # all_reduce | reduce_scatter
    axes: tuple[str, ...]
    params: tuple[str, ...]
    nbytes: float
    ready: str                      # the node whose backward completes its last gradient
    launch: float = 0.0             # seconds from the step's start
    events: list[Event] = field(default_factory=list)


@dataclass
class Schedule:
    makespan: float
    events: list[Event]
    buckets: list[Bucket]
    exposed: dict[str, float]       # per axis: communication the compute stream waits for
    hidden: dict[str, float]        # per axis: communication compute overlaps
    compute: float                  # busy time of the compute stream
    overlap: bool
    interference: float = 0.0       # compute slowed by the hidden communication (in makespan)
    prefetch: int = 0
    gathered_blocks: int = 0        # ZeRO-3: blocks whose full weights are alive at once
    async_tp: bool = False          # the sequence-parallel collectives run as collective matmuls
    collective_matmuls: int = 0     # how many

    def streams(self) -> list[str]:
        out = ["compute"]
        for e in self.events:
            if e.stream not in out:
                out.append(e.stream)
        return out


def simulate(model, report, zero: int = 0, overlap=None) -> Schedule:
    """Run one training step of the plan `report` prices (CostModel.evaluate's breakdown,
    with its `comms` list) on the streams; `overlap`: Plan.overlap (default: DDP's
    defaults), False or {"enabled": False} for the synchronous program. With `async_tp`
    "auto" the step is simulated with the plain collectives and with the collective matmuls;
    the faster is the schedule (its `async_tp` the choice)."""
    from autopar.compiler.cost import overlap_settings
    cfg = overlap_settings(overlap)
    want = cfg.get("async_tp", "auto")
    if not cfg["enabled"] or want is False or cfg.get(PEER_UNOVERLAPPED):
        return _simulate(model, report, zero, cfg, False)
    if want is True:
        return _simulate(model, report, zero, cfg, True)
    plain = _simulate(model, report, zero, cfg, False)
    if not matmul_sites(model, report):
        return plain
    ring = _simulate(model, report, zero, cfg, True)
    return ring if ring.makespan < plain.makespan else plain


def matmul_sites(model, report) -> dict[tuple, tuple]:
    """The collective matmuls of async TP, as passes/overlap.py's `async_tp` finds them in
    the program: a forward all_gather of an activation into linears (every use of the value
    a linear's input; its gradient reduce_scattered), or a forward reduce_scatter of a
    linear's output, on a dim other than the last. (kind, consumer member, source member)
    -> the forward item of report.comms."""
    members = model.members
    out = {}
    backward = {(c.kind, d, s) for c, _, d, s in report.comms if c.phase == "backward"}
    for item in report.comms:
        col, _, dst, src = item
        if col.phase != "forward" or col.kind not in ("all_gather", "reduce_scatter") or col.dim is None:
            continue
        sm = members[src]
        if sm.kind != "node" or model.mesh.get(col.axis, 1) == 1 or not sm.outputs \
                or col.dim >= len(sm.outputs[0].shape) - 1:
            continue
        if col.kind == "all_gather":
            if ("reduce_scatter", dst, src) in backward and linears_of(model, src, dst):
                out[("all_gather", dst, src)] = item
        elif sm.node.op == "linear" and ("all_gather", dst, src) in backward:
            out[("reduce_scatter", dst, src)] = item
    return out


def linears_of(model, src: int, dst: int) -> list[int]:
    """The linears a gathered value of `src` feeds (into `dst`, the first of them): every
    use of that output, each as the linear's input. [] when one use is something else."""
    m = model.members[dst]
    p = model.producer.get(m.inputs[0]) if not m.is_source and m.inputs else None
    if m.node.op != "linear" or p is None or p[0] != src:
        return []
    out = []
    for e in model.out_edges[src]:
        if e.out != p[1]:
            continue
        n = model.members[e.dst]
        if e.arg != 0 or n.node.op != "linear" or n.inputs[0] in n.inputs[1:]:
            return []
        out.append(e.dst)
    return sorted(out)


def _simulate(model, report, zero: int, cfg: dict, ring: bool) -> Schedule:
    on = bool(cfg["enabled"])
    after = on and bool(cfg.get(PEER_UNOVERLAPPED))
    ring = ring and not after
    prefetch = max(int(cfg["prefetch"]), 0)
    members = model.members
    dp = model.dp_axis
    events: list[Event] = []
    free: dict[str, float] = {}                 # per stream: when it is next free
    tc = 0.0                                    # compute stream

    def comm(col, seconds, name, phase, earliest, blocking):
        nonlocal tc
        stream = f"comm:{col.axis}"
        start = max(free.get(stream, 0.0), earliest)
        if blocking:
            start = max(start, tc)
        ev = Event(stream, name, start, seconds, phase, col.kind, col.axis)
        events.append(ev)
        free[stream] = ev.end
        if blocking:
            tc = ev.end
        return ev

    def run(name, seconds, phase):
        nonlocal tc
        if seconds <= 0:
            return
        events.append(Event("compute", name, tc, seconds, phase))
        tc += seconds

    # ---- what each collective is: parameter communication or on the critical path ----------
    # report.comms: (Collective, seconds, consumer member, source member)
    by_consumer: dict[int, list] = {}
    grad_cols: dict[int, list] = {}             # param member -> its gradient reductions
    optimizer = []
    for item in report.comms:
        col, t, dst, src = item
        if col.phase == "optimizer":
            optimizer.append(item)
            continue
        sm = members[src]
        if on and col.phase == "backward" and sm.trainable and col.kind in ("all_reduce", "reduce_scatter"):
            grad_cols.setdefault(src, []).append(item)
            continue
        by_consumer.setdefault(dst, []).append(item)
    forward_of: dict[int, int] = {}             # param member -> its forward collectives
    for col, _, _, src in report.comms:
        if col.phase == "forward" and members[src].kind == "param":
            forward_of[src] = forward_of.get(src, 0) + 1
    first_use: dict[int, int] = {}
    for m in members:
        if m.is_source:
            continue
        for v in m.inputs:
            p = model.producer[v][0]
            if members[p].kind == "param":
                first_use.setdefault(p, m.index)
    # ZeRO-3's schedule: forward all_gathers of dp-sharded parameters become prefetches
    zero3 = (on and not after and zero == 3 and dp is not None and model.mesh.get(dp, 1) > 1 and not model.regions)
    gathers: dict[int, list] = {}               # consumer -> gather items
    if zero3:
        for dst, items in by_consumer.items():
            keep = []
            for item in items:
                col, _, _, src = item
                if (col.kind == "all_gather" and col.phase == "forward" and col.axis == dp
                        and members[src].kind == "param"):
                    gathers.setdefault(dst, []).append(item)
                else:
                    keep.append(item)
            by_consumer[dst] = keep
        zero3 = bool(gathers)

    # ---- async TP: collective matmuls (rt.all_gather_linears, rt.linear_reduce_scatter) ----
    # the collective runs as its ring's n - 1 steps, each 1/(n-1) of its time, and the
    # linear computes on one rank's rows (1/n of it) per step
    gather_at: dict[int, tuple] = {}            # first linear -> (forward all_gather item, its linears)
    scatter_at: dict[int, tuple] = {}           # linear -> its output's forward reduce_scatter item
    behind_of: dict[int, list[int]] = {}        # id(backward reduce_scatter item) -> the linears it hides behind
    gathered_grad: dict[int, int] = {}          # id(backward all_gather item) -> the linear that consumes it
    if on and ring:
        sites = matmul_sites(model, report)
        fused = {k for (kind, dst, src) in sites if kind == "all_gather" for k in linears_of(model, src, dst)}
        for (kind, dst, src), item in sites.items():
            if kind == "reduce_scatter" and src in fused:
                continue                        # the program fuses the linear with its gather
            back = "reduce_scatter" if kind == "all_gather" else "all_gather"
            bitem = next(x for x in by_consumer.get(dst, []) if x[0].phase == "backward"
                         and x[0].kind == back and x[3] == src)
            by_consumer[dst] = [x for x in by_consumer[dst] if x is not item]
            if kind == "all_gather":
                gather_at[dst] = (item, linears_of(model, src, dst))
                behind_of[id(bitem)] = gather_at[dst][1]
            else:
                scatter_at[src] = item
                gathered_grad[id(bitem)] = src
    ring_grad: dict[int, tuple] = {}            # linear -> the backward all_gather item its backward runs

    def ring_gather(item, work, where, phase):
        """Each rank's rows through `work` seconds of compute as they arrive around the ring."""
        nonlocal tc
        col, t = item[0], item[1]
        n = model.mesh[col.axis]
        for k in range(n):
            ev = comm(col, t / (n - 1), f"{col.kind}({col.axis}) ring step {k + 1}/{n - 1} -> {where}", phase,
                      tc, False) if k < n - 1 else None
            run(f"{where} rows {k + 1}/{n}", work / n, phase)
            if ev is not None:
                tc = max(tc, ev.end)

    def ring_scatter(item, work, where):
        """The running sums around the ring, this rank's partial rows computed meanwhile."""
        nonlocal tc
        col, t = item[0], item[1]
        n = model.mesh[col.axis]
        run(f"{where} rows 1/{n}", work / n, "forward")
        for k in range(1, n):
            ev = comm(col, t / (n - 1), f"{col.kind}({col.axis}) ring step {k}/{n - 1} <- {where}", "forward",
                      tc, False)
            run(f"{where} rows {k + 1}/{n}", work / n, "forward")
            tc = max(tc, ev.end)

    def block_index_of(mi):
        b = block_of(members[mi].module) if members[mi].module else None
        return b[1] if b else None
    nodes = [m for m in members if not m.is_source]
    order: list[str] = []                       # block instances in forward order
    for m in nodes:
        b = block_index_of(m.index)
        if b is not None and b not in order:
            order.append(b)
    pos = {b: k for k, b in enumerate(order)}

    def param_block(src):
        name = members[src].key
        b = block_of(name.rsplit(".", 1)[0]) if "." in name else None
        return b[1] if b else None
    gather_of_block: dict = {}                  # block instance (None: outside blocks) -> items
    for dst in sorted(gathers):
        for item in gathers[dst]:
            gather_of_block.setdefault(param_block(item[3]), []).append(item)
    done_gather: dict[int, float] = {}          # consumer -> when its gathers are done

    def by_dtype(items):
        groups: dict = {}
        for item in items:
            groups.setdefault(str(members[item[3]].outputs[0].dtype), []).append(item)
        return groups.values()

    def flat_call(kind, group, what, phase):
        """One collective for a unit's weights of one dtype, as the runtime runs it: their
        bytes summed, the latency paid once."""
        axis = group[0][0].axis
        t = model.time_of_bytes(kind, axis, sum(c.bytes for c, *_ in group))
        keys = [members[src].key for *_, src in group]
        name = f"{kind}({axis}) {keys[0]}" + (f" +{len(keys) - 1}" if len(keys) > 1 else "") + what
        return comm(_Col(kind, axis), t, name, phase, tc, False)

    def issue_gathers(block, phase, tag=""):
        for group in by_dtype(gather_of_block.pop(block, []) if phase == "forward" else regather.pop(block, [])):
            ev = flat_call("all_gather", group, tag, phase)
            for _, _, dst, _ in group:
                done_gather[dst] = max(done_gather.get(dst, 0.0), ev.end)

    pending_rs: dict = {}                       # ZeRO-3 unit -> its gradients' reduce_scatters so far

    def scatter_unit(block):
        for group in by_dtype(pending_rs.pop(block, [])):
            flat_call("reduce_scatter", group, " grads", "backward")

    # ---- forward -------------------------------------------------------------------------
    regather = {b: list(items) for b, items in gather_of_block.items() if b is not None}
    if zero3:
        issue_gathers(None, "forward")
        for b in order[:prefetch + 1]:
            issue_gathers(b, "forward")
    current = None
    fused_done: set[int] = set()                # linears run by their gather's ring
    for m in nodes:
        nc = report.nodes[m.key]
        b = block_index_of(m.index)
        if zero3 and b is not None and b != current:
            current = b
            k = pos[b] + prefetch
            if k < len(order):
                issue_gathers(order[k], "forward")
        if m.index in done_gather:
            tc = max(tc, done_gather.pop(m.index))
        for col, t, dst, src in by_consumer.get(m.index, []):
            if col.phase == "forward":
                comm(col, t, f"{col.kind}({col.axis}) -> {m.key}", "forward", tc, True)
        where = f"{m.module or '(root)'} {m.node.op} %{m.key}"
        if m.index in gather_at:                # the linears on each rank's rows as they arrive
            item, lins = gather_at[m.index]
            work = sum(report.nodes[members[k].key].fwd_time for k in lins)
            ring_gather(item, work, where + (f" +{len(lins) - 1} linears" if len(lins) > 1 else ""), "forward")
            fused_done.update(lins)
            continue
        if m.index in fused_done:
            continue
        if m.index in scatter_at:
            ring_scatter(scatter_at[m.index], nc.fwd_time, where)
            continue
        run(where, nc.fwd_time, "forward")
    # ---- buckets -------------------------------------------------------------------------
    bucket_list: list[Bucket] = []
    launch_after: dict[int, list[Bucket]] = {}
    async_rs: dict[int, list] = {}              # ZeRO-3 per-use reduce_scatters, by consumer
    bucketed = []
    for p, items in grad_cols.items():
        if forward_of.get(p) or any(c.kind == "reduce_scatter" and d != p for c, _, d, _ in items):
            # ZeRO-3's per-use reduce_scatters: asynchronous under FSDP's schedule, else
            # synchronous inside autograd
            # a parameter resharded in forward (a gathered weight) keeps its per-use
            # reductions in the program (the overlap pass buckets copy_to chains only)
            for item in items:
                rs = zero3 and item[0].kind == "reduce_scatter" and item[0].axis == dp
                (async_rs if rs else by_consumer).setdefault(item[2], []).append(item)
            continue
        axes = tuple(dict.fromkeys(c.axis for c, *_ in items))
        kind = items[0][0].kind
        size = max(sum(c.bytes for c, *_ in items if c.axis == a) for a in axes)
        bucketed.append((p, kind, axes, size))
    if bucketed:
        bucketed.sort(key=lambda x: (-first_use.get(x[0], -1), members[x[0]].key))
        total = sum(x[3] for x in bucketed)
        if after:                               # one contiguous buffer per group
            first = cap = total
        else:
            first, cap = bucket_caps(total, int(cfg["bucket_bytes"]), int(cfg["first_bucket_bytes"]))
        items = [((kind, axes, str(members[p].outputs[0].dtype)), size) for p, kind, axes, size in bucketed]
        for i, group in enumerate(buckets.fill(items, first, cap)):
            ps = [bucketed[j] for j in group]
            ready = AFTER_BACKWARD if after else min(first_use.get(p, 0) for p, *_ in ps)
            bk = Bucket(i, ps[0][1], ps[0][2], tuple(members[p].key for p, *_ in ps),
                        sum(x[3] for x in ps), "(after backward)" if after else members[ready].key)
            bucket_list.append(bk)
            launch_after.setdefault(ready, []).append(bk)
    def launch(bk):
        bk.launch = tc
        for a in bk.axes:
            col = _Col(bk.kind, a)
            t = model.time_of_bytes(bk.kind, a, bk.nbytes)
            name = f"bucket {bk.index} {bk.kind}({a}) {len(bk.params)} grads"
            bk.events.append(comm(col, t, name, "backward", bk.events[-1].end if bk.events else tc, False))
    # ---- backward ------------------------------------------------------------------------
    if zero3:
        rev = order[::-1]
        for b in rev[:prefetch + 1]:
            issue_gathers(b, "backward", " (again)")
    current = None
    for m in reversed(nodes):
        nc = report.nodes[m.key]
        if nc.bwd_time <= 0 and nc.recompute_time <= 0 and m.index not in launch_after \
                and not by_consumer.get(m.index) and m.index not in async_rs:
            continue
        b = block_index_of(m.index)
        if zero3 and b is not None and b != current:
            scatter_unit(current)               # the block backward just left: all its gradients are in
            current = b
            k = pos[b] - prefetch
            if k >= 0:
                issue_gathers(order[k], "backward", " (again)")
        if m.index in done_gather:
            tc = max(tc, done_gather.pop(m.index))
        for col, t, dst, src in by_consumer.get(m.index, []):
            if col.phase == "recompute":
                comm(col, t, f"{col.kind}({col.axis}) -> {m.key} (recompute)", "recompute", tc, True)
        run(f"{m.module or '(root)'} {m.node.op} %{m.key} (recompute)", nc.recompute_time, "recompute")
        if m.index in ring_grad:                # the input gradient of each rank's rows as they arrive, then the weights'
            ring_gather(ring_grad.pop(m.index), nc.bwd_time / 2,
                        f"{m.module or '(root)'} {m.node.op} %{m.key} (backward, input gradient)", "backward")
            run(f"{m.module or '(root)'} {m.node.op} %{m.key} (backward, weights)", nc.bwd_time / 2, "backward")
        else:
            run(f"{m.module or '(root)'} {m.node.op} %{m.key} (backward)", nc.bwd_time, "backward")
        for item in by_consumer.get(m.index, []):
            col, t, dst, src = item
            if col.phase != "backward":
                continue
            name = f"{col.kind}({col.axis}) grad of {members[src].key} at {m.key}"
            if id(item) in gathered_grad:       # gathered around the ring in the linear's backward
                ring_grad[src] = item
                continue
            behind = behind_of.get(id(item)) or (model.hiding_linears(col, dst, src) if on and not after else [])
            if behind:
                # launched once the input's gradient is made (the first half of the linears'
                # backward: the program computes it first), waited for after the weights'
                half = sum(report.nodes[members[k].key].bwd_time for k in behind) / 2
                ev = comm(col, t, name + " (async)", "backward", tc - half, False)
                tc = max(tc, ev.end)
            else:
                comm(col, t, name, "backward", tc, True)
        for item in async_rs.get(m.index, []):
            pending_rs.setdefault(param_block(item[3]), []).append(item)
        for bk in launch_after.get(m.index, []):
            launch(bk)
    for bk in launch_after.get(AFTER_BACKWARD, []):
        launch(bk)
    for b in sorted(pending_rs, key=lambda b: b is None):   # the last block, then the root's
        scatter_unit(b)
    # ---- optimizer step ------------------------------------------------------------------
    opt = report.optimizer

    def step(keys, what):
        if keys:
            run(f"optimizer step: {len(keys)} parameters{what}", sum(opt[k] for k in keys), "optimizer")
    # as GradBuckets.step: a ZeRO-0 fp32 program with buckets in flight steps the parameters
    # of the longest reduced prefix of them (and those of no bucket) first, then waits
    behind = on and not after and bool(bucket_list) and not optimizer and model.precision != "mixed"
    if behind:
        ends = [max((e.end for e in b.events), default=b.launch) for b in bucket_list]
        k = next((i for i, e in enumerate(ends) if e > tc), len(bucket_list))
        late = {p for b in bucket_list[k:] for p in b.params}
        step([p for p in opt if p not in late], " (their gradients reduced)" if late else "")
        tc = max([tc] + ends[k:])
        step([p for p in opt if p in late], " (the last buckets')")
    tc = max([tc] + list(free.values()))
    if not behind:
        step(list(opt), "")
    for col, t, dst, src in optimizer:
        comm(col, t, f"{col.kind}({col.axis}) {members[src].key} (optimizer)", "optimizer", tc, True)
    makespan = max([tc] + [e.end for e in events])
    compute_events = [e for e in events if e.stream == "compute"]
    exposed = {a: 0.0 for a in model.axes}
    hidden = {a: 0.0 for a in model.axes}
    starts = [e.start for e in compute_events]
    for e in events:
        if e.stream == "compute":
            continue
        h, first, last = _overlap(compute_events, starts, e.start, e.end)
        e.hidden = h
        e.behind = (first, last) if first else None
        hidden[e.axis] += h
        exposed[e.axis] += e.dur - h
    blocks = 0
    if zero3:
        blocks = min(prefetch + 1, len(order))
    interference = getattr(model.profile, "overlap_slowdown", 0.0) * sum(hidden.values())
    n_sites = len(gather_at) + len(scatter_at)
    return Schedule(makespan + interference, events, bucket_list, exposed, hidden,
                    sum(e.dur for e in compute_events), on, interference, prefetch, blocks,
                    bool(n_sites), n_sites)


@dataclass(frozen=True)
class _Col:
    kind: str
    axis: str


def _overlap(compute: list[Event], starts: list[float], s: float, e: float):
    """Seconds of [s, e) the compute events cover, and the first and last they overlap."""
    if e <= s:
        return 0.0, None, None
    i = max(bisect.bisect_right(starts, s) - 1, 0)
    total, first, last = 0.0, None, None
    while i < len(compute) and compute[i].start < e:
        c = compute[i]
        o = min(e, c.end) - max(s, c.start)
        if o > 0:
            total += o
            first = first or c.name
            last = c.name
        i += 1
    return total, first, last


def trace(schedule: Schedule, name: str = "predicted step") -> dict:
    """The schedule as Chrome/Perfetto trace JSON (`chrome://tracing`, ui.perfetto.dev):
    one track (tid) per stream, complete ("X") events in microseconds.

        >>> json.dump(trace(sched), open("plan.trace.json", "w"))     # doctest: +SKIP
    """
    streams = schedule.streams()
    tid = {s: i for i, s in enumerate(streams)}
    out = [{"ph": "M", "pid": 0, "tid": 0, "name": "process_name", "args": {"name": name}}]
    for s, i in tid.items():
        out.append({"ph": "M", "pid": 0, "tid": i, "name": "thread_name", "args": {"name": s}})
    for e in schedule.events:
        args = {"phase": e.phase}
        if e.stream != "compute":
            args.update(kind=e.kind, axis=e.axis, hidden_us=round(e.hidden * 1e6, 3))
        out.append({"ph": "X", "pid": 0, "tid": tid[e.stream], "name": e.name,
                    "cat": e.phase if e.stream == "compute" else e.kind,
                    "ts": round(e.start * 1e6, 3), "dur": round(e.dur * 1e6, 3), "args": args})
    return {"traceEvents": out, "displayTimeUnit": "ms",
            "otherData": {"makespan_us": round(schedule.makespan * 1e6, 3),
                          "interference_us": round(schedule.interference * 1e6, 3),
                          "exposed_us": {a: round(t * 1e6, 3) for a, t in schedule.exposed.items()},
                          "hidden_us": {a: round(t * 1e6, 3) for a, t in schedule.hidden.items()}}}


__all__ = ["simulate", "trace", "Schedule", "Event", "Bucket", "bucket_caps", "MIN_BUCKETS"]

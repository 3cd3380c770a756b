"""Pipeline stages: a `pp` mesh axis cuts the model into contiguous ranges of its repeated
blocks, one range per pp coordinate.

A stage owns whole blocks of the model's one module list of repeated blocks (the
`transformer.h.*` of a GPT); the nodes before the first block (the embeddings) go with
stage 0, the nodes after the last (the final norm, the head and the loss) with the last
stage. The cut balances the stages' forward + backward time as the cost model prices each
node under the intra-stage plan (the plan over the mesh's other axes), so the embedding
and the loss head count where they fall.

    >>> stages = cut_stages(graph, 2, node_time)                  # doctest: +SKIP
    >>> [s.blocks for s in stages]                                 # doctest: +SKIP
    [(0, 1), (1, 2)]

A plan file's `stage` statements pin some stages' ranges; the cut balances the other
stages over the blocks the pins leave between them:

    >>> balanced_ranges([1, 1, 1, 1, 1], 3, pinned={0: (0, 1)})    # doctest: +SKIP
    [(0, 1), (1, 3), (3, 5)]

The plan keeps the result as `Plan.pipeline`:
`{"axis": "pp", "stages": p, "schedule": "1f1b", "blocks": "transformer.h",
"ranges": [[0, 1], [1, 2]], "pinned": [0], "stage_time": [...]}` (`pinned`: the stages a
plan file fixed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from autopar.compiler.errors import InputError, PlanInfeasible
from autopar.compiler.patterns import block_of

PP_AXIS = "pp"
SCHEDULES = ("gpipe", "1f1b", "interleaved")


def parse_schedule(text: str | None) -> tuple[str | None, int]:
    """`gpipe`, `1f1b`, `interleaved` (2 model chunks per rank) or `interleaved:V` /
    `interleaved V` -> (name, V); V is 1 for the schedules with one chunk per rank."""
    if text is None:
        return None, 1
    name, _, v = str(text).replace(" ", ":").partition(":")
    name = name.lower()
    if name not in SCHEDULES:
        raise InputError(f"pipeline schedule {text!r}: use one of gpipe, 1f1b, interleaved[:V]")
    if name != "interleaved":
        if v:
            raise InputError(f"pipeline schedule {text!r}: only the interleaved schedule takes a count "
                             "of model chunks per rank")
        return name, 1
    if not v:
        return name, 2
    if not v.isdigit() or int(v) < 2:
        raise InputError(f"pipeline schedule {text!r}: interleaved needs a whole number of model chunks "
                         "per rank, 2 or more (interleaved:2)")
    return name, int(v)


def format_schedule(name: str, v: int = 1) -> str:
    """The schedule as the plan and the flags carry it: `interleaved:V`, or the name."""
    return f"{name}:{v}" if name == "interleaved" else name


def schedule_arg(text: str) -> str:
    """argparse type of --schedule: parse_schedule's check, the normalised text back."""
    import argparse
    try:
        return format_schedule(*parse_schedule(text))
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def chunk_coord(chunk: int, p: int) -> int:
    """The pp coordinate that runs model chunk `chunk` of a pipeline over `p` ranks: chunk j
    on rank j mod p (one chunk per rank unless interleaved, v chunks j, j+p, ... on rank j)."""
    return chunk % p


@dataclass
class Stage:
    index: int
    blocks: tuple[int, int]            # block indices [first, end)
    nodes: list[int]                   # node indices (into the graph's node list) it runs
    params: list[str]                  # the parameters and buffers its nodes read
    modules: list[str]                 # top-level modules it owns (for the header)
    time: float = 0.0                  # forward + backward, the cost model's


def block_list(nodes) -> tuple[str, list[int]] | None:
    """The module list of repeated blocks with the most instances, and their indices."""
    kinds: dict[str, set[int]] = {}
    for n in nodes:
        b = block_of(n.meta.module) if n.meta.module else None
        if b is not None:
            kinds.setdefault(b[0], set()).add(int(b[1].rsplit(".", 1)[1]))
    if not kinds:
        return None
    kind = max(kinds, key=lambda k: len(kinds[k]))
    return kind, sorted(kinds[kind])


def node_blocks(nodes, kind: str) -> list[int]:
    """Block position of every node: its block's index, nodes between blocks with the next
    block, nodes before the first with block -1 (stage 0), after the last with a position
    past every block (the last stage)."""
    pos: list[int | None] = []
    for n in nodes:
        b = block_of(n.meta.module) if n.meta.module else None
        pos.append(int(b[1].rsplit(".", 1)[1]) if b is not None and b[0] == kind else None)
    out: list[int] = [0] * len(nodes)
    nxt = None
    for i in range(len(nodes) - 1, -1, -1):
        if pos[i] is not None:
            nxt = pos[i]
            out[i] = pos[i]
        else:
            out[i] = nxt if nxt is not None else 10 ** 9
    seen = False
    for i in range(len(nodes)):
        if pos[i] is not None:
            seen = True
        elif not seen:
            out[i] = -1
    return out


def balanced_ranges(times: Sequence[float], p: int,
                    pinned: dict[int, tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Contiguous ranges of `times` (one per block, the pre/post nodes added to the first
    and last) into `p` parts minimising the largest part; ties go to the earlier cut.
    `pinned` fixes some parts' ranges (stage -> [first, end)); the parts between two pinned
    ones (or before the first, after the last) are balanced over the blocks between them."""
    if pinned:
        out: list[tuple[int, int]] = []
        k = lo = 0
        for j in [*sorted(pinned), p]:
            hi = pinned[j][0] if j < p else len(times)
            free = j - k                          # stages k..j-1, blocks lo..hi-1 between pins
            if free > hi - lo or (free == 0 and hi != lo):
                raise InputError(f"pipeline stage pins {dict(sorted(pinned.items()))} leave blocks "
                                 f"[{lo}, {hi}) to {free} stage(s) between them; every stage needs "
                                 "at least one block and every block a stage")
            if free:
                out += [(a + lo, b + lo) for a, b in balanced_ranges(times[lo:hi], free)]
            if j < p:
                out.append(tuple(pinned[j]))
                k, lo = j + 1, pinned[j][1]
        return out
    n = len(times)
    prefix = [0.0]
    for t in times:
        prefix.append(prefix[-1] + t)
    INF = float("inf")
    # best[k][i]: the least max part of times[:i] in k parts
    best = [[INF] * (n + 1) for _ in range(p + 1)]
    cut = [[0] * (n + 1) for _ in range(p + 1)]
    best[0][0] = 0.0
    for k in range(1, p + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i] * (1 - 1e-12):
                    best[k][i], cut[k][i] = v, j
    ranges, i = [], n
    for k in range(p, 0, -1):
        j = cut[k][i]
        ranges.append((j, i))
        i = j
    return ranges[::-1]


def cut_stages(graph, p: int, node_time: Callable[[int], float] | None = None,
               ranges: Sequence[Sequence[int] | None] | None = None) -> list[Stage]:
    """`p` stages of `graph` (any object with .nodes, .params, .outputs; a prepared or a
    sharded graph), cut at block boundaries, balanced by `node_time(i)` (seconds of node i,
    forward + backward), or at the given block `ranges` (one per stage; a None entry is
    balanced over the blocks the others leave)."""
    nodes = graph.nodes
    found = block_list(nodes)
    if found is None:
        raise InputError(f"--mesh pp={p}: {getattr(graph, 'name', 'the model')} has no module list of "
                         "repeated blocks (like transformer.h.0, .1, ...) to cut into pipeline stages; "
                         "pipeline parallelism cuts at block boundaries. Drop the pp axis.")
    kind, indices = found
    nblocks = len(indices)
    if indices != list(range(nblocks)):
        raise InputError(f"--mesh pp={p}: the blocks of {kind} are not numbered 0..{nblocks - 1}")
    if p > nblocks:
        raise InputError(f"--mesh pp={p}: more stages than blocks -- {kind} has {nblocks} "
                         f"blocks and each stage needs at least one. Use pp <= {nblocks}.")
    where = node_blocks(nodes, kind)
    if ranges is not None and len(ranges) != p:
        raise InputError(f"{len(ranges)} stage ranges for pp={p}: give one per stage")
    if ranges is None or any(r is None for r in ranges):
        times = [0.0] * nblocks
        for i, b in enumerate(where):
            t = node_time(i) if node_time is not None else 1.0
            times[min(max(b, 0), nblocks - 1)] += t
        pinned = {k: tuple(r) for k, r in enumerate(ranges or []) if r is not None}
        ranges = balanced_ranges(times, p, pinned)
    ranges = [tuple(r) for r in ranges]
    if [a for a, _ in ranges] != [0] + [b for _, b in ranges[:-1]] or ranges[-1][1] != nblocks \
            or any(b <= a for a, b in ranges):
        raise InputError(f"pipeline stage ranges {[list(r) for r in ranges]}: the stages must cover "
                         f"the {nblocks} blocks of {kind} in order, each at least one block")
    stages = []
    for k, (a, b) in enumerate(ranges):
        idx = [i for i, w in enumerate(where)
               if (a <= w < b) or (k == 0 and w < 0) or (k == p - 1 and w >= nblocks)]
        read = []
        for i in idx:
            for v in nodes[i].inputs:
                if v.kind in ("param", "buffer") and v.name not in read:
                    read.append(v.name)
        mods = []
        for i in idx:
            m = nodes[i].meta.module
            if not m:
                continue
            bb = block_of(m)
            top = block_range(kind, (a, b)) if bb is not None and bb[0] == kind else m
            if top not in mods:
                mods.append(top)
        t = sum(node_time(i) for i in idx) if node_time is not None else 0.0
        stages.append(Stage(k, (a, b), idx, read, mods, t))
    # a parameter no node reads stays with stage 0 (it is saved and loaded there)
    used = {n for s in stages for n in s.params}
    for prm in graph.params:
        if prm.name not in used:
            stages[0].params.append(prm.name)
    return stages


def owners(stages: list[Stage]) -> dict[str, list[int]]:
    """parameter -> the stages that hold it; more than one: a tied weight (its gradient is
    summed over those stages after backward, so every copy takes the same update)."""
    out: dict[str, list[int]] = {}
    for s in stages:
        for n in s.params:
            out.setdefault(n, []).append(s.index)
    return out


def intra_cost_model(graph, plan, profile):
    """The cost model of a pipelined plan's intra-stage mesh (every axis but pp), under the
    plan's precision and recompute regions (their forward runs again in backward)."""
    from autopar.compiler.cluster import Cluster
    from autopar.compiler.cost import CostModel
    intra = {a: n for a, n in plan.mesh.items() if a != PP_AXIS}
    return CostModel(graph, Cluster(intra, profile), precision=plan.cost.get("precision"),
                     recompute=plan.recompute)


def stage_node_times(graph, plan, profile, cm=None) -> list[float]:
    """Forward + backward seconds of every node of `graph` under `plan` (its intra-stage
    strategies; the pp axis left out), from the cost model (`cm`: intra_cost_model's)."""
    intra = {a: n for a, n in plan.mesh.items() if a != PP_AXIS}
    keep = [i for i, a in enumerate(plan.mesh) if a != PP_AXIS]
    cm = cm or intra_cost_model(graph, plan, profile)
    out = []
    from autopar.compiler import sharding
    for n in graph.nodes:
        key = sharding.producer_key(n)
        s = tuple(plan.strategies[key][i] for i in keep) if key in plan.strategies else tuple(None for _ in intra)
        c = cm.compute(cm.by_key[key].index, s)
        out.append(c.fwd_time + c.bwd_time + c.recompute_time)
    return out


def in_flight(schedule: str, r: int, p: int, m: int, v: int = 1) -> float:
    """Microbatches whose activations rank `r` of `p` holds at its peak, in units of its whole
    share (all its chunks): GPipe all m; 1F1B p - r; interleaved the forwards it runs before
    its first backward plus one, each one chunk (1/v of the share): the warm-up of PyTorch's
    ScheduleInterleaved1F1B, (v-1) microbatches per round plus 2 per rank after it."""
    if schedule == "gpipe":
        return m
    if schedule == "interleaved":
        per_round = m // max(1, m // p)
        warm = min((v - 1) * per_round + 2 * (p - 1 - r), m * v)
        return min(warm + 1, m * v) / v
    return min(m, p - r)


def pipeline_base(plan, graph, profile, cm=None) -> dict:
    """What pricing a pipeline needs that does not depend on its microbatch count: every
    node's compute time, launch overhead and activation bytes under the intra-stage plan,
    each parameter's state, the cut into chunks (`cm`: intra_cost_model's)."""
    from autopar.compiler import sharding
    from autopar.compiler.cluster import Cluster
    pp = plan.pipeline
    p, v = pp["stages"], int(pp.get("virtual", 1))
    pos = list(plan.mesh).index(pp["axis"])
    intra = {a: n for a, n in plan.mesh.items() if a != pp["axis"]}
    cm = cm or intra_cost_model(graph, plan, profile)
    stages = cut_stages(graph, p * v, ranges=pp["ranges"])

    def strat(key):
        v = plan.strategies.get(key)
        return tuple(x for i, x in enumerate(v) if i != pos) if v is not None else tuple(None for _ in intra)
    from autopar.compiler.ops import REGISTRY
    node_t, node_act, node_ovh = [], [], []
    for n in graph.nodes:
        mi = cm.by_key[sharding.producer_key(n)].index
        c = cm.compute(mi, strat(cm.members[mi].key))
        node_t.append(c.fwd_time + c.bwd_time + c.recompute_time)
        # a kernel's launch overhead is paid once per microbatch (the flops split, it does not)
        ovh = 0.0 if REGISTRY[n.op].view else cm.profile.op_overhead * (2 if cm.has_backward(mi) else 1)
        node_ovh.append(ovh)
        node_act.append(cm.activation_bytes(mi, strat(cm.members[mi].key)))
    link = Cluster(dict(plan.mesh), profile).link(pp["axis"])
    state, opt = {}, {}
    for prm in graph.params:
        mi = cm.by_key[prm.name].index
        state[prm.name] = cm.param_state(mi, strat(prm.name), plan.zero)
        opt[prm.name] = cm.optimizer_time(mi, strat(prm.name), plan.zero)
    return {"cm": cm, "link": link, "stages": stages, "node_t": node_t, "node_act": node_act,
            "node_ovh": node_ovh, "state": state, "optimizer": opt, "pos": pos}


def price_pipeline(plan, graph, profile, base: dict | None = None) -> dict:
    """The pipeline's step time and memory per device, from the intra-stage plan's cost
    model, into plan.cost (step_time, memory: the worst stage, tflops_per_device over every
    device of the mesh) and plan.cost["pipeline"]. `base`: `pipeline_base` of this plan,
    when the caller prices several microbatch counts.

    Stage k's time t_k: its nodes' forward + backward compute, plus its share of the
    intra-stage plan's communication. GPipe and 1F1B idle each stage for (p-1) microbatch
    slots while the pipeline fills and drains, so the step is the slowest stage stretched by
    the bubble, max_k t_k * (1 + (p-1)/m), plus the point-to-point sends on the fill / drain
    path (2 (p-1) microbatch activations, forward and backward), the tied weights'
    gradient all_reduce and the optimizer step of the rank holding the most. Memory: a
    stage's parameters, gradients and optimizer state, plus
    the activations of the microbatches in flight -- GPipe keeps all m, 1F1B at most p - k on
    stage k (p on the first)."""
    from autopar.compiler.cost import collective_time
    pp = plan.pipeline
    pp.setdefault("unpipelined_step", plan.cost.get("step_time"))   # the intra-stage plan's, whole model
    # the intra-stage plan's FLOPs per device are the whole model's over the intra mesh;
    # the pipeline spreads them over p times as many devices
    if "flops_per_device" in plan.cost:
        pp.setdefault("intra_flops_per_device", plan.cost["flops_per_device"])
    p, m = pp["stages"], max(1, int(plan.microbatches or 1))
    v = int(pp.get("virtual", 1))
    b = base or pipeline_base(plan, graph, profile)
    node_t, node_act, node_ovh, state, stages = b["node_t"], b["node_act"], b["node_ovh"], b["state"], b["stages"]
    cm, link = b["cm"], b["link"]
    total_compute = sum(node_t) or 1.0
    comm = plan.cost.get("comm_time", 0.0)
    pos = b["pos"]
    rows = []
    for r in range(p):                 # a row per rank: its chunk (its v chunks, interleaved)
        mine = [st for st in stages if chunk_coord(st.index, p) == r]
        idx = [i for st in mine for i in st.nodes]
        held = list(dict.fromkeys(n for st in mine for n in st.params))
        compute = sum(node_t[i] for i in idx) + (m - 1) * sum(node_ovh[i] for i in idx)
        t = compute + comm * sum(node_t[i] for i in idx) / total_compute
        acts = sum(node_act[i] for i in idx)            # the whole batch's, this rank's shard
        flight = in_flight(pp["schedule"], r, p, m, v)
        parts = [sum(state.get(n, (0.0, 0.0, 0.0))[j] for n in held) for j in range(3)]
        blocks = [list(c.blocks) for c in mine]
        step_t = sum(b["optimizer"].get(n, 0.0) for n in held)     # after the flush, not stretched
        rows.append({"stage": r, "blocks": blocks[0] if v == 1 else blocks, "time": t, "compute": compute,
                     "optimizer": step_t, "in_flight": flight,
                     "activations": acts * flight / m, "state": sum(parts), "params": parts[0],
                     "grads": parts[1], "optimizer_state": parts[2], "memory": sum(parts) + acts * flight / m})
    # one microbatch's boundary activations (the largest cut), fp32 as traced
    from autopar.compiler.sharded import depends_on
    cut_bytes = 0.0
    for k in range(p * v - 1):
        defined = {x for i in stages[k].nodes for x in graph.nodes[i].outputs}
        crossing = {x for i in stages[k + 1].nodes for x in graph.nodes[i].inputs if x in defined}
        b = sum(prod_local(x, plan, pos) * cm.itemsize(x) for x in crossing) / m
        cut_bytes = max(cut_bytes, b)
    p2p = link.alpha + cut_bytes / link.bandwidth if p > 1 else 0.0
    holders = owners(stages)
    tied_bytes = sum(x.numel * cm.itemsize(x) for x in graph.params if x.requires_grad
                     and len({chunk_coord(c, p) for c in holders.get(x.name, [])}) > 1)
    tied_t = collective_time("all_reduce", 2, tied_bytes, link) if tied_bytes else 0.0
    # the fill and drain idle each rank (p-1) microbatch slots of one chunk: 1/v of its work
    bubble = (p - 1) / (v * m)
    slowest = max(r["time"] for r in rows)
    # the fill / drain path crosses every cut between chunks, forward and backward; then each
    # rank steps the parameters it holds
    opt_t = max(r["optimizer"] for r in rows)
    step = slowest * (1 + bubble) + 2 * (p * v - 1) * p2p + tied_t + opt_t
    out = {"schedule": pp["schedule"], "virtual": v, "stages": p, "microbatches": m, "bubble": bubble,
           "blocks": pp.get("blocks"), "pinned": list(pp.get("pinned", [])),
           "stage_rows": rows, "p2p_per_microbatch": p2p, "boundary_bytes": cut_bytes,
           "tied_all_reduce": tied_t, "optimizer_step": opt_t, "unpipelined_step": pp["unpipelined_step"], "step_time": step,
           "microbatches_tried": pp.get("microbatches_tried")}
    plan.cost["pipeline"] = out
    plan.cost["step_time"] = step
    if "intra_flops_per_device" in pp:
        plan.cost["flops_per_device"] = pp["intra_flops_per_device"] / p
        plan.cost["tflops_per_device"] = plan.cost["flops_per_device"] / step / 1e12 if step > 0 else 0.0
    worst = max(rows, key=lambda r: r["memory"])
    mem = dict(plan.cost.get("memory") or {})
    mem.update({k: int(worst[k]) for k in ("params", "grads", "activations")})
    mem["optimizer"] = int(worst["optimizer_state"])
    mem["total"] = int(worst["memory"])            # the fullest stage's device
    plan.cost["memory"] = mem
    pp["stage_time"] = [r["time"] for r in rows]
    return out


def prod_local(v, plan, pos) -> int:
    """Elements of this rank's block of `v` under the plan (pp left out)."""
    from autopar.compiler import sharding
    lay = plan.layouts.get(v.name)
    if lay is None:
        return v.numel
    intra = {a: n for a, n in plan.mesh.items() if a != PP_AXIS}
    out = 1
    for d in sharding.local_shape(v.shape, tuple(x for i, x in enumerate(lay) if i != pos), intra):
        out *= int(d)
    return out


def pipeline_lines(c: dict) -> list[str]:
    """The explanation's lines on the pipeline (plan.cost["pipeline"])."""
    from autopar.compiler.cluster import format_bytes, format_time
    sched = c["schedule"] + (f" ({c['virtual']} model chunks per rank)" if c.get("virtual", 1) > 1 else "")
    v = c.get("virtual", 1)
    out = ["", f"pipeline: {c['stages']} stages, schedule {sched}, {c['microbatches']} microbatches; "
               f"bubble (p-1)/{'(v m)' if v > 1 else 'm'} = {c['bubble']:.3g}"]
    if c.get("microbatches_tried"):
        out.append("  microbatches compared (predicted step): " + ", ".join(
            f"{m}: {format_time(t)}" for m, t in c["microbatches_tried"].items()))
    for r in c["stage_rows"]:
        cut = ""
        if c.get("blocks") and r.get("blocks") and v > 1:        # the rank's chunks
            cut = f" ({', '.join(block_range(c['blocks'], b) for b in r['blocks'])})"
        elif c.get("blocks") and r.get("blocks"):
            cut = f" ({block_range(c['blocks'], r['blocks'])}, " \
                  f"{'pinned' if r['stage'] in c.get('pinned', []) else 'balanced'})"
        out.append(f"  stage {r['stage']}{cut}: {format_time(r['time'])} per step (compute {format_time(r['compute'])}), "
                   f"memory {format_bytes(r['memory'])} (state {format_bytes(r['state'])}, activations of "
                   f"{r['in_flight']:.3g} microbatch(es) in flight {format_bytes(r['activations'])})")
    out.append(f"  step = slowest stage x (1 + bubble) + {'2(pv-1)' if v > 1 else '2(p-1)'} sends of {format_bytes(c['boundary_bytes'])} "
               f"({format_time(c['p2p_per_microbatch'])} each) + tied-weight all_reduce "
               f"{format_time(c['tied_all_reduce'])} + optimizer step "
               f"{format_time(c.get('optimizer_step', 0.0))} "
               f"= {format_time(c['step_time'])}")
    return out


def block_range(kind: str, blocks) -> str:
    """`transformer.h.0` for one block, `transformer.h.0-2` for [0, 3)."""
    a, b = blocks
    return f"{kind}.{a}" if b - a == 1 else f"{kind}.{a}-{b - 1}"


def pp_profile(name):
    from autopar.compiler.cluster import DeviceProfile, load_profile
    return name if isinstance(name, DeviceProfile) else load_profile(name)


def check_pipeline(plan, schedule: str | None, backend: str, graph=None) -> None:
    """What a pipelined plan does not run (yet), refused with the flag to change."""
    pp = plan.pipeline
    if not pp:
        raise InputError(f"--schedule {schedule}: a pipeline schedule needs a pp axis in the mesh "
                         "(e.g. --mesh pp=2); drop --schedule")
    if schedule:
        name, v = parse_schedule(schedule)
        if v != int(pp.get("virtual", 1)):
            raise InputError(f"--schedule {schedule}: the plan's stages were cut for "
                             f"{pp.get('virtual', 1)} model chunk(s) per rank ({pp['schedule']}); plan again "
                             f"with this schedule (autopar plan ... --schedule {schedule})")
        pp["schedule"] = name
    if pp.get("profile") is not None and graph is not None:
        try:
            profile = pp_profile(pp["profile"])
        except Exception:            # a profile file no longer at hand: keep the plan's prices
            profile = None
        if profile is not None:
            price_pipeline(plan, graph, profile)
    if pp["schedule"] not in SCHEDULES:
        raise InputError(f"pipeline schedule {pp['schedule']!r}: use one of {', '.join(SCHEDULES)}")
    m = max(1, int(plan.microbatches or 1))
    if pp["schedule"] == "interleaved" and m % max(1, m // pp["stages"]):
        raise InputError(f"interleaved schedule over pp={pp['stages']} with {m} microbatches: PyTorch's "
                         f"ScheduleInterleaved1F1B runs rounds of microbatches, so fewer than pp or a "
                         f"multiple of the rounds; use --microbatches {pp['stages']} or {2 * pp['stages']}")
    if plan.zero:
        raise InputError(f"ZeRO-{plan.zero} with a pp axis: not supported yet; plan with --zero 0")


def lift_plan(plan, mesh: dict[str, int]):
    """The intra-stage plan (over the mesh's axes but pp) as a plan over the whole mesh:
    every value replicated over pp (each pp coordinate runs its own stage of it)."""
    pos = list(mesh).index(PP_AXIS)
    plan.mesh = dict(mesh)
    plan.strategies = {k: list(v[:pos]) + [None] + list(v[pos:]) for k, v in plan.strategies.items()}
    plan.layouts = {k: list(v[:pos]) + ["R"] + list(v[pos:]) for k, v in plan.layouts.items()}
    return plan


def unlift_plan(plan):
    """lift_plan undone on a copy: the intra-stage plan inside a pipelined plan, its pp axis
    dropped (no cost, no pipeline)."""
    from autopar.compiler.plan import Plan
    pos = list(plan.mesh).index(PP_AXIS)
    return Plan(model=plan.model, mesh={a: k for a, k in plan.mesh.items() if a != PP_AXIS},
                device=plan.device, memory_limit=plan.memory_limit,
                strategies={k: v[:pos] + v[pos + 1:] for k, v in plan.strategies.items()},
                layouts={k: v[:pos] + v[pos + 1:] for k, v in plan.layouts.items()}, zero=0,
                dp_axis=plan.dp_axis, recompute=list(plan.recompute), overlap=dict(plan.overlap),
                cost={}, solver={})


def pipeline_plan(graph, mesh: dict[str, int], search: Callable, profile, schedule: str | None = None,
                  ranges=None, memory_limit: float | None = None, microbatches: int | None = None,
                  like=None):
    """The plan for a mesh with a pp axis: the search over the other axes (the intra-stage
    plan, one for every stage), lifted over pp, with the stages cut and balanced by its
    per-node times. `ranges` (one [first, end) block range or None per stage) pins the
    stages that have one; the others are balanced around them.

    Memory: a stage holds about 1/p of the model's state, and its activations are those of
    the microbatches in flight (at most p of m on 1F1B's first stage), so the intra-stage
    search sees the whole model against p times the per-device limit (`memory_limit`, the
    profile's memory by default) -- the state then fits its 1/p exactly and the activations
    with room -- and the microbatch count is chosen among those whose fullest stage fits
    the limit itself (PlanInfeasible when none does); `microbatches` given (a plan file's),
    that count only.

    The batch inputs must be split alike (`same_batch_split`): a search that splits them
    differently is run again with them pinned to the first one's layout. `like`, a plan of
    the same intra-stage axes (another shape's) that split them differently, pins them to
    its first input's layout from the start, saving that second search."""
    p = mesh[PP_AXIS]
    if p < 2:
        raise InputError(f"--mesh pp={p}: one pipeline stage is no pipeline; drop the pp axis or use pp >= 2")
    schedule, v = parse_schedule(schedule)
    found = block_list(graph.nodes)
    if v > 1 and found is not None and p * v > len(found[1]):
        raise InputError(f"--mesh pp={p} --schedule interleaved:{v}: {p * v} model chunks (pp x chunks per "
                         f"rank) but {found[0]} has {len(found[1])} blocks, and each chunk needs one; use "
                         f"interleaved:{max(1, len(found[1]) // p)} or fewer, or schedule 1f1b")
    if v > 1 and any(r is not None for r in ranges or []):
        raise InputError(f"stage pins with schedule interleaved {v}: a pin names the blocks of one pp "
                         f"coordinate's stage, and the interleaved schedule cuts pp x {v} chunks; drop the "
                         "stage statements or pin under schedule 1f1b / gpipe")
    intra = {a: n for a, n in mesh.items() if a != PP_AXIS}
    # ZeRO is not run under a pipeline yet: the search keeps stage 0
    limit = float(memory_limit if memory_limit is not None else profile.memory)
    pins = same_batch_split(graph, like) if like is not None and list(like.mesh) == list(intra) else []
    if pins:
        try:
            plan = search(graph, intra, zero=0, pins=pins, memory_limit=limit * p)
        except PlanInfeasible:
            pins = []          # that layout does not serve this shape: searched free, as without `like`
    if not pins:
        plan = search(graph, intra, zero=0, memory_limit=limit * p)
    pins = same_batch_split(graph, plan)
    if pins:
        plan = search(graph, intra, zero=0, pins=pins, memory_limit=limit * p)
    return pipelined(graph, plan, mesh, profile, format_schedule(schedule or "1f1b", v), ranges, limit,
                     microbatches)


def pipelined(graph, plan, mesh: dict[str, int], profile, schedule: str, ranges=None,
              memory_limit: float | None = None, microbatches: int | None = None, cm=None):
    """An intra-stage plan (over `mesh` but its pp axis) made the pipeline over `mesh`: the
    stages cut and balanced by its per-node times, lifted over pp, its microbatch count
    chosen (see pipeline_plan). The plan is changed in place and returned. `cm`: the
    plan's intra_cost_model, when the caller has it."""
    p = mesh[PP_AXIS]
    name, v = parse_schedule(schedule)
    cm = cm or intra_cost_model(graph, plan, profile)
    times = stage_node_times(graph, plan, profile, cm)
    stages = cut_stages(graph, p * v, lambda i: times[i], ranges=ranges)
    lift_plan(plan, mesh)
    plan.pipeline = {"axis": PP_AXIS, "stages": p, "virtual": v, "schedule": name,
                     "blocks": block_list(graph.nodes)[0],
                     "ranges": [list(s.blocks) for s in stages],
                     "pinned": [k for k, r in enumerate(ranges or []) if r is not None],
                     "stage_time": [s.time for s in stages], "profile": profile.name}
    choose_microbatches(plan, graph, profile, memory_limit, only=microbatches, cm=cm)
    if memory_limit is not None:
        # the intra-stage search ran against p times the limit; the plan keeps the device's
        plan.memory_limit = memory_limit
        plan.cost["memory_limit"] = memory_limit
        plan.cost["fits"] = plan.cost["memory"]["total"] <= memory_limit
    return plan


def batch_inputs(graph) -> list:
    """The inputs whose dim 0 is the batch (the first input's)."""
    if not graph.inputs or not graph.inputs[0].shape:
        return []
    # the traced sizes name each input's batch dim apart: the same size is the batch
    return [v for v in graph.inputs if v.shape and int(v.shape[0]) == int(graph.inputs[0].shape[0])]


def same_batch_split(graph, plan) -> list:
    """Pins giving every batch input the first input's layout, when the plan splits them
    differently. A schedule cuts each input into microbatches on this rank's rows; an input
    split over dp and one kept whole (then sliced inside the model) would pair the rows of
    different examples in every microbatch but the first."""
    from autopar.compiler.sharding import Pin
    inputs = batch_inputs(graph)
    if len(inputs) < 2:
        return []
    want = tuple(plan.layouts[inputs[0].name])
    if all(tuple(plan.layouts[v.name]) == want for v in inputs):
        return []
    return [Pin(v.name, want, "the pipeline: every batch input split like the first") for v in inputs]


def rank_batch(plan, graph) -> int | None:
    """The examples of the batch each rank holds, as microbatches may cut them: the
    greatest common divisor, over every value whose dim 0 is the batch (the first input's
    size), of its rows on one rank. A plan may keep the inputs whole and split the batch
    later (an activation over dp): the microbatches cut the input, and each cut must still
    split over dp there."""
    import math
    if not graph.inputs or not graph.inputs[0].shape:
        return None
    batch = int(graph.inputs[0].shape[0])
    rows = 0
    for v in graph.values():
        lay = plan.layouts.get(v.name)
        if not v.shape or lay is None or v.shape[0] != batch:
            continue
        ways = math.prod(n for (axis, n), pl in zip(plan.mesh.items(), lay) if pl == "S(0)")
        rows = math.gcd(rows, batch // ways)
    return rows or batch


def choose_microbatches(plan, graph, profile, memory_limit: float | None = None,
                        only: int | None = None, cm=None) -> int:
    """The microbatch count of the fastest predicted pipeline step among the divisors of the
    batch each rank holds whose fullest stage fits `memory_limit` bytes (more microbatches
    shrink the bubble and the activations in flight, each costs its kernels' launches once
    more); the plan keeps it and its price. A plan file or --microbatches overrides it.
    Raises PlanInfeasible, with the least memory any count needs, when none fits."""
    batch = rank_batch(plan, graph) or 1
    tried, memory = {}, {}
    p = plan.pipeline["stages"]
    intra = {a: n for a, n in plan.mesh.items() if a != PP_AXIS}
    base = pipeline_base(plan, graph, profile, cm)
    for m in [only] if only else [d for d in range(1, batch + 1) if batch % d == 0]:
        if plan.pipeline["schedule"] == "interleaved" and m % max(1, m // p) and not only:
            continue                  # PyTorch's interleaved rounds do not divide m
        plan.microbatches = m
        out = price_pipeline(plan, graph, profile, base)
        tried[m] = out["step_time"]
        memory[m] = max(r["memory"] for r in out["stage_rows"])
    fits = [m for m in tried if memory_limit is None or memory[m] <= memory_limit]
    plan.pipeline["microbatches_tried"] = {str(k): v for k, v in tried.items()}
    if not fits:
        from autopar.compiler.cluster import format_bytes
        from autopar.compiler.sharding import format_mesh
        least = min(memory, key=lambda m: (memory[m], tried[m]))
        err = PlanInfeasible(
            f"pp={p} over {format_mesh(intra)}: no microbatch count fits {format_bytes(memory_limit)} per "
            f"device; the fullest stage needs {format_bytes(memory[least])} at best ({least} microbatches). "
            "Use more pipeline stages, more devices on the other axes or a larger --memory")
        err.least_memory = memory[least]                 # type: ignore[attr-defined]
        raise err
    best = min(fits, key=lambda m: (tried[m], m))
    plan.microbatches = best
    price_pipeline(plan, graph, profile, base)
    return best



@dataclass
class StageIO:
    """What one stage of a sharded graph reads and hands on, for the program and the
    traffic prediction. `args`: its forward's arguments (the batch's inputs on stage 0, the
    previous stage's activations after); `outs`: what its forward returns (sent to the next
    stage; on the last stage what the loss reads); the last stage's `loss_nodes` run in the
    schedule's loss_fn over `outs` and `target`."""
    stage: Stage
    args: list
    outs: list
    forward_nodes: list[int]
    loss_nodes: list[int]
    target: object = None
    owns: list[str] = None


def stage_io(s, ranges) -> list[StageIO]:
    """The stages of sharded graph `s` cut at `ranges` and what crosses each cut. Raises
    InputError for what one schedule cannot run: a stage past the first reading the batch
    (other than the loss its targets), a value skipping a stage, a loss of several targets."""
    p = len(ranges)
    stages = cut_stages(s, p, ranges=ranges)
    nodes = s.nodes
    inputs = list(s.inputs)
    where = {}
    for st in stages:
        for i in st.nodes:
            for v in nodes[i].outputs:
                where[v] = st.index

    def reads(idx):
        out = []
        for i in idx:
            for v in nodes[i].inputs:
                if v.kind not in ("param", "buffer") and v not in out:
                    out.append(v)
        return out
    first_reads = [v for v in reads(stages[0].nodes) if v in inputs]
    result = []
    for st in stages:
        r = reads(st.nodes)
        own = {v for i in st.nodes for v in nodes[i].outputs}
        ext = [v for v in r if v not in own]
        batch = [v for v in ext if v in inputs]
        acts = [v for v in ext if v not in inputs]
        for v in acts:
            if where.get(v) != st.index - 1:
                raise InputError(f"pipeline stage {st.index} reads {v.name} from stage {where.get(v)}; "
                                 "a value may only cross into the next stage. Cut the stages elsewhere "
                                 "or drop the pp axis.")
        last = st.index == p - 1
        target = None
        loss_nodes: list[int] = []
        fwd = list(st.nodes)
        if st.index == 0:
            args = batch
        else:
            extra = [v for v in batch if not last or v in first_reads]
            if extra:
                raise InputError(f"pipeline stage {st.index} reads the model input {extra[0].name}; "
                                 "under a pipeline schedule only the first stage reads the batch "
                                 "(and the loss its targets). Drop the pp axis for this model.")
            args = acts
        if last:
            targets = [v for v in batch if v not in first_reads] if st.index else [
                v for v in inputs if v not in first_reads]
            if len(targets) != 1:
                raise InputError(f"the loss reads {len(targets)} model inputs the first stage does "
                                 f"not ({', '.join(v.name for v in targets) or 'none'}); the "
                                 "pipeline schedule hands its loss_fn one target tensor")
            target = targets[0]
            dep = {target}
            for i in st.nodes:
                if any(v in dep for v in nodes[i].inputs):
                    loss_nodes.append(i)
                    dep.update(nodes[i].outputs)
            ls = set(loss_nodes)
            fwd = [i for i in st.nodes if i not in ls]
            if s.outputs[0] not in dep:
                raise InputError("the loss does not depend on the targets; the pipeline cannot "
                                 "tell the loss from the model's forward")
        result.append(StageIO(st, args, [], fwd, loss_nodes, target))
    for k, io in enumerate(result):
        if k + 1 < p:
            io.outs = list(result[k + 1].args)
        else:
            fwd_out = {v for i in io.forward_nodes for v in nodes[i].outputs}
            io.outs = [v for v in reads(io.loss_nodes) if v in fwd_out]
            # the loss nodes may read what the previous stage sent: pass it through
            io.outs += [v for v in reads(io.loss_nodes) if v in io.args and v not in io.outs]
    return result


def owned_prefixes(s, io: StageIO, kind: str) -> list[str]:
    """The module prefixes of the parameters a stage holds (its blocks one by one, the other
    modules by path): what the program keeps on that stage."""
    out = []
    for name in io.stage.params:
        b = block_of(name.rsplit(".", 1)[0])
        pre = b[1] if b is not None and b[0] == kind else name.rsplit(".", 1)[0]
        if b is None and name in s.graph.pieces:
            pre = s.graph.pieces[name].source.rsplit(".", 1)[0]
        if pre not in out:
            out.append(pre)
    return out


def microbatch_bytes(s, v, m: int) -> int:
    """Bytes of this rank's block of `v` in one microbatch."""
    from autopar.compiler.sharded import depends_on
    b = v.numel * v.itemsize
    if m > 1 and depends_on(s.global_shapes.get(v.name, ()), s.batch_symbols()):
        b //= m
    return b


def wire_bytes(b: int, dtype, precision: str) -> int:
    """What a buffer counted at `b` bytes in its traced dtype sends under `precision`: a bf16
    program sends every floating buffer at half its (fp32) size, integer ones (token ids) as
    they are."""
    return b // 2 if precision == "bf16" and dtype.is_floating_point else b


def stage_traffic(s, ios: list[StageIO], precision: str = "fp32") -> list[list[tuple[str, int]]]:
    """Per pp coordinate (the ranks of one stage; interleaved, of its v model chunks), the
    calls of one step and rank (`kind:axis`, bytes) the pipeline adds: each microbatch's
    activations sent forward to the next chunk and received from the previous one, their
    gradients sent back and received in backward (the values needing a gradient), the
    gradient buckets of the parameters the rank holds, and the all_reduce of each tied
    weight's gradient over the coordinates holding it. Bytes are counted in `precision`
    (wire_bytes)."""
    def sized(b, dtype):
        return wire_bytes(b, dtype, precision)
    axis = s.plan.pipeline.get("axis", PP_AXIS)
    m = max(1, int(s.plan.microbatches or 1))
    p = len(ios)
    ranks = int(s.plan.pipeline.get("stages", p))
    out = []
    hold = owners([io.stage for io in ios])
    params = {v.name: v for v in s.params}
    from autopar.compiler.sharded import depends_on, is_collective, moves_data
    again = s.recomputed()
    batch = s.batch_symbols() if m > 1 else set()
    for k, io in enumerate(ios):
        calls = []
        # the plan's collectives of the nodes this stage runs, once per microbatch (the
        # gradient reductions too: a pipelined plan reduces inside each backward)
        per_mb = []
        for i in io.stage.nodes:
            n = s.nodes[i]
            if not moves_data(n):
                continue
            share = m if batch and depends_on(s.global_shapes.get(n.inputs[0].name, ()), batch) else 1
            dt = n.inputs[0].dtype
            for kind, ax, b, phase in s.node_traffic(n):
                # the vocab-parallel loss reduces fp32 statistics in every precision
                b = sized(b // share, dt) if is_collective(n) else b // share
                per_mb += [(f"{kind}:{ax}", b)] * (2 if phase == "forward" and i in again else 1)
        calls += per_mb * m
        if k > 0:
            for _ in range(m):
                calls += [(f"recv:{axis}", sized(microbatch_bytes(s, v, m), v.dtype)) for v in io.args]
            for _ in range(m):
                calls += [(f"send:{axis}", sized(microbatch_bytes(s, v, m), v.dtype)) for v in io.args
                          if v.name in s.needs_grad]
        if k + 1 < p:
            for _ in range(m):
                calls += [(f"send:{axis}", sized(microbatch_bytes(s, v, m), v.dtype)) for v in io.outs]
            for _ in range(m):
                calls += [(f"recv:{axis}", sized(microbatch_bytes(s, v, m), v.dtype)) for v in io.outs
                          if v.name in s.needs_grad]
        out.append(calls)
    per_rank = [[c for k, calls in enumerate(out) if chunk_coord(k, ranks) == r for c in calls]
                for r in range(ranks)]
    for r in range(ranks):
        held = {n for k, io in enumerate(ios) if chunk_coord(k, ranks) == r for n in io.stage.params}
        per_rank[r] += [(kind, b // 2 if precision == "bf16" else b)      # gradients: all floating
                        for kind, b in stage_bucket_calls(s, held)]
        for name, st in sorted(hold.items()):
            coords = {chunk_coord(k, ranks) for k in st}
            if len(coords) > 1 and r in coords and params[name].requires_grad:
                per_rank[r].append((f"all_reduce:{axis}", sized(params[name].numel * params[name].itemsize,
                                                                 params[name].dtype)))
    return per_rank


def stage_bucket_calls(s, held: set) -> list[tuple[str, int]]:
    """The gradient buckets a pipeline rank reduces after the schedule's last microbatch: the
    plan's bucket order (GRAD_ORDER) kept to the parameters it holds (`held`), filled with the
    same caps, as rt.GradBuckets fills them in the program."""
    from autopar.compiler import buckets
    from autopar.compiler.sharded import nbytes, zero_chunk

    def grad_bytes(s, name, kind):           # as passes/overlap.grad_bytes counts a bucket's share
        v = by_name[name]
        if kind == "reduce_scatter":
            n = s.mesh[s.zero.axis]
            return zero_chunk(v.numel, n) * n * v.itemsize
        return nbytes(v)
    o = s.overlap
    if o is None or not o.buckets:
        return []
    mine = set(held)
    by_name = {v.name: v for v in s.params}
    rows = [(n, b.axes, b.kind) for b in o.buckets for n in b.params if n in mine]
    items = [((axes, by_name[n].dtype, kind), grad_bytes(s, n, kind)) for n, axes, kind in rows]
    out = []
    for members in buckets.fill(items, o.first_cap, o.cap):
        axes, _, kind = items[members[0]][0]
        total = sum(items[j][1] for j in members)
        out += [(f"{kind}:{a}", total) for a in axes]
    return out


def tied(ios: list[StageIO], s) -> dict[str, list[int]]:
    """Trainable weights the ranks of several pp coordinates hold -> those coordinates (the
    model chunks holding one, interleaved, mapped to the coordinates running them)."""
    params = {v.name: v for v in s.params}
    ranks = int(s.plan.pipeline.get("stages", len(ios)))
    out = {}
    for n, st in sorted(owners([io.stage for io in ios]).items()):
        coords = sorted({chunk_coord(k, ranks) for k in st})
        if len(coords) > 1 and params[n].requires_grad:
            out[n] = coords
    return out


__all__ = ["parse_schedule", "format_schedule", "schedule_arg", "chunk_coord", "in_flight", "StageIO", "stage_io", "stage_traffic", "wire_bytes", "owned_prefixes", "tied", "PP_AXIS", "SCHEDULES", "Stage", "cut_stages", "balanced_ranges", "owners",
           "pipeline_plan", "lift_plan", "stage_node_times", "block_list", "node_blocks", "block_range"]

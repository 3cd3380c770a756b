"""The sharding search: the fastest plan that fits, found with OR-Tools CP-SAT.

The Alpa/XLA formulation: one strategy per node (and per source: input, parameter), a
resharding cost on every edge that depends on both ends' strategies, a memory limit per
device, minimise the estimated step time (compiler/cost.py). What keeps it small:

1. follow-merging: an elementwise or view node whose operand arrives in a layout it can
   take as is (for every choice of its producer) adopts its producer's choice -- it joins
   the producer's group and adds no variable;
2. repeated-block linking: module instances `X.N` (transformer.h.3, layers.7) with the
   same structure (op sequence, attrs, shapes, gradient flags -- not names) share one set
   of variables; their costs are summed with a multiplicity, so the model does not grow
   with depth;
3. dominated strategies are dropped (no worse in time, memory and every edge cost);
4. costs are scaled to integers; edges are encoded with one boolean per non-zero cost
   entry (after moving row/column minima into the unary costs) or, when that would be
   larger, one table constraint (AddAllowedAssignments); the LP relaxation includes
   the Boolean constraints (linearization level 2);
5. a local-search hint -- under a binding memory limit one that fits (Lagrangian local
   search), which is also the answer when the time limit stops the solver before it has
   any plan -- a time limit, and a deterministic mode (one worker, fixed seed).

The step time is a schedule (compiler/schedule.py: gradient buckets and ZeRO-3 prefetch
overlap communication with compute), which no linear objective states exactly. The
design is both: CP-SAT minimises a linear proxy (parameter communication priced at its
exposed share, cost.GRAD_EXPOSED / GATHER_EXPOSED), and per mesh shape and ZeRO stage its
answer, the improving solutions before it and the best plan by the additive prices (every
collective exposed) are simulated; the shortest makespan wins. `overlap=False` is the
additive model, where the objective is the cost model's step time exactly.

    >>> plan = search(graph, {"dp": 2, "tp": 4}, load_profile("h100"))   # doctest: +SKIP
    >>> plan.cost["step_time"], plan.zero                                # doctest: +SKIP

Pins (`sharding.Pin`) are hard constraints enforced through assumption literals, so an
infeasible set is reported by name (`PlanInfeasible`). A memory limit no plan meets is
reported with the least memory per device any plan needs (a second model minimising it).
"""
from __future__ import annotations

import concurrent.futures
import copy
import functools
import gc
import json
import os
import threading
import time
from dataclasses import dataclass, field, replace
from math import gcd, prod
from typing import Iterable, Sequence

import numpy as np
from ortools.sat.python import cp_model

from autopar.compiler import sharding
from autopar.compiler.cluster import Cluster, DeviceProfile, format_bytes, format_time, load_profile
from autopar.compiler.cost import CostModel, CostReport, Edge, _steps_cached
from autopar.compiler.errors import InputError, PlanInfeasible, UserError
from autopar.compiler.ir import Graph, format_attr
from autopar.compiler.ops import REGISTRY
from autopar.compiler.patterns import block_of, resolve_modules
from autopar.compiler.plan import Plan
from autopar.compiler.sharding import Collective, Pin, Strategy


PAIR_LIMIT = 1024             # edges with more (row class x column class) pairs use a table
# (a table has no linear relaxation: the bound stalls -- 441-pair edges of lora on dp=2,tp=2
# as tables took 3 s to prove at ZeRO-3, as pair booleans 0.15 s)


# ---- groups: follow-merging ------------------------------------------------------------------

@dataclass
class Group:
    """Members sharing one decision: the root's strategy index picks every member's."""
    root: int
    members: list[int]
    strat: dict[int, list[Strategy]]       # member -> strategy for each root strategy

    @property
    def size(self) -> int:
        return len(self.strat[self.root])


def followed_operand(cm: CostModel, mi: int) -> int | None:
    """Which operand an elementwise/view node follows: its first non-parameter operand."""
    m = cm.members[mi]
    od = REGISTRY[m.node.op]
    if not (od.elementwise or od.view):
        return None
    for i, v in enumerate(m.inputs):
        src = cm.members[cm.producer[v][0]]
        if src.kind not in ("param", "buffer"):
            return i
    return None


def build_groups(cm: CostModel, merge: bool, pinned: set[int]) -> tuple[list[Group], list[int]]:
    """Groups and member -> group id. A follower joins only when every choice of its
    producer gives it a layout it can take as is (never a partial sum)."""
    groups: list[Group] = []
    group_of = [-1] * len(cm.members)
    greedy: dict = {}
    for m in cm.members:
        mi = m.index
        i = None if (m.is_source or not merge or mi in pinned) else followed_operand(cm, mi)
        if i is not None:
            src, j = cm.producer[m.inputs[i]]
            g = groups[group_of[src]]
            by_layout: dict[tuple, Strategy] = {}
            for s in cm.strategies(mi):          # fewest splits first: the plain follow
                lay = cm.in_layout(mi, s, i)
                old = by_layout.get(lay)
                if old is None or sum(x is not None for x in s) < sum(x is not None for x in old):
                    by_layout[lay] = s
            edge = next(e for e in cm.in_edges[mi] if e.arg == i)
            sig = (m.node.op, format_attr(list(m.node.attrs)), i,
                   tuple((v.shape, str(v.dtype), v.name in cm.needs_grad) for v in (*m.inputs, *m.outputs)),
                   m.key in cm.regions, cm.has_backward(mi))
            chosen = []
            for sp in g.strat[src]:
                lay = cm.out_layouts(src, sp)[j]
                s = None if "P" in lay else by_layout.get(lay)
                if s is None:       # a partial sum or an unsplittable dim: cheapest conversion
                    s = greedy.get((sig, lay))
                    if s is None:
                        s = greedy[(sig, lay)] = min(cm.strategies(mi), key=lambda sc: (
                            sum(cm.time_of(c) for c in cm.edge_collectives(edge, sp, sc))
                            + cm.compute(mi, sc).fwd_time + cm.compute(mi, sc).bwd_time))
                chosen.append(s)
            g.members.append(mi)
            g.strat[mi] = chosen
            group_of[mi] = group_of[src]
            continue
        group_of[mi] = len(groups)
        groups.append(Group(mi, [mi], {mi: list(cm.strategies(mi))}))
    return groups, group_of


# ---- classes: repeated-block linking ---------------------------------------------------------

def build_classes(cm: CostModel, groups: list[Group], group_of: list[int], link: bool,
                  pinned_at: dict[int, list]) -> tuple[list[list[int]], list[int], dict]:
    """Classes of linked groups (each a list of group ids) and group -> class id. Pins are
    part of a block's signature: blocks pinned alike still link. A group may span
    consecutive instances of one block kind (a pinned block output followed into the next
    block): it links with the groups at the same positions and instance offsets."""
    class_of = [-1] * len(groups)
    classes: list[list[int]] = []
    info = {"blocks": 0, "block_classes": 0}
    if link:
        block = {}
        for m in cm.members:
            b = block_of(m.module)
            if b is not None:
                block[m.index] = b
        instances: dict[str, list[int]] = {}
        for mi, (_, inst) in block.items():
            instances.setdefault(inst, []).append(mi)
        sig_of: dict[str, tuple] = {}
        for inst, mems in instances.items():
            local = {mi: k for k, mi in enumerate(mems)}
            sig = [block[mems[0]][0]]
            for mi in mems:
                m = cm.members[mi]
                ins = []
                for v in m.inputs:
                    src, j = cm.producer[v]
                    if src in local:
                        ins.append(("L", local[src], j))
                    else:
                        ins.append(("X", v.shape, str(v.dtype), v.name in cm.needs_grad))
                sig.append((m.kind, m.node.op if m.node else "", format_attr(list(m.node.attrs)) if m.node else "",
                            tuple((v.shape, str(v.dtype), v.name in cm.needs_grad, v.requires_grad) for v in m.outputs),
                            tuple(ins), m.key in cm.regions, tuple(sorted(pinned_at.get(mi, ())))))
            # group shape inside the block: each member's group root and position, locally
            # (a group rooted here may reach into the next instance: the last one has none)
            for mi in mems:
                g = groups[group_of[mi]]
                sig.append(("G", local[g.root], g.members.index(mi)) if g.root in local else ("G", "outside"))
            sig_of[inst] = tuple(sig)
        by_sig: dict[tuple, list[str]] = {}
        for inst, sig in sig_of.items():
            by_sig.setdefault(sig, []).append(inst)
        inst_class = {}
        for sig, insts in by_sig.items():
            if len(insts) > 1:
                info["block_classes"] += 1
                for inst in insts:
                    inst_class[inst] = (id(sig), instances[inst])
        info["blocks"] = len(instances)
        # a group links when all its members lie in instances of one repeated block kind:
        # keyed by each member's instance offset and position there
        position = {mi: (inst, k) for inst in inst_class for k, mi in enumerate(instances[inst])}
        key_to_class: dict[tuple, int] = {}
        for gid, g in enumerate(groups):
            if any(mi not in position for mi in g.members):
                continue
            insts = {position[mi][0] for mi in g.members}
            if len({sig_of[inst] for inst in insts}) != 1:
                continue
            number = {inst: int(inst[len(block[g.root][0]) + 1:]) for inst in insts}
            first = min(number.values())
            key = (sig_of[position[g.root][0]],
                   tuple((number[position[mi][0]] - first, position[mi][1]) for mi in g.members))
            cid = key_to_class.get(key)
            if cid is None:
                cid = key_to_class[key] = len(classes)
                classes.append([])
            classes[cid].append(gid)
            class_of[gid] = cid
    for gid in range(len(groups)):
        if class_of[gid] < 0:
            class_of[gid] = len(classes)
            classes.append([gid])
    return classes, class_of, info


# ---- the search problem ------------------------------------------------------------------------

@dataclass
class Problem:
    """The merged and linked problem of one mesh, shared by the ZeRO levels."""
    cm: CostModel
    groups: list[Group]
    group_of: list[int]
    classes: list[list[int]]
    class_of: list[int]
    pins: list[tuple[Pin, int, int]]               # (pin, member, output)
    stats: dict = field(default_factory=dict)
    edge_cache: dict = field(default_factory=dict)
    edge_memo: dict = field(default_factory=dict)       # edge_matrices by content
    shared_cache: dict = field(default_factory=dict)    # shared_terms by value and domains

    def pos(self, mi: int) -> int:
        return self.groups[self.group_of[mi]].members.index(mi)


def edge_matrices(cm: CostModel, e: Edge, sps: Sequence[Strategy], scs: Sequence[Strategy],
                  zero: int, fold_rs: bool = False, memo: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Time and saved-copy memory of edge `e` for every (producer, consumer) strategy pair.
    `fold_rs`: the edge is its param's only use, so the ZeRO-2 reduce_scatter that replaces
    its gradient all_reduce is priced here (exact, and a tighter model than the OR).
    Entries depend only on the layouts at both ends, so they are computed once per
    distinct layout pair and memoised across edges of the same kind. `memo`: whole
    matrices by everything they depend on, so edges that differ only in where they sit
    share one computation (the residual stream is one merged group spanning every block:
    its edges are not deduplicated by linking, and would otherwise cost O(depth))."""
    v = e.value
    src_m, dst_m = cm.members[e.src], cm.members[e.dst]
    pair_memo = cm.__dict__.setdefault("_edge_pair_memo", {})   # lives and dies with `cm`
    kind = (v.shape, cm.itemsize(v), v.name in cm.needs_grad, cm.has_backward(e.dst),
            cm.recomputed_edge(e), src_m.trainable, fold_rs,
            src_m.outputs[0].shape if src_m.is_source else None, src_m.kind, cm.window_fraction(e.src),
            cm.overlap_prices)
    if memo is not None:
        # rows: out_layouts (by annotation object, strategy, output count) and
        # zero_applies (trainable, float, the dp layout); columns: in_layout by annotation
        mkey = (kind, zero >= 2, id(src_m.anno), len(src_m.outputs), e.out,
                src_m.outputs[0].dtype.is_floating_point, id(dst_m.anno), e.arg, tuple(sps), tuple(scs))
        hit = memo.get(mkey)
        if hit is not None:
            return hit
    src_ids: dict = {}
    row = []
    for sp in sps:
        lay = cm.out_layouts(e.src, sp)[e.out]
        zapp = zero >= 2 and cm.zero_applies(e.src, sp, zero)
        row.append(src_ids.setdefault((lay, zapp), len(src_ids)))
    dst_ids: dict = {}
    col = []
    for sc in scs:
        lay = cm.in_layout(e.dst, sc, e.arg)
        splits = frozenset(i for i, lab in enumerate(sc) if lab is not None)
        col.append(dst_ids.setdefault((lay, splits), len(dst_ids)))
    T = np.zeros((len(src_ids), len(dst_ids)))
    M = np.zeros((len(src_ids), len(dst_ids)))
    dst_keys = list(dst_ids)
    for a, (slay, zapp) in enumerate(src_ids):
        for b, (dlay, splits) in enumerate(dst_keys):
            mk = (kind, slay, zapp, dlay, splits)
            hit = pair_memo.get(mk)
            if hit is None:
                cols = cm.layout_collectives(e, slay, dlay, splits)
                t = 0.0
                replaced = False
                for c in cols:
                    if zapp and cm.is_param_grad_reduce(e, c):
                        replaced = True
                        continue
                    t += cm.solver_time(c, e.src)
                if replaced and fold_rs:
                    t += cm.solver_time(Collective("reduce_scatter", cm.dp_axis,
                                                   cm.local_bytes(src_m.outputs[0], slay), "backward"), e.src)
                hit = pair_memo[mk] = (t, cm.layout_edge_memory(e, dlay, cols))
            T[a, b], M[a, b] = hit
    r, c = np.array(row), np.array(col)
    out = T[np.ix_(r, c)], M[np.ix_(r, c)]
    if memo is not None:
        memo[mkey] = out
    return out


def build_problem(graph: Graph, cluster: Cluster, pins: Sequence[Pin], recompute, merge: bool,
                  link: bool, precision: str | None, dp_axis: str | None, overlap=None) -> Problem:
    cm = CostModel(graph, cluster, precision=precision, recompute=recompute, dp_axis=dp_axis,
                   overlap=overlap)
    pin_members = []
    for pin in pins:
        v = next((v for v in cm.producer if v.name == pin.value), None)
        if v is None:
            raise InputError(f"pin {pin}: the graph has no value %{pin.value}")
        if len(pin.layout) != len(cm.mesh):
            raise InputError(f"pin {pin}: {len(pin.layout)} placements for a mesh of "
                             f"{len(cm.mesh)} axes ({sharding.format_mesh(cm.mesh)})")
        mi, j = cm.producer[v]
        pin_members.append((pin, mi, j))
    pinned = {mi for _, mi, _ in pin_members}
    groups, group_of = build_groups(cm, merge, pinned)
    pinned_at: dict[int, list] = {}
    for pin, mi, j in pin_members:
        pinned_at.setdefault(mi, []).append((j, tuple(pin.layout)))
    classes, class_of, info = build_classes(cm, groups, group_of, link, pinned_at)
    stats = {
        "members": len(cm.members),
        "variables_before": sum(len(cm.strategies(m.index)) for m in cm.members),
        "groups_after_merging": len(groups),
        "variables_after_merging": sum(g.size for g in groups),
        "classes_after_linking": len(classes),
        "variables_after_linking": sum(groups[c[0]].size for c in classes),
        "repeated_block_kinds": info["block_classes"],
    }
    return Problem(cm, groups, group_of, classes, class_of, pin_members, stats)


@dataclass
class Tables:
    """One ZeRO level's costs per class over its remaining domain (indices into the
    group's strategy lists)."""
    dom: list[list[int]]
    ut: list[np.ndarray]
    um: list[np.ndarray]
    pairs: dict[tuple[int, int], list[np.ndarray]]      # (C1, C2) -> [T, M]
    rs: list[tuple[int, np.ndarray, list[tuple[int, np.ndarray]]]]   # param class, cost, consumers
    # collective CSE: steps one value shares among its consumers, each priced once --
    # (time, memory, producer class, producer positions, [(consumer class, positions)]);
    # memory stays per edge (see build_tables)
    shared: list[tuple[float, float, int, list[int], list[tuple[int, list[int]]]]] = field(default_factory=list)
    shared_classes: set[int] = field(default_factory=set)   # kept whole by dominance removal


def shared_values(prob: Problem, zero: int) -> dict[tuple, list]:
    """Values read by several consumer positions (collective CSE prices their steps once):
    key -> [producer member, output, consumer edges, every instance's edges]. Keys are by class and
    position, so a value of a linked block counts once with the number of blocks. Trainable
    parameters under ZeRO-2/3 keep the per-edge model (their gradient all_reduce becomes the
    stage's reduce_scatter)."""
    cm = prob.cm
    out: dict[tuple, list] = {}
    for m in cm.members:
        if zero >= 2 and m.trainable:
            continue
        by_out: dict[int, list] = {}
        for e in cm.out_edges[m.index]:
            by_out.setdefault(e.out, []).append(e)
        for j, edges in by_out.items():
            if len(edges) < 2:
                continue
            # consumers at one class position choose alike: one end (a value every linked
            # block reads -- rotary tables -- is resharded once for all of them)
            ends = {}
            for e in edges:
                region = cm.regions.get(cm.members[e.dst].key) if cm.reshard_inside(e) else None
                ends.setdefault((prob.class_of[prob.group_of[e.dst]], prob.pos(e.dst), e.arg, region or ""), e)
            key = (prob.class_of[prob.group_of[m.index]], prob.pos(m.index), j, tuple(sorted(ends)))
            ent = out.get(key)
            if ent is None:
                out[key] = [m.index, j, list(ends.values()), [edges]]
            else:
                ent[3].append(edges)
    return out


def shared_terms(prob: Problem, full_dom, key, src: int, j: int, edges, mult: int) -> list:
    """The trie of steps of one shared value: a node per (producer layout, region, step
    prefix), priced once however many consumers read through it. Positions are grouped by
    the layout they give (many strategies give one), so each distinct (producer layout,
    consumer layout) pair is walked once. The trie does not depend on the prices (overlap
    or additive, `cm.overlap_prices`): it is built once per value and domains
    (`prob.shared_cache`) and priced for each."""
    cm = prob.cm
    tk = ("trie", key, tuple(tuple(full_dom[c]) for c in
                             sorted({key[0], *(prob.class_of[prob.group_of[e.dst]] for e in edges)})))
    trie = prob.shared_cache.get(tk)
    if trie is None:
        trie = prob.shared_cache[tk] = shared_trie(prob, full_dom, key, src, j, edges)
    v = edges[0].value
    grad = v.name in cm.needs_grad
    # a step's price depends on the step and on what the value is (solver_time)
    price = cm.__dict__.setdefault("_shared_step_memo", {})      # lives and dies with `cm`
    sm = cm.members[src]
    src_kind = (sm.kind, sm.trainable, src in cm._window, cm.overlap_prices)
    out = []
    for st, in_region, A, Bs in trie:
        pk = (st, grad, in_region, src_kind)
        t = price.get(pk)
        if t is None:
            cols = st.collectives(grad)
            t = sum(cm.solver_time(c, src) for c in cols)
            if in_region:
                t += sum(cm.time_of(c) for c in cols if c.phase == "forward")
            price[pk] = t
        if t:
            out.append((mult * t, 0.0, key[0], A, Bs))
    return out


def shared_trie(prob: Problem, full_dom, key, src: int, j: int, edges) -> list:
    """shared_terms' trie, unpriced: per node (its last step, whether the consumer
    recomputes it inside a region, producer positions, [(consumer class, positions)])."""
    cm, groups = prob.cm, prob.groups
    ga = groups[prob.group_of[src]]
    ca = key[0]
    v = edges[0].value
    grad = v.name in cm.needs_grad
    itemsize = cm.itemsize(v)
    by_lay: dict = {}
    for pa, k in enumerate(full_dom[ca]):
        by_lay.setdefault(cm.out_layouts(src, ga.strat[src][k])[j], []).append(pa)
    ends = []                                   # per edge: (class, region, {(layout, splits): positions})
    for e in edges:
        gb = groups[prob.group_of[e.dst]]
        cb = prob.class_of[prob.group_of[e.dst]]
        region = cm.regions.get(cm.members[e.dst].key) if cm.reshard_inside(e) else None
        by_dst: dict = {}
        for pb, kk in enumerate(full_dom[cb]):
            sc = gb.strat[e.dst][kk]
            splits = frozenset(a for a, lab in enumerate(sc) if lab is not None)
            by_dst.setdefault((cm.in_layout(e.dst, sc, e.arg), splits), []).append(pb)
        ends.append((cb, region, by_dst))
    nodes: dict[tuple, dict] = {}
    for lay, pas in by_lay.items():
        for i, (cb, region, by_dst) in enumerate(ends):
            for (dst, splits), pbs in by_dst.items():
                chain = _steps_cached(lay, dst, v.shape, itemsize, cm.mesh_items, splits, grad)
                prefix: tuple = (lay, region)
                for st in chain:
                    prefix = prefix + ((st.axis, st.op, st.attrs),)
                    node = nodes.get(prefix)
                    if node is None:
                        node = nodes[prefix] = {"st": st, "r": region is not None, "A": set(), "B": {}}
                    node["A"].update(pas)
                    node["B"].setdefault((i, cb), set()).update(pbs)
    return [(n["st"], n["r"], sorted(n["A"]), [(cb, sorted(b)) for (_, cb), b in n["B"].items()])
            for n in nodes.values()]


def merge_shared(terms: list) -> list:
    """Shared steps reached by the same (producer positions, consumer positions) are paid
    together or not at all: one term with their summed costs (one CP-SAT boolean, not one
    per step -- on LLaMA-3-8B 27k terms fold into ~1.2k)."""
    out: dict[tuple, list] = {}
    for t, m, ca, A, Bs in terms:
        k = (ca, tuple(A), tuple((cb, tuple(B)) for cb, B in Bs))
        ent = out.get(k)
        if ent is None:
            out[k] = [t, m, ca, A, Bs]
        else:
            ent[0] += t
            ent[1] += m
    return [tuple(x) for x in out.values()]


def allowed_root(prob: Problem, zero: int, gid: int) -> list[int]:
    """Root strategies allowed at this ZeRO level: below 3, parameters never split dp."""
    cm = prob.cm
    g = prob.groups[gid]
    d = cm.dp_index()
    root = cm.members[g.root]
    if zero >= 3 or d is None or root.kind != "param":
        return list(range(g.size))
    return [k for k, s in enumerate(g.strat[g.root]) if s[d] is None]


def build_tables(prob: Problem, zero: int) -> Tables:
    cm, groups = prob.cm, prob.groups
    ncls = len(prob.classes)
    full_dom = []
    for cid, gids in enumerate(prob.classes):
        full_dom.append(allowed_root(prob, zero, gids[0]))
    ut = [np.zeros(len(full_dom[c])) for c in range(ncls)]
    um = [np.zeros(len(full_dom[c])) for c in range(ncls)]
    # unary: members' compute, activations, parameter state, optimizer gathers
    for cid, gids in enumerate(prob.classes):
        g = groups[gids[0]]
        mult = len(gids)
        for k_i, k in enumerate(full_dom[cid]):
            t = mm = 0.0
            for mi in g.members:
                s = g.strat[mi][k]
                c = cm.compute(mi, s)
                t += c.fwd_time + c.bwd_time + c.recompute_time
                mm += cm.activation_bytes(mi, s) + sum(cm.param_state(mi, s, zero))
                col = cm.optimizer_gather(mi, s, zero)
                if col is not None:
                    t += cm.time_of(col)
                t += cm.optimizer_time(mi, s, zero)
            ut[cid][k_i] += mult * t
            um[cid][k_i] += mult * mm
    # values several consumers read: their steps are priced once (collective CSE)
    shared, shared_classes, shared_edges = [], set(), set()
    for key, (src, j, edges, instances) in shared_values(prob, zero).items():
        # the same terms at every ZeRO stage that leaves these classes' domains alone
        ck = (key, cm.overlap_prices, tuple(tuple(full_dom[c]) for c in
                                            {key[0], *(prob.class_of[prob.group_of[e.dst]] for e in edges)}))
        terms = prob.shared_cache.get(ck)
        if terms is None:
            terms = prob.shared_cache[ck] = shared_terms(prob, full_dom, key, src, j, edges, len(instances))
        shared += terms
        shared_edges.update(id(e) for group in instances for e in group)
        shared_classes.add(key[0])
        shared_classes.update(prob.class_of[prob.group_of[e.dst]] for e in edges)
    shared = merge_shared(shared)
    # edges, deduplicated by (class, position) of both ends
    edge_count: dict[tuple, list] = {}
    for e in cm.edges:
        ga, gb = prob.group_of[e.src], prob.group_of[e.dst]
        key = (prob.class_of[ga], prob.pos(e.src), e.out, prob.class_of[gb], prob.pos(e.dst), e.arg,
               ga == gb, id(e) in shared_edges)
        ent = edge_count.get(key)
        if ent is None:
            edge_count[key] = [e, 1]
        else:
            ent[1] += 1
    pairs: dict[tuple[int, int], list[np.ndarray]] = {}
    for key, (e, mult) in edge_count.items():
        ca, cb, same_group = key[0], key[3], key[6]
        ga, gb = groups[prob.group_of[e.src]], groups[prob.group_of[e.dst]]
        fold = zero >= 2 and len(cm.out_edges[e.src]) == 1 and cm.members[e.src].trainable
        ck = (key, zero >= 2, cm.overlap_prices)
        if ck not in prob.edge_cache:
            sps = [ga.strat[e.src][k] for k in range(ga.size)]
            scs = [gb.strat[e.dst][k] for k in range(gb.size)]
            prob.edge_cache[ck] = edge_matrices(cm, e, sps, scs, zero, fold, prob.edge_memo)
        T, M = prob.edge_cache[ck]
        if key[7]:
            # a shared value's time is priced by its shared steps; its saved copies stay per
            # edge (an upper bound on memory: the memory limit stays a safe constraint)
            T = np.zeros_like(T)
        da, db = full_dom[ca], full_dom[cb]
        if same_group or ca == cb:           # one decision: only the diagonal is reachable
            idx = np.array(da)
            ut[ca] += mult * T[idx, idx]
            um[ca] += mult * M[idx, idx]
            continue
        sub_t, sub_m = T[np.ix_(da, db)], M[np.ix_(da, db)]
        if ca > cb:
            ca, cb, sub_t, sub_m = cb, ca, sub_t.T, sub_m.T
        acc = pairs.get((ca, cb))
        if acc is None:
            pairs[(ca, cb)] = [mult * sub_t, mult * sub_m]
        else:
            acc[0] += mult * sub_t
            acc[1] += mult * sub_m
    # ZeRO-2/3: one reduce_scatter per param whose gradient is partial on dp
    rs = []
    d = cm.dp_index()
    if zero >= 2 and d is not None:
        seen = set()
        for m in cm.members:
            if not m.trainable or len(cm.out_edges[m.index]) <= 1:     # one use: folded
                continue
            gid = prob.group_of[m.index]
            cid = prob.class_of[gid]
            key = (cid, prob.pos(m.index))
            if key in seen:
                continue
            seen.add(key)
            g = groups[gid]
            cost = np.array([cm.solver_time(cm.grad_reduce_scatter(m.index, g.strat[m.index][k]), m.index)
                             if cm.zero_applies(m.index, g.strat[m.index][k], zero) else 0.0
                             for k in full_dom[cid]]) * len(prob.classes[cid])
            if not cost.any():
                continue
            consumers = {}
            for gid2 in prob.classes[cid]:
                mi2 = groups[gid2].members[key[1]]
                for e in cm.out_edges[mi2]:
                    gc = prob.group_of[e.dst]
                    cc = prob.class_of[gc]
                    hk = (cc, prob.pos(e.dst))
                    if hk not in consumers:
                        gg = groups[gc]
                        consumers[hk] = np.array([gg.strat[e.dst][k][d] is not None for k in full_dom[cc]])
            rs.append((cid, cost, [(cc, mask) for (cc, _), mask in consumers.items()]))
    return Tables(full_dom, ut, um, pairs, rs, shared, shared_classes)


def remove_dominated(prob: Problem, tab: Tables, protected: set[int]) -> int:
    """Drop strategies no better than another in every cost; returns how many."""
    ncls = len(tab.dom)
    incident: list[list[tuple[tuple[int, int], int]]] = [[] for _ in range(ncls)]
    for (a, b) in tab.pairs:
        incident[a].append(((a, b), 0))
        incident[b].append(((a, b), 1))
    rs_feat: list[list[np.ndarray]] = [[] for _ in range(ncls)]
    for cid, cost, consumers in tab.rs:
        rs_feat[cid].append(cost)
        for cc, mask in consumers:
            rs_feat[cc].append(mask.astype(float))
    removed = 0
    for c in range(ncls):
        n = len(tab.dom[c])
        if n <= 1 or c in protected:
            continue
        feats = [tab.ut[c][:, None], tab.um[c][:, None]]
        for key, side in incident[c]:
            T, M = tab.pairs[key]
            feats += [T, M] if side == 0 else [T.T, M.T]
        feats += [f[:, None] for f in rs_feat[c]]
        F = np.concatenate(feats, axis=1)
        scale = np.abs(F).max(axis=0) + 1e-300
        tol = 1e-9 * scale
        keep = np.ones(n, dtype=bool)
        for k1 in range(n):
            le = np.all(F <= F[k1] + tol, axis=1)          # rows no worse than k1
            lt = np.any(F < F[k1] - tol, axis=1)
            dominators = keep & le & (lt | (np.arange(n) < k1))
            dominators[k1] = False
            if dominators.any():
                keep[k1] = False
        if keep.all():
            continue
        idx = np.nonzero(keep)[0]
        removed += n - len(idx)
        tab.dom[c] = [tab.dom[c][i] for i in idx]
        tab.ut[c], tab.um[c] = tab.ut[c][idx], tab.um[c][idx]
        for key, side in incident[c]:
            P = tab.pairs[key]
            tab.pairs[key] = [X[idx, :] if side == 0 else X[:, idx] for X in P]
        tab.rs = [(cid, cost[idx] if cid == c else cost,
                   [(cc, mask[idx] if cc == c else mask) for cc, mask in cons])
                  for cid, cost, cons in tab.rs]
        for i, f in enumerate(rs_feat[c]):
            rs_feat[c][i] = f[idx]
    return removed


# ---- CP-SAT ------------------------------------------------------------------------------------

@dataclass
class Solved:
    status: str
    zero: int
    choice: list[int] | None          # per class: index into the group domain
    objective: float | None           # seconds (or bytes for memory minimisation)
    solve_time: float
    core: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    bound: float | None = None        # time objective: no plan of this stage is faster (seconds)
    # the solver's last improving solutions before `choice` (time objective): the
    # candidates the search re-ranks by the simulated schedule
    alternatives: list[list[int]] = field(default_factory=list)


# candidates per mesh shape and ZeRO stage re-ranked by the schedule: the solver's answer
# and up to this many of the improving solutions it found before it
ALTERNATIVES = 3


class _Improving(cp_model.CpSolverSolutionCallback):
    """Keeps the last few solutions the solver reports (each better than the one before)."""

    def __init__(self, x, keep: int):
        super().__init__()
        self.x, self.keep, self.found = x, keep, []

    def on_solution_callback(self):
        picked = [next(k for k, b in enumerate(xc) if self.BooleanValue(b)) for xc in self.x]
        self.found.append(picked)
        del self.found[:-self.keep]


_ACTIVE: set = set()        # CP-SAT solvers solving now, in any thread
_ACTIVE_LOCK = threading.Lock()


def stop_solvers(stop: threading.Event) -> None:
    """Stop every solve in flight and, through `stop`, the side thread's solves not yet
    started (an interrupt ends the search without waiting for them)."""
    with _ACTIVE_LOCK:
        stop.set()
        for solver in list(_ACTIVE):
            solver.stop_search()


def solve_tables(prob: Problem, tab: Tables, zero: int, memory_limit: float | None,
                 time_limit: float, deterministic: bool, minimize: str = "time",
                 hint: dict[int, int] | None = None, diagnose: bool = False,
                 then_time: bool = False, workers: int | None = None,
                 stop: threading.Event | None = None) -> Solved:
    """Build and solve the CP-SAT model of one ZeRO level. `hint`: class -> position in
    its remaining domain. `minimize="memory", then_time=True`: the least memory, then the
    fastest plan that needs no more (a second solve of the same model). `workers`: CP-SAT's
    worker threads (default: one per CPU); `stop` set: no solve (UNKNOWN, nothing found)."""
    model = cp_model.CpModel()
    ncls = len(tab.dom)
    # integer scaling: the objective's upper bound maps to ~1e9
    ub_t = sum(u.max() for u in tab.ut if len(u)) + sum(P[0].max() for P in tab.pairs.values() if P[0].size)
    ub_t += sum(c.max() for _, c, _ in tab.rs) + sum(t for t, *_ in tab.shared)
    ub_m = sum(u.max() for u in tab.um if len(u)) + sum(P[1].max() for P in tab.pairs.values() if P[1].size)
    ub_m += sum(m for _, m, *_ in tab.shared)
    st = 1e9 / max(ub_t, 1e-30)
    unit_m = max(ub_m / 1e9, 1.0)

    def it(x):
        return int(round(x * st))

    def im(x):
        return int(np.ceil(x / unit_m - 1e-9))
    x = [[model.NewBoolVar(f"x{c}_{k}") for k in range(len(tab.dom[c]))] for c in range(ncls)]
    for c in range(ncls):
        model.AddExactlyOne(x[c])
    obj_t, obj_m = [], []
    ut = [u.copy() for u in tab.ut]
    um = [u.copy() for u in tab.um]
    index_var: dict[int, cp_model.IntVar] = {}

    def index_of(c):
        if c not in index_var:
            v = model.NewIntVar(0, len(tab.dom[c]) - 1, f"i{c}")
            model.Add(v == sum(k * b for k, b in enumerate(x[c])))
            index_var[c] = v
        return index_var[c]
    n_pair_bools = n_tables = 0
    for (a, b), (T, M) in tab.pairs.items():
        T, M = T.copy(), M.copy()
        for X, U in ((T, ut), (M, um)):
            r = X.min(axis=1)
            X -= r[:, None]
            U[a] += r
            cmin = X.min(axis=0)
            X -= cmin[None, :]
            U[b] += cmin
        Ti = np.rint(T * st).astype(np.int64)
        Mi = np.ceil(M / unit_m - 1e-9).astype(np.int64)
        if not Ti.any() and not Mi.any():
            continue
        # strategies with identical rows (columns) are one "row class" for this edge:
        # the pair variables live on classes, which keeps the encoding small
        rows, row_of = np.unique(np.concatenate([Ti, Mi], axis=1), axis=0, return_inverse=True)
        cols, col_of = np.unique(np.concatenate([Ti, Mi], axis=0).T, axis=0, return_inverse=True)
        row_of, col_of = row_of.reshape(-1), col_of.reshape(-1)
        ra = [np.nonzero(row_of == r)[0][0] for r in range(len(rows))]
        cb = [np.nonzero(col_of == c)[0][0] for c in range(len(cols))]
        if len(rows) * len(cols) <= PAIR_LIMIT:
            # the local-marginal encoding (Alpa's): tight LP relaxation on chains and trees
            y = [[model.NewBoolVar("") for _ in cb] for _ in ra]
            n_pair_bools += len(ra) * len(cb)
            for r in range(len(ra)):
                model.Add(sum(y[r]) == sum(x[a][k] for k in np.nonzero(row_of == r)[0]))
            for c in range(len(cb)):
                model.Add(sum(y[r][c] for r in range(len(ra))) == sum(x[b][l] for l in np.nonzero(col_of == c)[0]))
            for r, k in enumerate(ra):
                for c, l in enumerate(cb):
                    if Ti[k, l]:
                        obj_t.append(int(Ti[k, l]) * y[r][c])
                    if Mi[k, l]:
                        obj_m.append(int(Mi[k, l]) * y[r][c])
        else:
            n_tables += 1
            tv = model.NewIntVarFromDomain(cp_model.Domain.FromValues(sorted(set(Ti.flatten().tolist()))), "")
            mv = model.NewIntVarFromDomain(cp_model.Domain.FromValues(sorted(set(Mi.flatten().tolist()))), "")
            tuples = [(k, l, int(Ti[k, l]), int(Mi[k, l])) for k in range(Ti.shape[0]) for l in range(Ti.shape[1])]
            model.AddAllowedAssignments([index_of(a), index_of(b), tv, mv], tuples)
            obj_t.append(tv)
            obj_m.append(mv)
    for c in range(ncls):
        for k, b in enumerate(x[c]):
            if it(ut[c][k]):
                obj_t.append(it(ut[c][k]) * b)
            if im(um[c][k]):
                obj_m.append(im(um[c][k]) * b)
    # collective CSE: a step one value shares is paid once if any consumer reads through it
    n_shared = 0
    for t, mem, ca, A, Bs in tab.shared:
        ti, mi = it(t), im(mem)
        if not ti and not mi:
            continue
        u = model.NewBoolVar("")
        n_shared += 1
        for cb, B in Bs:
            model.Add(u >= sum(x[ca][p] for p in A) + sum(x[cb][q] for q in B) - 1)
        if ti:
            obj_t.append(ti * u)
        if mi:
            obj_m.append(mi * u)
    n_rs = 0
    for cid, cost, consumers in tab.rs:
        bvar = model.NewBoolVar("")
        for cc, mask in consumers:
            lits = [x[cc][k] for k in range(len(mask)) if mask[k]]
            if lits:
                model.Add(bvar >= sum(lits))
        for k, ck in enumerate(cost):
            if it(ck):
                z = model.NewBoolVar("")
                model.AddBoolOr([x[cid][k].Not(), bvar.Not(), z])
                obj_t.append(it(ck) * z)
                n_rs += 1
    # pins and the memory limit: hard constraints, or (diagnose=True, after an infeasible
    # solve) each behind an assumption literal so the solver names a conflicting subset
    # (assumptions also weaken presolve, hence two passes)
    assumptions, names = [], {}
    for pin, mi, j in prob.pins:
        gid = prob.group_of[mi]
        cid = prob.class_of[gid]
        g = prob.groups[gid]
        bad = [x[cid][kk] for kk, k in enumerate(tab.dom[cid])
               if not pin.matches(prob.cm.out_layouts(mi, g.strat[mi][k])[j])]
        if diagnose:
            lit = model.NewBoolVar(f"pin {pin}")
            for b in bad:
                model.AddImplication(lit, b.Not())
            assumptions.append(lit)
            names[lit.Index()] = str(pin)
        else:
            for b in bad:
                model.Add(b == 0)
    mem_expr = sum(obj_m) if obj_m else 0
    if memory_limit is not None and obj_m:
        ct = model.Add(mem_expr <= int(memory_limit // unit_m))
        if diagnose:
            lit = model.NewBoolVar("memory")
            ct.OnlyEnforceIf(lit)
            assumptions.append(lit)
            names[lit.Index()] = "memory"
    model.Minimize(sum(obj_t) if minimize == "time" else mem_expr)
    if assumptions:
        model.AddAssumptions(assumptions)
    if hint:
        for c, k in hint.items():
            for kk, b in enumerate(x[c]):
                model.AddHint(b, kk == k)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(time_limit, 0.05)
    if deterministic or diagnose:
        solver.parameters.num_workers = 1
        solver.parameters.random_seed = 0
    else:
        solver.parameters.num_workers = workers or max(os.cpu_count() or 1, 1)
    # Ctrl-C is the user's, not the solver's: CP-SAT would stop this solve and let the search
    # go on to the next; left to Python it ends the command once this solve returns
    solver.parameters.catch_sigint_signal = False
    # probing and symmetry detection cost more than they save on these models
    solver.parameters.cp_model_probing_level = 0
    solver.parameters.symmetry_level = 0
    # Boolean constraints in the LP too: presolve turns the pair booleans' marginal
    # equalities into exactly-one constraints, which the default level 1 leaves out of the
    # LP; under a binding memory limit its bound then stays far below the optimum (the
    # small GPT on dp=2,tp=2 at 1.5 MB: no plan in 10 s; at level 2 proven in ~1 s)
    solver.parameters.linearization_level = 2
    for k, v in json.loads(os.environ.get("AUTOPAR_CPSAT", "{}")).items():   # experiments
        setattr(solver.parameters, k, v)
    if os.environ.get("AUTOPAR_DUMP"):
        with open(os.environ["AUTOPAR_DUMP"], "w") as f:
            f.write(str(model.Proto()))
    t0 = time.perf_counter()
    keep = _Improving(x, ALTERNATIVES + 1) if minimize == "time" and not diagnose and prob.cm.overlapped else None
    with _ACTIVE_LOCK:
        if stop is not None and stop.is_set():
            return Solved("UNKNOWN", zero, None, None, 0.0)
        _ACTIVE.add(solver)
    try:
        status = solver.Solve(model, keep) if keep is not None else solver.Solve(model)
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.discard(solver)
    dt = time.perf_counter() - t0
    sname = solver.StatusName(status)
    stats = {"bools": sum(len(v) for v in x), "pair_bools": n_pair_bools, "tables": n_tables,
             "shared_step_bools": n_shared,
             "rs_bools": n_rs, "constraints": len(model.Proto().constraints)}
    bound = None
    if minimize == "time" and status in (cp_model.OPTIMAL, cp_model.FEASIBLE, cp_model.UNKNOWN):
        bound = solver.BestObjectiveBound() / st
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        picked = [next(k for k, b in enumerate(x[c]) if solver.BooleanValue(b)) for c in range(ncls)]
        obj = solver.ObjectiveValue() / st if minimize == "time" else solver.ObjectiveValue() * unit_m
        if minimize == "memory" and then_time and obj_m and not diagnose:
            # ties on memory are broken by time: keep the memory found, minimise time
            model.Add(mem_expr <= int(round(solver.ObjectiveValue())))
            model.Minimize(sum(obj_t))
            model.clear_hints()
            for c, k in enumerate(picked):
                for kk, b in enumerate(x[c]):
                    model.AddHint(b, kk == k)
            solver.parameters.max_time_in_seconds = max(time_limit - dt, 0.05)
            t1 = time.perf_counter()
            again = solver.Solve(model)
            dt += time.perf_counter() - t1
            if again in (cp_model.OPTIMAL, cp_model.FEASIBLE):
                picked = [next(k for k, b in enumerate(x[c]) if solver.BooleanValue(b)) for c in range(ncls)]
                sname = solver.StatusName(again) if sname == "OPTIMAL" else sname
        choice = [tab.dom[c][k] for c, k in enumerate(picked)]
        alternatives = []
        for p in reversed(keep.found if keep is not None else []):
            alt = [tab.dom[c][k] for c, k in enumerate(p)]
            if alt != choice and alt not in alternatives:
                alternatives.append(alt)
        return Solved(sname, zero, choice, obj, dt, stats=stats, bound=bound,
                      alternatives=alternatives[:ALTERNATIVES])
    core = []
    if status == cp_model.INFEASIBLE and assumptions:
        # shrink the solver's core until every assumption in it is needed (deletion filter)
        lits = {lit.Index(): lit for lit in assumptions}
        idx = list(solver.SufficientAssumptionsForInfeasibility()) or list(lits)
        solver.parameters.stop_after_first_solution = True
        i = 0
        while i < len(idx) and len(idx) > 1:
            trial = idx[:i] + idx[i + 1:]
            model.ClearAssumptions()
            model.AddAssumptions([lits[j] for j in trial])
            if solver.Solve(model) == cp_model.INFEASIBLE:
                idx = trial
            else:
                i += 1
        core = [names.get(i, "?") for i in idx]
    elif status == cp_model.INFEASIBLE and not diagnose and (prob.pins or memory_limit is not None):
        again = solve_tables(prob, tab, zero, memory_limit, time_limit, deterministic, minimize,
                             diagnose=True)
        core = again.core
    return Solved(sname, zero, None, None, dt, core, stats, bound)


def _neighbours(tab: Tables) -> list[list[tuple[int, np.ndarray, np.ndarray]]]:
    """Per class: (other class, time, memory) of each pair table, oriented rows = this class."""
    nbr: list[list[tuple[int, np.ndarray, np.ndarray]]] = [[] for _ in range(len(tab.dom))]
    for (a, b), (T, M) in tab.pairs.items():
        nbr[a].append((b, T, M))
        nbr[b].append((a, T.T, M.T))
    return nbr


def _totals(tab: Tables, ch: list[int]) -> tuple[float, float]:
    """(time, memory) of a choice (positions per class), ZeRO reduce_scatters left out."""
    t = sum(tab.ut[c][k] for c, k in enumerate(ch)) + sum(T[ch[a], ch[b]] for (a, b), (T, _) in tab.pairs.items())
    m = sum(tab.um[c][k] for c, k in enumerate(ch)) + sum(M[ch[a], ch[b]] for (a, b), (_, M) in tab.pairs.items())
    return float(t), float(m)


def _icm(tab: Tables, nbr, start: list[int], lam: float = 0.0, sweeps: int = 30) -> list[int]:
    """Iterated conditional modes on time + lam * memory from `start`."""
    ch = list(start)
    for _ in range(sweeps):
        changed = False
        for c in range(len(tab.dom)):
            if len(tab.dom[c]) <= 1:
                continue
            cost = tab.ut[c] + lam * tab.um[c] if lam else tab.ut[c].copy()
            for o, T, M in nbr[c]:
                cost += T[:, ch[o]] + lam * M[:, ch[o]] if lam else T[:, ch[o]]
            k = int(np.argmin(cost))
            if cost[k] < cost[ch[c]] - 1e-15:
                ch[c], changed = k, True
        if not changed:
            break
    return ch


def local_search_hint(tab: Tables, starts: list[list[int]], sweeps: int = 30) -> list[int]:
    """Iterated conditional modes from each start (positions per class); the best by the
    time objective (memory and ZeRO reduce_scatters ignored) -- a hint, nothing more."""
    nbr = _neighbours(tab)
    best, best_cost = None, float("inf")
    for start in starts:
        ch = _icm(tab, nbr, start, 0.0, sweeps)
        t = _totals(tab, ch)[0]
        if t < best_cost:
            best, best_cost = ch, t
    return best


def memory_hint(tab: Tables, limit: float, start: list[int], points: int = 16) -> list[int] | None:
    """A hint that fits `limit` bytes when `start` (the fastest by local search) does not:
    iterated conditional modes on time + lam * memory (a Lagrangian relaxation of the
    memory limit) over a log grid of lam, from `start` and from the least-memory choice per
    class; each answer that fits is then improved by single moves that keep it fitting, and
    the fastest is returned (None when none fits). Without it the solver starts from a hint
    the limit rules out and may spend its time limit before finding any plan. A grid, not
    a bisection on lam: local search is not monotone in lam, and the fastest fitting answer
    is often not at the smallest lam that fits."""
    t0, m0 = _totals(tab, start)
    if m0 <= limit:
        return start
    nbr = _neighbours(tab)
    least = [int(np.argmin(u)) for u in tab.um]
    best: tuple[float, list[int]] | None = None
    lam_of_byte = max(t0, 1e-30) / max(m0, 1.0)          # time per byte: lam's natural scale
    for lam in lam_of_byte * np.logspace(-2, 3, points):
        for s in (start, least):
            ch = _icm(tab, nbr, s, float(lam))
            t, m = _totals(tab, ch)
            if m <= limit:
                ch, t = _repair(tab, nbr, ch, t, m, limit)
                if best is None or t < best[0]:
                    best = (t, ch)
    return best[1] if best else None


def _repair(tab: Tables, nbr, ch: list[int], t: float, m: float, limit: float,
            sweeps: int = 30) -> tuple[list[int], float]:
    """Single-class moves that make `ch` faster and keep it within `limit` bytes."""
    ch = list(ch)
    for _ in range(sweeps):
        changed = False
        for c in range(len(tab.dom)):
            if len(tab.dom[c]) <= 1:
                continue
            ct, cmem = tab.ut[c].copy(), tab.um[c].copy()
            for o, T, M in nbr[c]:
                ct += T[:, ch[o]]
                cmem += M[:, ch[o]]
            dt, dm = ct - ct[ch[c]], cmem - cmem[ch[c]]
            dt[m + dm > limit] = np.inf
            k = int(np.argmin(dt))
            if dt[k] < -1e-12 * abs(t):
                ch[c], t, m, changed = k, t + dt[k], m + dm[k], True
        if not changed:
            break
    return ch, t


def hint_plan(prob: Problem, tab: Tables, zero: int, h: list[int], limit: float, res: Solved) -> Solved:
    """When the time limit stops the solver before it has any plan (UNKNOWN): the hint
    itself, if it fits the limit (exact cost model) and holds every pin, as a FEASIBLE
    answer -- a plan rather than none. Otherwise `res` unchanged."""
    cm = prob.cm
    choice = [tab.dom[c][k] for c, k in enumerate(h)]
    strategies = choice_strategies(prob, choice)
    for pin, mi, j in prob.pins:
        if not pin.matches(cm.out_layouts(mi, strategies[cm.members[mi].key])[j]):
            return res
    report = cm.evaluate(strategies, zero)
    if report.memory["total"] > limit:
        return res
    return Solved("FEASIBLE", zero, choice, report.step_time, res.solve_time,
                  stats=dict(res.stats, plan_from="hint: the time limit stopped the solver first"),
                  bound=res.bound)


def choice_strategies(prob: Problem, choice: list[int]) -> dict[str, Strategy]:
    out = {}
    for cid, gids in enumerate(prob.classes):
        for gid in gids:
            g = prob.groups[gid]
            for mi in g.members:
                out[prob.cm.members[mi].key] = g.strat[mi][choice[cid]]
    return out


# ---- the public entry points ---------------------------------------------------------------------

def zero_levels(cm: CostModel, zero: int | None) -> list[int]:
    """ZeRO stages to try. The automatic choice solves 0 and 3 only: stage 3's space holds
    every stage-2 plan at the same cost (a param left R on dp is treated as stage 2; a
    stage-3 answer that splits no param on dp is reported as stage 2), and stage 1 is
    never faster than 2 (reduce_scatter + all_gather move what one all_reduce does, with
    dp converted first) nor smaller in memory."""
    if cm.dp_index() is None:
        return [0]
    if zero is not None:
        return [zero]
    return [0, 3]


def _gc_paused(fn):
    """Run `fn` with the cyclic garbage collector paused (performance only). The search
    allocates many short-lived objects; with a large traced graph alive, the full
    collections they trigger rescan the whole heap (~0.25 s each at 96 GPT layers)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()
    return run


def search_fixed(graph: Graph, mesh: dict[str, int] | str, profile: DeviceProfile | str,
                 memory_limit: float | None = None, zero: int | None = None, pins: Iterable[Pin] = (),
                 time_limit: float = 10.0, deterministic: bool = False, recompute: Iterable[str] = (),
                 precision: str | None = None, merge: bool = True, link: bool = True,
                 dp_axis: str | None = None, objective: str = "time", overlap=None) -> Plan:
    """`search` with the recompute regions fixed to `recompute` (patterns or module paths;
    none: nothing recomputed). The fastest plan for `graph` on `mesh` that fits `memory_limit` bytes per device
    (default: the profile's memory). `zero=None` lets the search pick the ZeRO stage.
    `objective="memory"`: the plan of least memory per device instead, the fastest of those.
    `overlap`: the communication schedule the plan will run (Plan.overlap; default DDP's
    buckets and one block of ZeRO-3 prefetch, False: none) -- the solver prices it
    linearly, then its best candidates of each ZeRO stage are re-ranked by the simulated
    step (compiler/schedule.py).
    Raises `PlanInfeasible` naming the conflicting pins or the failing memory limit.

        >>> plan = search(graph, "dp=2,tp=2", "h100", deterministic=True)   # doctest: +SKIP
        >>> small = search(graph, "dp=2,tp=2", "h100", objective="memory")  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    if isinstance(profile, str):
        profile = load_profile(profile)
    if isinstance(mesh, str):
        mesh = sharding.parse_mesh(mesh)
    if zero is not None and zero not in (0, 1, 2, 3):
        raise InputError(f"zero={zero}: the ZeRO stage is 0, 1, 2 or 3")
    if objective not in ("time", "memory"):
        raise InputError(f"objective={objective!r}: minimise 'time' or 'memory'")
    pins = list(pins)
    recompute = resolve_modules(graph, list(recompute)) if recompute else []
    cluster = Cluster(dict(mesh), profile)
    limit = float(memory_limit) if memory_limit is not None else float(profile.memory)
    prob = build_problem(graph, cluster, pins, recompute, merge, link, precision, dp_axis, overlap)
    cm = prob.cm
    levels = zero_levels(cm, zero)
    if objective == "memory" and zero is None:
        levels = levels[-1:]          # stage 3 holds every plan of the lower stages, in less memory
    protected = {prob.class_of[prob.group_of[mi]] for _, mi, _ in prob.pins}
    results: list[tuple[Solved, Tables]] = []
    hint = None
    t_build = time.perf_counter() - t_start
    priced: dict[tuple, tuple] = {}     # one evaluation per distinct (stage, choice)

    def price(zero: int, choice: list[int]) -> tuple:
        hit = priced.get((zero, tuple(choice)))
        if hit is None:
            strategies = choice_strategies(prob, choice)
            hit = priced[(zero, tuple(choice))] = (strategies, cm.evaluate(strategies, zero))
        return hit
    side: dict[int, concurrent.futures.Future] = {}
    stop = threading.Event()
    workers = None
    if cm.overlapped and objective == "time":
        # the additive prices' candidates of every stage are solved beside the search (they
        # need nothing from it), each solver on half the CPUs; the Python that builds one's
        # tables runs while the other's CP-SAT has released the GIL
        workers = max(1, (os.cpu_count() or 1) // 2)
        extra_budget = max(0.25 * time_limit / len(levels), 0.1)
        for z in levels:
            side[z] = _SIDE.submit(additive_candidate, prob, z, limit, extra_budget, deterministic,
                                   protected, workers, stop)
    try:
        for i, z in enumerate(levels):
            tab = build_tables(prob, z)
            before = sum(len(d) for d in tab.dom)
            removed = remove_dominated(prob, tab, protected | tab.shared_classes)
            left = time_limit - (time.perf_counter() - t_start)
            budget = max(left / (len(levels) - i), 0.1)
            if side:
                budget = 0.75 * budget      # a quarter went to the additive candidate beside
            starts = [[int(np.argmin(u)) for u in tab.ut], [0] * len(tab.dom)]
            if hint is not None:
                starts.append([tab.dom[c].index(k) if k in tab.dom[c] else 0 for c, k in enumerate(hint)])
            h = local_search_hint(tab, starts)
            if objective == "time":
                # the fastest by local search rarely fits a binding limit: start from one that does
                h = memory_hint(tab, limit * (1 - 1e-4), h) or h
            res = solve_tables(prob, tab, z, limit, budget, deterministic, minimize=objective,
                               hint=dict(enumerate(h)), then_time=True, workers=workers)
            if side and res.choice is not None:
                for choice in [res.choice] + res.alternatives:     # while the candidates beside solve
                    price(z, choice)
            extra = side[z].result() if z in side else None
            if res.status == "UNKNOWN" and objective == "time":
                res = hint_plan(prob, tab, z, h, limit, res)
            res.stats.update(variables_before_dominance=before, dominated_removed=removed,
                             variables_after_dominance=before - removed)
            if res.choice is not None and extra is not None and extra != res.choice:
                res.alternatives.append(extra)
            results.append((res, tab))
            if res.choice is not None:
                hint = res.choice
    except BaseException:          # an interrupt or an error: nothing is left solving beside
        for f in side.values():
            f.cancel()
        stop_solvers(stop)
        concurrent.futures.wait(list(side.values()))    # stopped: returns at once
        raise
    ok = [(r, t) for r, t in results if r.choice is not None]
    if not ok:
        raise infeasible_error(prob, results, limit, deterministic, time_limit)
    # the exact cost of each candidate decides (the solver's objective is rounded, and with
    # overlap on linear where the step is a schedule): the solver's answer and the improving
    # solutions before it, by the simulated makespan
    exact = {}
    reranked = 0
    stage_best = []             # per ZeRO stage: [result, strategies, report, tables, bucket bytes]
    for r, t in ok:
        top = None
        for k, choice in enumerate([r.choice] + r.alternatives):
            strategies, report = price(r.zero, choice)
            if k and report.memory["total"] > limit:
                continue
            if k == 0 or report.step_time < exact[r.zero]:
                exact[r.zero] = report.step_time
            if top is None or better(report, top[2], objective):
                if k:
                    reranked += 1
                top = [r, strategies, report, t, cm.overlap["bucket_bytes"]]
        stage_best.append(top)
    if objective == "time" and cm.overlapped and not (isinstance(overlap, dict) and "bucket_bytes" in overlap):
        # the bucket size is tuned on each stage's best before the stages are compared: a
        # size that suits ZeRO-0's all-reduces can beat ZeRO-3 that DDP's 25 MiB lost to
        for cand in stage_best:
            cand[2], cand[4] = tune_buckets(cm, cand[0].zero, cand[2])
            exact[cand[0].zero] = cand[2].step_time
    best = None
    for cand in stage_best:
        if best is None or better(cand[2], best[2], objective):
            best = cand
    r, strategies, report, tab, bucket_bytes = best
    cm.overlap = {**cm.overlap, "bucket_bytes": bucket_bytes}
    chosen_zero = r.zero
    d = cm.dp_index()
    if chosen_zero == 3 and not any(strategies[m.key][d] is not None for m in cm.members
                                    if m.kind == "param"):
        chosen_zero = 2             # nothing stored sharded on dp: the same plan as stage 2
    status, lower, gap = r.status, None, None
    if objective == "time":
        # proven optimal only if no stage the solver left open (FEASIBLE, or UNKNOWN when
        # a stage found nothing in time) may still hold a faster plan: its bound decides
        unproven = [x.bound if x.bound is not None else 0.0 for x, _ in results
                    if x.status not in ("OPTIMAL", "INFEASIBLE")]
        lower = min([report.step_time] + unproven)
        gap = max(0.0, 1.0 - lower / report.step_time) if report.step_time > 0 else 0.0
        if status == "OPTIMAL" and gap > 1e-4:
            status = "FEASIBLE"
    wall = time.perf_counter() - t_start
    solver_stats = dict(prob.stats)
    solver_stats.update(r.stats)
    solver_stats.update({
        "status": status,
        "bound": lower,             # no plan is faster (seconds; time objective)
        "gap": gap,                 # 1 - bound / step time: 0 when proven optimal
        "objective": r.objective,
        "solve_time": sum(x.solve_time for x, _ in results),
        "build_time": t_build,
        "wall_time": wall,
        "zero_levels": {str(x.zero): {"status": x.status, "step_time": exact.get(x.zero),
                                      "solve_time": x.solve_time} for x, _ in results},
        "deterministic": deterministic,
        "time_limit": time_limit,
        "minimize": objective,
        "overlap": cm.overlapped,
        "reranked": reranked,        # times a candidate beat the solver's answer on the schedule
    })
    return make_plan(graph, cm, strategies, report, chosen_zero, limit, recompute, solver_stats,
                     [str(p) for p in pins])


# ---- recompute chosen by the search ----------------------------------------------------------------

# a plan needing at least this share of the memory limit without recompute is memory-bound:
# recompute may let a faster layout fit, so the search tries it too (below it, recompute
# only adds a forward and is never tried)
RECOMPUTE_TRY_FRACTION = 0.8
# at most this many recompute candidates per mesh shape (block kinds added one at a time,
# the one saving most memory first)
RECOMPUTE_CANDIDATES = 3


def recompute_candidates(graph: Graph, precision_itemsize=None) -> list[tuple[list[str], float]]:
    """The recompute choices the search tries, in order: every instance of the repeated
    block kind saving the most activation memory, then that and the next kind, ... --
    each as (module paths, activation bytes saved, whole graph unsplit)."""
    from autopar.compiler.cost import recompute_savings
    from autopar.compiler.gradients import grad_info
    from autopar.compiler.patterns import repeated_blocks
    lists = repeated_blocks(graph)
    if not lists:
        return []
    needs_grad = grad_info(graph).needs_grad
    size = precision_itemsize or (lambda v: v.itemsize)
    saving = sorted(((recompute_savings(graph, insts, needs_grad, size), name)
                     for name, insts in lists.items()), key=lambda x: -x[0])
    out, paths, total = [], [], 0.0
    for saved, name in saving[:RECOMPUTE_CANDIDATES]:
        if saved <= 0:
            break
        paths = paths + lists[name]
        total += saved
        out.append((list(paths), total))
    return out


def compute_bound(graph: Graph, cluster: Cluster, recompute: Sequence[str], precision: str | None) -> float:
    """No plan with these recompute regions steps faster than this: its FLOPs (forward,
    backward, the regions' forward again) over every device at the profile's achievable
    peak -- each node's compute is at least its FLOPs over its split factor, which is at
    most the device count, and the step's schedule runs all compute on one stream."""
    cm = CostModel(graph, cluster, precision=precision, recompute=recompute)
    rep = tuple(None for _ in cm.mesh)
    flops = 0.0
    for m in cm.members:
        if m.is_source:
            continue
        c = cm.compute(m.index, rep)
        flops += c.flops + c.bwd_flops + (c.flops if m.key in cm.regions else 0.0)
    return flops / (cluster.devices * cm.profile.efficiency * cm.profile.peak_flops)


@_gc_paused
def search(graph: Graph, mesh: dict[str, int] | str, profile: DeviceProfile | str,
           memory_limit: float | None = None, zero: int | None = None, pins: Iterable[Pin] = (),
           time_limit: float = 10.0, deterministic: bool = False, recompute: Iterable[str] = (),
           precision: str | None = None, merge: bool = True, link: bool = True,
           dp_axis: str | None = None, objective: str = "time", overlap=None,
           search_recompute: bool = True, step_to_beat: float | None = None) -> Plan:
    """The fastest plan for `graph` on `mesh` that fits `memory_limit` bytes per device
    (default: the profile's memory), recompute included: `search_fixed` without recompute,
    then -- when no plan fits, or the plan found needs RECOMPUTE_TRY_FRACTION of the limit
    or more -- with recompute of each candidate of `recompute_candidates` (every instance
    of a repeated block kind, the one saving most memory first); the fastest plan by
    the predicted step time wins (Plan.recompute says which, Plan.solver["recompute_search"]
    what was tried). An enumeration, not a CP-SAT decision: recomputing a block changes
    which values are saved, where its reshards run (again in backward), the ZeRO-3 prefetch
    window and the simulated schedule the candidates are ranked by -- the cost model's
    structure, not one linear term -- so each choice is priced by the exact model it
    runs under, at the price of one more search per candidate (a few, and only when
    memory binds).

    A candidate is skipped, unsearched, when `compute_bound` proves it slower than the plan
    without recompute or than `step_to_beat` (search_devices passes the best step of the
    mesh shapes searched before): what keeps the extra searches few.

    `recompute` given (a plan file's `recompute` lines): exactly those regions, nothing
    added or removed. `search_recompute=False`, or objective="memory": no recompute
    unless given. Other arguments as `search_fixed`. Raises `PlanInfeasible`; a memory
    limit nothing meets names the least memory per device with and without recompute.

        >>> plan = search(graph, "dp=2,tp=2", "h100", deterministic=True)   # doctest: +SKIP
        >>> plan.recompute, plan.solver["recompute_search"]["chosen"]        # doctest: +SKIP
    """
    from autopar.compiler.patterns import fold_modules
    kw = dict(memory_limit=memory_limit, zero=zero, pins=list(pins), time_limit=time_limit,
              deterministic=deterministic, precision=precision, merge=merge, link=link,
              dp_axis=dp_axis, objective=objective, overlap=overlap)
    recompute = list(recompute)
    if recompute or not search_recompute or objective != "time":
        plan = search_fixed(graph, mesh, profile, recompute=recompute, **kw)
        plan.solver["recompute_search"] = {
            "mode": "given" if recompute else "off", "chosen": fold_modules(plan.recompute, graph)}
        return plan
    if isinstance(profile, str):
        profile = load_profile(profile)
    limit = float(memory_limit) if memory_limit is not None else float(profile.memory)
    t0 = time.perf_counter()
    tried: list[dict] = []
    plans: list[Plan] = []
    errors: list[tuple[list[str], PlanInfeasible]] = []

    def attempt(paths: list[str]) -> None:
        t = time.perf_counter()
        entry: dict = {"recompute": fold_modules(paths, graph), "modules": len(paths)}
        try:
            plan = search_fixed(graph, mesh, profile, recompute=paths, **kw)
        except PlanInfeasible as e:
            entry.update(status="timed out" if getattr(e, "timed_out", False) else "infeasible",
                         least_memory=getattr(e, "least_memory", None), reason=str(e))
            errors.append((paths, e))
        else:
            entry.update(status="fits", step_time=plan.cost["step_time"],
                         memory=plan.cost["memory"]["total"], zero=plan.zero)
            plans.append(plan)
        entry["wall_time"] = time.perf_counter() - t
        tried.append(entry)

    attempt([])
    base = plans[0] if plans else None
    base_err = errors[0][1] if errors else None
    # recompute cannot resolve conflicting pins; it may only help memory
    hopeless = base_err is not None and getattr(base_err, "reason", "memory") == "pins"
    bound = base is not None and base.cost["memory"]["total"] >= RECOMPUTE_TRY_FRACTION * limit
    saved = []
    if not hopeless and (base is None or bound):
        prec = precision or profile.precision
        saved = recompute_candidates(graph, (lambda v: 2 if v.dtype.is_floating_point else v.itemsize)
                                     if prec == "mixed" else None)
        cluster = Cluster(dict(sharding.parse_mesh(mesh) if isinstance(mesh, str) else mesh), profile)
        for paths, b in saved:
            beat = min([x for x in (step_to_beat, base.cost["step_time"] if base else None) if x is not None],
                       default=None)
            lb = compute_bound(graph, cluster, paths, precision) if beat is not None else None
            if lb is not None and lb >= beat:
                tried.append({"recompute": fold_modules(paths, graph), "modules": len(paths),
                              "status": "skipped", "lower_bound": lb, "saves_estimate": b,
                              "reason": f"its compute alone takes {lb:.4g} s per step, no faster than "
                                        f"{beat:.4g} s (a plan found already)", "wall_time": 0.0})
                continue
            attempt(paths)
            tried[-1]["saves_estimate"] = b
    info = {"mode": "searched", "tried": tried, "limit": limit,
            "tried_because": ("nothing fits without recompute" if base is None else
                              f"the plan without recompute needs {base.cost['memory']['total'] / limit:.0%} "
                              f"of the memory limit" if bound else
                              f"the plan without recompute needs less than "
                              f"{RECOMPUTE_TRY_FRACTION:.0%} of the memory limit: recompute not tried"),
            "wall_time": time.perf_counter() - t0}
    if not plans:
        raise recompute_infeasible(graph, mesh, base_err, errors, tried, limit)
    best = min(plans, key=lambda p: p.cost["step_time"])
    info["chosen"] = fold_modules(best.recompute, graph)
    if base is not None:
        info["without"] = {"step_time": base.cost["step_time"], "memory": base.cost["memory"]["total"],
                           "zero": base.zero}
    else:
        info["without"] = {"least_memory": getattr(base_err, "least_memory", None)}
    best.solver["recompute_search"] = info
    # the whole search's time, every candidate included
    best.solver["wall_time"] = info["wall_time"]
    return best


def recompute_infeasible(graph: Graph, mesh, base_err: PlanInfeasible | None,
                         errors: list[tuple[list[str], PlanInfeasible]], tried: list[dict],
                         limit: float) -> PlanInfeasible:
    """No candidate fits: the error without recompute, with what recompute would need
    added (the smallest memory limit any tried choice fits)."""
    from autopar.compiler.patterns import fold_modules
    if base_err is None:                       # cannot happen: the first attempt failed
        base_err = errors[0][1]
    skipped = [t for t in tried if t["status"] == "skipped"]
    if len(errors) == 1 or getattr(base_err, "least_memory", None) is None:
        if not skipped:
            return base_err
        # say why recompute was not searched here (another mesh shape is faster anyway)
        note = " ".join(f"Recompute of {', '.join(t['recompute'])} was not searched on this mesh: "
                        f"{t['reason']}." for t in skipped)
        err = PlanInfeasible(f"{base_err} {note}")
        err.__dict__.update(base_err.__dict__)
        err.recompute_tried = tried                 # type: ignore[attr-defined]
        return err
    least = [(getattr(e, "least_memory", None), paths) for paths, e in errors]
    known = [(m, p) for m, p in least if m is not None]
    if not known:
        return base_err
    m_best, p_best = min(known, key=lambda x: x[0])
    m0 = base_err.least_memory                 # type: ignore[attr-defined]
    mesh_s = sharding.format_mesh(sharding.parse_mesh(mesh) if isinstance(mesh, str) else mesh)
    rc = ", ".join(fold_modules(p_best, graph)) or "nothing"
    parts = [f"memory per device: no plan on mesh {mesh_s} fits the limit of {format_bytes(limit)}, "
             f"with or without recompute. Without recompute the least any plan needs is "
             f"{format_bytes(m0)}; with recompute of {rc} (every block's activations dropped "
             f"to its input, its forward run again in backward) the least is {format_bytes(m_best)}"]
    br = getattr(next(e for p, e in errors if p is p_best), "memory_breakdown", None)
    if br:
        parts.append(f" (params {format_bytes(br['params'])}, grads {format_bytes(br['grads'])}, "
                     f"optimizer {format_bytes(br['optimizer'])}, activations {format_bytes(br['activations'])})")
    parts.append(f". A limit of {format_bytes(m_best)} per device would fit on this mesh; "
                 "otherwise use more devices or a smaller batch.")
    err = PlanInfeasible("".join(parts))
    err.least_memory = m_best                       # type: ignore[attr-defined]
    err.least_memory_without_recompute = m0         # type: ignore[attr-defined]
    err.least_memory_recompute = fold_modules(p_best, graph)   # type: ignore[attr-defined]
    err.memory_breakdown = br                       # type: ignore[attr-defined]
    err.reason = "memory"                           # type: ignore[attr-defined]
    err.recompute_tried = tried                     # type: ignore[attr-defined]
    return err


# one thread beside the search for the additive prices' candidate (search_fixed)
_SIDE = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="autopar-additive")


def additive_candidate(prob: Problem, zero: int, limit: float, budget: float, deterministic: bool,
                       protected: set[int], workers: int | None = None,
                       stop: threading.Event | None = None) -> list[int] | None:
    """The fastest plan by the additive prices (every collective exposed): a candidate for
    the schedule's re-ranking that the overlap prices may undervalue -- a plan that
    communicates nothing where the schedule cannot hide the gradients' latency. It prices
    through its own shallow copy of the cost model (the caches shared, keyed by the price
    mode), so it can run beside the search's own solves."""
    if stop is not None and stop.is_set():
        return None
    side = replace(prob, cm=copy.copy(prob.cm))
    side.cm.overlap_prices = False
    tab = build_tables(side, zero)
    remove_dominated(side, tab, protected | tab.shared_classes)
    h = local_search_hint(tab, [[int(np.argmin(u)) for u in tab.ut], [0] * len(tab.dom)])
    h = memory_hint(tab, limit * (1 - 1e-4), h) or h
    res = solve_tables(side, tab, zero, limit, budget, deterministic, hint=dict(enumerate(h)),
                       workers=workers, stop=stop)
    return res.choice


def better(a: CostReport, b: CostReport, objective: str) -> bool:
    """`a` beats `b`: faster, or for objective "memory" smaller (then faster)."""
    if objective == "memory":
        ma, mb = a.memory["total"], b.memory["total"]
        if abs(ma - mb) > 1e-9 * max(ma, mb):
            return ma < mb
    return a.step_time < b.step_time * (1 - 1e-9)


# gradient bucket sizes the search tries on its chosen plan (DDP's 25 MiB first): on a slow
# link a bucket's latency, 2 (n - 1) alpha, adds up over a large model's many buckets
BUCKET_CHOICES = (25 << 20, 50 << 20, 100 << 20, 200 << 20)


def tune_buckets(cm: CostModel, zero: int, report: CostReport) -> tuple[CostReport, int]:
    """The plan's schedule (`report`, an evaluation under `cm.overlap`) under each of
    BUCKET_CHOICES: (the fastest's report, its bucket size) -- faster by more than 0.1%, so
    that a tie keeps DDP's size. For a caller that left the bucket size to the search;
    `cm.overlap` is left as it was."""
    base = dict(cm.overlap)
    best = (report.step_time, base["bucket_bytes"], report)
    trial = dict(base)
    if trial.get("async_tp", "auto") == "auto" and report.schedule is not None:
        trial["async_tp"] = bool(report.schedule.async_tp)   # the ring choice stays: one simulation each
    for b in BUCKET_CHOICES:
        if b == base["bucket_bytes"]:
            continue
        cm.overlap = {**trial, "bucket_bytes": b}
        rep = cm.reschedule(report, zero)         # the schedule only: bytes and memory stay
        if rep.step_time < best[0] * (1 - 1e-3):
            best = (rep.step_time, b, rep)
    cm.overlap = base
    return best[2], best[1]


def make_plan(graph: Graph, cm: CostModel, strategies: dict[str, Strategy], report: CostReport,
              zero: int, limit: float | None, recompute, solver_stats: dict, constraints=(),
              layouts=None) -> Plan:
    mesh = dict(cm.mesh)
    layouts = layouts if layouts is not None else sharding.derive_layouts(graph, mesh, strategies)
    cost = report.to_dict()
    cost["memory_limit"] = limit
    cost["fits"] = limit is None or report.memory["total"] <= limit
    cost["links"] = {a: {"kind": cm.cluster.link_kind(a), "alpha": cm.cluster.link(a).alpha,
                         "bandwidth": cm.cluster.link(a).bandwidth} for a in mesh}
    cost["precision"] = cm.precision
    overlap = dict(cm.overlap)
    sched = report.schedule
    if overlap.get("async_tp", "auto") == "auto" and sched is not None and sched.async_tp:
        overlap["async_tp"] = True          # the schedule found that the collective matmuls pay
    return Plan(model=graph.name, mesh=mesh, device=cm.profile.name, memory_limit=limit,
                strategies={k: list(v) for k, v in strategies.items()},
                layouts={k: list(v) for k, v in layouts.items()}, zero=zero,
                dp_axis=cm.dp_axis if cm.dp_index() is not None else None,
                recompute=list(recompute), overlap=overlap, cost=cost, solver=solver_stats,
                constraints=list(constraints))


def infeasible_error(prob: Problem, results, limit: float, deterministic: bool,
                     time_limit: float | None = None) -> PlanInfeasible:
    cm = prob.cm
    mesh = sharding.format_mesh(cm.mesh)
    levels = ", ".join(f"ZeRO-{r.zero}: {'no plan fits' if r.status == 'INFEASIBLE' else r.status}"
                       for r, _ in results)
    timed_out = PlanInfeasible(
        f"the solver's time limit{f' ({time_limit:g} s)' if time_limit is not None else ''} was reached "
        f"before any plan was found on mesh {mesh} ({levels}); a plan may well exist -- none is "
        "proven impossible. Raise --time-limit (or the search's time_limit).")
    timed_out.timed_out = True              # type: ignore[attr-defined]
    timed_out.reason = "time limit"         # type: ignore[attr-defined]
    cores = [r.core for r, _ in results if r.status == "INFEASIBLE"]
    pin_cores = [c for c in cores if c and "memory" not in c]
    if pin_cores and len(pin_cores) == len(results):
        core = min(pin_cores, key=len)
        err = PlanInfeasible(f"the pins cannot all hold on mesh {mesh}: {'; '.join(core)}. "
                              "No strategy gives these values those layouts together (a dim that "
                              "no axis size divides, a dim the op cannot split, or two pins on "
                              "one decision). Remove or change one of them.")
        err.reason = "pins"                 # type: ignore[attr-defined]
        return err
    if not any(r.status == "INFEASIBLE" for r, _ in results):
        return timed_out
    pinned_memory = sorted({p for c in cores for p in c if p != "memory"})
    # memory: the least memory any plan needs, from a model minimising it
    best = None
    for r, tab in results:
        res = solve_tables(prob, tab, r.zero, None, 10.0, deterministic, minimize="memory")
        if res.choice is None:
            continue
        rep = cm.evaluate(choice_strategies(prob, res.choice), r.zero)
        if best is None or rep.memory["total"] < best[1].memory["total"]:
            best = (r.zero, rep)
    if best is None:
        if any(r.status != "INFEASIBLE" for r, _ in results):
            return timed_out
        err = PlanInfeasible(f"no plan exists on mesh {mesh} even without a memory limit")
        err.reason = "pins"                 # type: ignore[attr-defined]
        return err
    z, rep = best
    m = rep.memory
    if m["total"] <= limit and any(r.status != "INFEASIBLE" for r, _ in results):
        return timed_out        # a stage the time limit cut short has plans that fit
    err = PlanInfeasible(
        f"memory per device: no plan on mesh {mesh} fits the limit of {format_bytes(limit)}. "
        f"The least any plan needs is {format_bytes(m['total'])} per device (ZeRO-{z}: params "
        f"{format_bytes(m['params'])}, grads {format_bytes(m['grads'])}, optimizer "
        f"{format_bytes(m['optimizer'])}, activations {format_bytes(m['activations'])}). "
        "Use more devices, a smaller batch, recompute regions, or raise --memory."
        + (f" The pins {'; '.join(pinned_memory)} take part in this." if pinned_memory else ""))
    err.least_memory = m["total"]           # type: ignore[attr-defined]
    err.memory_breakdown = dict(m)          # type: ignore[attr-defined]
    err.reason = "memory"                   # type: ignore[attr-defined]
    return err


def mesh_shapes(n: int, axes: Sequence[str] = ("dp", "tp"), max_inner: int | None = None) -> list[dict[str, int]]:
    """Factorisations of `n` devices over two axes, the inner one at most `max_inner`
    (tensor parallelism beyond a node is never the fastest with these links)."""
    outer, inner = axes
    out = []
    for t in range(1, n + 1):
        if n % t == 0 and (max_inner is None or t <= max_inner):
            out.append({outer: n // t, inner: t})
    return out


@_gc_paused
def search_devices(graph: Graph, n: int, profile: DeviceProfile | str, axes: Sequence[str] = ("dp", "tp"),
                   max_inner: int | None = None, pipeline: bool = False, schedule: str | None = None,
                   **kwargs) -> tuple[Plan, list[dict]]:
    """Search every mesh shape of `n` devices and return the fastest plan (the smallest,
    for objective="memory") and one row per shape (mesh, status, step time, compute,
    communication, memory, ZeRO stage). A model with experts (moe_experts) gets the dp x ep
    shapes too, ep dividing the expert count. `pipeline`: the pp x dp x tp shapes too
    (`search_pipelines`), under `schedule` (1f1b by default).

        >>> plan, rows = search_devices(graph, 8, "h100")               # doctest: +SKIP
    """
    if isinstance(profile, str):
        profile = load_profile(profile)
    if n < 1:
        raise InputError(f"--devices {n}: give a positive device count")

    def rank(plan: Plan) -> tuple:
        if kwargs.get("objective", "time") == "memory":
            return plan.cost["memory"]["total"], plan.cost["step_time"]
        return (plan.cost["step_time"],)
    rows, best, found = [], None, []
    inner = max_inner if max_inner is not None else profile.node_size
    shapes = mesh_shapes(n, axes, inner)
    experts = [nd.inputs[3].shape[0] for nd in graph.nodes if nd.op == "moe_experts"]
    if experts and sharding.EXPERT_AXIS not in axes:
        # a model with experts: the expert-parallel shapes too (the experts and their tokens
        # split over ep, all_to_all between), weighed against tensor-parallel experts
        e = gcd(*experts)
        shapes += [m for m in mesh_shapes(n, (axes[0], sharding.EXPERT_AXIS), inner)
                   if 1 < m[sharding.EXPERT_AXIS] and e % m[sharding.EXPERT_AXIS] == 0]
    for mesh in shapes:
        row = {"mesh": sharding.format_mesh(mesh)}
        try:
            beat = {} if best is None or kwargs.get("objective", "time") != "time" else \
                {"step_to_beat": best.cost["step_time"]}
            plan = search(graph, mesh, profile, **kwargs, **beat)
        except PlanInfeasible as e:
            row.update(status="infeasible", reason=str(e),
                       least_memory=getattr(e, "least_memory", None),
                       least_memory_recompute=getattr(e, "least_memory_recompute", None))
            rows.append(row)
            continue
        rows.append(candidate_row(row, plan))
        found.append(plan)
        if best is None or rank(plan) < rank(best):
            best = plan
    if pipeline and kwargs.get("zero") in (None, 0) and kwargs.get("objective", "time") == "time":
        for plan in search_pipelines(graph, n, profile, axes, inner, schedule, found, rows, kwargs):
            if best is None or rank(plan) < rank(best):
                best = plan
    if best is None:

        detail = "; ".join(f"{r['mesh']}: {r['reason']}" for r in rows)
        sized = [r for r in rows if r.get("least_memory")]
        head = f"no mesh shape of {n} devices has a plan."
        if sized:
            r = min(sized, key=lambda r: r["least_memory"])
            rc = r.get("least_memory_recompute")
            head += (f" The least memory per device of any shape is {format_bytes(r['least_memory'])}, "
                     f"on {r['mesh']}" + (f" with recompute of {', '.join(rc)}" if rc else "")
                     + ": a limit of that fits.")
        err = PlanInfeasible(f"{head} {detail}")
        if sized:
            err.least_memory = r["least_memory"]           # type: ignore[attr-defined]
            err.least_memory_mesh = r["mesh"]               # type: ignore[attr-defined]
        err.rows = rows                                     # type: ignore[attr-defined]
        raise err
    for r in rows:
        r["winner"] = r["mesh"] == sharding.format_mesh(best.mesh) and r["status"] != "screened"
    best.solver["mesh_candidates"] = rows
    return best, rows


def candidate_row(row: dict, plan: Plan) -> dict:
    """search_devices' row of one mesh shape's plan."""
    c = plan.cost
    row.update(status=plan.solver["status"], step_time=c["step_time"], compute=c["compute_time"],
               communication=c["comm_time"], comm_by_axis=c["communication"],
               exposed=sum(c.get("exposed_comm", {}).values()),
               memory=c["memory"]["total"], zero=plan.zero,
               tflops_per_device=c["tflops_per_device"], solve_time=plan.solver["solve_time"],
               wall_time=plan.solver["wall_time"],
               recompute=(plan.solver.get("recompute_search") or {}).get("chosen", []))
    if plan.pipeline:
        pc = plan.cost["pipeline"]
        slow = max(pc["stage_rows"], key=lambda r: r["time"])
        # the slowest stage's work (the step is it stretched by the bubble, plus the sends)
        row.update(microbatches=plan.microbatches, schedule=pc["schedule"], bubble=pc["bubble"],
                   compute=slow["compute"], communication=slow["time"] - slow["compute"])
    return row


PIPELINE_REFINE = 2       # screened pipeline shapes searched in full, the fastest first


def search_pipelines(graph: Graph, n: int, profile: DeviceProfile, axes: Sequence[str], max_inner: int,
                     schedule: str | None, found: list[Plan], rows: list[dict], kwargs: dict) -> list[Plan]:
    """The pp x dp x tp shapes of `n` devices, their rows appended to `rows`; returns the
    plans searched in full.

    A shape's intra-stage plan is a search of the whole model over its other axes, as
    costly as a shape without pp; a search for every (pp, dp, tp) would multiply the
    search time by the count of pp sizes. So the shapes are screened first and few searched:

    - a shape whose parameter state alone cannot fit -- the whole model's state over pp
      and the model-parallel axes (the outer axis replicates it) -- is skipped;
    - the others are priced with a plan already at hand of the same inner (tensor-parallel)
      size: the strategies of the dp x tp search of the same tp, or of the first pipeline
      shape searched with it (a search is run when there is none), re-priced on the
      shape's axes and cut into its stages, its microbatch count chosen -- the
      strategies a tp size gives each value do not depend on how the other devices are
      split;
    - the PIPELINE_REFINE fastest screened shapes are searched in full (`pipeline_plan`),
      and only fully searched plans compete with the shapes without pp.

    Rows of shapes priced but not searched have status "screened"."""
    from autopar.compiler import stages as st
    blk = st.block_list(graph.nodes)
    if blk is None:
        return []
    name, v = st.parse_schedule(schedule)
    sched = st.format_schedule(name or "1f1b", v)
    outer, inner_axis = axes
    limit = float(kwargs.get("memory_limit") or profile.memory)
    precision = kwargs.get("precision")
    kw = {k: x for k, x in kwargs.items() if k not in ("memory_limit", "zero", "step_to_beat")}

    def searcher(g, m, **more):
        return search(g, m, profile, **{**kw, **more})
    one = CostModel(graph, Cluster({outer: 1}, profile), precision=precision)
    rep = (None,)
    state = sum(sum(one.param_state(m.index, rep, 0)) for m in one.members if m.kind in ("param", "buffer"))
    seeds: dict[int, Plan] = {p.mesh[inner_axis]: p for p in found if inner_axis in p.mesh}
    screened: list[tuple[float, dict, dict]] = []
    full: list[Plan] = []
    # no pipeline steps faster than the model's FLOPs over all n devices stretched by its
    # least bubble, (p-1)/(v m) with m at most the batch: a shape whose bound is slower than
    # a plan already found can never win, nor can its full search
    fastest = min(found, key=lambda q: q.cost["step_time"]) if found else None
    if fastest is not None:
        flops_bound = compute_bound(graph, Cluster({outer: n}, profile), kwargs.get("recompute") or (), precision)
        batch = int(graph.inputs[0].shape[0]) if graph.inputs and graph.inputs[0].shape else 1
    for p in [d for d in range(2, n + 1) if n % d == 0 and d * v <= len(blk[1])]:
        for intra in mesh_shapes(n // p, axes, max_inner):
            mesh = {st.PP_AXIS: p, **intra}
            row = {"mesh": sharding.format_mesh(mesh)}
            bound = state / (p * prod(k for a, k in intra.items() if a != outer))
            if bound > limit:
                rows.append({**row, "status": "skipped", "reason": (
                    f"the parameter state alone needs {format_bytes(bound)} per device at best "
                    f"(over pp and {inner_axis}), more than {format_bytes(limit)}")})
                continue
            if fastest is not None:
                lb = row["bound"] = flops_bound * (1 + (p - 1) / (v * batch))
                if lb >= fastest.cost["step_time"]:
                    rows.append({**row, "status": "skipped", "reason": (
                        f"at least {format_time(lb)} a step (the FLOPs over {n} devices, bubble at least "
                        f"{p - 1}/{v * batch}), slower than {sharding.format_mesh(fastest.mesh)}'s "
                        f"{format_time(fastest.cost['step_time'])}")})
                    continue
            t = intra[inner_axis]
            t0 = time.perf_counter()
            try:
                if t not in seeds:
                    plan = st.pipeline_plan(graph, mesh, searcher, profile, schedule=sched, memory_limit=limit)
                    seeds[t] = st.unlift_plan(plan)
                    full.append(plan)
                    rows.append(candidate_row(row, plan))
                    continue
                plan, cm = repriced(graph, seeds[t], intra, profile, limit * p, precision)
                st.pipelined(graph, plan, mesh, profile, sched, memory_limit=limit, cm=cm)
            except (PlanInfeasible, InputError) as e:
                rows.append({**row, "status": "infeasible", "reason": str(e),
                             "least_memory": getattr(e, "least_memory", None)})
                continue
            plan.solver["wall_time"] = time.perf_counter() - t0
            r = candidate_row(row, plan)
            r["status"] = "screened"
            rows.append(r)
            screened.append((plan.cost["step_time"], mesh, r))
    searched = {sharding.format_mesh(p.mesh) for p in full}
    for _, mesh, r in sorted(screened, key=lambda x: x[0])[:PIPELINE_REFINE]:
        if r["mesh"] in searched:
            continue
        try:
            plan = st.pipeline_plan(graph, mesh, searcher, profile, schedule=sched, memory_limit=limit,
                                    like=seeds.get(mesh[inner_axis]))
        except (PlanInfeasible, InputError) as e:
            r.update(status="infeasible", reason=f"screened at {r['step_time']:.4g} s, then: {e}")
            continue
        kept = {k: r[k] for k in ("mesh", "bound") if k in r}      # the screened numbers go
        r.clear()
        r.update(kept)
        candidate_row(r, plan)
        full.append(plan)
    return full


def repriced(graph: Graph, seed: Plan, mesh: dict[str, int], profile: DeviceProfile, limit: float,
             precision: str | None) -> tuple[Plan, CostModel]:
    """`seed`'s strategies (and recompute) on another mesh of the same axes, priced there
    without ZeRO: a plan for screening, not searched, and its cost model."""
    cm = CostModel(graph, Cluster(dict(mesh), profile), precision=precision, recompute=seed.recompute,
                   dp_axis=seed.dp_axis)
    strategies = {k: tuple(v) for k, v in seed.strategies.items()}
    layouts = sharding.derive_layouts(graph, dict(mesh), strategies)
    for v in graph.values():
        for (axis, k), pl in zip(mesh.items(), layouts.get(v.name, ())):
            d = sharding.shard_dim(pl)
            if d is not None and v.shape[d] % k:
                raise InputError(f"%{v.name} {list(v.shape)}: dim {d} does not split {k} ways over {axis}")
    t0 = time.perf_counter()
    # the pipeline's price counts the intra-stage communication whole (compiler/stages.py):
    # the overlap schedule of the unpipelined step is not needed
    report = cm.evaluate(strategies, 0, schedule=False)
    stats = {"status": "screened", "solve_time": 0.0, "wall_time": time.perf_counter() - t0,
             "screened_from": sharding.format_mesh(seed.mesh)}
    return make_plan(graph, cm, strategies, report, 0, limit, seed.recompute, stats, layouts=layouts), cm


__all__ = ["search", "search_fixed", "search_devices", "PlanInfeasible", "mesh_shapes", "block_of",
           "build_problem", "recompute_candidates", "compute_bound"]

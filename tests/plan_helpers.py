"""Plans for tests, made without the solver: a greedy fill around layouts we force.

    >>> plan = forced_plan(g, {"dp": 2, "tp": 2}, MEGATRON_SP)          # doctest: +SKIP

A rule is (module glob, op, {axis: placement of the node's first output}); the greedy
planner (`autopar.passes.greedy.greedy_plan`) fills every other node with the cheapest
strategy, parameters free to take whatever layout their first use wants. Inputs are
sharded on their batch dim over `dp` when the mesh has it.
"""
from __future__ import annotations

import fnmatch

from autopar.passes.greedy import greedy_plan
from autopar.compiler.plan import Plan

# Megatron tensor parallelism on `tp` (column-parallel c_attn / c_fc, heads split, row-parallel
# c_proj), with the attention residual reduce_scattered over the sequence (sequence
# parallelism) and the MLP activation moved between dims (an all_to_all each way), so one
# GPT step uses every collective kind.
MEGATRON_SP = [
    ("*.attn.c_attn", "linear", {"tp": "S(2)"}),
    ("*.attn", "view", {"tp": "S(2)"}),
    ("*.attn", "scaled_dot_product_attention", {"tp": "S(1)"}),
    ("*.attn.c_proj", "linear", {"tp": "P"}),
    ("transformer.h.*", "add", {"tp": "S(1)"}),
    ("*.ln_2", "layer_norm", {"tp": "S(1)"}),
    ("*.mlp.c_fc", "linear", {"tp": "S(2)"}),
    ("*.mlp.gelu", "gelu", {"tp": "S(1)"}),
    ("*.mlp.c_proj", "linear", {"tp": "P"}),
]

# DDP's layout of the GPT: every activation split on the batch, the position embedding (no
# batch dim) replicated rather than split on its width.
DDP = [("transformer.wpe", "embedding", {"dp": "R"})]

# Column / row parallel MLP layers with the activations resharded in between.
MLP_TP = [
    ("net.0", "linear", {"tp": "S(1)"}),
    ("net.1", "gelu", {"tp": "S(0)"}),
    ("net.2", "linear", {"tp": "S(0)"}),
    ("net.4", "linear", {"tp": "P"}),
]

# Llama: column-parallel wq/wk/wv and w1/w3, row-parallel wo and w2.
LLAMA_TP = [
    ("*.attention.w[qkv]", "linear", {"tp": "S(2)"}),
    ("*.attention.wo", "linear", {"tp": "P"}),
    ("*.feed_forward.w[13]", "linear", {"tp": "S(2)"}),
    ("*.feed_forward.w2", "linear", {"tp": "P"}),
]


def forced_plan(graph, mesh: dict, rules=(), zero: int = 0, recompute=(), batch_axis: str | None = "dp",
                zero3: bool = False) -> Plan:
    """Greedy plan honouring `rules`; `zero3` shards every trainable parameter over dp
    (dim 0 when it divides, else the first dim that does)."""
    mesh = dict(mesh)
    axes = list(mesh)
    outputs = {}
    for node in graph.nodes:
        for pattern, op, lay in rules:
            if node.op == op and fnmatch.fnmatchcase(node.meta.module, pattern):
                want = [lay.get(a) for a in axes]
                if batch_axis in mesh and want[axes.index(batch_axis)] is None and node.outputs[0].shape:
                    want[axes.index(batch_axis)] = "S(0)"
                if any(w is not None for w in want):
                    outputs[node.outputs[0].name] = tuple(want)
                break
    seeds = {}
    if batch_axis in mesh:
        i = axes.index(batch_axis)
        for v in graph.inputs:
            s = [None] * len(axes)
            s[i] = "d0"
            seeds[v.name] = tuple(s)
        for p in graph.params:
            if zero3 and p.requires_grad and batch_axis in mesh:
                dims = [d for d, n in enumerate(p.shape) if n % mesh[batch_axis] == 0]
                if dims:
                    s = [None] * len(axes)
                    s[i] = f"d{dims[0]}"
                    seeds[p.name] = tuple(s)
    plan = greedy_plan(graph, mesh, seeds=seeds, flop_weight=0.0, outputs=outputs, free_params=True)
    plan.zero = 3 if zero3 else zero
    plan.recompute = list(recompute)
    return plan

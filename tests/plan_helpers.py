"""Plans for tests, made without the solver: a greedy fill around layouts we force.

    >>> plan = forced_plan(g, {"dp": 2, "tp": 2}, MEGATRON_SP)          # doctest: +SKIP

A rule is (module glob, op, {axis: placement of the node's first output}); the greedy
planner (`autopar.passes.greedy.greedy_plan`) fills every other node with the cheapest
strategy, parameters free to take whatever layout their first use wants. Inputs are
sharded on their batch dim over `dp` when the mesh has it.

Also the one multi-rank job the parity tests start (`launch_programs`): this file is its
worker (`python tests/plan_helpers.py MANIFEST`), running every generated program of the
manifest in turn in the same ranks, exactly as `python program.py ...` would (the programs
share the job's process group: a group start costs seconds, one per job is enough). The
compiler is imported lazily, so a rank starts light (the programs import only the runtime).
"""
from __future__ import annotations

import fnmatch
import json
import os
import runpy
import sys
from pathlib import Path

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

# Megatron-LM's sequence parallelism: the block's input, its layer norms and residual adds
# split on the sequence over `tp`; all_gathered before the column-parallel linears (c_attn,
# c_fc), reduce_scattered after the row-parallel ones (c_proj) -- the collective matmuls
# async TP chunks.
SEQUENCE_PARALLEL = [
    ("*.attn.c_attn", "linear", {"tp": "S(2)"}),
    ("*.attn", "view", {"tp": "S(2)"}),
    ("*.attn", "scaled_dot_product_attention", {"tp": "S(1)"}),
    ("*.attn.c_proj", "linear", {"tp": "P"}),
    ("transformer.h.*", "add", {"tp": "S(1)"}),
    ("*.ln_[12]", "layer_norm", {"tp": "S(1)"}),
    ("*.mlp.c_fc", "linear", {"tp": "S(2)"}),
    ("*.mlp.gelu", "gelu", {"tp": "S(2)"}),
    ("*.mlp.c_proj", "linear", {"tp": "P"}),
]

# Megatron-LM's tensor parallelism without sequence parallelism: the block's input and the
# layer norms replicated on `tp`, so a copy_to feeds the query / key / value projections
# and c_fc (their input gradient's all_reduce hides behind their weight gradients).
MEGATRON = [
    ("*.attn.c_attn", "linear", {"tp": "S(2)"}),
    ("*.attn", "view", {"tp": "S(2)"}),
    ("*.attn", "scaled_dot_product_attention", {"tp": "S(1)"}),
    ("*.attn.c_proj", "linear", {"tp": "P"}),
    ("transformer.h.*", "add", {"tp": "R"}),
    ("*.ln_[12]", "layer_norm", {"tp": "R"}),
    ("*.mlp.c_fc", "linear", {"tp": "S(2)"}),
    ("*.mlp.gelu", "gelu", {"tp": "S(2)"}),
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
                zero3: bool = False):
    """Greedy plan honouring `rules`; `zero3` shards every trainable parameter over dp
    (dim 0 when it divides, else the first dim that does)."""
    from autopar.passes.greedy import greedy_plan
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


# ==========================================================================
# one job of generated programs
# ==========================================================================
def program_entry(prog, directory: Path, steps: int, optimizer: str | None = "adamw", extra=()) -> dict:
    """A manifest entry: run `prog` (written to `directory`) for `steps`, saving its final
    shards to directory/shards and its statistics to directory/stats.rank<r>.json."""
    args = ["--steps", str(steps)] + (["--optimizer", optimizer] if optimizer else [])
    args += ["--save", str(directory / "shards"), "--stats", str(directory / "stats"), *extra]
    return {"program": str(prog.files["program"]), "args": args}


def launch_programs(directory: Path, entries: list[dict], world: int, backend: str = "torch",
                    timeout: float = 240):
    """Run every entry in ONE job of `world` ranks (this file is the worker); fails the
    test with the launcher's message if any rank fails. Returns the JobResult.

        res = launch_programs(tmp_path, [program_entry(prog, tmp_path / "a", 3)], 4)   # doctest: +SKIP
    """
    from autopar.backends.launch import launch
    manifest = directory / "manifest.json"
    manifest.write_text(json.dumps({"backend": backend, "cases": entries}))
    with open(os.devnull, "w") as sink:
        res = launch(Path(__file__), world, backend, [str(manifest)], timeout=timeout,
                     log_dir=directory / "logs", out=sink)
    assert res.ok, res.message
    return res


_references: dict = {}


def shared_reference(key, init: dict, batch, compute):
    """compute() -- a single-device reference run from `init` on `batch` -- once per `key`
    for every backend that runs the same case; the stored result is reused only when the
    initial state and batch are equal to the ones it was computed from.

        losses, state = shared_reference("mlp_tp4", init, batch, lambda: reference_run(...))  # doctest: +SKIP
    """
    import torch
    hit = _references.get(key)
    if hit is not None:
        h_init, h_batch, result = hit
        if (h_init.keys() == init.keys() and all(torch.equal(h_init[k], init[k]) for k in init)
                and len(h_batch) == len(batch) and all(torch.equal(a, b) for a, b in zip(h_batch, batch))):
            return result
    result = compute()
    _references[key] = (init, tuple(batch), result)
    return result


def _worker(manifest_path: str) -> None:
    manifest = json.loads(Path(manifest_path).read_text())
    if manifest["backend"] == "torch":
        import torch.distributed as dist
        dist.init_process_group("gloo")        # every program's mesh reuses this world
    for case in manifest["cases"]:
        sys.argv = [case["program"], *case["args"]]
        runpy.run_path(case["program"], run_name="__main__")
    if manifest["backend"] == "torch":
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])

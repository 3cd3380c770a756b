"""The shared emitter: a sharded graph (`passes.apply.apply_plan`) -> one self-contained
Python program that trains the model on this rank's shards.

The program reads like a hand-written nanoGPT-style file: a header (model, mesh, plan,
launch command), a table of layouts, an `nn.Module` holding only this rank's parameter
shards under their original state-dict names, a straight-line `forward` with one line
per op and the collectives written out (layouts and bytes in comments), loading from a
full single-device state dict, and a training loop. The two backends differ only in how
ranks start and talk (`Backend`): torch.distributed under torchrun, or MPI under mpiexec.

    >>> src = emit_program(sharded, backend_named("torch"), model_name="GPT")     # doctest: +SKIP
"""
from __future__ import annotations

import keyword
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from autopar.compiler import sharding
from autopar.compiler.errors import InputError
from autopar.compiler.ir import Graph, Node, Value
from autopar.compiler.ops import REGISTRY
from autopar.compiler.plan import Plan
from autopar.passes.apply import (BIAS_SHARE, MEAN_SCALE, collective_traffic, format_bytes,
                                  is_collective, is_inserted_scale, predict_traffic,
                                  recompute_regions, region_io)


@dataclass(frozen=True)
class Backend:
    """What differs between the generated torch.distributed and MPI programs: how ranks
    start and how the per-axis groups are made. Everything else is one emitter."""
    name: str                      # torch | mpi
    runtime: str                   # rt.init_mesh(..., backend=runtime)
    groups_comment: str            # how per-axis groups are made, for the header
    launcher: str                  # how to start ranks, for the header
    launch: str                    # the launch command, {world} {file} {extra}

    def launch_command(self, file: str, world: int, extra: str = "") -> str:
        return self.launch.format(world=world, file=file, extra=extra).rstrip()


BACKENDS = {
    "torch": Backend(
        name="torch", runtime="torch",
        groups_comment=("Process groups: init_process_group (gloo on CPU, NCCL on GPU) and one "
                        "dist.new_group per slice of each mesh axis, made by rt.init_mesh."),
        launcher="torchrun (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the environment)",
        launch="OMP_NUM_THREADS=1 torchrun --nproc-per-node {world} {file} {extra}"),
    "mpi": Backend(
        name="mpi", runtime="mpi",
        groups_comment=("Communicators: MPI.COMM_WORLD.Split(color=first rank of the slice, "
                        "key=coordinate) once per mesh axis, made by rt.init_mesh."),
        launcher="mpiexec (mpi4py; rank and size from MPI.COMM_WORLD)",
        launch="OMP_NUM_THREADS=1 mpiexec -n {world} python {file} {extra}"),
}


def backend_named(name: str) -> Backend:
    if name not in BACKENDS:
        raise InputError(f"unknown backend '{name}': use {' or '.join(BACKENDS)}")
    return BACKENDS[name]


@dataclass(frozen=True)
class EmitOptions:
    steps: int = 10
    optimizer: str = "adamw"
    lr: float = 1e-3
    device: str = "cpu"
    init_file: str = "init.pt"       # full state dict + example batch, next to the program
    state_keys: frozenset = frozenset()   # the model's state_dict keys (persistent buffers)
    class_name: str = "Model"


RESERVED = set(keyword.kwlist) | {"self", "mesh", "torch", "F", "nn", "rt", "math", "checkpoint",
                                  "os", "time", "json", "argparse", "LAYOUTS", "MESH", "shard",
                                  "input", "sum", "max", "min", "slice", "type", "len", "list",
                                  "print", "range", "float", "int", "id", "all", "any"}


def identifier(name: str) -> str:
    s = re.sub(r"\W", "_", name)
    if not s or s[0].isdigit():
        s = "v_" + s
    return s + "_" if s in RESERVED else s


# ---- naming -------------------------------------------------------------------------------

def module_var(path: str) -> str:
    """`transformer.h.0.attn.c_attn` -> `h0_c_attn`, `transformer.h.0` -> `h0`, `net.2` -> `net2`."""
    parts = path.split(".")
    tags, leaf = [], None
    for i, p in enumerate(parts):
        if p.isdigit():
            tags.append((parts[i - 1] if i else "m") + p)
            leaf = None
        else:
            leaf = p
    if leaf is not None and (not tags or parts[-1] == leaf):
        tags.append(leaf)
    return "_".join(tags)


def param_var(name: str) -> str:
    """`transformer.h.0.attn.c_attn.weight` -> `h0_c_attn_weight`, `net.2.bias` -> `net2_bias`."""
    prefix, _, leaf = name.rpartition(".")
    return f"{module_var(prefix)}_{leaf}" if prefix else leaf


def attr_path(name: str, tree: "ModuleTree") -> str:
    """`transformer.h.0.attn.c_attn.weight` -> `self.transformer.h[0].attn.c_attn.weight`."""
    out, node = "self", tree
    for part in name.split("."):
        kind = node.kind
        if kind == "list":
            out += f"[{part}]"
        elif kind == "dict":
            out += f"[{part!r}]"
        else:
            out += f".{part}"
        node = node.children.get(part)
        if node is None:
            break
    return out


@dataclass
class ModuleTree:
    """The nesting of parameter names: children by name; `kind` says how children are
    reached (attribute, list index, dict key)."""
    children: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        keys = list(self.children)
        if keys and all(k.isdigit() for k in keys):
            return "list" if sorted(int(k) for k in keys) == list(range(len(keys))) else "dict"
        if any(not k.isidentifier() or keyword.iskeyword(k) for k in keys):
            return "dict"
        return "attr"

    def add(self, name: str) -> None:
        node = self
        for part in name.split(".")[:-1]:
            node = node.children.setdefault(part, ModuleTree())
        node.children.setdefault(name.split(".")[-1], None)


def value_names(g: Graph) -> dict[Value, str]:
    """A Python variable per activation: the module name for the last node of each module
    (its output), otherwise the IR name; a collective reuses its operand's name when it is
    that operand's only use."""
    users = g.users()
    last: dict[str, int] = {}
    for i, n in enumerate(g.nodes):
        if n.meta.module and not is_collective(n) and not is_inserted_scale(n):
            last[n.meta.module] = i
    taken: set[str] = set()
    names: dict[Value, str] = {}

    def claim(base: str) -> str:
        base = identifier(base)
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name
    for v in g.inputs:
        names[v] = claim(v.name)
    outputs = set(g.outputs)
    for i, n in enumerate(g.nodes):
        if is_collective(n) or is_inserted_scale(n):
            x = n.inputs[0]
            if len(users.get(x, [])) == 1 and x not in outputs and x.kind not in ("param", "buffer"):
                names[n.outputs[0]] = names[x]
                continue
            if x.kind in ("param", "buffer"):          # this use's view of a parameter
                names[n.outputs[0]] = claim(param_var(x.name))
                continue
            suffix = (n.attr["axis"] if is_collective(n) else "mean" if n.meta.source == MEAN_SCALE else "share")
            names[n.outputs[0]] = claim(f"{names[x]}_{suffix}")
            continue
        if len(n.outputs) == 1 and last.get(n.meta.module) == i:
            names[n.outputs[0]] = claim(module_var(n.meta.module))
        else:
            for v in n.outputs:
                names[v] = claim(v.name)
    return names


# ---- expressions ---------------------------------------------------------------------------

class Expr(str):
    """Already-rendered Python source (prints without quotes)."""

    def __repr__(self) -> str:
        return str(self)


def literal(v: Any) -> str:
    if isinstance(v, Expr):
        return str(v)
    if isinstance(v, torch.dtype):
        return str(v)
    if isinstance(v, torch.device):
        return "mesh.device"
    if isinstance(v, torch.layout):
        return str(v)
    if isinstance(v, torch.memory_format):
        return str(v)
    if isinstance(v, float):
        if v == float("inf"):
            return 'float("inf")'
        if v == float("-inf"):
            return 'float("-inf")'
        return repr(v)
    if isinstance(v, (list, tuple)):
        inner = ", ".join(literal(x) for x in v)
        return f"[{inner}]" if isinstance(v, list) else f"({inner}{',' if len(v) == 1 else ''})"
    return repr(v)


def bind(node: Node, operand: list[str]) -> dict[str, Any]:
    """Schema argument name -> rendered operand or attribute value (absent defaults left out)."""
    d = REGISTRY[node.op]
    it = iter(operand)
    attrs = node.attr
    out: dict[str, Any] = {}
    for a in d.args:
        if a.kind == "tensor":
            out[a.name] = attrs[a.name] if a.name in attrs else Expr(next(it))
        elif a.kind == "tensor_list":
            out[a.name] = [Expr(x) for x in it]
        elif a.kind == "opt_tensor":
            out[a.name] = attrs[a.name] if a.name in attrs else Expr(next(it))
        elif a.name in attrs:
            out[a.name] = attrs[a.name]
    return out


def call(fn: str, args: list, kwargs: dict) -> str:
    parts = [literal(a) for a in args] + [f"{k}={literal(v)}" for k, v in kwargs.items()]
    return f"{fn}({', '.join(parts)})"


def kw(a: dict, names_defaults: list[tuple[str, Any]]) -> dict:
    """Keyword arguments whose value differs from the default."""
    return {k: a[k] for k, dflt in names_defaults if k in a and a[k] != dflt}


BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
UNARY_TORCH = {"rsqrt", "sqrt", "exp", "log", "tanh", "sigmoid", "sin", "cos", "abs", "erf",
               "reciprocal", "square"}
REDUCTION = {0: "none", 1: "mean", 2: "sum"}


def render_op(node: Node, operand: list[str]) -> str:
    """Python expression for one IR node (readable torch calls; aten as the fallback)."""
    op = node.op
    a = bind(node, operand)
    base = op.split(".")[0]
    if op == "linear":
        bias = a.get("bias")
        return call("F.linear", [a["input"], a["weight"]] + ([bias] if bias is not None else []), {})
    if op == "embedding":
        return call("F.embedding", [a["indices"], a["weight"]],
                    kw(a, [("padding_idx", -1), ("scale_grad_by_freq", False), ("sparse", False)]))
    if op == "layer_norm":
        return call("F.layer_norm", [a["input"], tuple(a["normalized_shape"]), a.get("weight"),
                                     a.get("bias"), a.get("eps", 1e-5)], {})
    if op == "rms_norm":
        return call("F.rms_norm", [a["input"], tuple(a["normalized_shape"]), a.get("weight")],
                    kw(a, [("eps", None)]))
    if op in ("gelu", "relu", "silu"):
        return call(f"F.{op}", [a["self"]], kw(a, [("approximate", "none")]))
    if base in UNARY_TORCH and len(node.inputs) == 1 and op == base:
        return f"torch.{base}({operand[0]})"
    if op == "neg":
        return f"-{operand[0]}"
    if op == "pow.Tensor_Scalar":
        return f"{operand[0]}.pow({literal(a['exponent'])})"
    if base in BINARY and (op.endswith(".Tensor") or op == base or op.endswith(".Scalar")) \
            and a.get("alpha", 1) == 1 and "rounding_mode" not in a:
        return f"{literal(a['self'])} {BINARY[base]} {literal(a['other'])}"
    if op in ("view", "reshape", "_unsafe_view"):
        size = a.get("size", a.get("shape"))
        return f"{operand[0]}.reshape({', '.join(str(s) for s in size)})"
    if op == "expand":
        return f"{operand[0]}.expand({', '.join(str(s) for s in a['size'])})"
    if op == "transpose":
        return f"{operand[0]}.transpose({a['dim0']}, {a['dim1']})"
    if op == "permute":
        return f"{operand[0]}.permute({', '.join(str(s) for s in a['dims'])})"
    if op in ("t", "numpy_T"):
        return f"{operand[0]}.t()" if len(node.inputs[0].shape) <= 2 else f"{operand[0]}.mT"
    if op == "unsqueeze":
        return f"{operand[0]}.unsqueeze({a['dim']})"
    if op in ("squeeze.dim",):
        return f"{operand[0]}.squeeze({a['dim']})"
    if op == "flatten.using_ints":
        return f"{operand[0]}.flatten({a.get('start_dim', 0)}, {a.get('end_dim', -1)})"
    if op in ("split", "split_with_sizes"):
        size = a.get("split_size", a.get("split_sizes"))
        return f"{operand[0]}.split({literal(size)}, dim={a.get('dim', 0)})"
    if op == "slice":
        rank = len(node.inputs[0].shape)
        dim = a.get("dim", 0) % rank
        start = a.get("start") or 0
        end = a.get("end")
        step = a.get("step", 1)
        stop = "" if end is None or end >= 2 ** 62 else str(end)
        sl = f"{start if start else ''}:{stop}" + (f":{step}" if step != 1 else "")
        return f"{operand[0]}[{', '.join([':'] * dim + [sl])}]"
    if op == "select":
        rank = len(node.inputs[0].shape)
        dim = a["dim"] % rank
        return f"{operand[0]}[{', '.join([':'] * dim + [str(a['index'])])}]"
    if op == "cat":
        return f"torch.cat([{', '.join(operand)}], dim={a.get('dim', 0)})"
    if op == "stack":
        return f"torch.stack([{', '.join(operand)}], dim={a.get('dim', 0)})"
    if op == "matmul":
        return f"{operand[0]} @ {operand[1]}"
    if op == "scaled_dot_product_attention":
        args = [a["query"], a["key"], a["value"]]
        return call("F.scaled_dot_product_attention", args,
                    kw(a, [("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False),
                           ("scale", None), ("enable_gqa", False)]))
    if op in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
        fn = "F.log_softmax" if "log" in op else "F.softmax"
        return call(fn, [a["self"]], {"dim": a["dim"]})
    if op == "cross_entropy_loss":
        k = kw(a, [("weight", None), ("ignore_index", -100), ("label_smoothing", 0.0)])
        if a.get("reduction", 1) != 1:
            k["reduction"] = REDUCTION[a["reduction"]]
        return call("F.cross_entropy", [a["self"], a["target"]], k)
    if op == "mse_loss":
        k = {"reduction": REDUCTION[a["reduction"]]} if a.get("reduction", 1) != 1 else {}
        return call("F.mse_loss", [a["self"], a["target"]], k)
    if op in ("mean.dim", "sum.dim_IntList"):
        return f"{operand[0]}.{base}(dim={literal(a['dim'])}" + (", keepdim=True)" if a.get("keepdim") else ")")
    if op in ("mean", "sum"):
        return f"{operand[0]}.{base}()"
    if op == "masked_fill.Scalar":
        return f"{operand[0]}.masked_fill({operand[1]}, {literal(a['value'])})"
    if op == "broadcast_tensors":
        return f"torch.broadcast_tensors({', '.join(operand)})"
    if op.startswith("arange"):
        pos = [a[k] for k in ("start", "end", "step") if k in a]
        return call("torch.arange", pos, {k: a[k] for k in ("dtype", "device") if a.get(k) is not None})
    # fallback: the ATen overload itself, with the schema's arguments
    target = REGISTRY[op].target
    fn = f"torch.ops.{str(target).replace('::', '.')}" if target is not None else op
    if "." not in fn.replace("torch.ops.", "", 1):
        fn = f"torch.ops.aten.{op}"
    args, kwargs = [], {}
    for spec in REGISTRY[op].args:
        if spec.name in a:
            (kwargs.__setitem__(spec.name, a[spec.name]) if spec.kwarg_only
             else args.append(a[spec.name]))
    return call(fn, args, kwargs)


COLLECTIVE_CALL = {
    "copy_to": lambda x, at: f'rt.copy_to({x}, mesh, "{at["axis"]}")',
    "all_reduce": lambda x, at: f'rt.all_reduce({x}, mesh, "{at["axis"]}")',
    "all_gather": lambda x, at: (f'rt.all_gather({x}, mesh, "{at["axis"]}", dim={at["dim"]}'
                                 + (", partial_grad=True)" if at["partial_grad"] else ")")),
    "scatter": lambda x, at: f'rt.scatter({x}, mesh, "{at["axis"]}", dim={at["dim"]})',
    "reduce_scatter": lambda x, at: f'rt.reduce_scatter({x}, mesh, "{at["axis"]}", dim={at["dim"]})',
    "all_to_all": lambda x, at: (f'rt.all_to_all({x}, mesh, "{at["axis"]}", '
                                 f'split_dim={at["split_dim"]}, concat_dim={at["concat_dim"]})'),
}

COLLECTIVE_WHY = {
    "copy_to": "gradient is a partial sum: all_reduce it in backward",
    "all_reduce": "sum the partial results",
    "all_gather": "gather the shards",
    "scatter": "keep this rank's slice",
    "reduce_scatter": "sum the partial results, keep this rank's slice",
    "all_to_all": "re-shard on another dim",
}


def shape_comment(g: Graph, v: Value) -> str:
    """`(4/dp, 32, 192/tp)`, with `partial over tp` for pending sums."""
    mesh = g.mesh                                      # type: ignore[attr-defined]
    lay = g.layouts[v.name]                            # type: ignore[attr-defined]
    full = g.global_shapes[v.name]                     # type: ignore[attr-defined]
    dims = [str(s) for s in full]
    partial = []
    for p, axis in zip(lay, mesh):
        d = sharding.shard_dim(p)
        if d is not None:
            dims[d] += f"/{axis}"
        elif p == "P":
            partial.append(axis)
    text = "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
    if partial:
        text += f" partial sum over {', '.join(partial)}"
    return text


# ---- the program ------------------------------------------------------------------------------

class Writer:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str = "", indent: int = 0) -> None:
        self.lines.append(("    " * indent + line) if line else "")

    def text(self) -> str:
        return "\n".join(self.lines).rstrip() + "\n"


def comment_pad(code: str, comment: str, width: int = 72) -> str:
    return f"{code:<{width}}  # {comment}" if comment else code


def plan_summary(g: Graph) -> list[str]:
    plan: Plan = g.plan                                # type: ignore[attr-defined]
    mesh = g.mesh                                      # type: ignore[attr-defined]
    counts: dict[str, int] = {}
    for n in g.nodes:
        if is_collective(n):
            counts[n.op] = counts.get(n.op, 0) + 1
    lines = [f"mesh {sharding.format_mesh(mesh)} ({_world(mesh)} ranks), ZeRO stage {plan.zero}"
             + (f" over {g.zero.axis}" if plan.zero else "")]  # type: ignore[attr-defined]
    if plan.recompute:
        lines.append(f"recompute (activation checkpointing): {', '.join(plan.recompute)}")
    if counts:
        lines.append("collectives in forward: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    traffic = predict_traffic(g)
    if traffic:
        lines.append("bytes per step and rank: " + ", ".join(f"{k} {format_bytes(b)}" for k, b in traffic.items()))
    if plan.cost.get("step_time"):
        lines.append(f"estimated step time: {plan.cost['step_time'] * 1e3:.3g} ms")
    return lines


def _world(mesh) -> int:
    n = 1
    for s in mesh.values():
        n *= s
    return n


def emit_program(g: Graph, backend: Backend, model_name: str, opts: EmitOptions = EmitOptions(),
                 file_name: str = "program.py") -> str:
    """The whole generated program for sharded graph `g`."""
    mesh = g.mesh                                      # type: ignore[attr-defined]
    plan: Plan = g.plan                                # type: ignore[attr-defined]
    zero = g.zero                                      # type: ignore[attr-defined]
    world = _world(mesh)
    names = value_names(g)
    tree = ModuleTree()
    for p in g.params:
        tree.add(p.name)
    for alias in g.aliases:
        tree.add(alias)
    for p in g.params:
        names[p] = attr_path(p.name, tree)
    cls = identifier(opts.class_name)
    w = Writer()

    # header
    launch = backend.launch_command(file_name, world, f"--steps {opts.steps}")
    w('"""' + f"{model_name} on a {sharding.format_mesh(mesh)} mesh: one rank's program, generated by autopar.")
    w()
    w("Plan:")
    for line in plan_summary(g):
        w(f"    {line}")
    w()
    w(f"Ranks: {backend.launcher}. {backend.groups_comment}")
    w("Every rank runs this same file; it differs only by its mesh coordinates.")
    w()
    w("Launch (from this directory):")
    w(f"    {launch}")
    w()
    w(f"`{opts.init_file}` holds the full single-device state dict and the example batch; each")
    w("rank keeps its own block of every tensor (see LAYOUTS) and saves its final shards.")
    w('"""')
    w("import argparse")
    w("import json")
    if zero.params:
        w("import math")
    w("import os")
    w("import resource")
    w("import time")
    w()
    w("import torch")
    w("import torch.nn as nn")
    w("import torch.nn.functional as F")
    regions = recompute_regions(g, plan.recompute)
    if regions:
        w("from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop")
    w()
    w("from autopar.backends import runtime as rt")
    w()
    w(f"MESH = {dict(mesh)!r}")
    axes = ", ".join(mesh)
    w()
    w(f"# Layout of every parameter, buffer and input: one placement per mesh axis ({axes}).")
    w("# S(d): sharded on dim d, R: replicated. A rank holds the block at its coordinates.")
    w("LAYOUTS = {")
    for v in (*g.inputs, *g.params):
        w(f"    {v.name!r}: {tuple(g.layouts[v.name])!r},", 0)   # type: ignore[attr-defined]
    w("}")
    w(f"INPUTS = {[v.name for v in g.inputs]!r}")
    if g.pieces:
        w()
        w("# Fused weights cut into pieces that shard on their own (e.g. c_attn's q, k, v):")
        w("# piece name -> (state-dict name, dim, start, stop).")
        w("PIECES = {")
        for name, pc in g.pieces.items():
            w(f"    {name!r}: ({pc.source!r}, {pc.dim}, {pc.start}, {pc.stop}),", 0)
        w("}")
    w()
    w()
    if g.pieces:
        w("def full_tensor(full, name):")
        w('"""A tensor of the single-device state dict; a piece is cut out of its fused weight."""', 1)
        w("if name in PIECES:", 1)
        w("source, dim, start, stop = PIECES[name]", 2)
        w("return full[source].narrow(dim, start, stop - start)", 2)
        w("return full[name]", 1)
        w()
        w()
    w("def shard(full, layout, mesh):")
    w('"""This rank\'s block of a full tensor."""', 1)
    w("for axis, placement in zip(MESH, layout):", 1)
    w('if placement.startswith("S("):', 2)
    w("full = mesh.chunk(full, axis, dim=int(placement[2:-1]))", 3)
    w("return full.contiguous()", 1)
    w()
    w()

    # module
    w(f"class {cls}(nn.Module):")
    w(f'"""This rank\'s shards of {model_name}\'s parameters, under their original names."""', 1)
    w()
    w("def __init__(self, mesh):", 1)
    w("super().__init__()", 2)
    w("self.mesh = mesh", 2)
    _emit_params(w, g, tree, names, opts)
    w()
    _emit_forward(w, g, names, regions)
    w()
    w("def load_full_state_dict(self, full):", 1)
    w('"""Copy this rank\'s block of every tensor of a single-device state dict."""', 2)
    w("with torch.no_grad():", 2)
    w("for name, t in [*self.named_parameters(), *self.named_buffers()]:", 3)
    w(f"t.copy_(shard({'full_tensor(full, name)' if g.pieces else 'full[name]'}, LAYOUTS[name], self.mesh))", 4)
    w()
    w()
    if zero.params:
        _emit_zero(w, zero)
    _emit_main(w, g, backend, cls, opts, names)
    return w.text()


def _emit_params(w: Writer, g: Graph, tree: ModuleTree, names, opts: EmitOptions) -> None:
    """Containers in state-dict order, then each tensor; tied names last."""
    by_name = {p.name: p for p in g.params}
    mesh = g.mesh                                      # type: ignore[attr-defined]

    def init(child: ModuleTree) -> str:
        if is_piece_list(child):
            return "nn.ParameterList()"
        if child.kind == "list":
            return f"nn.ModuleList(nn.Module() for _ in range({len(child.children)}))"
        if child.kind == "dict":
            keys = ", ".join(f"{k!r}: nn.Module()" for k, c in child.children.items() if c is not None)
            return f"nn.ModuleDict({{{keys}}})"
        return "nn.Module()"

    def walk(node: ModuleTree, prefix: str, expr: str):
        for key, child in node.children.items():
            name = prefix + key
            if child is None:
                if name not in g.aliases:
                    _emit_tensor(w, g, expr, key, by_name[name], opts, mesh,
                                 append=is_piece_list(node))
                continue
            sub = (f"{expr}[{key}]" if node.kind == "list" else
                   f"{expr}[{key!r}]" if node.kind == "dict" else f"{expr}.{key}")
            if node.kind == "attr" or child.kind != "attr":
                w(f"{sub} = {init(child)}", 2)
            walk(child, name + ".", sub)
    walk(tree, "", "self")
    for alias, canon in sorted(g.aliases.items()):
        w(f"{attr_path(alias, tree)} = {attr_path(canon, tree)}  # tied: one tensor, two names", 2)


def is_piece_list(node: ModuleTree) -> bool:
    """The pieces of a fused weight (`c_attn.weight.0`, `.1`, `.2`): a ParameterList, so
    the state-dict names stay the fused name plus the piece index."""
    return node.kind == "list" and all(c is None for c in node.children.values())


def _emit_tensor(w, g, holder, leaf, p: Value, opts, mesh, append: bool = False) -> None:
    shape = ", ".join(str(s) for s in p.shape)
    note = f"{shape_comment(g, p)} {sharding.format_layout(mesh, g.layouts[p.name])}"
    dtype = "" if p.dtype == torch.float32 else f", dtype={p.dtype}"
    if p.kind == "buffer":
        persistent = (not opts.state_keys) or p.name in opts.state_keys
        extra = "" if persistent else ", persistent=False"
        w(comment_pad(f"{holder}.register_buffer({leaf!r}, torch.empty({shape}{dtype}){extra})", note), 2)
        return
    grad = "" if p.requires_grad else ", requires_grad=False"
    new = f"nn.Parameter(torch.empty({shape}{dtype}){grad})"
    if append:
        pc = g.pieces[p.name]
        code = f"{holder}.append({new})"
        note += f" piece {pc.index + 1}/{pc.count} of the fused weight"
    else:
        code = (f"{holder}.{leaf} = {new}" if leaf.isidentifier() and not keyword.iskeyword(leaf)
                else f"{holder}.register_parameter({leaf!r}, {new})")
    w(comment_pad(code, note + ("" if p.requires_grad else " frozen")), 2)


def _block(module: str) -> str:
    """The enclosing repeated block (`transformer.h.0`) or top-level module of a path."""
    parts = module.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if module else ""


def _emit_node(w: Writer, g: Graph, n: Node, names, indent: int) -> None:
    needs = g.needs_grad                               # type: ignore[attr-defined]
    mesh = g.mesh                                      # type: ignore[attr-defined]
    operand = [names[v] for v in n.inputs]
    outs = ", ".join(names[v] for v in n.outputs)
    if is_collective(n):
        x = n.inputs[0]
        src = sharding.format_layout(mesh, g.layouts[x.name])          # type: ignore[attr-defined]
        dst = sharding.format_layout(mesh, g.layouts[n.outputs[0].name])  # type: ignore[attr-defined]
        traffic = ", ".join(f"{k} {format_bytes(b)} {'fwd' if ph == 'forward' else 'bwd'}"
                            for k, _, b, ph in collective_traffic(n, x.name in needs))
        if n.op == "copy_to":
            w(f"# {n.attr['axis']} splits this op: the gradient is a partial sum, all_reduce it in backward ({traffic})", indent)
        else:
            w(f"# {src} -> {dst}: {COLLECTIVE_WHY[n.op]} ({traffic or 'no data moved'})", indent)
        code = f"{outs} = {COLLECTIVE_CALL[n.op](operand[0], n.attr)}"
    elif n.meta.source == MEAN_SCALE:
        w(f"# a mean over this rank's shard: divide by the {n.attr['other']} shards so that they sum up", indent)
        code = f"{outs} = {operand[0]} / {n.attr['other']}"
    elif n.meta.source == BIAS_SHARE:
        w(f"# the output is a partial sum over {n.attr['other']} ranks: each adds 1/{n.attr['other']} of the bias", indent)
        code = f"{outs} = {operand[0]} / {n.attr['other']}"
    else:
        code = f"{outs} = {render_op(n, operand)}"
    comment = shape_comment(g, n.outputs[0]) if len(n.outputs) == 1 else ""
    w(comment_pad(code, comment, 72 - 4 * indent), indent)


def _emit_forward(w: Writer, g: Graph, names, regions) -> None:
    args = ", ".join(names[v] for v in g.inputs)
    w(f"def forward(self, {args}):", 1)
    w('"""One training step\'s forward on this rank\'s shards; returns this rank\'s loss."""', 2)
    w("mesh = self.mesh", 2)
    for v in g.inputs:
        w(f"# {names[v]}: {shape_comment(g, v)}", 2)
    starts = {s: e for s, e in regions}
    i, block = 0, None
    nodes = g.nodes
    while i < len(nodes):
        n = nodes[i]
        b = _block(n.meta.module)
        if b != block and b:
            w()
            w(f"# {b}", 2)
            block = b
        if i in starts:
            end = starts[i]
            ins, outs = region_io(g, i, end)
            fn = identifier(f"{module_fn(nodes[i:end])}_recomputed")
            w(f"def {fn}({', '.join(names[v] for v in ins)}):", 2)
            for m in nodes[i:end]:
                mb = _block(m.meta.module)
                if mb != block and mb:
                    w(f"# {mb}", 3)
                    block = mb
                _emit_node(w, g, m, names, 3)
            w(f"return {', '.join(names[v] for v in outs)}", 3)
            w("# recompute the whole region in backward (its collectives run again)", 2)
            w("with set_checkpoint_early_stop(False):", 2)
            lhs = ", ".join(names[v] for v in outs)
            w(f"{lhs} = checkpoint({fn}, {', '.join(names[v] for v in ins)}, use_reentrant=False)", 3)
            i = end
            continue
        _emit_node(w, g, n, names, 2)
        i += 1
    w(f"return {', '.join(names[v] for v in g.outputs)}", 2)


def module_fn(nodes: list[Node]) -> str:
    mods = [n.meta.module for n in nodes if n.meta.module]
    if not mods:
        return "region"
    common = mods[0].split(".")
    for m in mods[1:]:
        parts = m.split(".")
        k = 0
        while k < min(len(common), len(parts)) and common[k] == parts[k]:
            k += 1
        common = common[:k]
    return module_var(".".join(common)) if common else module_var(_block(mods[0])) + "_to_" + module_var(_block(mods[-1]))


def _emit_zero(w: Writer, zero) -> None:
    w("class ZeroShards:")
    w(f'"""ZeRO-{zero.stage} over `{zero.axis}`: each rank keeps the optimizer state of 1/{zero.axis} of every', 1)
    w("data-parallel parameter (flattened, padded to equal chunks), updates that chunk and", 1)
    w("all-gathers the parameter after the step. A gradient that is still a partial sum over", 1)
    w(f'{zero.axis} (`partial`) is reduce-scattered; one already summed is just sliced."""', 1)
    w()
    w("def __init__(self, mesh, params, partial):", 1)
    w(f'self.mesh, self.axis = mesh, "{zero.axis}"', 2)
    w("self.params, self.partial = params, partial", 2)
    w("n, me = mesh.size(self.axis), mesh.coord(self.axis)", 2)
    w("self.chunks = {}", 2)
    w("for name, p in params.items():", 2)
    w("size = math.ceil(p.numel() / n)", 3)
    w("flat = F.pad(p.detach().reshape(-1), (0, size * n - p.numel()))", 3)
    w("self.chunks[name] = flat[me * size:(me + 1) * size].clone().requires_grad_()", 3)
    w()
    w("def reduce_grads(self):", 1)
    w("n, me = self.mesh.size(self.axis), self.mesh.coord(self.axis)", 2)
    w("for name, p in self.params.items():", 2)
    w("chunk = self.chunks[name]", 3)
    w("flat = F.pad(p.grad.reshape(-1), (0, chunk.numel() * n - p.numel()))", 3)
    w("if name in self.partial:", 3)
    w("chunk.grad = self.mesh.reduce_scatter_flat(flat, self.axis)", 4)
    w("else:", 3)
    w("chunk.grad = flat[me * chunk.numel():(me + 1) * chunk.numel()].clone()", 4)
    w("p.grad = None", 3)
    w()
    w("@torch.no_grad()", 1)
    w("def gather_params(self):", 1)
    w("for name, p in self.params.items():", 2)
    w("full = self.mesh.all_gather_flat(self.chunks[name], self.axis)", 3)
    w("p.copy_(full[:p.numel()].view_as(p))", 3)
    w()
    w()


def _emit_main(w: Writer, g: Graph, backend: Backend, cls: str, opts: EmitOptions, names) -> None:
    mesh = g.mesh                                      # type: ignore[attr-defined]
    zero = g.zero                                      # type: ignore[attr-defined]
    loss = g.outputs[0]
    partial = [a for a, p in zip(mesh, g.layouts[loss.name]) if p == "P"]   # type: ignore[attr-defined]
    w("def main():")
    w("parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])", 1)
    w(f'parser.add_argument("--init", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), {opts.init_file!r}),', 1)
    w('help="torch.save\'d {\\"model\\": full state dict, \\"inputs\\": example batch}")', 5)
    w(f'parser.add_argument("--steps", type=int, default={opts.steps})', 1)
    w(f'parser.add_argument("--optimizer", choices=["sgd", "adamw"], default={opts.optimizer!r})', 1)
    w(f'parser.add_argument("--lr", type=float, default={opts.lr!r})', 1)
    w(f'parser.add_argument("--device", choices=["cpu", "cuda"], default={opts.device!r})', 1)
    w('parser.add_argument("--save", default="shards", help="directory for each rank\'s final shards")', 1)
    w('parser.add_argument("--stats", default=None, help="write losses, bytes and times to STATS.rank<r>.json")', 1)
    w("args = parser.parse_args()", 1)
    w()
    w("rt.one_thread()", 1)
    w(f'mesh = rt.init_mesh(MESH, backend="{backend.runtime}", device=args.device)', 1)
    w("init = torch.load(args.init, map_location=\"cpu\")", 1)
    w(f"model = {cls}(mesh)", 1)
    w("model.load_full_state_dict(init[\"model\"])", 1)
    w("model.to(mesh.device)", 1)
    inputs = ", ".join(names[v] for v in g.inputs)
    w(f"{inputs}{',' if len(g.inputs) == 1 else ''} = [shard(t, LAYOUTS[name], mesh).to(mesh.device)", 1)
    w(f"{' ' * (len(inputs) + 4)}for name, t in zip(INPUTS, init[\"inputs\"])]", 1)
    w()
    if zero.params:
        w(f"# ZeRO-{zero.stage}: the optimizer owns 1/{zero.axis} chunks of the data-parallel parameters", 1)
        w("params = dict(model.named_parameters())", 1)
        w("zero = ZeroShards(mesh, {name: params[name] for name in [", 1)
        for p in zero.params:
            w(f"{p!r},", 2)
        partial_grads = sorted(zero.reduce_scatter)
        if partial_grads:
            w("]}, partial={", 1)
            for p in partial_grads:
                w(f"{p!r},", 2)
            w("})", 1)
        else:
            w("]}, partial=set())", 1)
        w("trainable = [*zero.chunks.values(),", 1)
        w("             *[p for name, p in params.items() if p.requires_grad and name not in zero.params]]", 1)
    else:
        w("trainable = [p for p in model.parameters() if p.requires_grad]", 1)
    w('if args.optimizer == "adamw":', 1)
    w("optimizer = torch.optim.AdamW(trainable, lr=args.lr)", 2)
    w("else:", 1)
    w("optimizer = torch.optim.SGD(trainable, lr=args.lr, momentum=0.9)", 2)
    w()
    w("losses, traffic, times = [], [], []", 1)
    w("for step in range(args.steps):", 1)
    w("mesh.reset_traffic()", 2)
    w("t0 = time.perf_counter()", 2)
    what = f"partial sum over {', '.join(partial)}" if partial else "replicated"
    w(f"loss = model({inputs})  # this rank's loss ({what})", 2)
    w("loss.backward()  # gradients synchronise inside the collectives' backward", 2)
    if zero.params:
        w("zero.reduce_grads()", 2)
    w("optimizer.step()", 2)
    w("optimizer.zero_grad(set_to_none=True)", 2)
    if zero.params:
        w("zero.gather_params()", 2)
    w("times.append(time.perf_counter() - t0)", 2)
    red = "loss.item()"
    for a in partial:
        red = f'mesh.all_reduce_scalar({red}, "{a}")'
    w(f"losses.append({red})  # the global loss", 2)
    w('traffic.append({f"{kind}:{axis}": b for (kind, axis), b in sorted(mesh.traffic.items())})', 2)
    w('rt.log(mesh, f"step {step}: loss {losses[-1]:.6f} ({times[-1] * 1e3:.1f} ms)")', 2)
    w()
    w("os.makedirs(args.save, exist_ok=True)", 1)
    w('torch.save(model.state_dict(), os.path.join(args.save, f"rank{mesh.rank}.pt"))', 1)
    w("if args.stats:", 1)
    w('with open(f"{args.stats}.rank{mesh.rank}.json", "w") as f:', 2)
    w('json.dump({"rank": mesh.rank, "coords": mesh.coords, "losses": losses, "traffic": traffic,', 3)
    w('"times": times, "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, f)', 3 + 2)
    w("mesh.shutdown()", 1)
    w()
    w()
    w('if __name__ == "__main__":')
    w("main()", 1)


__all__ = ["Backend", "BACKENDS", "backend_named", "EmitOptions", "emit_program", "render_op", "value_names", "module_var",
           "shape_comment"]

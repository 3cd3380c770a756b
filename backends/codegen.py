"""The code generator: a sharded graph (`passes.apply.apply_plan`) -> one self-contained
Python program that trains the model on this rank's shards.

The program keeps the model's shape, the way a person would write it: a header (model,
mesh, plan, launch command), the table of what is sharded, one `nn.Module` class per
repeated block class (its forward written once, the model's own loop over the layers),
a model class holding only this rank's parameter shards under their original state-dict
names, forwards with one line per op named after the user's own code (`q, k, v` where the
model splits its fused projection) and every collective written out with its layouts and
bytes, loading from a full single-device state dict, and a training loop. The two backends
differ only in how ranks start and talk (`Backend`): torch.distributed under torchrun, or
MPI under mpiexec.

    >>> src = emit_program(sharded, backend_named("torch"), model_name="GPT")   # doctest: +SKIP
"""
from __future__ import annotations

import ast
import keyword
import re
from dataclasses import dataclass, field

import torch

from autopar.compiler import buckets, collectives, sharding
from autopar.compiler.errors import InputError
from autopar.compiler.ir import Node, SymInt, Value
from autopar.compiler.ops import EXPERT_PARALLEL_MOE, VOCAB_PARALLEL_CE, library_modules
from autopar.compiler.patterns import block_of
from autopar.compiler.sharded import (BIAS_SHARE, MEAN_SCALE, ShardedGraph, format_bytes,
                                      is_collective, is_inserted_scale, nbytes, region_io)
from autopar.backends.render import Expr, render_op
from autopar.compiler import onnx_node


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
    init_file: str = "init.safetensors"   # full state dict + example batch, next to the program
    state_keys: frozenset = frozenset()   # the model's state_dict keys (persistent buffers)
    class_name: str = "Model"
    precision: str = "fp32"               # fp32, or bf16 compute/communication + fp32 masters


RESERVED = set(keyword.kwlist) | {"self", "mesh", "torch", "F", "nn", "rt", "math", "checkpoint",
                                  "os", "time", "json", "argparse", "LAYOUTS", "MESH", "shard",
                                  "input", "sum", "max", "min", "slice", "type", "len", "list",
                                  "print", "range", "float", "int", "id", "all", "any", "block",
                                  "super", "set_checkpoint_early_stop", "resource", "dict",
                                  "ckpt", "start", "checkpoint_specs"}


def identifier(name: str) -> str:
    s = re.sub(r"\W", "_", name)
    if not s or s[0].isdigit():
        s = "v_" + s
    return s + "_" if s in RESERVED else s


# ---- names -------------------------------------------------------------------------------

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
    if leaf.isdigit() and prefix:             # a piece of a fused weight: c_attn.weight.1
        prefix, _, leaf2 = prefix.rpartition(".")
        leaf = f"{leaf2}_{leaf}"
    return f"{module_var(prefix)}_{leaf}" if prefix else leaf


def assigned_names(line: str) -> list[str]:
    """The names a source line assigns (`q, k, v = ...` -> [q, k, v]); [] for anything else."""
    try:
        tree = ast.parse(line)
    except SyntaxError:
        return []
    if len(tree.body) != 1 or not isinstance(tree.body[0], (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        return []
    st = tree.body[0]
    target = st.targets[-1] if isinstance(st, ast.Assign) else st.target
    elts = target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]
    out = []
    for t in elts:
        if not isinstance(t, ast.Name):
            return []
        out.append(t.id)
    return out


class Scope:
    """Python names for the values of one function body. A name is reused once the value
    holding it is dead (the way one writes `k = k.view(...).transpose(1, 2)`)."""

    def __init__(self, nodes: list[Node], outputs=()):
        self.last_use: dict[Value, int] = {}
        for i, n in enumerate(nodes):
            for v in n.inputs:
                self.last_use[v] = i
        for v in outputs:
            self.last_use[v] = len(nodes) + 1
        self.holder: dict[str, Value] = {}
        self.names: dict[Value, str] = {}

    def claim(self, v: Value, base: str, at: int) -> str:
        base = identifier(base)
        name, k = base, 1
        while name in self.holder and self.last_use.get(self.holder[name], -1) > at:
            name, k = f"{base}_{k}", k + 1
        self.holder[name] = v
        self.names[v] = name
        return name

    def fix(self, v: Value, name: str) -> None:
        """`v` must be called `name` (a parameter, a value carried through a loop)."""
        self.holder[name] = v
        self.names[v] = name
        self.last_use.setdefault(v, 10 ** 9)


def name_nodes(scope: Scope, nodes: list[Node], module_prefix: str = "", outputs=()) -> None:
    """Name every value `nodes` define, in order: after the user's own line of code (the
    names it assigns, matched to the values the line hands on), else after the module whose
    result it is, else the IR's name; a collective keeps its operand's name."""
    outs = set(outputs)
    lines: dict[int, str] = {}            # node index -> the name its line gives it
    i = 0
    work = [k for k, n in enumerate(nodes) if not (is_collective(n) or is_inserted_scale(n))]
    while i < len(work):
        line = nodes[work[i]].meta.line
        j = i
        while j + 1 < len(work) and nodes[work[j + 1]].meta.line == line:
            j += 1
        group = work[i:j + 1]
        i = j + 1
        targets = assigned_names(line) if line else []
        if not targets:
            continue
        inside = {v for k in group for v in nodes[k].outputs}
        handed = []
        for k in group:
            for v in nodes[k].outputs:
                used_after = any(v in m.inputs for m in nodes if not (set(m.outputs) & inside)) or v in outs
                if used_after:
                    handed.append((k, v))
        if len(handed) == len(targets):
            for (k, v), t in zip(handed, targets):
                lines[id(v)] = t
        elif len(targets) == 1 and handed:
            lines[id(handed[-1][1])] = targets[0]
    last: dict[str, int] = {}
    for k, n in enumerate(nodes):
        if n.meta.module and not is_collective(n) and not is_inserted_scale(n):
            last[n.meta.module] = k
    for k, n in enumerate(nodes):
        if all(v in scope.names for v in n.outputs):
            continue                            # fixed by the caller (a loop's variable)
        if is_collective(n) or is_inserted_scale(n):
            x = n.inputs[0]
            if x.kind in ("param", "buffer"):
                base = param_var(x.name[len(module_prefix):] if x.name.startswith(module_prefix) else x.name)
            else:
                base = scope.names.get(x, x.name)
            scope.claim(n.outputs[0], base, k)
            continue
        for v in n.outputs:
            if id(v) in lines:
                base = lines[id(v)]
            elif len(n.outputs) == 1 and last.get(n.meta.module) == k and n.meta.module:
                path = n.meta.module
                rel = path[len(module_prefix):] if module_prefix and path.startswith(module_prefix) else path
                base = (rel.rsplit(".", 1)[-1] if module_prefix else module_var(rel)) or v.name
            else:
                base = v.name
            scope.claim(v, base, k)


# ---- the module tree of parameters ----------------------------------------------------------

def attr_path(name: str, tree: "ModuleTree", root: str = "self") -> str:
    """`transformer.h.0.attn.c_attn.weight` -> `self.transformer.h[0].attn.c_attn.weight`."""
    out, node = root, tree
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


def is_piece_list(node: ModuleTree) -> bool:
    """The pieces of a fused weight (`c_attn.weight.0`, `.1`, `.2`): a ParameterList, so
    the state-dict names stay the fused name plus the piece index."""
    return node.kind == "list" and all(c is None for c in node.children.values())


# ---- repeated blocks ---------------------------------------------------------------------------

@dataclass
class Instance:
    """One module instance of a repeated block (`transformer.h.3`) in the program: its core
    nodes, the collectives on values from outside it that run just before it (`entries`),
    what it reads from outside (`ext`, in first-use order) and hands on (`outs`)."""
    path: str
    index: int
    core: list[int]
    entries: list[int]
    ext: list[Value]
    outs: list[Value]
    sig: tuple = ()


@dataclass
class BlockClass:
    kind: str                   # transformer.h
    name: str                   # the class name in the program
    instances: list[Instance]

    @property
    def template(self) -> Instance:
        return self.instances[0]


def find_blocks(s: ShardedGraph) -> tuple[list[int], list[BlockClass]]:
    """The program's node order and its block classes: the instances of each module list
    whose cores are identical (ops, attributes, local shapes, layouts, parameters relative to
    the instance), the model's order kept. Nodes that sit inside an instance but belong to
    none (a collective shared by several blocks) move in front of it; a module list whose
    instances cannot be cut out cleanly is emitted flat."""
    nodes = s.nodes
    order = list(range(len(nodes)))
    inst_of: dict[int, tuple[str, str]] = {}
    for i, n in enumerate(nodes):
        b = block_of(n.meta.module) if n.meta.module else None
        if b is not None:
            inst_of[i] = b
    kinds: dict[str, list[str]] = {}
    for kind, path in inst_of.values():
        if path not in kinds.setdefault(kind, []):
            kinds[kind].append(path)
    classes: list[BlockClass] = []
    for kind, paths in kinds.items():
        if len(paths) < 2:
            continue
        # the instances must be the whole module list, each holding parameters (the program
        # builds it as `nn.ModuleList(Block(mesh) for ...)`)
        index = {int(p.rsplit(".", 1)[1]) for p in paths}
        owners = {int(p.name[len(kind) + 1:].split(".", 1)[0]) for p in s.params
                  if p.name.startswith(kind + ".") and p.name[len(kind) + 1:].split(".", 1)[0].isdigit()}
        if not (index == owners == set(range(len(index)))):
            continue
        new_order = hoist_outside(order, nodes, inst_of, kind)
        if new_order is None:
            continue
        pos = {i: k for k, i in enumerate(new_order)}
        insts = []
        ok = True
        for path in sorted(paths, key=lambda p: int(p.rsplit(".", 1)[1])):
            members = sorted((i for i, b in inst_of.items() if b[1] == path), key=pos.__getitem__)
            first, last = pos[members[0]], pos[members[-1]]
            if last - first + 1 != len(members):
                ok = False
                break
            insts.append(cut_instance(s, path, members))
        if not ok or not regions_fit(s, insts):
            continue
        order = new_order
        by_sig: dict[tuple, list[Instance]] = {}
        for inst in insts:
            by_sig.setdefault(inst.sig, []).append(inst)
        for sig, group in by_sig.items():
            if len(group) < 2:
                continue
            leaf = kind.rsplit(".", 1)[-1]
            base = "Block" if leaf in ("h", "layers", "layer", "blocks", "block") else leaf.title().replace("_", "")
            name = base if not any(c.name == base for c in classes) else f"{base}{len(classes)}"
            classes.append(BlockClass(kind, identifier(name), group))
    return order, classes


def hoist_outside(order: list[int], nodes: list[Node], inst_of, kind: str) -> list[int] | None:
    """Move nodes that sit between nodes of one instance of `kind` but belong to none of
    its instances to just before that instance (legal when what they read is made before);
    None when one cannot move."""
    out = list(order)

    def path_at(k):
        b = inst_of.get(out[k])
        return b[1] if b is not None and b[0] == kind else None
    i = 0
    while i < len(out):
        if path_at(i) is not None:
            i += 1
            continue
        prev = next((k for k in range(i - 1, -1, -1) if path_at(k) is not None), None)
        nxt = next((k for k in range(i + 1, len(out)) if path_at(k) is not None), None)
        if prev is None or nxt is None or path_at(prev) != path_at(nxt):
            i += 1
            continue
        inst = path_at(prev)
        first = next(k for k in range(len(out)) if path_at(k) == inst)
        made_inside = {v for k in range(first, i) for v in nodes[out[k]].outputs}
        if any(v in made_inside for v in nodes[out[i]].inputs):
            return None
        idx = out.pop(i)
        out.insert(first, idx)
        i += 1
    return out


def cut_instance(s: ShardedGraph, path: str, members: list[int]) -> Instance:
    """Split an instance's nodes into entry collectives and the core, and sign the core."""
    nodes = s.nodes
    inside: set[Value] = set()
    entries, core = [], []
    for i in members:
        n = nodes[i]
        if is_collective(n) and n.inputs[0].kind not in ("param", "buffer") and n.inputs[0] not in inside:
            entries.append(i)
            continue
        core.append(i)
        inside.update(n.outputs)
    core_defined = {v for i in core for v in nodes[i].outputs}
    ext: list[Value] = []
    prefix = path + "."
    for i in core:
        for v in nodes[i].inputs:
            outside = v.kind not in ("param", "buffer") or not v.name.startswith(prefix)
            if v not in core_defined and outside and v not in ext:
                ext.append(v)
    member_set = set(members)
    later = set(s.outputs)
    for j, n in enumerate(nodes):
        if j not in member_set:
            later.update(n.inputs)
    outs = [v for i in core for v in nodes[i].outputs if v in later]
    local = {}
    sig = []
    for k, i in enumerate(core):
        n = nodes[i]
        refs = []
        for v in n.inputs:
            if v in local:
                refs.append(("n",) + local[v])
            elif v.kind in ("param", "buffer") and v.name.startswith(prefix):
                refs.append(("p", v.name[len(prefix):], v.shape, v.requires_grad, s.layouts[v.name]))
            else:
                refs.append(("x", ext.index(v), v.shape, s.layouts[v.name]))
        for j, v in enumerate(n.outputs):
            local[v] = (k, j)
        sig.append((n.op, repr(n.attrs), tuple(refs), n.meta.source in (MEAN_SCALE, BIAS_SHARE),
                    tuple((v.shape, str(v.dtype), s.layouts[v.name], v.name in s.needs_grad) for v in n.outputs),
                    n.meta.module[len(prefix):] if n.meta.module.startswith(prefix) else "",
                    n.meta.line))
    sig.append(("outs", tuple(local[v] for v in outs), core_regions(s, core)))
    return Instance(path, int(path.rsplit(".", 1)[1]), core, entries, ext, outs, tuple(sig))


def core_regions(s: ShardedGraph, core: list[int]) -> tuple[tuple[int, int], ...]:
    """The recompute regions inside an instance's core, as positions in the core."""
    pos = {i: k for k, i in enumerate(core)}
    out = []
    for r in s.regions:
        idx = list(range(r.start, r.end))
        if idx and all(i in pos for i in idx) and pos[idx[-1]] - pos[idx[0]] == len(idx) - 1:
            out.append((pos[idx[0]], pos[idx[-1]] + 1))
    return tuple(out)


def regions_fit(s: ShardedGraph, insts: list["Instance"]) -> bool:
    """Every recompute region touching these instances lies inside one instance's core."""
    for r in s.regions:
        span = set(range(r.start, r.end))
        hit = [inst for inst in insts if span & set(inst.core + inst.entries)]
        if not hit:
            continue
        if len(hit) > 1 or not span <= set(hit[0].core):
            return False
    return True


# ---- sizes that come from the batch ---------------------------------------------------------

def shards_of(layout, d: int, mesh: dict) -> int:
    n = 1
    for p, size in zip(layout, mesh.values()):
        if sharding.shard_dim(p) == d:
            n *= size
    return n


def free_symbols(expr: str) -> list[str]:
    return sorted(set(re.findall(r"\b[a-z]\d+\b", expr)))


class Sizes:
    """The program's names for sizes from the batch: `B, T = idx.shape` (this rank's share
    of the symbolic dims the trace recorded), and every size attribute written over them
    (`q.reshape(B, T, 2, 16)`), so the program trains on any batch the mesh divides."""

    LETTERS = ["B", "T"] + [f"S{i}" for i in range(2, 64)]

    def __init__(self, s: ShardedGraph):
        self.s = s
        self.of: dict[str, tuple[str, int]] = {}      # symbol -> (name, shards it is taken over)
        self.defs: list[tuple[Value, list]] = []      # per input: its dims' names (or None)
        self.asserts: list[str] = []
        letters = iter(self.LETTERS)
        seen: dict[tuple, str] = {}                   # (rank, dim, hint) -> symbol
        for v in s.inputs:
            dims = s.graph.input_sizes.get(v.name)
            if not dims:
                continue
            names = []
            for d, e in enumerate(dims):
                if not (isinstance(e, str) and e.isidentifier()):
                    names.append(None)
                    continue
                sh = shards_of(s.layouts[v.name], d, s.mesh)
                key = (len(dims), d, int(v.shape[d]) * sh)
                if e in self.of:
                    names.append(None)
                elif key in seen and self.of[seen[key]][1] == sh:
                    # another input's dim of the same size at the same place: one size, checked
                    name = self.of[seen[key]][0]
                    self.of[e] = (name, sh)
                    self.asserts.append(f"assert {identifier(v.name)}.shape[{d}] == {name}, "
                                        f'"{v.name} must have {name} (dim {d} of the first input) at dim {d}"')
                    names.append(None)
                else:
                    name = next(letters)
                    self.of[e] = (name, sh)
                    seen[key] = e
                    names.append(name)
            if any(names):
                self.defs.append((v, names))

    def model_lines(self) -> list[str]:
        out = []
        for v, names in self.defs:
            x = identifier(v.name)
            if all(names):
                out.append(f"{', '.join(names)}{',' if len(names) == 1 else ''} = {x}.shape  "
                           f"# this rank's {self.describe(v, names)}")
            else:
                for d, nm in enumerate(names):
                    if nm:
                        out.append(f"{nm} = {x}.shape[{d}]")
        return out + self.asserts

    def describe(self, v: Value, names) -> str:
        parts = []
        for d, nm in enumerate(names):
            sh = shards_of(self.s.layouts[v.name], d, self.s.mesh)
            parts.append(f"{nm} = {int(v.shape[d])}" + (f" of {int(v.shape[d]) * sh}" if sh > 1 else ""))
        return ", ".join(parts) + " in the example"

    def block_lines(self, ext: list[Value], names: dict, used: set[str]) -> tuple[list[str], set[str]]:
        """Lines defining the size names a block uses, read from its arguments' shapes."""
        out, known = [], set()
        for v in ext:
            g = self.s.global_shapes.get(v.name, ())
            for d, size in enumerate(g):
                if not isinstance(size, SymInt) or size.expr not in self.of:
                    continue
                name, sh_model = self.of[size.expr]
                if name in known or name not in used:
                    continue
                sh_here = shards_of(self.s.layouts[v.name], d, self.s.mesh)
                read = f"{names[v]}.shape[{d}]"
                if sh_here == sh_model:
                    out.append(f"{name} = {read}")
                elif sh_here > sh_model and sh_here % sh_model == 0:
                    out.append(f"{name} = {read} * {sh_here // sh_model}")
                elif sh_model % sh_here == 0:
                    out.append(f"{name} = {read} // {sh_model // sh_here}")
                else:
                    continue
                known.add(name)
        return out, known

    def render(self, v, known: set[str] | None = None):
        """A SymInt as its expression over the size names (`known`: the names defined where
        it is used); the example's value when it does not reduce to them."""
        if not isinstance(v, SymInt):
            return v
        try:
            import sympy
            syms = {x: sympy.Symbol(x) for x in free_symbols(v.expr)}
            if not syms or any(x not in self.of for x in syms):
                return int(v)
            names = {x: self.of[x] for x in syms}
            if known is not None and any(nm not in known for nm, _ in names.values()):
                return int(v)
            e = sympy.sympify(v.expr, locals=syms)
            e = sympy.simplify(e.subs({syms[x]: sympy.Symbol(nm) * sh for x, (nm, sh) in names.items()}))
            num, den = sympy.fraction(sympy.together(e))
            text = str(num).replace("*", " * ") if den == 1 else f"({num}) // {den}"
            return Expr(text)
        except Exception:                      # an expression sympy cannot read: the example's size
            return int(v)

    def used(self, nodes: list[Node]) -> set[str]:
        out = set()
        for n in nodes:
            for _, a in n.attrs:
                for x in (a if isinstance(a, (list, tuple)) else [a]):
                    if isinstance(x, SymInt):
                        out.update(self.of[y][0] for y in free_symbols(x.expr) if y in self.of)
        return out


# ---- comments -------------------------------------------------------------------------------

def shape_comment(s: ShardedGraph, v: Value) -> str:
    """`(4/dp, 32, 192/tp)`, with `partial sum over tp` for pending sums."""
    lay = s.layouts[v.name]
    full = s.global_shapes[v.name]
    dims = [str(d) for d in full]
    partial = []
    for p, axis in zip(lay, s.mesh):
        d = sharding.shard_dim(p)
        if d is not None:
            dims[d] += f"/{axis}"
        elif p == "P":
            partial.append(axis)
    text = "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
    if partial:
        text += f" partial sum over {', '.join(partial)}"
    return text


class Writer:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str = "", indent: int = 0) -> None:
        self.lines.append(("    " * indent + line) if line else "")

    def text(self) -> str:
        return "\n".join(self.lines).rstrip() + "\n"


def comment_pad(code: str, comment: str, width: int = 72) -> str:
    return f"{code:<{width}}  # {comment}" if comment else code


def plan_summary(s: ShardedGraph) -> list[str]:
    plan, mesh = s.plan, s.mesh
    # calls as the ranks make them: both passes, bucketed gradients, and the exchanges
    # inside expert-parallel and vocab-parallel ops
    counts = s.call_counts()
    lines = [f"mesh {sharding.format_mesh(mesh)} ({world_size(mesh)} ranks), ZeRO stage {plan.zero}"
             + (f" over {s.zero.axis}" if plan.zero else "")]
    if plan.recompute:
        lines.append(f"recompute (activation checkpointing): {', '.join(plan.recompute)}")
    if counts:
        lines.append("collective calls per step and rank: " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
    traffic = s.traffic()
    if traffic:
        lines.append("bytes per step and rank: " + ", ".join(f"{k} {format_bytes(b)}" for k, b in traffic.items()))
    o = s.overlap
    if o is not None and o.buckets:
        per = ", ".join(f"{k} x{v}" for k, v in sorted(o.calls().items()))
        lines.append(f"gradient buckets: {len(o.buckets)} ({per}), launched asynchronously in backward")
    if o is not None and o.gathers:
        lines.append(f"ZeRO-3 schedule: {len(o.gathers)} parameter gathers prefetched {o.prefetch} block(s) ahead; "
                     f"{len(o.regathered)} weights freed after forward and gathered again in backward")
    if plan.cost.get("step_time"):
        lines.append(f"estimated step time: {plan.cost['step_time'] * 1e3:.3g} ms")
    return lines


def world_size(mesh) -> int:
    n = 1
    for v in mesh.values():
        n *= v
    return n


# ---- the program ------------------------------------------------------------------------------

class Emitter:
    """Writes one program; holds the sharded graph, the block classes and the names."""

    def __init__(self, s: ShardedGraph, backend: Backend, model_name: str, opts: EmitOptions,
                 file_name: str):
        self.s, self.backend, self.model_name, self.opts, self.file_name = s, backend, model_name, opts, file_name
        self.order, self.classes = find_blocks(s)
        self.instance: dict[str, tuple[BlockClass, Instance]] = {}
        for c in self.classes:
            for inst in c.instances:
                self.instance[inst.path] = (c, inst)
        self.users: dict[Value, set[int]] = {}
        for i, n in enumerate(s.nodes):
            for v in n.inputs:
                self.users.setdefault(v, set()).add(i)
        self.tree = ModuleTree()
        for p in s.params:
            self.tree.add(p.name)
        for alias in s.graph.aliases:
            self.tree.add(alias)
        self.w = Writer()
        self.regions_written = 0
        self.sizes = Sizes(s)
        self.known_sizes: set[str] | None = None       # size names defined in the current body
        from autopar.backends.pipeline_emit import PipelineParts, is_pipeline
        self.pp = PipelineParts(self) if is_pipeline(s) else None   # a plan with a pp axis

    # ---- helpers ----

    def param_ref(self, v: Value, tree: ModuleTree, prefix: str = "") -> str:
        name = v.name[len(prefix):] if prefix and v.name.startswith(prefix) else v.name
        return attr_path(name, tree)

    def node_lines(self, n: Node, names: dict, indent: int, param_ref) -> None:
        s, w = self.s, self.w

        def ref(v):       # a parameter of another module reaches a block as an argument
            return names[v] if v in names or v.kind not in ("param", "buffer") else param_ref(v)
        operand = [ref(v) for v in n.inputs]
        o = s.overlap
        hiding = o.async_inputs if o is not None else {}
        chunked = o.async_tp if o is not None else {}
        if n.op in ("all_gather", "reduce_scatter") and n.outputs[0].name in chunked:
            if n.op == "all_gather":
                names[n.outputs[0]] = operand[0]    # the linears it feeds run the step (below)
            return                                  # a reduce_scatter: run by its linear (below)
        if n.op == "linear" and (n.inputs[0].name in chunked or self.chunked_output(n) is not None):
            self.collective_matmul(n, names, indent, ref)
            return
        if n.op == "copy_to" and n.outputs[0].name in hiding:
            names[n.outputs[0]] = operand[0]    # the linear it feeds runs the step (below)
            return
        outs = ", ".join(names[v] for v in n.outputs)
        if n.op == "linear" and n.inputs[0].name in hiding:
            x = n.inputs[0]
            group = [s.nodes[i] for i in sorted(self.users[x])]     # the linears of this input
            if group[0] is not n:
                return                          # run with the first of them
            axis = hiding[x.name]
            traffic = ", ".join(f"{k} {format_bytes(b)}" for k, _, b, _ in s.node_traffic(self.copy_of(x)))
            these = "this linear" if len(group) == 1 else f"these {len(group)} linears"
            w(f"# {axis} splits {these}: the input's gradient is a partial sum, all_reduced in backward", indent)
            w(f"# while the weight gradients are computed ({traffic} bwd, async)", indent)

            def layer(m):
                ops = [ref(v) for v in m.inputs]
                return ops[1], (ops[2] if len(ops) > 2 else "None")
            if len(group) == 1:
                code = f'{outs} = rt.copy_to_linear({operand[0]}, {", ".join(layer(n))}, mesh, "{axis}")'
            else:
                w(f'{", ".join(names[m.outputs[0]] for m in group)} = rt.copy_to_linears({operand[0]}, [', indent)
                for m in group:
                    w("(%s, %s),  # %s" % (*layer(m), shape_comment(s, m.outputs[0])), indent + 1)
                w(f'], mesh, "{axis}")', indent)
                return
        elif is_collective(n):
            x = n.inputs[0]
            src = sharding.format_layout(s.mesh, s.layouts[x.name])
            dst = sharding.format_layout(s.mesh, s.layouts[n.outputs[0].name])
            traffic = ", ".join(f"{k} {format_bytes(b)} {'fwd' if ph == 'forward' else 'bwd'}"
                                for k, _, b, ph in s.node_traffic(n))
            axis = n.attr["axis"]
            if n.op == "copy_to":
                w(f"# {axis} splits the next op: the gradient is a partial sum, all_reduce it in backward ({traffic})", indent)
            elif o is not None and n.outputs[0].name in o.gathers:
                again = ", again in backward" if any(p == x.name for p, _ in o.regathered) else ""
                w(f"# {src} -> {dst}: ZeRO-3, gathered ahead of use (all_gather {format_bytes(nbytes(n.outputs[0]))} "
                  f"fwd{again}; reduce_scatter bwd, async)", indent)
            else:
                w(f"# {src} -> {dst}: {collectives.OPS[n.op].why} ({traffic or 'no data moved'})", indent)
            if o is not None and n.outputs[0].name in o.gathers:
                pg = ", partial_grad=False" if not n.attr.get("partial_grad") else ""
                code = f'{outs} = rt.gather_param({operand[0]}, mesh, "{axis}", dim={n.attr["dim"]}{pg})'
            else:
                code = f"{outs} = {collectives.call_source(n.op, operand[0], axis, n.attr)}"
        elif n.meta.source == MEAN_SCALE:
            w(f"# a mean over this rank's shard: divide by the {n.attr['other']} shards so that they sum up", indent)
            code = f"{outs} = {operand[0]} / {n.attr['other']}"
        elif n.meta.source == BIAS_SHARE:
            w(f"# the output is a partial sum over {n.attr['other']} ranks: each adds 1/{n.attr['other']} of the bias", indent)
            code = f"{outs} = {operand[0]} / {n.attr['other']}"
        elif n.op == VOCAB_PARALLEL_CE:
            axis = n.attr["axis"]
            sizes = sorted({format_bytes(b) for _, _, b, _ in s.node_traffic(n)})
            w(f"# vocab-parallel loss: the logits stay split on {axis} (no gather). Inside, each row's max, then its", indent)
            w(f"# sum of exp, is all_reduced over {axis} (all_reduce {' / '.join(sizes)} fwd x2, nothing in backward);", indent)
            w(f"# the rank whose classes hold a row's target adds that row's loss: a partial sum over {axis}", indent)
            code = f"{outs} = {render_op(self.with_sizes(n), operand)}"
        elif n.op == EXPERT_PARALLEL_MOE:
            axis = n.attr["axis"]
            t = s.node_traffic(n)
            w(f"# expert parallel on {axis}: this rank's tokens and experts. Inside, the rows' counts per expert", indent)
            w(f"# (all_to_all {format_bytes(t[0][2])}), then each (token, expert) row goes to its expert's rank and its", indent)
            w(f"# result comes back (all_to_all {format_bytes(t[1][2])} out, {format_bytes(t[2][2])} back; the same two in backward)", indent)
            code = f"{outs} = {render_op(self.with_sizes(n), operand)}"
        elif n.op.startswith("onnx."):   # an ONNX op without a lowering: ONNX's reference implementation
            code = f"{outs} = {onnx_node.call_source(n.op, operand, n.attr)}"
        else:
            code = f"{outs} = {render_op(self.with_sizes(n), operand)}"
        comment = shape_comment(s, n.outputs[0]) if len(n.outputs) == 1 else ""
        w(comment_pad(code, comment, 72 - 4 * indent), indent)

    def chunked_output(self, n: Node) -> Node | None:
        """The async-TP reduce_scatter that linear `n`'s output feeds, if any."""
        o = self.s.overlap
        if o is None or not o.async_tp:
            return None
        for i in self.users.get(n.outputs[0], ()):
            m = self.s.nodes[i]
            if m.op == "reduce_scatter" and m.outputs[0].name in o.async_tp:
                return m
        return None

    def collective_matmul(self, n: Node, names: dict, indent: int, ref) -> None:
        """A collective matmul (async TP): the gathered input's linears as one
        rt.all_gather_linears, or a linear and its output's reduce_scatter as one
        rt.linear_reduce_scatter."""
        s, w = self.s, self.w

        def layer(m):
            ops = [ref(v) for v in m.inputs]
            return ops[1], (ops[2] if len(ops) > 2 else "None")

        def traffic(node):
            return "; ".join(f"{k} {format_bytes(b)} {'fwd' if ph == 'forward' else 'bwd'}" for k, _, b, ph
                             in s.node_traffic(node))
        rs = self.chunked_output(n)
        if rs is not None:
            axis, dim = s.overlap.async_tp[rs.outputs[0].name]
            src = sharding.format_layout(s.mesh, s.layouts[n.outputs[0].name])
            dst = sharding.format_layout(s.mesh, s.layouts[rs.outputs[0].name])
            w(f"# {src} -> {dst}, a collective matmul (async TP): the running sum of each rank's rows", indent)
            w("# travels the ring while this rank computes its part of the next; backward gathers the", indent)
            w(f"# gradient around the ring beside the input gradient ({traffic(rs)})", indent)
            code = (f'{names[rs.outputs[0]]} = rt.linear_reduce_scatter({ref(n.inputs[0])}, {", ".join(layer(n))}, '
                    f'mesh, "{axis}", dim={dim})')
            w(comment_pad(code, shape_comment(s, rs.outputs[0]), 72 - 4 * indent), indent)
            return
        x = n.inputs[0]
        group = [s.nodes[i] for i in sorted(self.users[x])]         # the linears of this input
        if group[0] is not n:
            return                                  # run with the first of them
        axis, dim = s.overlap.async_tp[x.name]
        gather = next(m for m in s.nodes if m.op == "all_gather" and m.outputs[0] is x)
        src = sharding.format_layout(s.mesh, s.layouts[gather.inputs[0].name])
        dst = sharding.format_layout(s.mesh, s.layouts[x.name])
        these = "the linear runs" if len(group) == 1 else f"the {len(group)} linears run"
        w(f"# {src} -> {dst}, a collective matmul (async TP): the shards travel the ring and {these}", indent)
        w(f"# on each as it arrives ({traffic(gather)}; backward's reduce_scatter runs while", indent)
        w("# the weight gradients are computed)", indent)
        outs = ", ".join(names[m.outputs[0]] for m in group)
        w(f"{outs}{',' if len(group) == 1 else ''} = rt.all_gather_linears({names[x]}, [", indent)
        for m in group:
            w("(%s, %s),  # %s" % (*layer(m), shape_comment(s, m.outputs[0])), indent + 1)
        w(f'], mesh, "{axis}", dim={dim})', indent)

    def copy_of(self, v: Value) -> Node:
        """The copy_to node that makes `v`."""
        return next(n for n in self.s.nodes if n.op == "copy_to" and n.outputs[0] is v)

    def with_sizes(self, n: Node) -> Node:
        """`n` with its sizes from the batch written over the size names in scope."""
        def sub(a):
            if isinstance(a, SymInt):
                return self.sizes.render(a, self.known_sizes)
            if isinstance(a, list):
                return [sub(x) for x in a]
            if isinstance(a, tuple):
                return tuple(sub(x) for x in a)
            return a
        if not any(isinstance(x, SymInt) for _, a in n.attrs for x in (a if isinstance(a, (list, tuple)) else [a])):
            return n
        return n.replace(attrs=tuple((k, sub(a)) for k, a in n.attrs))

    def body(self, nodes: list[Node], names: dict, indent: int, param_ref, regions=(), block_comments=True,
             outputs=(), copies: int = 1) -> None:
        """Straight-line code for `nodes`, recompute regions as checkpointed functions
        (`copies`: how many instances this code runs as, for the count of regions)."""
        w = self.w
        starts = {a: b for a, b in regions}
        i, block = 0, None
        local_graph = _Sub(nodes, outputs)
        while i < len(nodes):
            n = nodes[i]
            b = _block(n.meta.module)
            if block_comments and b != block and b:
                w()
                w(f"# {b}", indent)
                block = b
            if i in starts:
                end = starts[i]
                ins, outs = region_io(local_graph, i, end)
                fn = identifier(f"{module_fn(nodes[i:end])}_recomputed")
                w(f"def {fn}({', '.join(names[v] for v in ins)}):", indent)
                for m in nodes[i:end]:
                    self.node_lines(m, names, indent + 1, param_ref)
                w(f"return {', '.join(names[v] for v in outs)}", indent + 1)
                w("# recompute the whole region in backward (its collectives run again)", indent)
                w("with set_checkpoint_early_stop(False):", indent)
                lhs = ", ".join(names[v] for v in outs)
                w(f"{lhs} = checkpoint({fn}, {', '.join(names[v] for v in ins)}, use_reentrant=False)", indent + 1)
                self.regions_written += copies
                i = end
                continue
            self.node_lines(n, names, indent, param_ref)
            i += 1

    # ---- sections ----

    def header(self) -> None:
        s, w, opts = self.s, self.w, self.opts
        launch = self.backend.launch_command(self.file_name, world_size(s.mesh), f"--steps {opts.steps}")
        w('"""' + f"{self.model_name} on a {sharding.format_mesh(s.mesh)} mesh: one rank's program, generated by autopar.")
        w()
        w("Plan:")
        for line in plan_summary(s):
            w(f"    {line}")
        for line in (self.pp.header_lines() if self.pp else []):
            w(f"    {line}")
        for c in self.classes:
            w(f"    {c.kind}.*: {len(c.instances)} blocks of one class ({c.name}), its forward written once")
        w()
        w(f"Ranks: {self.backend.launcher}. {self.backend.groups_comment}")
        w("Every rank runs this same file; it differs only by its mesh coordinates.")
        w()
        w("Launch (from this directory):")
        w(f"    {launch}")
        w()
        w(f"`{opts.init_file}` (safetensors) holds the full single-device state dict and the example batch; each")
        w("rank keeps its own block of every tensor (see LAYOUTS) and saves its final shards.")
        for line in checkpoint_header(s.plan):
            w(line)
        if opts.precision == "bf16":
            w()
            w("Precision: bf16. Weights, activations, gradients and every collective are bfloat16;")
            w("the optimizer steps fp32 master weights (fp32 moments), the bf16 weights are rounded")
            w("from them after each step, and the saved shards are the fp32 masters.")
        w('"""')
        w("import argparse")
        w("import collections")
        if getattr(s.plan, "microbatches", 1) > 1:
            w("import contextlib")
        w("import json")
        if s.zero.params:
            w("import math")
        w("import os")
        w("import resource")
        w("import time")
        w()
        w("import torch")
        w("import torch.nn as nn")
        w("import torch.nn.functional as F")
        for module in library_modules(dict.fromkeys(n.op for n in s.nodes)):
            w(f"import {module}  # defines the torch.ops of that library this program calls")
        if s.regions:
            w("from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop")
        w()
        w("from autopar.backends import runtime as rt")
        if any(n.op.startswith("onnx.") for n in s.nodes):
            w("from autopar.compiler import onnx_node")
        w()

    def folded_kinds(self) -> list[str]:
        """Module lists whose every instance is of a block class: their table entries are
        written once for all blocks (`transformer.h.*.mlp.c_fc.weight`)."""
        out = []
        for kind in dict.fromkeys(c.kind for c in self.classes):
            insts = self.kind_instances(kind)
            if all(p in self.instance for p in insts):
                out.append(kind)
        return out

    def folded(self, entries: list[tuple[str, tuple]]) -> list[tuple[str, tuple]]:
        """(name, value) table rows with the rows of every block folded into one `*` row
        where all blocks agree (a value naming its own block has `*` for the index)."""
        kinds = self.folded_kinds()
        count = {k: len(self.kind_instances(k)) for k in kinds}

        def key(name):
            for k in kinds:
                if name.startswith(k + "."):
                    index, _, rest = name[len(k) + 1:].partition(".")
                    if index.isdigit():
                        return k, f"{k}.*.{rest}", index
            return None, name, None

        def norm(value, kind, index):
            return tuple(x.replace(f"{kind}.{index}.", f"{kind}.*.") if isinstance(x, str) else x
                         for x in value)
        groups: dict[str, list] = {}
        for name, value in entries:
            kind, k, index = key(name)
            groups.setdefault(k, []).append((name, value, kind, index))
        out = []
        for k, items in groups.items():
            kind = items[0][2]
            vals = {norm(v, kd, i) if kd else v for _, v, kd, i in items}
            if kind is not None and len(items) == count[kind] and len(vals) == 1:
                out.append((k, vals.pop()))
            else:
                out.extend((name, value) for name, value, _, _ in items)
        return out

    def tables(self) -> None:
        s, w = self.s, self.w
        w(f"MESH = {dict(s.mesh)!r}")
        w()
        rep = tuple("R" for _ in s.mesh)
        kinds = self.folded_kinds()
        w(f"# What is sharded: one placement per mesh axis ({', '.join(s.mesh)}); S(d) is sharded on")
        w("# dim d (a rank holds the block at its coordinates). Every other parameter, buffer and")
        w("# input is replicated." + (" A row with `*` holds for every block." if kinds else ""))
        w("LAYOUTS = {")
        rows = [(v.name, tuple(s.layouts[v.name])) for v in (*s.inputs, *s.params)
                if tuple(s.layouts[v.name]) != rep]
        for name, lay in self.folded(rows):
            w(f"    {name!r}: {lay!r},", 0)
        w("}")
        w(f"REPLICATED = {rep!r}")
        w(f"INPUTS = {[v.name for v in s.inputs]!r}")
        w(f"BLOCK_LISTS = {kinds!r}")
        if self.pp:
            self.pp.tables()
        self.grad_buckets()
        if s.graph.pieces:
            w()
            w("# Fused weights cut into pieces that shard on their own (e.g. c_attn's q, k, v):")
            w("# piece name -> (state-dict name, dim, start, stop).")
            w("PIECES = {")
            rows = [(name, (pc.source, pc.dim, pc.start, pc.stop)) for name, pc in s.graph.pieces.items()]
            for name, v in self.folded(rows):
                w(f"    {name!r}: {v!r},", 0)
            w("}")
        w()
        w()
        w("def table_row(table, name):")
        w('"""`name`\'s row of LAYOUTS or PIECES: its own, or its block\'s `*` row (then also the', 1)
        w('module list and the block index, e.g. ("transformer.h", "3"))."""', 1)
        w("if name in table:", 1)
        w("return table[name], None", 2)
        w("for blocks in BLOCK_LISTS:", 1)
        w('if name.startswith(blocks + "."):', 2)
        w('index, _, rest = name[len(blocks) + 1:].partition(".")', 3)
        w('if f"{blocks}.*.{rest}" in table:', 3)
        w('return table[f"{blocks}.*.{rest}"], (blocks, index)', 4)
        w("return None, None", 1)
        w()
        w()
        if s.graph.pieces:
            w("def full_tensor(full, name):")
            w('"""A tensor of the single-device state dict; a piece is cut out of its fused weight."""', 1)
            w("row, block = table_row(PIECES, name)", 1)
            w("if row is None:", 1)
            w("return full[name]", 2)
            w("source, dim, start, stop = row", 1)
            w("if block is not None:", 1)
            w("blocks, index = block", 2)
            w('source = source.replace(f"{blocks}.*.", f"{blocks}.{index}.", 1)', 2)
            w("return full[source].narrow(dim, start, stop - start)", 1)
            w()
            w()
        w("def shard(full, name, mesh):")
        w('"""This rank\'s block of the full tensor called `name`."""', 1)
        w("layout = table_row(LAYOUTS, name)[0] or REPLICATED", 1)
        w("for axis, placement in zip(MESH, layout):", 1)
        w('if placement.startswith("S("):', 2)
        w("full = mesh.chunk(full, axis, dim=int(placement[2:-1]))", 3)
        w("return full.contiguous()", 1)
        w()
        w()

    def grad_buckets(self) -> None:
        """GRAD_ORDER and the bucket sizes: the overlap schedule's gradient buckets
        (passes/overlap.py), rebuilt by rt.GradBuckets with compiler/buckets.fill."""
        o, w = self.s.overlap, self.w
        if o is None or not o.buckets:
            return
        order = [(n, b.axes) if b.kind == "all_reduce" else (n, b.axes, b.kind)
                 for b in o.buckets for n in b.params]
        w()
        w("# Gradients of replicated parameters are partial sums over the listed axes (ZeRO-2's rows")
        w("# say reduce_scatter: each rank keeps its chunk for its optimizer state). rt.GradBuckets")
        w("# packs them, in the order backward finishes them (a `*` row: every block, last first),")
        w(f"# into buckets of up to BUCKET_BYTES (the first FIRST_BUCKET_BYTES); each bucket is")
        w("# all_reduced as one flat tensor, launched asynchronously the moment backward has")
        w("# accumulated its last gradient, and finished when backward returns. This plan:")
        for b in o.buckets:
            what = (b.params[0] if len(b.params) == 1 else
                    f"{len(b.params)} gradients, {b.params[0]} .. {b.params[-1]}")
            w(f"#   bucket {b.index}: {b.kind} {format_bytes(b.nbytes)} over {', '.join(b.axes)}, {what}")
        w(f"BUCKET_BYTES, FIRST_BUCKET_BYTES = {o.cap}, {o.first_cap}"
          + (f"  # the plan's {o.bucket_bytes} is more than a quarter of all gradients"
             if o.cap < o.bucket_bytes else ""))
        w("GRAD_ORDER = [")
        for row in buckets.fold(order, self.folded_kinds()):
            if isinstance(row[1], list):
                w(f"    ({row[0]!r}, [", 0)
                for entry in row[1]:
                    w(f"        {entry!r},", 0)
                w(f"    ], {row[2]}),", 0)
            else:
                w(f"    {row!r},", 0)
        w("]")

    def params(self, tree: ModuleTree, prefix: str, skip: set[str]) -> None:
        """Containers in state-dict order, then each tensor; tied names last. Subtrees in
        `skip` (module lists of block instances) are made by their block class."""
        s, w = self.s, self.w
        by_name = {p.name: p for p in s.params}

        def init(child: ModuleTree) -> str:
            if is_piece_list(child):
                return "nn.ParameterList()"
            if child.kind == "list":
                return f"nn.ModuleList(nn.Module() for _ in range({len(child.children)}))"
            if child.kind == "dict":
                keys = ", ".join(f"{k!r}: nn.Module()" for k, c in child.children.items() if c is not None)
                return f"nn.ModuleDict({{{keys}}})"
            return "nn.Module()"

        def walk(node: ModuleTree, name_prefix: str, expr: str):
            for key, child in node.children.items():
                name = name_prefix + key
                if child is None:
                    full = prefix + name
                    if full not in s.graph.aliases:
                        self.tensor(expr, key, by_name[full], append=is_piece_list(node))
                    continue
                sub = (f"{expr}[{key}]" if node.kind == "list" else
                       f"{expr}[{key!r}]" if node.kind == "dict" else f"{expr}.{key}")
                if prefix + name in skip and child.kind == "list":
                    made = [skip_class.get(f"{prefix}{name}.{k}") for k in child.children]
                    if all(m is not None and m is made[0] for m in made):
                        w(f"{sub} = nn.ModuleList({made[0].name}(mesh) for _ in range({len(made)}))", 2)
                        continue
                    parts = ", ".join(f"{m.name}(mesh)" if m is not None else "nn.Module()" for m in made)
                    w(f"{sub} = nn.ModuleList([{parts}])", 2)
                    for k, m in zip(child.children, made):
                        if m is None:
                            walk(child.children[k], f"{name}.{k}.", f"{sub}[{k}]")
                    continue
                if node.kind == "attr" or child.kind != "attr":
                    w(f"{sub} = {init(child)}", 2)
                walk(child, name + ".", sub)
        skip_class = {inst.path: c for c in self.classes for inst in c.instances}
        walk(tree, "", "self")

    def tensor(self, holder, leaf, p: Value, append: bool = False) -> None:
        s, w, opts = self.s, self.w, self.opts
        shape = ", ".join(str(d) for d in p.shape)
        note = f"{shape_comment(s, p)} {sharding.format_layout(s.mesh, s.layouts[p.name])}"
        dtype = "" if p.dtype == torch.float32 else f", dtype={p.dtype}"
        if p.kind == "buffer":
            persistent = (not opts.state_keys) or p.name in opts.state_keys
            extra = "" if persistent else ", persistent=False"
            w(comment_pad(f"{holder}.register_buffer({leaf!r}, torch.empty({shape}{dtype}){extra})", note), 2)
            return
        grad = "" if p.requires_grad else ", requires_grad=False"
        new = f"nn.Parameter(torch.empty({shape}{dtype}){grad})"
        if append:
            pc = s.graph.pieces[p.name]
            code = f"{holder}.append({new})"
            note += f" piece {pc.index + 1}/{pc.count} of the fused weight"
        else:
            code = (f"{holder}.{leaf} = {new}" if leaf.isidentifier() and not keyword.iskeyword(leaf)
                    else f"{holder}.register_parameter({leaf!r}, {new})")
        w(comment_pad(code, note + ("" if p.requires_grad else " frozen")), 2)

    def block_class(self, c: BlockClass) -> None:
        s, w = self.s, self.w
        t = c.template
        prefix = t.path + "."
        nodes = [s.nodes[i] for i in t.core]
        tree = ModuleTree()
        mine = [p for p in s.params if p.name.startswith(prefix)]
        for p in mine:
            tree.add(p.name[len(prefix):])
        w(f"class {c.name}(nn.Module):")
        w(f'"""One of {c.kind}.*: this rank\'s shards of a block\'s parameters and its forward."""', 1)
        w()
        w("def __init__(self, mesh):", 1)
        w("super().__init__()", 2)
        w("self.mesh = mesh", 2)
        self.params(tree, prefix, set())
        w()
        scope = Scope(nodes, t.outs)
        for k, v in enumerate(t.ext):
            scope.fix(v, self.ext_name(c, k))
        name_nodes(scope, nodes, prefix, t.outs)
        args = ", ".join(scope.names[v] for v in t.ext)
        w(f"def forward(self, {args}):", 1)
        w("mesh = self.mesh", 2)
        for v in t.ext:
            w(f"# {scope.names[v]}: {shape_comment(s, v)}", 2)
        lines, self.known_sizes = self.sizes.block_lines(t.ext, scope.names, self.sizes.used(nodes))
        for line in lines:
            w(line, 2)
        regions = core_regions(s, t.core)
        self.body(nodes, scope.names, 2, lambda v: self.param_ref(v, tree, prefix), regions,
                  block_comments=False, outputs=t.outs, copies=len(c.instances))
        w(f"return {', '.join(scope.names[v] for v in t.outs)}", 2)
        self.known_sizes = None
        w()
        w()

    def ext_name(self, c: BlockClass, k: int) -> str:
        """The block forward's k-th argument: `x` for what one block hands the next."""
        carried = self.carried(self.run_from(c, c.template))
        if carried is not None and k in carried:
            return "x" if len(carried) == 1 else f"x{sorted(carried).index(k)}"
        v = c.template.ext[k]
        if v.kind in ("param", "buffer"):
            return identifier(param_var(v.name))
        return identifier(self.top_names.get(v, v.name))

    def carried(self, insts: list[Instance]) -> dict[int, int] | None:
        """ext slot -> the out slot of the previous instance it reads, when consecutive
        instances are chained that way (every other slot reads one value in all of them, and
        what a block hands on is read only by the next); None when they are no loop."""
        if len(insts) < 2:
            return None
        first = insts[0]
        mapping: dict[int, int] = {}
        for a, b in zip(insts, insts[1:]):
            if b.entries or len(b.ext) != len(first.ext) or len(b.outs) != len(first.outs):
                return None
            for k, v in enumerate(b.ext):
                if v in a.outs:
                    o = a.outs.index(v)
                    if mapping.setdefault(k, o) != o:
                        return None
                elif v is not first.ext[k] or k in mapping:
                    return None
        if not mapping:
            return None
        for a, b in zip(insts, insts[1:]):
            nxt = set(b.core)
            for o, v in enumerate(a.outs):
                if o not in mapping.values() or any(u not in nxt for u in self.users.get(v, ())):
                    return None
        return mapping

    def model_class(self, cls: str) -> None:
        s, w = self.s, self.w
        w(f"class {cls}(nn.Module):")
        w(f'"""This rank\'s shards of {self.model_name}\'s parameters, under their original names."""', 1)
        w()
        w("def __init__(self, mesh):", 1)
        w("super().__init__()", 2)
        w("self.mesh = mesh", 2)
        self.params(self.tree, "", {c.kind for c in self.classes})
        for alias, canon in sorted(s.graph.aliases.items()):
            w(f"{attr_path(alias, self.tree)} = {attr_path(canon, self.tree)}  # tied: one tensor, two names", 2)
        if s.overlap is not None and s.overlap.gathers:
            o = s.overlap
            w(f"# ZeRO-3 as FSDP schedules it: a block's {o.zero3_axis}-sharded weights are all_gathered "
              f"{o.prefetch} block(s) ahead,", 2)
            w("# freed after the block's forward and gathered again (ahead, in reverse) in backward;", 2)
            w("# their gradients are reduce_scattered asynchronously and land on the shards when backward ends", 2)
            w(f'self.zero3 = rt.ParamGather(mesh, "{o.zero3_axis}", self, lambda name: table_row(LAYOUTS, name)[0] or REPLICATED,', 2)
            w(f"                            blocks={o.zero3_blocks!r}, prefetch={o.prefetch})", 2)
        if s.overlap is not None and s.overlap.buckets and not self.pp:   # a stage makes its own
            w("# the replicated parameters' gradients: all_reduced in buckets while backward runs", 2)
            w("self.grad_buckets = rt.GradBuckets(mesh, GRAD_ORDER, self, BUCKET_BYTES, FIRST_BUCKET_BYTES)", 2)
        w()
        if self.pp:
            self.pp.methods()          # one method per pipeline stage, and the loss
        else:
            self.forward()
        w()
        if getattr(s.plan, "microbatches", 1) > 1:
            w("def no_sync(self):", 1)
            w('"""Backward inside this block keeps the gradients local (a microbatch before the last)."""', 2)
            if s.overlap is not None and s.overlap.buckets:
                w("return self.grad_buckets.no_sync()", 2)
            else:
                w("return contextlib.nullcontext()  # no gradient bucket to hold back", 2)
            w()
        w("def load_full_state_dict(self, full):", 1)
        w('"""Copy this rank\'s block of every tensor of a single-device state dict."""', 2)
        w("with torch.no_grad():", 2)
        w("for name, t in [*self.named_parameters(), *self.named_buffers()]:", 3)
        w(f"t.copy_(shard({'full_tensor(full, name)' if s.graph.pieces else 'full[name]'}, name, self.mesh))", 4)
        w()
        w()

    def forward(self) -> None:
        s, w = self.s, self.w
        nodes = s.nodes
        # the top level's units: plain nodes, or whole runs of one block class
        in_class = {}
        for c in self.classes:
            for inst in c.instances:
                for i in inst.core + inst.entries:
                    in_class[i] = inst.path
        names = self.top_names
        args = ", ".join(names[v] for v in s.inputs)
        w(f"def forward(self, {args}):", 1)
        w('"""One training step\'s forward on this rank\'s shards; returns this rank\'s loss."""', 2)
        w("mesh = self.mesh", 2)
        for v in s.inputs:
            w(f"# {names[v]}: {shape_comment(s, v)}", 2)
        for line in self.sizes.model_lines():
            w(line, 2)
        self.known_sizes = {nm for nm, _ in self.sizes.of.values()}
        emitted: set[str] = set()
        k = 0
        order = self.order
        pending: list[int] = []

        def flush():
            if pending:
                sub = [nodes[i] for i in pending]
                self.body(sub, names, 2, lambda v: attr_path(v.name, self.tree), core_regions(s, pending),
                          outputs=[v for v in s.outputs] + later_uses(pending))
                pending.clear()

        def later_uses(idx):
            mine = {v for i in idx for v in nodes[i].outputs}
            rest = [nodes[i] for i in order if i not in set(idx)]
            return [v for v in mine if any(v in m.inputs for m in rest)]
        while k < len(order):
            i = order[k]
            path = in_class.get(i)
            if path is None:
                pending.append(i)
                k += 1
                continue
            if path in emitted:
                k += 1
                continue
            flush()
            c, inst = self.instance[path]
            run = self.run_from(c, inst)
            self.emit_run(c, run, names)
            for r in run:
                emitted.add(r.path)
            k += 1
        flush()
        w(f"return {', '.join(names[v] for v in s.outputs)}", 2)

    def run_from(self, c: BlockClass, first: Instance) -> list[Instance]:
        """The consecutive instances of `c` from `first` on that can share one loop."""
        insts = c.instances
        start = insts.index(first)
        run = [first]
        for inst in insts[start + 1:]:
            if inst.index != run[-1].index + 1 or self.carried(run + [inst]) is None:
                break
            run.append(inst)
        return run

    def top_ref(self, v: Value, names: dict) -> str:
        return attr_path(v.name, self.tree) if v.kind in ("param", "buffer") else names[v]

    def emit_run(self, c: BlockClass, run: list[Instance], names: dict) -> None:
        s, w = self.s, self.w
        first = run[0]
        w()
        lst = attr_path(c.kind, self.tree)
        if first.entries:
            w(f"# into {c.kind}.*: re-shard what the blocks read", 2)
            for i in first.entries:
                self.node_lines(s.nodes[i], names, 2, lambda v: attr_path(v.name, self.tree))
        carried = self.carried(run)
        if carried is not None:
            last = run[-1]
            ins = ", ".join(self.top_ref(v, names) for v in first.ext)
            outs = ", ".join(names[v] for v in last.outs)
            whole = len(run) == len(self.kind_instances(c.kind)) and run[0].index == 0
            sl = "" if whole else f"[{run[0].index}:{run[-1].index + 1}]"
            w(f"for block in {lst}{sl}:", 2)
            w(f"{outs} = block({ins})", 3)
            return
        for inst in run:
            if inst is not first:
                for i in inst.entries:
                    self.node_lines(s.nodes[i], names, 2, lambda v: attr_path(v.name, self.tree))
            outs = ", ".join(names[v] for v in inst.outs)
            w(f"{outs} = {lst}[{inst.index}]({', '.join(self.top_ref(v, names) for v in inst.ext)})", 2)

    def kind_instances(self, kind: str) -> list[str]:
        return sorted({b[1] for n in self.s.nodes if n.meta.module
                       for b in [block_of(n.meta.module)] if b is not None and b[0] == kind},
                      key=lambda p: int(p.rsplit(".", 1)[1]))


def _block(module: str) -> str:
    """The enclosing repeated block (`transformer.h.0`) or top-level module of a path."""
    parts = module.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if module else ""


class _Sub:
    """A node list with the graph interface `region_io` reads."""

    def __init__(self, nodes, outputs=()):
        self.nodes = nodes
        self.outputs = list(outputs)


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


def emit_program(s: ShardedGraph, backend: Backend, model_name: str, opts: EmitOptions = EmitOptions(),
                 file_name: str = "program.py") -> str:
    """The whole generated program for sharded graph `s`."""
    e = Emitter(s, backend, model_name, opts, file_name)
    cls = identifier(opts.class_name)
    e.top_names = top_names(e)
    e.header()
    e.tables()
    for c in e.classes:
        e.block_class(c)
    e.model_class(cls)
    if s.zero.params:
        _emit_zero(e.w, s.zero, opts.precision == "bf16")
    _emit_checkpoint_specs(e.w, s)
    if e.pp:
        e.pp.main(e.w, s, e.backend, cls, opts, e.top_names, (_emit_checkpoint_args, _emit_checkpoint_resume, _emit_masters))
    else:
        _emit_main(e.w, s, e.backend, cls, opts, e.top_names)
    if e.regions_written != len(s.regions):        # a block class or reordering lost one
        raise AssertionError(f"the program checkpoints {e.regions_written} regions, the plan has "
                             f"{len(s.regions)}")
    return e.w.text()


def top_names(e: Emitter) -> dict:
    """Names of the top level's values. A loop's variable keeps one name through the loop:
    what the first block reads and what every block hands the next are named alike."""
    s = e.s
    nodes = [s.nodes[i] for i in e.order]

    def run_names(fixed: dict) -> Scope:
        scope = Scope(nodes, s.outputs)
        for v in s.inputs:
            scope.fix(v, identifier(v.name))
        for v, nm in fixed.items():
            scope.fix(v, nm)
        name_nodes(scope, nodes, "", s.outputs)
        return scope
    first = run_names({})
    fixed: dict = {}
    for c in e.classes:
        seen = set()
        for inst in c.instances:
            if inst.path in seen:
                continue
            run = e.run_from(c, inst)
            seen.update(r.path for r in run)
            carried = e.carried(run)
            for k, o in (carried or {}).items():
                nm = first.names.get(run[0].ext[k], "x")
                fixed[run[0].ext[k]] = nm
                for r in run:
                    fixed[r.outs[o]] = nm
    return run_names(fixed).names if fixed else first.names


def _emit_masters(w: Writer, inputs: str, s: ShardedGraph, skip: str) -> None:
    """bf16: fp32 masters of the trainable parameters (but `skip`, ZeRO's, whose chunks are
    their masters), taken before the module and the float inputs are cast."""
    w("# precision bf16: the module computes and communicates in bfloat16; the optimizer", 1)
    w("# steps fp32 masters of its trainable parameters (taken before the cast)", 1)
    w(f"masters = rt.MasterWeights(model{', skip=' + skip if skip else ''})", 1)
    comma = "," if len(s.inputs) == 1 else ""
    w(f"{inputs}{comma} = [rt.to_compute(t) for t in ({inputs}{comma})]  # float inputs in bf16", 1)


def _emit_zero(w: Writer, zero, bf16: bool = False) -> None:
    w("class ZeroShards:")
    w(f'"""ZeRO-{zero.stage} over `{zero.axis}`: each rank keeps the optimizer state of 1/{zero.axis} of every', 1)
    w("data-parallel parameter (flattened, padded to equal chunks), updates that chunk and", 1)
    w("all-gathers the parameter after the step. A gradient that is still a partial sum over", 1)
    if bf16:
        w(f"{zero.axis} (`partial`) is reduce-scattered; one already summed is just sliced.", 1)
        w("", 0)
        w("bf16: the chunks are taken before the module is cast, so they are the fp32 master", 1)
        w("weights' shards; gradients arrive in bf16 and are widened onto them, and the gather", 1)
        w('after the step sends the chunks rounded to bf16."""', 1)
    else:
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
    w("def reduce_grads(self, reduced=None):", 1)
    w('"""Each chunk\'s gradient; `reduced` holds the chunks the gradient buckets already', 2)
    w('reduce_scattered during backward."""', 2)
    w("n, me = self.mesh.size(self.axis), self.mesh.coord(self.axis)", 2)
    w("reduced = reduced or {}", 2)
    w("for name, p in self.params.items():", 2)
    w("chunk = self.chunks[name]", 3)
    widen = ".float()" if bf16 else ""
    w("if name in reduced:", 3)
    w(f"chunk.grad = reduced.pop(name){widen}", 4)
    w("p.grad = None", 4)
    w("continue", 4)
    w("flat = F.pad(p.grad.reshape(-1), (0, chunk.numel() * n - p.numel()))", 3)
    w("if name in self.partial:", 3)
    w(f"chunk.grad = self.mesh.reduce_scatter_flat(flat, self.axis){widen}", 4)
    w("else:", 3)
    w(f"chunk.grad = flat[me * chunk.numel():(me + 1) * chunk.numel()]{widen or '.clone()'}", 4)
    w("p.grad = None", 3)
    w()
    w("@torch.no_grad()", 1)
    w("def gather_params(self):", 1)
    w("for name, p in self.params.items():", 2)
    if bf16:
        w("full = self.mesh.all_gather_flat(self.chunks[name].detach().to(p.dtype), self.axis)  # bf16", 3)
    else:
        w("full = self.mesh.all_gather_flat(self.chunks[name], self.axis)", 3)
    w("p.copy_(full[:p.numel()].view_as(p))", 3)
    if bf16:
        w()
        w("@torch.no_grad()", 1)
        w("def full_masters(self):", 1)
        w('"""The fp32 masters whole (what a rank saves), gathered once after training."""', 2)
        w("return {name: self.mesh.all_gather_flat(self.chunks[name].detach(), self.axis)[:p.numel()].view(p.shape)", 2)
        w("        for name, p in self.params.items()}", 2)
    w()
    w()


def microbatched_inputs(s: ShardedGraph) -> set | None:
    """The inputs a microbatched plan splits (those whose dim 0 is the batch: the first
    input's symbolic dim 0), or None when the plan runs the batch whole."""
    if getattr(s.plan, "microbatches", 1) <= 1:
        return None
    sizes = s.graph.input_sizes
    first = (sizes.get(s.inputs[0].name) or [None])[0] if s.inputs else None
    if not (isinstance(first, str) and first.isidentifier()):
        raise InputError(f"a plan with {s.plan.microbatches} microbatches needs the batch size read "
                         "from the batch (a graph traced with symbolic sizes, as `autopar emit/run` "
                         "trace it); this graph's batch dim is fixed. Plan with microbatches 1.")
    n = s.global_shapes[s.inputs[0].name][0]
    return {v for v in s.inputs if isinstance((sizes.get(v.name) or [None])[0], str)
            and s.global_shapes[v.name] and s.global_shapes[v.name][0] == n}


# ---- training-state checkpoints (the runtime's rt.TrainingCheckpoint does the work) ----------

CHECKPOINT_KEYS = ("directory", "every", "keep", "async", "resume")


def checkpoint_header(plan) -> list[str]:
    """The header's lines on checkpoints: the plan's settings and the flags."""
    c = getattr(plan, "checkpoint", None) or {}
    lines = ["", "Checkpoints (sharded safetensors + index.json; a program of any plan resumes from them):"]
    if c.get("directory"):
        every = f"every {c['every']} steps and " if c.get("every") else ""
        keep = f", keeping the last {c['keep']}" if c.get("keep") else ""
        lines.append(f"    the plan saves {every}at the end to \"{c['directory']}\"{keep}"
                     f"{', asynchronously' if c.get('async') else ''} (--checkpoint, --every, --keep, --async)")
    else:
        lines.append("    --checkpoint DIR saves at the end (--every N steps too, --keep K, --async)")
    if c.get("resume"):
        lines.append(f"    the plan resumes from \"{c['resume']}\" when it holds a checkpoint (--resume DIR)")
    else:
        lines.append("    --resume DIR continues from the latest one in DIR")
    return lines


def _emit_checkpoint_specs(w: Writer, s: ShardedGraph) -> None:
    """`checkpoint_specs(model, full)`: where each tensor of this rank sits in the
    single-device state dict, the names and layouts a checkpoint is saved and read under."""
    pieces = bool(s.graph.pieces)
    w("def checkpoint_specs(model, full):")
    w('"""name -> rt.ShardSpec(global shape, layout, source) of every tensor of this rank\'s state', 1)
    w('dict; `source` places a piece of a fused weight in it (a checkpoint keeps the model\'s names)."""', 1)
    w("specs = {}", 1)
    w("for name in model.state_dict():", 1)
    w("layout = table_row(LAYOUTS, name)[0] or REPLICATED", 2)
    if pieces:
        w("row, block = table_row(PIECES, name)", 2)
        w("source = None", 2)
        w("if row is not None:", 2)
        w("src, dim, begin, end = row", 3)
        w("if block is not None:", 3)
        w('src = src.replace(f"{block[0]}.*.", f"{block[0]}.{block[1]}.", 1)', 4)
        w("source = (src, dim, begin, end)", 3)
        w("specs[name] = rt.ShardSpec(tuple(full_tensor(full, name).shape), layout, source=source)", 2)
    else:
        w("specs[name] = rt.ShardSpec(tuple(full[name].shape), layout)", 2)
    w("return specs", 1)
    w()
    w()


def _emit_checkpoint_args(w: Writer, s: ShardedGraph) -> None:
    c = {k: v for k, v in (getattr(s.plan, "checkpoint", None) or {}).items() if k in CHECKPOINT_KEYS}
    w(f"rt.add_checkpoint_args(parser, {c!r})  # --checkpoint, --every, --keep, --async, --resume", 1)


def _emit_checkpoint_resume(w: Writer, opts: EmitOptions, zero: bool, specs: str = "checkpoint_specs(model, full)",
                            extra: str = "") -> None:
    plan_file = opts.init_file.removesuffix(".init.safetensors") + ".plan.json"
    zero_args = (", zero_chunks=zero.chunks, zero_axis=zero.axis" if zero else "") + extra
    w(f"ckpt = rt.TrainingCheckpoint(args, mesh, model, optimizer, {specs}"
      f"{zero_args},", 1)
    w(" " * len("ckpt = rt.TrainingCheckpoint(") + f"plan=os.path.join(os.path.dirname(__file__), {plan_file!r}))", 1)
    w("start = ckpt.resume()  # 0, or the steps the --resume checkpoint was saved after", 1)
    # the specs were the single-device state dict's last reader: it would otherwise stay
    # alive through training, the whole model on every rank
    w("del full, example  # every rank holds its shards now: the whole model's tensors go", 1)


def _emit_main(w: Writer, s: ShardedGraph, backend: Backend, cls: str, opts: EmitOptions, names) -> None:
    mesh, zero = s.mesh, s.zero
    loss = s.outputs[0]
    partial = [a for a, p in zip(mesh, s.layouts[loss.name]) if p == "P"]
    w("def main():")
    w("parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])", 1)
    w(f'parser.add_argument("--init", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), {opts.init_file!r}),', 1)
    w('help="the full state dict and the example batch (safetensors, rt.save_init)")', 5)
    w(f'parser.add_argument("--steps", type=int, default={opts.steps})', 1)
    w(f'parser.add_argument("--optimizer", choices=["sgd", "adamw"], default={opts.optimizer!r})', 1)
    w(f'parser.add_argument("--lr", type=float, default={opts.lr!r})', 1)
    w(f'parser.add_argument("--device", choices=["cpu", "cuda"], default={opts.device!r})', 1)
    w('parser.add_argument("--save", default="shards", help="directory for each rank\'s final shards")', 1)
    w('parser.add_argument("--stats", default=None, help="write losses, bytes and times to STATS.rank<r>.json")', 1)
    if microbatched_inputs(s) is not None:
        w(f'parser.add_argument("--microbatches", type=int, default={s.plan.microbatches}, '
          'help="split each rank\'s batch into this many microbatches")', 1)
    w('parser.add_argument("--timeline", default=None, help="write the last step\'s trace and hidden communication to DIR")', 1)
    _emit_checkpoint_args(w, s)
    w("args = parser.parse_args()", 1)
    w()
    w("rt.one_thread()", 1)
    w(f'mesh = rt.init_mesh(MESH, backend="{backend.runtime}", device=args.device)', 1)
    w("full, example = rt.load_init(args.init)  # safetensors: nothing is unpickled", 1)
    w(f"model = {cls}(mesh)", 1)
    w("model.load_full_state_dict(full)", 1)
    w("model.to(mesh.device)", 1)
    inputs = ", ".join(names[v] for v in s.inputs)
    w(f"{inputs}{',' if len(s.inputs) == 1 else ''} = [shard(t, name, mesh).to(mesh.device)", 1)
    w(f"{' ' * (len(inputs) + 4)}for name, t in zip(INPUTS, example)]", 1)
    w()
    bf16 = opts.precision == "bf16"
    if bf16 and not zero.params:
        _emit_masters(w, inputs, s, "")
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
        if bf16:
            _emit_masters(w, inputs, s, "zero.params")
            w("trainable = [*zero.chunks.values(), *masters.params()]  # fp32", 1)
        else:
            w("trainable = [*zero.chunks.values(),", 1)
            w("             *[p for name, p in params.items() if p.requires_grad and name not in zero.params]]", 1)
    elif bf16:
        w("trainable = masters.params()  # fp32", 1)
    else:
        w("trainable = [p for p in model.parameters() if p.requires_grad]", 1)
    w('if args.optimizer == "adamw":', 1)
    w("optimizer = torch.optim.AdamW(trainable, lr=args.lr, fused=True)  # one pass over each tensor's state", 2)
    w("else:", 1)
    w("optimizer = torch.optim.SGD(trainable, lr=args.lr, momentum=0.9)", 2)
    _emit_checkpoint_resume(w, opts, bool(zero.params), extra=", masters=masters" if bf16 else "")
    w()
    # the last gradient buckets finish behind the optimizer step: the other parameters step
    # while they are in flight (a ZeRO or mixed-precision step needs every gradient first)
    step_behind = bool(s.overlap is not None and s.overlap.buckets and not zero.params and not bf16)
    w("losses, traffic, calls, times = [], [], [], []", 1)
    if step_behind:
        w("# backward leaves its last gradient buckets in flight; model.grad_buckets.step steps the", 1)
        w("# parameters of the reduced ones while those finish, then the rest", 1)
        w("model.grad_buckets.defer = True", 1)
    w("timeline = rt.Timeline(mesh, args.timeline, args.steps)  # --timeline DIR: the last step, profiled", 1)
    w("for step in range(start, start + args.steps):", 1)
    w("mesh.reset_traffic()", 2)
    w("timeline.begin(step)", 2)
    w("t0 = time.perf_counter()", 2)
    what = f"partial sum over {', '.join(partial)}" if partial else "replicated"
    if s.overlap is not None and s.overlap.buckets:
        backward = "loss.backward()  # activations' collectives run inside backward; gradient buckets reduce behind it"
    else:
        backward = "loss.backward()  # gradients synchronise inside the collectives' backward"
    m = microbatched_inputs(s)
    if m is None:
        w(f"loss = model({inputs})  # this rank's loss ({what})", 2)
        w(backward, 2)
    else:
        chunked = ", ".join(f"{names[v]}.chunk(m)[mb]" if v in m else names[v] for v in s.inputs)
        w("m, step_loss = args.microbatches, 0.0", 2)
        first = names[s.inputs[0]]
        w(f'assert {first}.shape[0] % m == 0, f"this rank\'s batch of {{{first}.shape[0]}} does not split into {{m}} microbatches"', 2)
        w("for mb in range(m):", 2)
        w("# microbatch mb of m: the gradients add up over the microbatches and are reduced once, after the last", 3)
        w("with model.no_sync() if mb < m - 1 else contextlib.nullcontext():", 3)
        w(f"loss = model({chunked}) / m  # this rank's loss ({what}), 1/m of it", 4)
        w(backward, 4)
        w("step_loss += loss.item()", 3)
    if zero.params:
        if s.overlap is not None and s.overlap.scattered():
            w("zero.reduce_grads(model.grad_buckets.reduced)  # ZeRO-2's chunks came from the buckets", 2)
        else:
            w("zero.reduce_grads()", 2)
    if bf16:
        w("masters.grads_to_masters()  # bf16 gradients (already reduced) widened onto the fp32 masters", 2)
    if step_behind:
        w("model.grad_buckets.step(optimizer)  # optimizer.step(), the last buckets' all_reduce hidden behind it", 2)
    else:
        w("optimizer.step()", 2)
    w("optimizer.zero_grad(set_to_none=True)", 2)
    if bf16:
        w("masters.refresh()  # bf16 weights rounded from the stepped masters", 2)
    if zero.params:
        w("zero.gather_params()", 2)
    w("times.append(time.perf_counter() - t0)", 2)
    w("timeline.end(step)", 2)
    red = "loss.item()" if m is None else "step_loss"
    for a in partial:
        red = f'mesh.all_reduce_scalar({red}, "{a}")'
    w(f"losses.append({red})  # the global loss", 2)
    w('traffic.append({f"{kind}:{axis}": b for (kind, axis), b in sorted(mesh.traffic.items())})', 2)
    w('calls.append(collections.Counter(f"{e.kind}:{e.axis}" for e in mesh.events))', 2)
    w('rt.log(mesh, f"step {step}: loss {losses[-1]:.6f} ({times[-1] * 1e3:.1f} ms)")', 2)
    w("ckpt.step_done(step + 1)  # saves every --every steps", 2)
    w("ckpt.finish(start + args.steps)  # the last save; waits for background writers", 1)
    w()
    w("timeline.write()", 1)
    w("peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # training's peak: before the final save", 1)
    w("os.makedirs(args.save, exist_ok=True)", 1)
    state, note = ("model.state_dict()", "")
    if bf16:
        state, note = (f"masters.state_dict({'zero.full_masters()' if zero.params else ''})", "  # the fp32 masters")
    w(f'rt.save_file(os.path.join(args.save, f"rank{{mesh.rank}}.safetensors"), {state}){note}', 1)
    w("if args.stats:", 1)
    w('with open(f"{args.stats}.rank{mesh.rank}.json", "w") as f:', 2)
    w('json.dump({"rank": mesh.rank, "coords": mesh.coords, "losses": losses, "traffic": traffic, "calls": calls,', 3)
    w('"times": times, "max_rss_kib": peak_kib,', 3 + 2)
    w('"checkpoint": ckpt.stats()}, f)', 3 + 2)
    w("mesh.shutdown()", 1)
    w()
    w()
    w('if __name__ == "__main__":')
    w("main()", 1)


__all__ = ["Backend", "BACKENDS", "backend_named", "EmitOptions", "emit_program", "module_var",
           "shape_comment", "find_blocks"]

"""The ONNX front end: an `.onnx` file becomes autopar's IR, with the same ops the torch
front end produces (`linear`, `layer_norm`, `embedding`, `softmax`, `cross_entropy_loss`,
views...), so plans, plan files and programs are shared.

    >>> module, inputs, name = load_onnx("gpt.onnx", "gpt.npz")      # doctest: +SKIP
    >>> graph = trace(module, inputs)        # the lowered graph (a copy), not a trace

What the lowering does, in order:
- initializers: a floating-point tensor with more than one element and no huge values is a
  trainable parameter; integer tensors, scalars and masks (values near the float limit)
  are constants (buffers). torch.onnx's exporter records real parameters in `value_info`
  (`pkg.torch.export.graph_signature.InputSpec.kind`); its constant folding makes others
  (`val_8` = a transposed weight) and its de-duplication merges equal tensors (every zero
  bias of a fresh model becomes one initializer). A merged tensor (all elements equal,
  used in several places) gets one copy per use, so each module trains its own.
- buffers the exporter folded: ONNX has no parameter/buffer distinction, and a table the
  exporter's optimizer computed (value_info `pkg.onnxscript.optimizer.folded_from`) has no
  record. Such a table trains when it is read as a parameter is -- a MatMul/Gemm operand
  (the transposed copy `val_N` of a weight), a Gather's table, an Add (GPT's position table
  `embedding_1`, folded from `wpe.weight[arange(T)]`) -- or when one of its sources is
  recorded as a parameter. Read only as a factor of elementwise `Mul`s, it is what a torch
  model keeps as a buffer (Llama's rope `cos`/`sin` slices, 0/1 masks) and stays a frozen
  constant. Weights are folded by data movement only and end in a matmul, gather or sum;
  tables multiplied into activations are positions and masks. The exception -- a
  parameter folded by a reshape and only multiplied (a layer-scale `gamma.view(1, C, 1,
  1)`) -- is frozen by this rule: the graph's notes list every folded table kept frozen,
  and exporting with `optimize=False` keeps every initializer's record.
- names: a parameter the exporter renamed is named after the module that uses it and its
  role there (`transformer.h.0.attn.c_attn.weight`), from the node's
  `pkg.torch.onnx.name_scopes`; the same metadata gives every node its module path, so
  repeated blocks are linked in the search.
- `MatMul` by a weight (`Transpose` of one, or a folded `(k, n)` tensor, which is stored
  transposed as `(n, k)`), with the `Add` of a bias after it, and `Gemm` become `linear`:
  the search shards them column/row-parallel as it does the torch graph's.
- shape arithmetic (`Shape`, `Gather` on shapes, `Concat`, `Range`, `Trilu` of constants,
  ...) is folded to constants by running the node on them.
- what the exporter writes out comes back as the op torch's graph has, under torch's names
  and with the scalars and attributes torch records (`sqrt` -> `reciprocal` is `rsqrt`,
  `x * sigmoid(x)` is `silu`, `mean((a - b)^2)` is `mse_loss`, a Transpose of two dims is
  `transpose`, equal Split pieces `split` named `split_0...`, `1e-05` not its float32
  rounding): the same IR gives the same plan as the torch front end's.
- a node with no lowering becomes an opaque `onnx.<Op>` node, replicated on every rank,
  with a warning naming it. The single-device run and the generated program both evaluate
  it with ONNX's reference implementation (`compiler/onnx_node.py`). It has no
  gradient: a graph where a parameter would train through one is refused, naming the node.
"""
from __future__ import annotations

import ast
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from autopar.compiler.errors import UserError
from autopar.compiler.interpret import IRModule
from autopar.compiler.ir import Graph, Value
from autopar.compiler.ops import REGISTRY, OpDef
from autopar.frontends.lower import Builder

aten = torch.ops.aten

# ONNX TensorProto element types -> torch dtypes (the ones models train with)
DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32,
          7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}
TensorProto_FLOAT = 1
MASK_LIMIT = 1e30          # |x| at or above this marks a mask, not a weight
SCOPES = "pkg.torch.onnx.name_scopes"
KIND = "pkg.torch.export.graph_signature.InputSpec.kind"
SDPA = "aten.scaled_dot_product_attention.default"
FOLDED = "pkg.onnxscript.optimizer.folded_from"


class OnnxError(UserError):
    """The ONNX file or its inputs cannot be used: the message names the file, node or
    input and the fix."""


# ---- loading ------------------------------------------------------------------------------------

def load_onnx(path: str, inputs_npz: str | None = None):
    """Read `path`, lower it, and return `(module, example_inputs, name)`: `module` is an
    `IRModule` (its parameters are the trainable initializers), the inputs come from
    `inputs_npz` (arrays by graph input name) or, without it, are made from the input
    types (a note in the graph says so).

        >>> model, inputs, name = load_onnx("mlp.onnx", "mlp.npz")   # doctest: +SKIP
    """
    import onnx
    if not os.path.isfile(path):
        raise OnnxError(f"SPEC '{path}': no such file (from {os.getcwd()}). Check the path.")
    try:
        proto = onnx.load(path)
    except Exception as e:
        raise OnnxError(f"{path} is not an ONNX model ({type(e).__name__}: {first_line(e)}). "
                        "Give a file written by onnx.save or torch.onnx.export.") from e
    if not proto.graph.node:
        raise OnnxError(f"{path} is not an ONNX model (no graph nodes). Give a file written by "
                        "onnx.save or torch.onnx.export.")
    name = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    inits = {t.name for t in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in inits]
    notes = []
    if inputs_npz is not None:
        inputs = _inputs_from_npz(path, inputs_npz, graph_inputs)
    else:
        inputs, note = _made_inputs(path, proto, graph_inputs)
        notes.append(note)
    graph, tensors, loss_name = lower_onnx(proto, path, name, inputs)
    graph.notes[:0] = notes
    # a class per model, so the generated program reads `GptOnnx` / `GptOnnxShard`
    cls = type("".join(w.capitalize() for w in name.split("_") if w) + "Onnx", (IRModule,),
               {"__module__": __name__, "__doc__": f"{os.path.basename(path)} as a trainable module"})
    module = cls(graph, tensors, reference=OnnxReference(proto, graph_inputs, [loss_name]))
    return module, inputs, name


def _inputs_from_npz(path: str, npz: str, graph_inputs) -> tuple:
    if not os.path.isfile(npz):
        raise OnnxError(f"--inputs {npz}: no such file. Save the example inputs with "
                        "numpy.savez(FILE, name=array, ...) under the graph's input names.")
    try:
        data = np.load(npz)
    except Exception as e:
        raise OnnxError(f"--inputs {npz} is not a .npz file ({first_line(e)}); write it with "
                        "numpy.savez(FILE, name=array, ...)") from e
    out = []
    for vi in graph_inputs:
        if vi.name not in data.files:
            raise OnnxError(f"--inputs {npz}: no array for the input '{vi.name}' of {path} (the "
                            f"file has {', '.join(data.files) or 'no arrays'}). Save one under that "
                            f"name: numpy.savez(FILE, {vi.name}=array, ...).")
        arr = data[vi.name]
        want = _declared_shape(vi)
        if len(want) != arr.ndim or any(w is not None and w != s for w, s in zip(want, arr.shape)):
            shown = "[" + ",".join("?" if w is None else str(w) for w in want) + "]"
            raise OnnxError(f"--inputs {npz}: '{vi.name}' has shape {list(arr.shape)}, but {path} "
                            f"declares {shown}. Save an array of the declared shape.")
        out.append(torch.from_numpy(np.ascontiguousarray(arr)))
    extra = sorted(set(data.files) - {vi.name for vi in graph_inputs})
    if extra:
        raise OnnxError(f"--inputs {npz}: arrays {', '.join(extra)} name no input of {path} (its "
                        f"inputs: {', '.join(vi.name for vi in graph_inputs)}). Remove or rename them.")
    return tuple(out)


def _declared_shape(vi) -> list[int | None]:
    tt = vi.type.tensor_type
    return [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]


def _made_inputs(path: str, proto, graph_inputs) -> tuple[tuple, str]:
    """Inputs from the declared types: floats ~ N(0, 1); integers below the size of the
    table they index (a Gather's data, a loss's classes), else below 2."""
    bounds = _index_bounds(proto)
    gen = torch.Generator().manual_seed(0)
    out, made = [], []
    for vi in graph_inputs:
        shape = _declared_shape(vi)
        if any(s is None for s in shape):
            dims = ", ".join(d.dim_param or "?" for d in vi.type.tensor_type.shape.dim
                             if not d.HasField("dim_value"))
            raise OnnxError(f"{path}: input '{vi.name}' has dynamic dims ({dims}); autopar plans "
                            "static shapes. Give example inputs with --inputs FILE.npz "
                            f"(numpy.savez(FILE, {vi.name}=array, ...)).")
        dtype = DTYPES.get(vi.type.tensor_type.elem_type)
        if dtype is None:
            raise OnnxError(f"{path}: input '{vi.name}' has ONNX element type "
                            f"{vi.type.tensor_type.elem_type}, which autopar does not train with; "
                            "give --inputs FILE.npz or export with float32/int64 inputs")
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dtype))
            made.append(f"{vi.name} ~ N(0,1)")
        elif dtype == torch.bool:
            out.append(torch.randint(0, 2, shape, generator=gen).bool())
            made.append(f"{vi.name} random bool")
        else:
            hi = bounds.get(vi.name, 2)
            out.append(torch.randint(0, hi, shape, generator=gen).to(dtype))
            made.append(f"{vi.name} in [0, {hi})")
    note = (f"onnx: no --inputs given; example inputs made from the declared types "
            f"({'; '.join(made)})")
    return tuple(out), note


def _index_bounds(proto) -> dict[str, int]:
    """Graph input -> the size of the table it indexes, following shape-only ops."""
    shapes = {}
    for vi in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output):
        shapes[vi.name] = _declared_shape(vi)
    for t in proto.graph.initializer:
        shapes[t.name] = list(t.dims)
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i, x in enumerate(n.input):
            consumers.setdefault(x, []).append((n, i))
    passthrough = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Identity", "Transpose"}

    def bound(name, seen=()):
        best = None
        for n, i in consumers.get(name, []):
            b = None
            if n.op_type == "Gather" and i == 1:
                axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                data = shapes.get(n.input[0])
                b = data[axis] if data and data[axis] else None
            elif n.op_type in ("SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss") and i == 1:
                sc = shapes.get(n.input[0])
                b = sc[1] if sc and len(sc) > 1 else None
            elif n.op_type in passthrough and i == 0 and n.output[0] not in seen:
                b = bound(n.output[0], seen + (n.output[0],))
            if b:
                best = b if best is None else min(best, b)
        return best
    return {vi.name: b for vi in proto.graph.input if (b := bound(vi.name))}


class OnnxReference:
    """The graph's own outputs, by `onnx.reference.ReferenceEvaluator` (the ground truth
    `--verify` compares the lowered IR with)."""

    def __init__(self, proto, graph_inputs, output_names: list[str]):
        self.proto = proto
        self.input_names = [vi.name for vi in graph_inputs]
        self.output_names = list(output_names)
        self.names = [o.name for o in proto.graph.output]

    def __call__(self, *inputs):
        from onnx.reference import ReferenceEvaluator
        ev = ReferenceEvaluator(self.proto)
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, inputs)}
        outs = ev.run(None, feeds)
        by_name = dict(zip(self.names, outs))
        got = [torch.from_numpy(np.asarray(by_name[n])) for n in self.output_names]
        return got[0] if len(got) == 1 else tuple(got)


# ---- lowering -----------------------------------------------------------------------------------

@dataclass
class Init:
    """An initializer not yet used: it becomes a parameter (or constant) at its first use,
    named after that use's module and role. `transposed`: seen through a 2-D Transpose."""
    name: str
    transposed: bool = False


def lower_onnx(proto, path: str, name: str, inputs: tuple) -> tuple[Graph, dict[str, torch.Tensor], str]:
    """The autopar Graph of an ONNX model (outputs: its scalar loss), the tensors of its
    trainable parameters by name, and the ONNX name of the loss. `inputs` fix the input
    shapes."""
    return _Lowering(proto, path, name).run(inputs)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def py_scalar(c) -> float | int | bool:
    """A one-element constant as the Python number a torch model would have written: a
    float32 as its shortest decimal (`1e-05`, not `9.999999747378752e-06`), which is the
    same float32 value."""
    x = np.asarray(c).reshape(-1)[0]
    if isinstance(x, np.floating) and x.dtype.itemsize <= 4:
        return float(str(x))
    return x.item()


def ir_name(name: str) -> str:
    """An ONNX tensor name as an IR value name (`val_154/shape` -> `val_154_shape`)."""
    return re.sub(r"[^0-9A-Za-z_.]", "_", name) or "v"


class _Lowering:
    def __init__(self, proto, path: str, name: str):
        import onnx
        from onnx import numpy_helper
        self.onnx = onnx
        self.proto = proto
        self.path = path
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        if self.opset and not 13 <= self.opset <= 28:
            warnings.warn(f"autopar: {path} uses opset {self.opset}; the ONNX front end is written "
                          "for opsets 17-23", stacklevel=3)
        self.b = Builder(name, nn.Module())
        g = proto.graph
        self.arrays = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in g.node:            # Constant nodes are initializers by another name
            if n.op_type == "Constant":
                self.arrays[n.output[0]] = self._constant_value(n)
        self.recorded = {}
        self.folded_from: dict[str, list[str]] = {}   # initializer -> what the exporter folded
        for vi in g.value_info:
            md = {p.key: p.value for p in vi.metadata_props}
            if KIND in md:
                self.recorded[vi.name] = md[KIND]
            if FOLDED in md:
                try:
                    self.folded_from[vi.name] = [str(x) for x in ast.literal_eval(md[FOLDED])]
                except (ValueError, SyntaxError):
                    self.folded_from[vi.name] = []
        self.folded_tables: dict[str, str] = {}        # folded initializer -> why it is frozen
        # every node gets a name (rewrites skip nodes by name; messages name them)
        taken = {n.name for n in g.node if n.name}
        for k, n in enumerate(g.node):
            if not n.name:
                n.name = next(c for c in (f"{n.op_type}_{k}", f"{n.op_type}_{k}_") if c not in taken)
                taken.add(n.name)
        self.uses: dict[str, int] = {}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for x in n.input:
                if x:
                    self.uses[x] = self.uses.get(x, 0) + 1
                    self.consumers.setdefault(x, []).append(n)
        self.graph_outputs = {o.name for o in g.output}
        self.env: dict[str, Any] = {}          # onnx name -> Value | np.ndarray | Init | list
        self.tensors: dict[str, torch.Tensor] = {}
        self.param_of: dict[tuple, Value] = {}  # (initializer, transposed) -> parameter
        self.copies: dict[str, list[str]] = {}  # merged initializer -> its per-use copies
        self.renamed: list[str] = []
        self.frozen_consts: list[str] = []
        self.unrecorded: list[str] = []         # trained without the exporter's record
        self.fused: list[str] = []              # modules whose attention became one op
        self.tied: list[str] = []               # folded copies that are another parameter
        self.tried: set[str] = set()            # nodes of attention groups already matched
        from onnx import numpy_helper
        self.numpy_helper = numpy_helper
        self.skip: set[str] = set()             # nodes already lowered with an earlier one
        self.scope_of: dict[str, str] = {}      # onnx value -> module of its producer

    # -- entry --

    def run(self, inputs: tuple):
        g = self.proto.graph
        inits = set(self.arrays)
        for t in g.initializer:
            self.env[t.name] = Init(t.name)
        graph_inputs = [i for i in g.input if i.name not in inits]
        for vi, t in zip(graph_inputs, inputs):
            v = Value(self.b.fresh(ir_name(vi.name)), tuple(t.shape), t.dtype, "input")
            self.b.inputs.append(v)
            self.env[vi.name] = v
        nodes = list(g.node)
        i = 0
        while i < len(nodes):
            node = nodes[i]
            if self.torch_op(node) == SDPA and node.name not in self.tried:
                group = self._group(nodes, i)
                self.tried.update(n.name for n in group)
                if self.fuse_attention(group):
                    i += len(group)
                    continue
            if node.op_type == "Constant":
                self.bind(node, self.arrays[node.output[0]])
            elif node.name not in self.skip:
                self.lower_node(node)
            i += 1
        loss = self._loss_output()
        self._refuse_gradients_through_opaque_nodes()
        graph = self.b.graph([loss])
        graph.constants = self.b.constants
        notes = []
        others = [o.name for o in g.output if self.env.get(o.name) is not loss]
        if others:
            notes.append(f"onnx: trains on the scalar output '{loss.name}'; the other outputs "
                         f"({', '.join(others)}) are not part of the training step")
        if self.renamed:
            notes.append("onnx: parameters named after the module that uses them (the exporter "
                         "folded or renamed them): " + ", ".join(self.renamed))
        for src, names in self.copies.items():
            if len(names) > 1:
                notes.append(f"onnx: initializer {src} (all elements equal) is used by "
                             f"{len(names)} modules, merged by the exporter; each trains its own "
                             f"copy: {', '.join(names)}")
        if self.tied:
            notes.append("onnx: initializers equal to a parameter (copies the exporter folded) "
                         "share it, a tied weight: " + ", ".join(self.tied))
        if self.fused:
            notes.append(f"onnx: {len(self.fused)} attention blocks written out by the exporter "
                         "lowered as scaled_dot_product_attention (checked numerically): "
                         + ", ".join(self.fused[:3]) + (", ..." if len(self.fused) > 3 else ""))
        if self.unrecorded:
            notes.append("onnx: initializers with no parameter record (folded by the exporter), "
                         "trained as parameters: " + ", ".join(self.unrecorded))
        if self.folded_tables:
            notes.append("onnx: tables the exporter folded, read only as factors of a Mul (rope "
                         "tables, masks: a torch model's buffers), are constants, not trained: "
                         + ", ".join(f"{ir_name(k)} (from {v})" for k, v in self.folded_tables.items())
                         + "; to train one, export with optimize=False, which keeps the "
                         "exporter's parameter records")
        if self.frozen_consts:
            notes.append("onnx: constants (integer, scalar or mask initializers, not trained): "
                         + ", ".join(self.frozen_consts))
        graph.notes.extend(notes)
        return graph, self.tensors, self.loss_onnx_name

    def _refuse_gradients_through_opaque_nodes(self) -> None:
        """An opaque node has no gradient: refuse a graph where a trainable parameter's
        gradient would have to pass through one (it would silently not train)."""
        grad: dict[str, str] = {v.name: v.name for v in self.b.params if v.kind == "param"}
        for n in self.b.nodes:
            src = next((grad[v.name] for v in n.inputs if v.name in grad), None)
            if src is None:
                continue
            floats = [o for o in n.outputs if o.dtype.is_floating_point]
            if n.op.startswith("onnx.") and floats:
                raise OnnxError(
                    f"{self.path}: ONNX node '{n.meta.source}' ({n.op[5:]}, module "
                    f"{n.meta.module or 'root'}) has no lowering and no gradient, but the "
                    f"parameter '{src}' before it trains through it. autopar runs such a node "
                    "forward only (ONNX's reference implementation). Export the model with "
                    "ops the front end lowers (frontends/onnx.py lists them), or apply this op "
                    "to the inputs only, before any parameter, where no gradient is needed.")
            for o in floats:
                grad[o.name] = src

    def _loss_output(self) -> Value:
        for o in self.proto.graph.output:
            v = self.env.get(o.name)
            if isinstance(v, Value) and v.shape == () and v.dtype.is_floating_point:
                self.loss_onnx_name = o.name
                return v
        shown = ", ".join(f"{o.name}: {self._describe(self.env.get(o.name))}"
                          for o in self.proto.graph.output)
        raise OnnxError(f"{self.path}: no scalar output to train on (outputs: {shown}). Export the "
                        "model with its loss, e.g. a forward that returns F.cross_entropy(...), "
                        "so the graph's first scalar float output is the loss.")

    @staticmethod
    def _describe(v) -> str:
        if isinstance(v, Value):
            return v.type_str()
        if isinstance(v, np.ndarray):
            return f"constant {v.dtype}{list(v.shape)}"
        return "not computed"

    # -- metadata --

    def module_of(self, node) -> str:
        md = {p.key: p.value for p in node.metadata_props}
        scopes = md.get(SCOPES)
        if scopes:
            try:
                parts = ast.literal_eval(scopes)
            except (ValueError, SyntaxError):
                parts = []
            mods = [p for p in parts[:-1] if p]
            if mods:
                return mods[-1]
            if parts:
                return ""
        for x in node.input:        # a node the exporter's optimizer made: its producer's
            if x in self.scope_of:
                return self.scope_of[x]
        return ""

    def torch_op(self, node) -> str:
        """The ATen op the node was exported from (`aten.linear.default`), '' if unknown."""
        md = {p.key: p.value for p in node.metadata_props}
        ns = md.get("namespace", "")
        return ns.rsplit(": ", 1)[-1] if ": " in ns else ""

    # -- values --

    def const(self, name: str):
        """The numpy value of `name` if it is known at lowering time, else None."""
        v = self.env.get(name)
        if isinstance(v, np.ndarray):
            return v
        if isinstance(v, Init) and not self.trainable(v.name):
            a = self.arrays[v.name]
            return a.T if v.transposed else a
        return None

    def trainable(self, init: str) -> bool:
        kind = self.recorded.get(init)
        if kind == "PARAMETER":
            return True
        if kind is not None:          # BUFFER, CONSTANT_TENSOR
            return False
        a = self.arrays[init]
        users = self.consumers.get(init, [])
        if users and all(n.op_type == "Cast" and not DTYPES.get(self.attrs(n).get("to"), torch.float32)
                         .is_floating_point for n in users):
            return False              # a mask or index table stored as floats
        if not (np.issubdtype(a.dtype, np.floating) and a.size > 1
                and bool(np.all(np.abs(a) < MASK_LIMIT))):
            return False
        if init in self.folded_from and users and all(n.op_type == "Mul" for n in users) and not any(
                self.recorded.get(x) == "PARAMETER" for x in self.folded_from[init]):
            # a table the exporter computed from constants, read only as a factor: rope
            # cos/sin, a 0/1 mask -- what a torch model keeps as a buffer (module docstring)
            named = [x for x in self.folded_from[init] if not re.fullmatch(r"val_\d+", x)]
            self.folded_tables.setdefault(init, ", ".join(named) or "constants")
            return False
        return True

    def tensor(self, name: str, node, role: str | None = None, want_transposed: bool = False) -> Value:
        """The IR Value of ONNX tensor `name` as `node` uses it; `role` names a parameter
        (`weight`, `bias`) by its use, `want_transposed`: the use needs the initializer
        transposed (stored (n, k) for a (k, n) MatMul operand)."""
        v = self.env.get(name)
        if isinstance(v, Value):
            return v
        if isinstance(v, Init):
            if not self.trainable(v.name):
                return self.buffer(name, self.const(name))
            return self.param(v, node, role, want_transposed)
        if isinstance(v, np.ndarray):
            return self.buffer(name, v)
        raise OnnxError(f"{self.path}: node '{node.name}' ({node.op_type}) reads '{name}', which "
                        "no earlier node computes (the graph is not in topological order, or the "
                        "name is misspelt). Re-export the model or run onnx.checker on it.")

    def buffer(self, name: str, arr: np.ndarray) -> Value:
        key = ir_name(name)
        if key in self.b.param_by_name:
            return self.b.param_by_name[key]
        t = torch.from_numpy(np.array(arr))
        self.b.constants[key] = t
        v = Value(key, tuple(t.shape), t.dtype, "buffer")
        self.b.used_names.add(key)
        self.b.param_by_name[key] = v
        self.b.params.append(v)
        if name in self.arrays and name not in self.folded_tables:
            self.frozen_consts.append(key)
        return v

    def param(self, ref: Init, node, role, want_transposed: bool) -> Value:
        arr = self.arrays[ref.name]
        transposed = ref.transposed != want_transposed       # store the tensor transposed
        module = self.module_of(node)
        uniform = arr.size > 1 and bool(np.all(arr == arr.flat[0]))
        merged = uniform and self.uses.get(ref.name, 0) > 1
        key = (ref.name, transposed, module if merged else None)
        if key in self.param_of:
            return self.param_of[key]
        if (ref.name, not transposed, None) in self.param_of and not merged:
            # one tensor used both ways: keep one parameter, a view for the other use
            base = self.param_of[(ref.name, not transposed, None)]
            v = self.b.emit_op(aten.t.default, [base], {}, self.b.fresh(ir_name(ref.name) + "_t"),
                               module)
            self.param_of[key] = v
            return v
        t = torch.from_numpy(np.array(arr.T if transposed else arr))
        if not uniform:
            # a folded copy of a parameter (the exporter's `W.T` of a tied weight): the same
            # values, so the same tensor -- keep the tie
            twin = next((p for p in self.b.params if p.kind == "param" and p.shape == t.shape
                         and torch.equal(self.tensors[p.name], t)), None)
            if twin is not None:
                self.param_of[key] = twin
                self.tied.append(f"{ref.name}{' (transposed)' if transposed else ''} = {twin.name}")
                return twin
        name = self.param_name(ref.name, module, role, merged)
        if transposed and name == ir_name(ref.name):
            name = self.b.fresh(name + "_t")     # the name says it is not the ONNX tensor
        v = Value(name, tuple(t.shape), t.dtype, "param", True)
        self.b.used_names.add(name)
        self.b.param_by_name[name] = v
        self.b.params.append(v)
        self.tensors[name] = t
        self.param_of[key] = v
        if merged:
            self.copies.setdefault(ref.name, []).append(name)
        elif name == ref.name and ref.name not in self.recorded:
            self.unrecorded.append(name)
        if not merged and name != ref.name:
            self.renamed.append(f"{ref.name} -> {name}" + (" (transposed)" if transposed else ""))
        return v

    def param_name(self, init: str, module: str, role: str | None, merged: bool) -> str:
        named = init in self.recorded or "." in init       # a state-dict name, not val_N
        leaf = init.rsplit(".", 1)[-1] if "." in init else role
        if named and not merged:
            cand = ir_name(init)
        elif module and leaf:
            cand = f"{module}.{leaf}"
        else:
            cand = ir_name(init)
        if cand in self.b.used_names:
            cand = self.b.fresh(cand)
        return cand

    # -- emission --

    def emit(self, target, args, kwargs, node, out: str | None = None):
        out = out if out is not None else node.output[0]
        v = self.b.emit_op(target, args, kwargs, ir_name(out), self.module_of(node))
        return v

    def bind(self, node, value) -> None:
        outs = value if isinstance(value, list) else [value]
        module = self.module_of(node)
        for o, v in zip(node.output, outs):
            if o:
                self.env[o] = v
                self.scope_of[o] = module

    def attrs(self, node) -> dict[str, Any]:
        h = self.onnx.helper
        out = {}
        for a in node.attribute:
            val = h.get_attribute_value(a)
            out[a.name] = val.decode() if isinstance(val, bytes) else val
        return out

    def _constant_value(self, node) -> np.ndarray:
        from onnx import numpy_helper
        a = {x.name: x for x in node.attribute}
        if "value" in a:
            return numpy_helper.to_array(a["value"].t)
        for k, dt in (("value_float", np.float32), ("value_int", np.int64)):
            if k in a:
                return np.array(self.onnx.helper.get_attribute_value(a[k]), dtype=dt)
        for k, dt in (("value_floats", np.float32), ("value_ints", np.int64)):
            if k in a:
                return np.array(self.onnx.helper.get_attribute_value(a[k]), dtype=dt)
        return self.fold(node, [])[0]

    def fold(self, node, values: list[np.ndarray]) -> list[np.ndarray]:
        """Run one node on constant inputs (ONNX's reference implementation)."""
        from onnx.reference import ReferenceEvaluator
        h = self.onnx.helper
        names = [f"in{i}" for i in range(len(values))]
        ins = [x if x else "" for x in node.input]
        feeds, k = {}, 0
        inputs = []
        for x in ins:
            if not x:
                inputs.append("")
                continue
            inputs.append(names[k])
            feeds[names[k]] = values[k]
            k += 1
        outs = [f"out{i}" for i in range(len(node.output))]
        n = h.make_node(node.op_type, inputs, outs, domain=node.domain)
        n.attribute.extend(node.attribute)
        g = h.make_graph([n], "fold", [h.make_tensor_value_info(x, 0, None) for x in feeds],
                         [h.make_tensor_value_info(x, 0, None) for x in outs])
        m = h.make_model(g, opset_imports=list(self.proto.opset_import))
        return [np.asarray(r) for r in ReferenceEvaluator(m).run(None, feeds)]

    # -- nodes --

    def lower_node(self, node) -> None:
        ins = [x for x in node.input]
        known = [self.const(x) if x else None for x in ins]
        if node.op_type == "Shape":
            shape = self._shape(ins[0], node)
            a = self.attrs(node)
            sl = slice(a.get("start", 0), a.get("end", None))
            self.bind(node, np.array(shape[sl], dtype=np.int64))
            return
        if node.op_type == "Size":
            self.bind(node, np.array(int(np.prod(self._shape(ins[0], node))), dtype=np.int64))
            return
        if node.op_type == "CastLike" and known[0] is not None:
            # only the dtype of the second operand matters: a constant stays one
            like = self.env.get(ins[1])
            dtype = like.dtype if isinstance(like, Value) else torch.from_numpy(np.array(known[1])).dtype
            self.bind(node, torch.from_numpy(np.array(known[0])).to(dtype).numpy())
            return
        if all(k is not None for k, x in zip(known, ins) if x) and any(x for x in ins):
            self.bind(node, self.fold(node, [k for k, x in zip(known, ins) if x]))
            return
        fn = getattr(self, f"op_{node.op_type}", None)
        if fn is None:
            self.bind(node, self.opaque(node))
            return
        self.bind(node, fn(node, self.attrs(node)))

    def _shape(self, name, node) -> tuple:
        v = self.env.get(name)
        if isinstance(v, Value):
            return v.shape
        c = self.const(name)
        if c is not None:
            return c.shape
        if isinstance(v, Init):
            a = self.arrays[v.name]
            return a.T.shape if v.transposed else a.shape
        raise OnnxError(f"{self.path}: node '{node.name}' reads '{name}' before it is computed")

    def ints(self, name, node, what: str) -> list[int]:
        c = self.const(name)
        if c is None:
            raise OnnxError(f"{self.path}: node '{node.name}' ({node.op_type}): its {what} "
                            f"'{name}' depends on the inputs' values; autopar needs it constant "
                            "(static shapes). Re-export with static shapes.")
        return [int(x) for x in np.asarray(c).reshape(-1)]

    def v(self, node, i: int, role: str | None = None) -> Value:
        return self.tensor(node.input[i], node, role)

    def opset_of(self, domain: str) -> int:
        want = "" if domain in ("", "ai.onnx") else domain
        return next((o.version for o in self.proto.opset_import
                     if (o.domain if o.domain != "ai.onnx" else "") == want), 0)

    def opaque(self, node):
        op = f"onnx.{node.op_type}"
        d = REGISTRY.get(op)
        if d is None:
            d = OnnxOpDef(op, None, ())
            REGISTRY[op] = d
        module = self.module_of(node)
        if not d.warned:
            d.warned = True
            warnings.warn(f"autopar: ONNX node '{node.name}' ({node.op_type}, module "
                          f"{module or 'root'}) in {self.path} has no lowering; it runs as an opaque "
                          f"node '{op}' replicated on every rank, through ONNX's reference "
                          "implementation (no gradient flows through it).", stacklevel=2)
        inputs = [self.tensor(x, node) for x in node.input if x]
        a = tuple(sorted(self.attrs(node).items())) + (("optional", tuple(bool(x) for x in node.input)),
                                                       ("n_outputs", len(node.output)),
                                                       ("opset", self.opset_of(node.domain)))
        if node.domain not in ("", "ai.onnx"):
            a += (("domain", node.domain),)
        feeds = [np.zeros(v.shape, dtype=torch.empty((), dtype=v.dtype).numpy().dtype) for v in inputs]
        shapes = self.fold(node, feeds)
        outs = [Value(self.b.fresh(ir_name(o or f"{node.name}_{k}")), tuple(s.shape),
                      torch.from_numpy(np.array(s)).dtype) for k, (o, s) in enumerate(zip(node.output, shapes))]
        from autopar.compiler.ir import Node, NodeMeta
        self.b.nodes.append(Node(op, tuple(inputs), a, tuple(outs), NodeMeta(module, node.name)))
        return outs if len(outs) > 1 else outs[0]

    # attention: the exporter writes one aten SDPA call as ~12 nodes; put it back

    def _group(self, nodes, i: int) -> list:
        """The run of nodes from `nodes[i]` exported from one torch call (same scopes)."""
        key = {p.key: p.value for p in nodes[i].metadata_props}.get(SCOPES)
        j = i
        while j < len(nodes) and {p.key: p.value for p in nodes[j].metadata_props}.get(SCOPES) == key:
            j += 1
        return nodes[i:j]

    def fuse_attention(self, group) -> bool:
        """Lower `group` (softmax(q k^T * scale + mask) v, as the exporter wrote SDPA) as one
        `scaled_dot_product_attention`, so the search sees heads it can shard as in the torch
        graph. The match is checked numerically against the group itself on random inputs;
        anything that does not match is lowered node by node."""
        group = self._prefold(group)
        made = {o for n in group for o in n.output}
        by_out = {o: n for n in group for o in n.output}
        last = group[-1]
        outside = [o for o in made if o != last.output[0] and (
            o in self.graph_outputs or any(c not in group for c in self.consumers.get(o, [])))]
        if last.op_type != "MatMul" or outside:
            return False

        def back(name, scale):
            """Follow views and multiplications by constants back to a value from outside
            the group: (name, accumulated scale)."""
            while name in by_out:
                n = by_out[name]
                if n.op_type in ("Reshape", "Transpose", "Identity", "Cast", "CastLike"):
                    name = n.input[0]
                elif n.op_type in ("Mul", "Div"):
                    consts = [self.const(x) for x in n.input[:2]]
                    if consts[1] is not None and consts[1].size == 1:
                        c = float(consts[1].reshape(-1)[0])
                        scale, name = scale * (c if n.op_type == "Mul" else 1.0 / c), n.input[0]
                    elif n.op_type == "Mul" and consts[0] is not None and consts[0].size == 1:
                        scale, name = scale * float(consts[0].reshape(-1)[0]), n.input[1]
                    else:
                        return None, scale
                else:
                    return None, scale
            return name, scale
        probs = by_out.get(last.input[0])
        v_name, one = back(last.input[1], 1.0)
        if probs is None or probs.op_type != "Softmax" or v_name is None or one != 1.0:
            return False
        scores, mask = by_out.get(probs.input[0]), None
        if scores is not None and scores.op_type == "Add":
            mask = next((x for x in scores.input if x not in by_out), None)
            other = [x for x in scores.input if x in by_out]
            scores = by_out.get(other[0]) if len(other) == 1 else None
        if scores is None or scores.op_type != "MatMul" or mask is not None and self.const(mask) is None:
            return False
        q_name, sq = back(scores.input[0], 1.0)
        k_name, sk = back(scores.input[1], 1.0)
        if q_name is None or k_name is None:
            return False
        q, k, v = (self.tensor(x, last) for x in (q_name, k_name, v_name))
        if len(q.shape) < 3 or q.dtype != torch.float32:
            return False
        kshape = tuple(q.shape[:-2]) + (v.shape[-2], q.shape[-1])
        if int(np.prod(k.shape)) != int(np.prod(kshape)) or v.shape[:-2] != q.shape[:-2]:
            return False
        scale = sq * sk
        default = 1.0 / float(np.sqrt(q.shape[-1]))
        causal = mask is not None and self._is_causal(self.const(mask), q.shape[-2], v.shape[-2])
        if not self._attention_matches(group, (q_name, k_name, v_name), (q, k, v), kshape,
                                       None if causal or mask is None else self.const(mask),
                                       causal, scale):
            return False
        module = self.module_of(last)
        if k.shape != kshape:
            k = self.b.emit_op(aten.view.default, [k, list(kshape)], {}, ir_name(k_name) + "_heads", module)
        args = [q, k, v]
        args.append(self.buffer(mask, self.const(mask)) if mask is not None and not causal else None)
        args += [0.0, causal]
        kwargs = {} if abs(scale - default) <= 1e-6 * default else {"scale": scale}
        out = self.b.emit_op(aten.scaled_dot_product_attention.default, args, kwargs,
                             ir_name(last.output[0]), module)
        self.env[last.output[0]] = out
        self.scope_of[last.output[0]] = module
        self.fused.append(module or "root")
        return True

    def _prefold(self, group) -> list:
        """Fold the group's shape arithmetic and constants (the scale, the causal mask)
        first; returns the nodes left, the ones that compute on tensors."""
        left = []
        for n in group:
            ins = [x for x in n.input if x]
            if n.op_type == "Constant":
                self.bind(n, self.arrays[n.output[0]])
            elif n.op_type in ("Shape", "Size") or (ins and all(self.const(x) is not None for x in ins)) \
                    or (n.op_type == "CastLike" and self.const(n.input[0]) is not None):
                self.lower_node(n)
            else:
                left.append(n)
        return left

    @staticmethod
    def _is_causal(mask: np.ndarray, L: int, S: int) -> bool:
        m = np.asarray(mask)
        if m.ndim < 2 or m.shape[-2:] != (L, S) or L != S or m.size != L * S:
            return False
        m = m.reshape(L, S)
        lower = np.tril(np.ones((L, S), dtype=bool))
        return bool(np.all(m[lower] == 0) and np.all(m[~lower] <= -MASK_LIMIT))

    def _attention_matches(self, group, names, values, kshape, mask, causal, scale) -> bool:
        from onnx.reference import ReferenceEvaluator
        h = self.onnx.helper
        gen = torch.Generator().manual_seed(0)
        feeds = {n: torch.randn(v.shape, generator=gen) for n, v in zip(names, values)}
        made = {o for n in group for o in n.output}
        consts = {}
        for n in group:
            for x in n.input:
                if x and x not in made and x not in feeds:
                    c = self.const(x)
                    if c is None:
                        return False
                    consts[x] = c
        g = h.make_graph(list(group), "attention",
                         [h.make_tensor_value_info(n, TensorProto_FLOAT, list(v.shape))
                          for n, v in zip(names, values)],
                         [h.make_tensor_value_info(group[-1].output[0], TensorProto_FLOAT, None)],
                         initializer=[self.numpy_helper.from_array(np.asarray(c), x) for x, c in consts.items()])
        try:
            (want,) = ReferenceEvaluator(h.make_model(g, opset_imports=list(self.proto.opset_import))).run(
                None, {n: t.numpy() for n, t in feeds.items()})
        except Exception:
            return False
        q, k, v = (feeds[n] for n in names)
        got = torch.nn.functional.scaled_dot_product_attention(
            q, k.reshape(kshape), v, attn_mask=None if mask is None else torch.from_numpy(np.array(mask)),
            is_causal=causal, scale=scale)
        return got.shape == want.shape and bool(np.allclose(got.numpy(), want, rtol=1e-4, atol=1e-5))

    # elementwise

    def _binary(self, node, tensor_op, scalar_op):
        a, b = node.input[0], node.input[1]
        ca, cb = self.const(a), self.const(b)
        if cb is not None and cb.size == 1 and scalar_op is not None:
            x = self.v(node, 0)
            if len(x.shape) >= cb.ndim:
                return self.emit(scalar_op, [x, py_scalar(cb)], {}, node)
        if ca is not None and ca.size == 1 and node.op_type in ("Add", "Mul"):
            y = self.v(node, 1)
            if len(y.shape) >= ca.ndim:
                return self.emit(scalar_op, [y, py_scalar(ca)], {}, node)
        if ca is not None and ca.size == 1 and node.op_type == "Sub":
            y = self.v(node, 1)
            if len(y.shape) >= ca.ndim:
                return self.emit(aten.rsub.Scalar, [y, py_scalar(ca)], {}, node)
        return self.emit(tensor_op, [self.v(node, 0), self.v(node, 1)], {}, node)

    # a Python number as the other operand: `x + 1e-05` traces to add.Tensor in torch too
    def op_Add(self, node, a):
        return self._binary(node, aten.add.Tensor, aten.add.Tensor)

    def op_Sub(self, node, a):
        if (mse := self._mse(node)) is not None:
            return mse
        return self._binary(node, aten.sub.Tensor, aten.sub.Tensor)

    def op_Mul(self, node, a):
        return self._binary(node, aten.mul.Tensor, aten.mul.Tensor)

    def op_Div(self, node, a):
        return self._binary(node, aten.div.Tensor, aten.div.Tensor)

    # ops the exporter writes out, put back as the one op torch's graph has (the same IR,
    # so the same plan): sqrt -> reciprocal is rsqrt, x * sigmoid(x) is silu,
    # mean((a - b)^2) over every dim is mse_loss

    def _sole_user(self, node, op_type: str):
        out = node.output[0]
        users = list({n.name: n for n in self.consumers.get(out, [])}.values())   # x * x: one user
        if len(users) == 1 and users[0].op_type == op_type and out not in self.graph_outputs \
                and users[0].name not in self.skip:
            return users[0]
        return None

    def _replace(self, node, later, target, args):
        """Emit `target(args)` as the output of `later`, a node after `node` that is then
        skipped."""
        v = self.emit(target, args, {}, node, out=later.output[0])
        self.skip.add(later.name)
        self.env[later.output[0]] = v
        self.scope_of[later.output[0]] = self.module_of(node)
        return v

    def op_Sqrt(self, node, a):
        rec = self._sole_user(node, "Reciprocal")
        if rec is not None:
            return self._replace(node, rec, aten.rsqrt.default, [self.v(node, 0)])
        return self.emit(aten.sqrt.default, [self.v(node, 0)], {}, node)

    def op_Sigmoid(self, node, a):
        mul = self._sole_user(node, "Mul")
        if mul is not None and node.input[0] in mul.input and self.const(node.input[0]) is None:
            return self._replace(node, mul, aten.silu.default, [self.v(node, 0)])
        return self.emit(aten.sigmoid.default, [self.v(node, 0)], {}, node)

    def _mse(self, node):
        sq = self._sole_user(node, "Mul") or self._sole_user(node, "Pow")
        if sq is None or any(self.const(x) is not None for x in node.input[:2]):
            return None
        if sq.op_type == "Mul" and list(sq.input) != [node.output[0]] * 2:
            return None
        if sq.op_type == "Pow" and not (self.const(sq.input[1]) is not None
                                        and np.asarray(self.const(sq.input[1])).size == 1
                                        and float(np.asarray(self.const(sq.input[1])).reshape(-1)[0]) == 2.0):
            return None
        mean = self._sole_user(sq, "ReduceMean")
        x, y = self.v(node, 0), self.v(node, 1)
        if mean is None or x.shape != y.shape or not x.dtype.is_floating_point:
            return None
        ma = self.attrs(mean)
        axes = (self.ints(mean.input[1], mean, "axes") if len(mean.input) > 1 and mean.input[1]
                else list(ma.get("axes", [])))
        if ma.get("keepdims", 1) or sorted(ax % len(x.shape) for ax in axes) != list(range(len(x.shape))) \
                and not (not axes and not ma.get("noop_with_empty_axes", 0)):
            return None
        self.skip.add(sq.name)
        return self._replace(node, mean, aten.mse_loss.default, [x, y])

    def op_Pow(self, node, a):
        e = self.const(node.input[1])
        if e is not None and e.size == 1:
            exp = py_scalar(e)
            if isinstance(exp, float) and exp.is_integer():
                exp = int(exp)          # x.pow(2), as torch models write it
            return self.emit(aten.pow.Tensor_Scalar, [self.v(node, 0), exp], {}, node)
        return self.emit(aten.pow.Tensor_Tensor, [self.v(node, 0), self.v(node, 1)], {}, node)

    def _unary(target):
        def fn(self, node, a):
            return self.emit(target, [self.v(node, 0)], {}, node)
        return fn

    op_Erf = _unary(aten.erf.default)
    op_Tanh = _unary(aten.tanh.default)
    op_Relu = _unary(aten.relu.default)
    op_Neg = _unary(aten.neg.default)
    op_Exp = _unary(aten.exp.default)
    op_Log = _unary(aten.log.default)
    op_Abs = _unary(aten.abs.default)
    op_Reciprocal = _unary(aten.reciprocal.default)
    op_Sin = _unary(aten.sin.default)
    op_Cos = _unary(aten.cos.default)
    op_Not = _unary(aten.logical_not.default)

    def op_Gelu(self, node, a):
        approx = a.get("approximate", "none")
        return self.emit(aten.gelu.default, [self.v(node, 0)],
                         {} if approx == "none" else {"approximate": approx}, node)

    def op_Identity(self, node, a):
        return self.v(node, 0)

    def op_Dropout(self, node, a):
        if len(node.input) > 2 and node.input[2]:
            train = self.const(node.input[2])
            if train is None or bool(train):
                return self.opaque(node)
        return self.v(node, 0) if len(node.output) == 1 else self.opaque(node)

    def _cast(self, x: Value, dtype, node):
        if x.dtype == dtype:
            return x
        return self.emit(aten.to.dtype, [x, dtype], {}, node)

    def op_Cast(self, node, a):
        return self._cast(self.v(node, 0), DTYPES[a["to"]], node)

    def op_CastLike(self, node, a):
        like = self.env.get(node.input[1])
        dtype = like.dtype if isinstance(like, Value) else torch.from_numpy(np.array(self.const(node.input[1]))).dtype
        return self._cast(self.v(node, 0), dtype, node)

    def op_Where(self, node, a):
        return self.emit(aten.where.self, [self.v(node, 0), self.v(node, 1), self.v(node, 2)], {}, node)

    def _compare(tensor_op):
        def fn(self, node, a):
            return self.emit(tensor_op, [self.v(node, 0), self.v(node, 1)], {}, node)
        return fn

    op_Equal = _compare(aten.eq.Tensor)
    op_Less = _compare(aten.lt.Tensor)
    op_Greater = _compare(aten.gt.Tensor)
    op_And = _compare(aten.logical_and.default)
    op_Or = _compare(aten.logical_or.default)
    op_Max = _compare(aten.maximum.default)
    op_Min = _compare(aten.minimum.default)

    def op_Trilu(self, node, a):
        k = self.ints(node.input[1], node, "k")[0] if len(node.input) > 1 and node.input[1] else 0
        op = aten.triu.default if a.get("upper", 1) else aten.tril.default
        return self.emit(op, [self.v(node, 0), k], {}, node)

    # matrix products

    def _weight(self, name):
        """`(initializer, stored_transposed)` if `name` is a 2-D trainable initializer
        (possibly seen through a Transpose), else None."""
        v = self.env.get(name)
        if isinstance(v, Init) and self.trainable(v.name) and self.arrays[v.name].ndim == 2:
            return v
        return None

    def _bias_after(self, node, n: int):
        """The 1-D trainable initializer of size n that a lone `Add` after `node` adds."""
        out = node.output[0]
        users = self.consumers.get(out, [])
        if len(users) != 1 or out in self.graph_outputs or users[0].op_type != "Add":
            return None, None
        add = users[0]
        other = add.input[1] if add.input[0] == out else add.input[0]
        ref = self.env.get(other)
        if isinstance(ref, Init) and self.trainable(ref.name) and self.arrays[ref.name].shape == (n,):
            return add, other
        return None, None

    def _linear(self, node, x: Value, wname: str, want_t: bool, bias: str | None, add=None):
        w = self.tensor(wname, node, "weight", want_transposed=want_t)
        args = [x, w]
        if bias is not None:
            args.append(self.tensor(bias, node, "bias"))
        out = add.output[0] if add is not None else node.output[0]
        v = self.emit(aten.linear.default, args, {}, node, out=out)
        if add is not None:
            self.skip.add(add.name)
            self.env[add.output[0]] = v
            self.scope_of[add.output[0]] = self.module_of(node)
        return v

    def op_MatMul(self, node, a):
        x = self.v(node, 0)
        ref = self._weight(node.input[1])
        if ref is not None and len(x.shape) >= 2:
            # x @ W with W (k, n): a linear over W^T (n, k), the layout torch's Linear keeps
            n = self._shape(node.input[1], node)[1]
            add, bias = self._bias_after(node, n)
            return self._linear(node, x, node.input[1], True, bias, add)
        return self.emit(aten.matmul.default, [x, self.v(node, 1)], {}, node)

    def op_Gemm(self, node, a):
        alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
        ta, tb = a.get("transA", 0), a.get("transB", 0)
        x = self.v(node, 0)
        ref = self._weight(node.input[1])
        c = node.input[2] if len(node.input) > 2 and node.input[2] else None
        cref = self.env.get(c) if c else None
        n_out = self._shape(node.input[1], node)[0 if tb else 1]
        bias_ok = c is None or (isinstance(cref, Init) and self.trainable(cref.name)
                                and self.arrays[cref.name].shape == (n_out,))
        if alpha == 1.0 and beta == 1.0 and not ta and ref is not None and bias_ok:
            # Gemm computes x @ B' + C with B' = B^T under transB: then B is (n, k) already
            return self._linear(node, x, node.input[1], not tb, c)
        if ta:
            x = self.emit(aten.t.default, [x], {}, node, out=node.output[0] + "_a")
        y = self.v(node, 1)
        if tb:
            y = self.emit(aten.t.default, [y], {}, node, out=node.output[0] + "_b")
        out = self.emit(aten.mm.default, [x, y], {}, node, out=node.output[0] + "_mm")
        if alpha != 1.0:
            out = self.emit(aten.mul.Scalar, [out, alpha], {}, node, out=node.output[0] + "_alpha")
        if c is not None:
            cv = self.tensor(c, node)
            if beta != 1.0:
                cv = self.emit(aten.mul.Scalar, [cv, beta], {}, node, out=node.output[0] + "_beta")
            out = self.emit(aten.add.Tensor, [out, cv], {}, node)
        return out

    # normalisation, softmax, loss

    def op_LayerNormalization(self, node, a):
        x = self.v(node, 0)
        axis = a.get("axis", -1) % len(x.shape)
        if len([o for o in node.output if o]) > 1 and any(
                self.uses.get(o, 0) for o in node.output[1:] if o):
            return self.opaque(node)
        w = self.tensor(node.input[1], node, "weight")
        b = self.tensor(node.input[2], node, "bias") if len(node.input) > 2 and node.input[2] else None
        # as F.layer_norm records it (cudnn_enable=False), eps in the model's decimal
        return self.emit(aten.layer_norm.default,
                         [x, list(x.shape[axis:]), w, b, py_scalar(np.float32(a.get("epsilon", 1e-5))),
                          False], {}, node)

    def op_Softmax(self, node, a):
        x = self.v(node, 0)
        axis = a.get("axis", -1 if self.opset >= 13 else 1)
        return self.emit(aten.softmax.int, [x, axis], {}, node)

    def op_LogSoftmax(self, node, a):
        return self.emit(aten.log_softmax.int, [self.v(node, 0), a.get("axis", -1)], {}, node)

    def op_SoftmaxCrossEntropyLoss(self, node, a):
        if len(node.output) > 1 and node.output[1] and self.uses.get(node.output[1], 0):
            return self.opaque(node)
        scores, labels = self.v(node, 0), self.v(node, 1)
        weight = self.v(node, 2) if len(node.input) > 2 and node.input[2] else None
        red = {"none": 0, "mean": 1, "sum": 2}[a.get("reduction", "mean")]
        return self.emit(aten.cross_entropy_loss.default,
                         [scores, labels, weight, red, a.get("ignore_index", -100)], {}, node)

    def _reduce(self, node, a, mean: bool):
        x = self.v(node, 0)
        if len(node.input) > 1 and node.input[1]:
            axes = self.ints(node.input[1], node, "axes")
        else:
            axes = list(a.get("axes", []))
        if not axes and a.get("noop_with_empty_axes", 0):
            return x
        keep = bool(a.get("keepdims", 1))
        if not axes:
            axes = list(range(len(x.shape)))
        op = aten.mean.dim if mean else aten.sum.dim_IntList
        return self.emit(op, [x, axes, keep], {}, node)

    def op_ReduceMean(self, node, a):
        return self._reduce(node, a, True)

    def op_ReduceSum(self, node, a):
        return self._reduce(node, a, False)

    # shape ops

    def _view(self, node, shape):
        x = self.v(node, 0)
        shape = [int(s) for s in shape]
        if tuple(shape) == x.shape:
            return x
        return self.emit(aten.view.default, [x, shape], {}, node)

    def op_Reshape(self, node, a):
        x = self.v(node, 0)
        shape = self.ints(node.input[1], node, "target shape")
        if not a.get("allowzero", 0):
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        if -1 in shape:
            known = int(np.prod([s for s in shape if s != -1]))
            shape[shape.index(-1)] = int(np.prod(x.shape)) // max(known, 1)
        return self._view(node, shape)

    def op_Flatten(self, node, a):
        x = self.v(node, 0)
        axis = a.get("axis", 1) % (len(x.shape) + 1) if x.shape else 0
        return self._view(node, [int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:]))])

    def _axes(self, node, a, rank: int) -> list[int] | None:
        if len(node.input) > 1 and node.input[1]:
            ax = self.ints(node.input[1], node, "axes")
        elif "axes" in a:
            ax = list(a["axes"])
        else:
            return None
        return [x % rank for x in ax]

    def op_Squeeze(self, node, a):
        x = self.v(node, 0)
        axes = self._axes(node, a, len(x.shape))
        shape = [s for i, s in enumerate(x.shape) if not (axes is None and s == 1 or axes and i in axes)]
        return self._view(node, shape)

    def op_Unsqueeze(self, node, a):
        x = self.v(node, 0)
        rank = len(x.shape) + len(self.ints(node.input[1], node, "axes") if len(node.input) > 1
                                  else a["axes"])
        axes = sorted(self._axes(node, a, rank))
        if len(axes) == 1:          # x.unsqueeze(d), as torch writes it
            return self.emit(aten.unsqueeze.default, [x, axes[0]], {}, node)
        shape = list(x.shape)
        for ax in axes:
            shape.insert(ax, 1)
        return self._view(node, shape)

    def op_Transpose(self, node, a):
        ref = self.env.get(node.input[0])
        perm = a.get("perm")
        if isinstance(ref, Init) and self.trainable(ref.name) and self.arrays[ref.name].ndim == 2 \
                and (perm is None or list(perm) == [1, 0]):
            return Init(ref.name, not ref.transposed)   # decided by its use (MatMul: linear)
        x = self.v(node, 0)
        perm = list(perm) if perm is not None else list(reversed(range(len(x.shape))))
        moved = [i for i, p in enumerate(perm) if p != i]
        if len(moved) == 2:         # a swap of two dims: x.transpose(d0, d1), as torch writes it
            return self.emit(aten.transpose.int, [x, moved[0], moved[1]], {}, node)
        return self.emit(aten.permute.default, [x, perm], {}, node)

    def op_Split(self, node, a):
        x = self.v(node, 0)
        axis = a.get("axis", 0) % len(x.shape)
        n_out = len(node.output)
        if len(node.input) > 1 and node.input[1]:
            sizes = self.ints(node.input[1], node, "split sizes")
        elif "split" in a:
            sizes = list(a["split"])
        else:
            dim, k = x.shape[axis], a.get("num_outputs", n_out)
            chunk = -(-dim // k)
            sizes = [min(chunk, dim - i * chunk) for i in range(k)]
        # the exporter names the pieces of torch's `split` `<name>_split_<i>`: name them
        # `<name>_<i>` as the torch front end does
        m = [re.fullmatch(r"(.+)_split_(\d+)", o) for o in node.output]
        base = m[0].group(1) if all(m) and len({x.group(1) for x in m}) == 1 else node.output[0]
        if len(sizes) > 1 and len(set(sizes[:-1])) == 1 and sizes[-1] <= sizes[0]:
            args = [x, sizes[0], axis]          # x.split(size, dim): torch's `split`
            outs = self.b.emit_op(aten.split.Tensor, args, {}, ir_name(base), self.module_of(node))
        else:
            outs = self.b.emit_op(aten.split_with_sizes.default, [x, sizes, axis], {},
                                  ir_name(base), self.module_of(node))
        return list(outs)

    def op_SplitToSequence(self, node, a):
        x = self.v(node, 0)
        axis = a.get("axis", 0) % len(x.shape)
        if len(node.input) > 1 and node.input[1]:
            sizes = self.ints(node.input[1], node, "split sizes")
            if len(sizes) == 1:
                s = sizes[0]
                sizes = [min(s, x.shape[axis] - i) for i in range(0, x.shape[axis], s)]
        else:
            sizes = [1] * x.shape[axis]
        outs = list(self.b.emit_op(aten.split_with_sizes.default, [x, sizes, axis], {},
                                   ir_name(node.output[0]), self.module_of(node)))
        if len(node.input) <= 1 and not a.get("keepdims", 1):
            outs = [self.b.emit_op(aten.squeeze.dim, [o, axis], {}, o.name + "_sq",
                                   self.module_of(node)) for o in outs]
        return [outs]       # one ONNX value holding a sequence

    def op_SequenceAt(self, node, a):
        seq = self.env.get(node.input[0])
        i = self.ints(node.input[1], node, "position")[0]
        if not isinstance(seq, list):
            return self.opaque(node)
        return seq[i]

    def op_Concat(self, node, a):
        parts = [self.tensor(x, node) for x in node.input if x]
        axis = a["axis"] % len(parts[0].shape)
        return self.emit(aten.cat.default, [parts, axis], {}, node)

    def op_Slice(self, node, a):
        x = self.v(node, 0)
        starts = self.ints(node.input[1], node, "starts")
        ends = self.ints(node.input[2], node, "ends")
        axes = self.ints(node.input[3], node, "axes") if len(node.input) > 3 and node.input[3] \
            else list(range(len(starts)))
        steps = self.ints(node.input[4], node, "steps") if len(node.input) > 4 and node.input[4] \
            else [1] * len(starts)
        for s, e, ax, st in zip(starts, ends, axes, steps):
            ax %= len(x.shape)
            dim = x.shape[ax]
            s, e, _ = slice(s, e, st).indices(dim)
            if (s, e, st) == (0, dim, 1):
                continue
            if st < 0:
                return self.opaque(node)
            x = self.emit(aten.slice.Tensor, [x, ax, s, e, st], {}, node)
        return x

    def op_Gather(self, node, a):
        axis = a.get("axis", 0)
        idx_const = self.const(node.input[1])
        data_ref = self.env.get(node.input[0])
        if idx_const is None:
            idx = self.v(node, 1)
            if axis == 0 and isinstance(data_ref, Init) and self.trainable(data_ref.name) \
                    and self.arrays[data_ref.name].ndim == 2:
                w = self.tensor(node.input[0], node, "weight")
                return self.emit(aten.embedding.default, [w, idx], {}, node)
            x = self.v(node, 0)
            if axis % len(x.shape) == 0:
                return self.emit(aten.embedding.default, [x, idx], {}, node) if len(x.shape) == 2 \
                    else self.opaque(node)
            return self.opaque(node)
        x = self.v(node, 0)
        axis %= len(x.shape)
        if idx_const.ndim == 0:
            return self.emit(aten.select.int, [x, axis, int(idx_const) % x.shape[axis]], {}, node)
        flat = idx_const.reshape(-1) % x.shape[axis]
        if idx_const.ndim == 1 and len(flat) and np.all(np.diff(flat) == 1):
            return self.emit(aten.slice.Tensor, [x, axis, int(flat[0]), int(flat[-1]) + 1, 1], {}, node)
        return self.opaque(node)

    def op_Expand(self, node, a):
        x = self.v(node, 0)
        shape = self.ints(node.input[1], node, "shape")
        out = list(np.broadcast_shapes(x.shape, tuple(shape)))
        if tuple(out) == x.shape:
            return x
        if len(out) > len(x.shape):
            x = self.emit(aten.view.default, [x, [1] * (len(out) - len(x.shape)) + list(x.shape)],
                          {}, node, out=node.output[0] + "_r")
        return self.emit(aten.expand.default, [x, out], {}, node)


class OnnxOpDef(OpDef):
    """An ONNX op with no lowering: replicated (no sharding rule), evaluated node by node
    by ONNX's reference implementation (`compiler/onnx_node.py`, which generated
    programs call too), forward only."""

    def run(self, inputs, attrs):
        from autopar.compiler import onnx_node
        attrs = dict(attrs)
        optional, n_out = attrs.pop("optional"), attrs.pop("n_outputs")
        opset, domain = attrs.pop("opset", None), attrs.pop("domain", "")
        out = onnx_node.run(self.name.split(".", 1)[1], list(inputs), attrs, optional, n_out,
                            opset, domain)
        return out if isinstance(out, tuple) else (out,)


__all__ = ["load_onnx", "lower_onnx", "OnnxError", "OnnxReference"]

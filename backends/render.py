"""One IR node as a Python expression: readable torch calls (`F.linear(x, w, b)`,
`x.transpose(1, 2)`, `q @ k`), the ATen overload itself as the fallback.

    >>> render_op(node, ["h", "self.c_fc.weight", "self.c_fc.bias"])     # doctest: +SKIP
    'F.linear(h, self.c_fc.weight, self.c_fc.bias)'

A size attribute that came from the batch (`compiler.ir.SymInt`, recorded by tracing with
symbolic sizes) renders as its expression over the program's size names (`B * T`).
"""
from __future__ import annotations

from typing import Any

import torch

from autopar.compiler.ir import Node
from autopar.compiler.ops import EXPERT_PARALLEL_MOE, REGISTRY, VOCAB_PARALLEL_CE


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
    """Schema argument name -> rendered operand or attribute value (absent defaults left out);
    the op table's own binding (a tensor list followed by tensors: `index_put`)."""
    return REGISTRY[node.op].bind([Expr(x) for x in operand], node.attr)


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
    if op == VOCAB_PARALLEL_CE:
        k = {"ignore_index": a["ignore_index"]} if a.get("ignore_index", -100) != -100 else {}
        k["reduction"] = REDUCTION[a.get("reduction", 2)]
        return call("rt.vocab_parallel_cross_entropy", [a["self"], a["target"], Expr("mesh"), Expr(f'"{a["axis"]}"')], k)
    if op in ("moe_experts", EXPERT_PARALLEL_MOE):
        args = [a[k] for k in ("hidden", "top_k_index", "top_k_weights", "gate", "up", "down")]
        if op == EXPERT_PARALLEL_MOE:
            args += [Expr("mesh"), Expr(f'"{a["axis"]}"')]
        return call("rt.moe_experts", args, {})
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


__all__ = ["Expr", "literal", "bind", "call", "kw", "render_op"]

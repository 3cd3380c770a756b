"""The interpreter: run any IR graph on real tensors. A lowered graph must reproduce the
traced model's loss and its gradients exactly; this is the lowering's ground truth.

    >>> outs = interpret(graph, state_dict, (idx, targets))    # doctest: +SKIP
    >>> loss, dropped = loss_of(model(idx, targets))           # doctest: +SKIP

A model's forward may return its scalar loss, a tuple or list whose first element is the
loss (`(loss, logits)`), or a mapping with a "loss" entry (a dict, a Hugging Face
`ModelOutput`); `loss_of` is the one place that rule lives, read by the front end, the
verification and the single-device reference run alike.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from autopar.compiler.errors import UserError
from autopar.compiler.ir import Graph, Value
from autopar.compiler.ops import REGISTRY


class ModelOutputError(UserError):
    """The model's forward returned something that is not (or does not hold) a scalar loss."""


def describe_output(x) -> str:
    """`Tensor[4, 10] float32`, `tuple(Tensor[], Tensor[4, 10])`, `CausalLMOutputWithPast(loss, logits)`."""
    if isinstance(x, torch.Tensor):
        return f"Tensor[{', '.join(str(s) for s in x.shape)}] {str(x.dtype).replace('torch.', '')}"
    if isinstance(x, (tuple, list)):
        inner = ", ".join(describe_output(v) for v in x[:4]) + (", ..." if len(x) > 4 else "")
        return f"{type(x).__name__}({inner})"
    if isinstance(x, Mapping):
        return f"{type(x).__name__}({', '.join(str(k) for k in x.keys())})"
    return type(x).__name__


def _scalar_loss(t, what: str, whole) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ModelOutputError(
            f"the model's forward returned {describe_output(whole)}: {what} is "
            f"{describe_output(t)}, not a tensor. autopar trains the scalar loss forward "
            "returns: return it alone, first in a tuple, or as the \"loss\" entry of a dict.")
    if t.dim() != 0 or not t.is_floating_point():
        fix = ("reduce it (e.g. .mean()) or compute the loss inside forward" if t.dim()
               else "return a floating-point loss")
        raise ModelOutputError(
            f"the model's forward returned {describe_output(whole)}: {what} is "
            f"{describe_output(t)}, not a scalar floating-point loss; {fix}.")
    return t


def loss_of(out) -> tuple[torch.Tensor, str]:
    """The scalar loss in what a model's forward returned, and a note on what was dropped
    ("" when nothing was). Raises ModelOutputError naming what was returned otherwise.

    >>> loss, note = loss_of((torch.tensor(1.0), torch.zeros(4, 10)))
    >>> note
    'model output: the loss is element 0 of tuple(Tensor[] float32, Tensor[4, 10] float32); dropped the rest'
    """
    if isinstance(out, torch.Tensor):
        return _scalar_loss(out, "it", out), ""
    if isinstance(out, (tuple, list)):
        if not out:
            raise ModelOutputError(f"the model's forward returned an empty {type(out).__name__}; "
                                   "return the scalar loss")
        loss = _scalar_loss(out[0], "its first element", out)
        rest = "; dropped the rest" if len(out) > 1 else ""
        return loss, (f"model output: the loss is element 0 of {describe_output(out)}{rest}"
                      if rest else "")
    if isinstance(out, Mapping):
        if out.get("loss") is None:
            hint = (" (a Hugging Face model computes its loss when given labels, e.g. "
                    "model(input_ids=idx, labels=targets))" if hasattr(out, "to_tuple") else "")
            raise ModelOutputError(
                f"the model's forward returned {describe_output(out)} without a \"loss\" "
                f"entry{hint}; autopar trains the scalar loss: return it, or put it under \"loss\".")
        loss = _scalar_loss(out["loss"], 'its "loss" entry', out)
        others = [str(k) for k in out.keys() if k != "loss"]
        return loss, (f"model output: the loss is the \"loss\" entry of {type(out).__name__}; "
                      f"dropped {', '.join(others)}" if others else "")
    raise ModelOutputError(f"the model's forward returned {describe_output(out)}; autopar trains the "
                           "scalar loss forward returns: return it alone, first in a tuple, or as "
                           "the \"loss\" entry of a dict.")


def interpret(graph: Graph, state: dict[str, torch.Tensor], inputs: tuple) -> list[torch.Tensor]:
    """Outputs of `graph` given parameter/buffer tensors (by state-dict name) and inputs."""
    env: dict[Value, torch.Tensor] = {}
    if len(inputs) != len(graph.inputs):
        raise ValueError(f"graph {graph.name} takes {len(graph.inputs)} inputs, got {len(inputs)}")
    for v, t in zip(graph.inputs, inputs):
        env[v] = t
    consts = graph.constants
    for p in graph.params:
        t = state.get(p.name)
        if t is None and p.name in graph.pieces:
            pc = graph.pieces[p.name]
            t = pc.cut(state[pc.source])
        if t is None:
            t = consts.get(p.name)
        if t is None:
            alias = next((a for a, c in graph.aliases.items() if c == p.name and a in state), None)
            if alias is None:
                raise KeyError(f"no tensor for parameter '{p.name}'")
            t = state[alias]
        env[p] = t
    for node in graph.nodes:
        outs = REGISTRY[node.op].run([env[v] for v in node.inputs], node.attr)
        for v, t in zip(node.outputs, outs):
            env[v] = t
    return [env[v] for v in graph.outputs]


class IRModule(torch.nn.Module):
    """An IR graph as a trainable module: its parameters are `nn.Parameter`s under their
    state-dict names (dotted names become nested submodules) and `forward` runs the
    interpreter, so a graph from a non-torch front end (ONNX) trains, plans and checks like
    any model. `reference`, when given, computes the outputs the graph must reproduce (for
    ONNX: `onnx.reference.ReferenceEvaluator`); `--verify` compares against it.

        >>> m = IRModule(graph, {"fc.weight": w, "fc.bias": b})      # doctest: +SKIP
        >>> loss = m(x, target); loss.backward()                     # doctest: +SKIP
    """

    def __init__(self, graph: Graph, tensors: dict[str, torch.Tensor], reference=None):
        super().__init__()
        self.graph = graph
        self.reference = reference
        trainable = {p.name: p.requires_grad for p in graph.params}
        for name, t in tensors.items():
            *path, leaf = name.split(".")
            holder = self
            for part in path:
                child = holder._modules.get(part)
                if child is None:
                    child = torch.nn.Module()
                    holder.add_module(part, child)
                holder = child
            holder.register_parameter(leaf, torch.nn.Parameter(
                t.detach().clone(), requires_grad=trainable.get(name, True)))

    def forward(self, *inputs):
        outs = interpret(self.graph, dict(self.named_parameters(remove_duplicate=False)), inputs)
        return outs[0] if len(outs) == 1 else tuple(outs)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) by its state-dict name."""
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    return state


def max_abs_error(model: torch.nn.Module, graph: Graph, inputs: tuple) -> tuple[float, float]:
    """(max |interpreted - eager| of the loss, the loss's magnitude). For an `IRModule`
    with a `reference` (an ONNX graph), the reference is what it is compared with."""
    with torch.no_grad():
        reference = getattr(model, "reference", None) if isinstance(model, IRModule) else None
        ref, _ = loss_of(reference(*inputs) if reference is not None else model(*inputs))
        got = interpret(graph, model_state(model), inputs)
    a, b = ref.double(), got[0].double()
    return (a - b).abs().max().item(), a.abs().max().item()


def max_grad_error(model: torch.nn.Module, graph: Graph, inputs: tuple) -> tuple[float, float, str]:
    """The gradients the interpreted IR gives every trainable parameter against eager
    backward: (max |difference|, the largest eager gradient, the worst parameter's name).

    The forward check alone passes a model whose custom autograd Function was traced as its
    forward only; this is the check that notices the backward differs.

    >>> err, scale, worst = max_grad_error(model, graph, (x, y))    # doctest: +SKIP
    """
    state = model_state(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        return 0.0, 0.0, ""
    names = list(trainable)
    loss, _ = loss_of(model(*inputs))
    eager = torch.autograd.grad(loss, [trainable[n] for n in names], allow_unused=True)
    leaves = {n: t.detach().requires_grad_(n in trainable) for n, t in state.items()}
    out = interpret(graph, leaves, inputs)[0]
    used = [n for n in names if n in leaves]
    ir = torch.autograd.grad(out, [leaves[n] for n in used], allow_unused=True)
    got = dict(zip(used, ir))
    err, scale, worst = 0.0, 0.0, ""
    for n, g in zip(names, eager):
        g = torch.zeros_like(trainable[n]) if g is None else g
        h = got.get(n)
        h = torch.zeros_like(g) if h is None else h
        e = (g.double() - h.double()).abs().max().item() if g.numel() else 0.0
        scale = max(scale, g.double().abs().max().item() if g.numel() else 0.0)
        if e > err or not worst:
            err, worst = e, n
    return err, scale, worst

"""The interpreter: run any IR graph on real tensors. A lowered graph must reproduce the
traced model's outputs exactly; this is the lowering's ground truth.

    >>> outs = interpret(graph, state_dict, (idx, targets))    # doctest: +SKIP
"""
from __future__ import annotations

import torch

from autopar.compiler.ir import Graph, Value
from autopar.compiler.ops import REGISTRY


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
    """(max |interpreted - eager| over all outputs, the scale of the outputs). For an
    `IRModule` with a `reference` (an ONNX graph), the reference is what it is compared with."""
    with torch.no_grad():
        reference = getattr(model, "reference", None) if isinstance(model, IRModule) else None
        ref = reference(*inputs) if reference is not None else model(*inputs)
        refs = list(ref) if isinstance(ref, (tuple, list)) else [ref]
        got = interpret(graph, model_state(model), inputs)
    err, scale = 0.0, 0.0
    for a, b in zip(refs, got):
        err = max(err, (a.double() - b.double()).abs().max().item())
        scale = max(scale, a.double().abs().max().item())
    return err, scale

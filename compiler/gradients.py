"""Which values need a gradient: forward propagation of `requires_grad` from the
trainable parameters (FlexLLM's frozen-parameter analysis).

A frozen parameter (`requires_grad=False`) needs no gradient, no gradient communication
and no optimizer state, and an activation kept only for its weight gradient need not be
saved; the cost model, plan application and the code generators all read this analysis.

    >>> info = grad_info(graph); "lm_head.weight" in info.needs_grad     # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass

from autopar.compiler.ir import Graph

NON_DIFFERENTIABLE = {"arange", "arange.start", "arange.start_step", "eq", "eq.Scalar",
                      "ne.Scalar", "lt.Scalar", "gt.Scalar", "le.Scalar", "ge.Scalar",
                      "lt", "gt", "logical_not", "logical_and", "logical_or", "zeros_like",
                      "ones_like", "full_like", "ones", "zeros", "full"}


@dataclass
class GradInfo:
    """Which values need a gradient. A frozen parameter (requires_grad=False) gets no
    gradient, no gradient communication and no optimizer state."""
    needs_grad: set[str]
    trainable: list[str]
    frozen: list[str]
    trainable_elems: int
    frozen_elems: int
    n_values: int

    def summary(self) -> str:
        return (f"gradients: {len(self.trainable)} trainable params ({self.trainable_elems:,} "
                f"elements); {len(self.frozen)} frozen params ({self.frozen_elems:,} elements) get "
                f"no gradient, no gradient communication and no optimizer state; "
                f"{self.n_values - len(self.needs_grad)} of {self.n_values} values need no gradient")


def grad_info(graph: Graph) -> GradInfo:
    """Forward propagation of `requires_grad` from trainable parameters."""
    need = {p.name for p in graph.params if p.requires_grad}
    for n in graph.nodes:
        if n.op in NON_DIFFERENTIABLE:
            continue
        if any(v.name in need for v in n.inputs):
            for v in n.outputs:
                if v.dtype.is_floating_point or v.dtype.is_complex:
                    need.add(v.name)
    trainable = [p for p in graph.params if p.requires_grad]
    frozen = [p for p in graph.params if p.kind == "param" and not p.requires_grad]
    n_values = len(graph.inputs) + len(graph.params) + sum(len(n.outputs) for n in graph.nodes)
    return GradInfo(need, [p.name for p in trainable], [p.name for p in frozen],
                    sum(p.numel for p in trainable), sum(p.numel for p in frozen), n_values)


__all__ = ["GradInfo", "grad_info", "NON_DIFFERENTIABLE"]

"""The mixture-of-experts op: one IR node for a layer of gated (SwiGLU) experts.

    out = moe_experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k],
                      gate [E, I, H], up [E, I, H], down [E, H, I])        # -> [T, H]

Each token t goes to the k experts `top_k_index[t]`; expert e computes
`down[e] @ (silu(gate[e] @ x) * (up[e] @ x))`, and the token's result is the sum of its k
expert outputs weighed by `top_k_weights[t]`. Router and softmax stay ordinary ops before
it; what this node hides is the sort-by-expert, the grouped matmuls and the un-sort, which
as separate ops pin every token to every rank (the sort is global).

Kept as one node it can be split three ways (compiler/ops.a_moe_experts):
  tokens      each rank its tokens with every expert (data parallel);
  intermediate  each rank 1/n of every expert's I (tensor-parallel experts, partial sums);
  experts     each rank its tokens *and* E/n experts (expert parallelism): the op sends
              every (token, expert) row to the rank holding that expert and the results
              back, two all_to_alls each way (backends/runtime/moe.py).

`torch.ops.autopar.moe_experts` is a real op: model code may call it (examples/moe.py),
and tracing routes Hugging Face experts through it (frontends/tracing.py). Its backward
recomputes the forward under autograd, so a single-device run trains like the program.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["moe_experts", "expert_ffn", "moe_reference", "token_rows"]


def expert_ffn(x: torch.Tensor, expert: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
               down: torch.Tensor) -> torch.Tensor:
    """Rows `x` [S, H], row i through expert `expert[i]` (an index into gate/up/down's E):
    the gated MLP of each expert on its rows, results in the rows' order. Differentiable."""
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=gate.shape[0]).tolist()
    # every expert runs, on zero rows too: the result then depends on every input, so on
    # an expert-parallel rank that received no rows backward still reaches (and sends
    # through) its exchanges, and unused experts get zero gradients, not none
    parts = [F.linear(F.silu(F.linear(rows, gate[e])) * F.linear(rows, up[e]), down[e])
             for e, rows in enumerate(torch.split(x[order], counts))]
    y = torch.cat(parts) if parts else x.new_zeros((0, down.shape[1]))
    return y[torch.argsort(order)]


def token_rows(hidden: torch.Tensor, k: int) -> torch.Tensor:
    """One row per (token, choice) pair, token-major: row t*k + j is token t."""
    return hidden.repeat_interleave(k, dim=0)


def moe_reference(hidden, top_k_index, top_k_weights, gate, up, down) -> torch.Tensor:
    """The op on one device (the math every split must reproduce)."""
    T, k = top_k_index.shape
    y = expert_ffn(token_rows(hidden, k), top_k_index.reshape(-1), gate, up, down)
    y = y * top_k_weights.reshape(-1, 1).to(y.dtype)
    return y.view(T, k, -1).sum(dim=1).to(hidden.dtype)


@torch.library.custom_op("autopar::moe_experts", mutates_args=())
def _moe_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return moe_reference(hidden, top_k_index, top_k_weights, gate, up, down)


@_moe_experts.register_fake
def _(hidden, top_k_index, top_k_weights, gate, up, down):
    return hidden.new_empty(hidden.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in saved]
        out = moe_reference(*leaves)
        wrt = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wrt, grad, allow_unused=True))
    return tuple(next(grads) if t.requires_grad else None for t in leaves)


_moe_experts.register_autograd(_backward, setup_context=_setup)


def moe_experts(hidden, top_k_index, top_k_weights, gate, up, down) -> torch.Tensor:
    """A layer of gated experts as one traceable op (see the module docstring); `hidden`
    [T, H], `top_k_index` [T, k] int64, `top_k_weights` [T, k], `gate`/`up` [E, I, H],
    `down` [E, H, I]."""
    E = gate.shape[0]
    if top_k_index.shape[0] != hidden.shape[0] or top_k_weights.shape != top_k_index.shape:
        raise ValueError(f"moe_experts: hidden {tuple(hidden.shape)}, top_k_index "
                         f"{tuple(top_k_index.shape)} and top_k_weights {tuple(top_k_weights.shape)} "
                         "must have one row per token and the same k")
    if up.shape != gate.shape or down.shape != (E, gate.shape[2], gate.shape[1]) \
            or gate.shape[2] != hidden.shape[1]:
        raise ValueError(f"moe_experts: gate {tuple(gate.shape)} and up {tuple(up.shape)} must be "
                         f"[E, I, H] and down {tuple(down.shape)} [E, H, I], with H = {hidden.shape[1]}")
    return torch.ops.autopar.moe_experts(hidden, top_k_index, top_k_weights, gate, up, down)

"""Mixture-of-experts layers in a program: `moe_experts` on this rank's tokens and experts,
optionally expert-parallel over a mesh axis.

    y = rt.moe_experts(h, top_k_index, top_k_weights, gate, up, down)            # local
    y = rt.moe_experts(h, top_k_index, top_k_weights, gate, up, down, mesh, "ep")

Expert parallel: rank r of the axis (size n) holds its own tokens and experts
r*E/n .. (r+1)*E/n - 1 of the E. Its (token, choice) rows, sorted by expert, go to the
ranks that hold their experts; each rank runs its experts on the rows it received and
sends the results back, where they are un-sorted and weighed as on one device:

  1. all_to_all of the row counts per expert (E int64): every rank learns how many rows
     each source sends to each of its experts;
  2. all_to_all of the rows (uneven: counts from step 1);
  3. the experts' gated MLPs on the rows received (compiler/moe.expert_ffn);
  4. all_to_all of the results back, the inverse of step 2.

Backward runs steps 4 and 2 in reverse with the gradients. Each all_to_all of rows is
recorded by this rank's own rows (those it sends in step 2 and gets back in step 4), a
size routing does not change, so the bytes measured are the bytes the plan predicts
(`sharding.expert_collectives`).
"""
from __future__ import annotations

import torch

from autopar.compiler.moe import expert_ffn, moe_reference, token_rows

from .mesh import Mesh, _nbytes, _resolve_phase, backward_scope

__all__ = ["moe_experts"]


class _ExchangeRows(torch.autograd.Function):
    """Rows of `x` in runs to the axis' coordinates (`send[j]` rows to j), `recv[j]` rows
    back from each; backward sends the gradient the opposite way. `own` is the bytes
    this rank records in both directions (its own rows)."""

    @staticmethod
    def forward(ctx, x, mesh, axis, send, recv, own):
        ctx.mesh, ctx.axis, ctx.send, ctx.recv, ctx.own = mesh, axis, send, recv, own
        mesh._record("all_to_all", axis, own, _resolve_phase(None, "forward"))
        return mesh._comm(axis).alltoallv0(x.detach(), send, recv)

    @staticmethod
    def backward(ctx, g):
        with backward_scope():
            ctx.mesh._record("all_to_all", ctx.axis, ctx.own, "backward")
            return ctx.mesh._comm(ctx.axis).alltoallv0(g, ctx.recv, ctx.send), None, None, None, None, None


def moe_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                mesh: Mesh | None = None, axis=None) -> torch.Tensor:
    """The gated experts of compiler/moe.py on this rank's tokens; with `mesh` and `axis`,
    expert-parallel (see the module docstring): `gate`/`up`/`down` hold this rank's E/n
    experts and `top_k_index` names experts of all E."""
    if mesh is None or axis is None or mesh.size(axis) == 1:
        return moe_reference(hidden, top_k_index, top_k_weights, gate, up, down)
    n, r, local = mesh.size(axis), mesh.coord(axis), gate.shape[0]
    T, k = top_k_index.shape
    expert = top_k_index.reshape(-1)
    order = torch.argsort(expert, stable=True)        # rows grouped by expert, so by rank
    counts = torch.bincount(expert, minlength=n * local)
    # 1. how many rows each source sends to each of this rank's experts: [n sources, local]
    got = mesh.all_to_all_flat(counts.view(n, local).contiguous(), axis, split_dim=0, concat_dim=0,
                               phase=_resolve_phase(None, "forward"))
    send = counts.view(n, local).sum(dim=1).tolist()
    recv = got.sum(dim=1).tolist()
    rows = token_rows(hidden, k)[order]
    own = _nbytes(rows)
    # 2. the rows to their experts' ranks
    mine = _ExchangeRows.apply(rows, mesh, axis, send, recv, own)
    # 3. this rank's experts: received rows are by source, then by local expert
    which = torch.arange(local, device=expert.device).repeat(n).repeat_interleave(got.reshape(-1))
    y = expert_ffn(mine, which, gate, up, down)
    # 4. the results back to the rows' ranks, then in the rows' own order
    back = _ExchangeRows.apply(y, mesh, axis, recv, send, own)
    out = back[torch.argsort(order)] * top_k_weights.reshape(-1, 1).to(back.dtype)
    return out.view(T, k, -1).sum(dim=1).to(hidden.dtype)

"""The vocab-parallel cross-entropy: a loss over logits whose class dim is split over a mesh
axis, computed without gathering the logits.

Rank r of the axis holds logits [N, C/k] (classes r*C/k .. (r+1)*C/k - 1) and every
target [N]. Per row, the log-sum-exp over all C classes needs two reductions over the
axis of N fp32 values each: the row's max (so no shard's exp overflows), then the row's
sum of exp(x - max). The rank whose shard holds a row's target then has everything for
that row's loss, lse - x[target]; the other ranks contribute 0 for it. So each rank's
result is a partial sum over the axis (its rows' losses, as a sum or per row), which the
program all_reduces like any partial sum. Rows whose target is `ignore_index` count 0.

    loss_part = rt.vocab_parallel_cross_entropy(logits, target, mesh, "tp", reduction="sum")

Backward needs no communication: the gradient arriving at a partial sum is the same on
every rank, and the loss summed over the ranks has, on rank r's logits, the gradient
g * (softmax(x)[:, shard r] - onehot(target)[:, shard r]) on kept rows; the softmax uses
the global max and sum already reduced in forward.

The two all_reduces are recorded like every collective of the runtime (kind all_reduce,
the bytes of the N fp32 values, phase forward; backward when a recompute region runs the
loss again), so the bytes the plan predicts (`sharding.split_class_collectives`) are the
bytes measured.
"""
from __future__ import annotations

import torch

from .mesh import Mesh, _nbytes, _resolve_phase

__all__ = ["vocab_parallel_cross_entropy"]

REDUCTIONS = ("none", "sum")


def _reduce(mesh: Mesh, axis, t: torch.Tensor, op: str) -> torch.Tensor:
    mesh._comm(axis).allreduce_(t, op)
    mesh._record("all_reduce", axis, _nbytes(t), _resolve_phase(None, "forward"))
    return t


class _VocabParallelCE(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, target, mesh, axis, ignore_index, reduction):
        width = logits.shape[-1]
        first = mesh.coord(axis) * width              # the first class of this rank's shard
        x = logits.detach().float()
        row_max = x.max(dim=-1).values.contiguous()
        _reduce(mesh, axis, row_max, "max")           # all_reduce(max) of N fp32 values
        exp = torch.exp(x - row_max[:, None])
        sum_exp = exp.sum(dim=-1).contiguous()
        _reduce(mesh, axis, sum_exp, "sum")           # all_reduce(sum) of N fp32 values
        # log_softmax as torch forms it on one device, (x - max) - log(sum of exp), so a
        # row's values differ from the single-device ones only by the sum's order
        log_p = (x - row_max[:, None]) - sum_exp.log()[:, None]
        kept = target != ignore_index
        local = target - first
        mine = kept & (local >= 0) & (local < width)  # rows whose target this shard holds
        index = torch.where(mine, local, torch.zeros_like(local))
        picked = log_p.gather(1, index[:, None]).squeeze(1)
        rows = torch.where(mine, -picked, torch.zeros_like(picked))
        ctx.save_for_backward(log_p, index, mine, kept)
        ctx.reduction, ctx.dtype = reduction, logits.dtype
        out = rows.sum() if reduction == "sum" else rows
        return out.to(logits.dtype)

    @staticmethod
    def backward(ctx, g):
        log_p, index, mine, kept = ctx.saved_tensors
        # per row: g * softmax, less g at the target (log_softmax's backward as torch
        # forms it); rows ignored get no gradient
        g = g.float()
        g_row = (g.expand(kept.shape) if ctx.reduction == "sum" else g) * kept
        grad = log_p.exp().mul_(g_row[:, None])
        grad.scatter_add_(1, index[:, None], -(g_row * mine)[:, None])
        return grad.to(ctx.dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mesh: Mesh, axis,
                                 ignore_index: int = -100, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of `logits` [N, C/k] (this rank's classes of `axis`) against class
    indices `target` [N]: this rank's partial sum over `axis` of the loss, summed over
    the rows (`reduction="sum"`) or per row (`"none"`). See the module docstring."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"vocab_parallel_cross_entropy: reduction must be one of {REDUCTIONS}, "
                         f"got {reduction!r} (a mean is a sum divided by the kept targets)")
    if logits.dim() != 2 or target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"vocab_parallel_cross_entropy: logits [N, C/k] and target [N] expected, "
                         f"got {tuple(logits.shape)} and {tuple(target.shape)}")
    return _VocabParallelCE.apply(logits, target, mesh, axis, int(ignore_index), reduction)

"""Differentiable collectives (Megatron-LM ``mappings.py`` style conjugate pairs).

=====================  ==========================  ===============================
function               forward                     backward
=====================  ==========================  ===============================
``copy_to``            identity                    all_reduce(sum)
``all_reduce``         all_reduce(sum)             identity
``all_gather``         all_gather(dim)             own slice, or reduce_scatter(dim)
                                                   when ``partial_grad=True``
``scatter``            own chunk(dim)              all_gather(dim)
``reduce_scatter``     reduce_scatter(sum, dim)    all_gather(dim)
``all_to_all``         all_to_all(split, concat)   all_to_all(concat, split)
=====================  ==========================  ===============================

Every function takes ``(x, mesh, axis, ...)``; ``axis`` is a mesh axis name or
``None`` for the whole world. On a size-1 axis every function returns ``x``
unchanged (no communication, nothing accounted).
"""
from __future__ import annotations

import torch

from .mesh import (Mesh, _all_to_all, _check_divisible, _gather, _nbytes, _norm_dim,
                   _reduce_scatter, _resolve_phase, backward_scope)

__all__ = ["copy_to", "all_reduce", "all_gather", "scatter", "reduce_scatter", "all_to_all"]


# ---- accounted primitives (autograd-free) ---------------------------------
def _ar(mesh: Mesh, axis, g: torch.Tensor, phase: str) -> torch.Tensor:
    c = mesh._comm(axis)
    out = g.detach().clone(memory_format=torch.contiguous_format)
    mesh._record("all_reduce", axis, _nbytes(out), _resolve_phase(None, phase))
    c.allreduce_(out, "sum")
    return out


def _ag(mesh: Mesh, axis, g: torch.Tensor, dim: int, phase: str) -> torch.Tensor:
    c = mesh._comm(axis)
    mesh._record("all_gather", axis, _nbytes(g) * c.size, _resolve_phase(None, phase))
    return _gather(c, g.detach(), dim)


def _rs(mesh: Mesh, axis, g: torch.Tensor, dim: int, phase: str) -> torch.Tensor:
    c = mesh._comm(axis)
    mesh._record("reduce_scatter", axis, _nbytes(g), _resolve_phase(None, phase))
    return _reduce_scatter(c, g.detach(), dim, "sum")


def _a2a(mesh: Mesh, axis, g: torch.Tensor, sd: int, cd: int, phase: str) -> torch.Tensor:
    c = mesh._comm(axis)
    mesh._record("all_to_all", axis, _nbytes(g), _resolve_phase(None, phase))
    return _all_to_all(c, g.detach(), sd, cd)


def _slice(mesh: Mesh, axis, g: torch.Tensor, dim: int) -> torch.Tensor:
    return g.chunk(mesh.size(axis), dim)[mesh.coord(axis)].contiguous()


# ---- autograd Functions ----------------------------------------------------
class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axis):
        ctx.mesh, ctx.axis = mesh, axis
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        with backward_scope():
            return _ar(ctx.mesh, ctx.axis, g, "backward"), None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axis):
        return _ar(mesh, axis, x, "forward")

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axis, dim, partial_grad):
        ctx.mesh, ctx.axis, ctx.dim, ctx.partial = mesh, axis, dim, partial_grad
        return _ag(mesh, axis, x, dim, "forward")

    @staticmethod
    def backward(ctx, g):
        with backward_scope():
            if ctx.partial:
                gx = _rs(ctx.mesh, ctx.axis, g, ctx.dim, "backward")
            else:
                gx = _slice(ctx.mesh, ctx.axis, g, ctx.dim)
            return gx, None, None, None, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axis, dim):
        ctx.mesh, ctx.axis, ctx.dim = mesh, axis, dim
        return _slice(mesh, axis, x, dim)

    @staticmethod
    def backward(ctx, g):
        with backward_scope():
            return _ag(ctx.mesh, ctx.axis, g, ctx.dim, "backward"), None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axis, dim):
        ctx.mesh, ctx.axis, ctx.dim = mesh, axis, dim
        return _rs(mesh, axis, x, dim, "forward")

    @staticmethod
    def backward(ctx, g):
        with backward_scope():
            return _ag(ctx.mesh, ctx.axis, g, ctx.dim, "backward"), None, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axis, split_dim, concat_dim):
        ctx.mesh, ctx.axis, ctx.sd, ctx.cd = mesh, axis, split_dim, concat_dim
        return _a2a(mesh, axis, x, split_dim, concat_dim, "forward")

    @staticmethod
    def backward(ctx, g):
        with backward_scope():
            return _a2a(ctx.mesh, ctx.axis, g, ctx.cd, ctx.sd, "backward"), None, None, None, None


# ---- public API ------------------------------------------------------------
def _trivial(mesh: Mesh, axis) -> bool:
    mesh._comm(axis)  # validates the axis / closed mesh
    return mesh.size(axis) == 1


def copy_to(x: torch.Tensor, mesh: Mesh, axis) -> torch.Tensor:
    """Megatron "f": identity forward, all-reduce(sum) of the gradient over ``axis``."""
    if _trivial(mesh, axis):
        return x
    return _CopyTo.apply(x, mesh, axis)


def all_reduce(x: torch.Tensor, mesh: Mesh, axis) -> torch.Tensor:
    """Megatron "g": all-reduce(sum) forward over ``axis``, identity backward."""
    if _trivial(mesh, axis):
        return x
    return _AllReduce.apply(x, mesh, axis)


def all_gather(x: torch.Tensor, mesh: Mesh, axis, dim: int,
               partial_grad: bool = False) -> torch.Tensor:
    """Concatenate the shards of ``axis`` along ``dim`` in coordinate order.

    Backward: this rank's slice of the gradient (the gradient is assumed
    replicated over ``axis``), or with ``partial_grad=True`` a reduce-scatter(sum)
    of the gradient (each rank holds a partial sum). All ranks must pass shards
    of identical shape.
    """
    d = _norm_dim(x, dim)
    if _trivial(mesh, axis):
        return x
    return _AllGather.apply(x, mesh, axis, d, bool(partial_grad))


def scatter(x: torch.Tensor, mesh: Mesh, axis, dim: int) -> torch.Tensor:
    """Take this rank's chunk of (replicated) ``x`` along ``dim``; backward all-gathers."""
    d = _norm_dim(x, dim)
    _check_divisible(x, d, mesh.size(axis), "scatter", axis)
    if _trivial(mesh, axis):
        return x
    return _Scatter.apply(x, mesh, axis, d)


def reduce_scatter(x: torch.Tensor, mesh: Mesh, axis, dim: int) -> torch.Tensor:
    """Sum over ``axis`` and keep this rank's chunk along ``dim``; backward all-gathers."""
    d = _norm_dim(x, dim)
    _check_divisible(x, d, mesh.size(axis), "reduce_scatter", axis)
    if _trivial(mesh, axis):
        return x
    return _ReduceScatter.apply(x, mesh, axis, d)


def all_to_all(x: torch.Tensor, mesh: Mesh, axis, split_dim: int, concat_dim: int) -> torch.Tensor:
    """Split ``x`` along ``split_dim`` into n chunks, send chunk j to coordinate j and
    concatenate the received chunks along ``concat_dim`` in coordinate order (a
    tensor sharded on ``concat_dim`` becomes sharded on ``split_dim``). Backward is
    the inverse all-to-all."""
    sd = _norm_dim(x, split_dim, "split_dim")
    cd = _norm_dim(x, concat_dim, "concat_dim")
    _check_divisible(x, sd, mesh.size(axis), "all_to_all", axis)
    if _trivial(mesh, axis):
        return x
    return _AllToAll.apply(x, mesh, axis, sd, cd)

"""Differentiable collectives: the program steps of the collective table, as autograd
Functions (Megatron-LM's conjugate pairs, read from `autopar.compiler.collectives.OPS`).

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

``copy_to_linear(x, weight, bias, mesh, axis)`` is ``copy_to`` followed by the
``F.linear`` it feeds, as one step whose backward hides the all_reduce: it computes the
input's gradient first, launches its all_reduce asynchronously, computes the weight's and
bias' gradients meanwhile and waits only then (Megatron-LM's asynchronous input-gradient
all-reduce of a column-parallel linear). ``copy_to_linears`` does it for several linears
of one input (query, key, value). The same sums, the same bytes, one call.

Every function takes ``(x, mesh, axis, ...)``; ``axis`` is a mesh axis name or ``None``
for the whole world. On a size-1 axis every function returns ``x`` unchanged (no
communication, nothing accounted). What each direction does and records is the table's:
one `_Step` Function runs the table's forward move and, in backward, its backward move.
"""
from __future__ import annotations

import time

import torch

from autopar.compiler.collectives import ACTION_BYTES, Move, moves

from .mesh import (Mesh, _all_to_all, _check_divisible, _gather, _nbytes, _norm_dim,
                   _reduce_scatter, _resolve_phase, backward_scope)

__all__ = ["copy_to", "copy_to_linear", "copy_to_linears", "all_reduce", "all_gather", "scatter", "reduce_scatter", "all_to_all"]


def run_move(move: Move, mesh: Mesh, axis, t: torch.Tensor, dims: tuple, phase: str) -> torch.Tensor:
    """Carry out one move of the table on `t`, recording its bytes (ACTION_BYTES)."""
    a = move.action
    if a == "identity":
        return t if phase == "backward" else t.view_as(t)
    if a == "slice":
        return t.chunk(mesh.size(axis), dims[0])[mesh.coord(axis)].contiguous()
    c = mesh._comm(axis)
    t = t.detach()
    if a == "all_reduce":
        out = t.clone(memory_format=torch.contiguous_format)
        c.allreduce_(out, "sum")
    elif a == "all_gather":
        out = _gather(c, t, dims[0])
    elif a == "reduce_scatter":
        out = _reduce_scatter(c, t, dims[0], "sum")
    elif a == "all_to_all":
        out = _all_to_all(c, t, dims[0], dims[1])
    else:                                           # pragma: no cover - the table has no other
        raise ValueError(f"unknown move {a}")
    mesh._record(a, axis, _nbytes(t if ACTION_BYTES[a] == "in" else out), _resolve_phase(None, phase))
    return out


class _Step(torch.autograd.Function):
    """One program step: the table's forward move now, its backward move on the gradient."""

    @staticmethod
    def forward(ctx, x, mesh, axis, op, attrs):
        fwd, bwd = moves(op, attrs)
        ctx.mesh, ctx.axis, ctx.bwd, ctx.dims = mesh, axis, bwd, bwd.dim_values(attrs)
        return run_move(fwd, mesh, axis, x, fwd.dim_values(attrs), "forward")

    @staticmethod
    def backward(ctx, g):
        with backward_scope():
            return run_move(ctx.bwd, ctx.mesh, ctx.axis, g, ctx.dims, "backward"), None, None, None, None


def _step(op: str, x: torch.Tensor, mesh: Mesh, axis, **attrs) -> torch.Tensor:
    mesh._comm(axis)                    # validates the axis / a closed mesh
    if mesh.size(axis) == 1:
        return x
    return _Step.apply(x, mesh, axis, op, attrs)


# ---- public API ------------------------------------------------------------
def copy_to(x: torch.Tensor, mesh: Mesh, axis) -> torch.Tensor:
    """Megatron "f": identity forward, all-reduce(sum) of the gradient over ``axis``."""
    return _step("copy_to", x, mesh, axis)


def copy_to_linear(x: torch.Tensor, weight: torch.Tensor, bias, mesh: Mesh, axis) -> torch.Tensor:
    """`F.linear(copy_to(x, mesh, axis), weight, bias)`, the all_reduce of x's gradient
    running while backward computes the weight's gradient (see the module docstring)."""
    return copy_to_linears(x, [(weight, bias)], mesh, axis)[0]


def copy_to_linears(x: torch.Tensor, layers, mesh: Mesh, axis) -> list[torch.Tensor]:
    """`[F.linear(copy_to(x, mesh, axis), w, b) for w, b in layers]`: several linears of one
    input (the query, key and value projections) whose summed input gradient is all_reduced
    once, while backward computes their weights' gradients."""
    mesh._comm(axis)
    if mesh.size(axis) == 1:
        return [torch.nn.functional.linear(x, w, b) for w, b in layers]
    flat = [t for w, b in layers for t in (w, b)]
    return list(_CopyToLinears.apply(x, mesh, axis, *flat))


class _CopyToLinears(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axis, *flat):
        ws, bs = flat[0::2], flat[1::2]
        ctx.save_for_backward(x, *ws)
        ctx.mesh, ctx.axis, ctx.biases = mesh, axis, [b is not None for b in bs]
        return tuple(torch.nn.functional.linear(x, w, b) for w, b in zip(ws, bs))

    @staticmethod
    def backward(ctx, *grads):
        x, *ws = ctx.saved_tensors
        mesh, axis = ctx.mesh, ctx.axis
        gx = handle = None
        out = [None] * (2 * len(ws))
        with backward_scope():
            g2 = [g.reshape(-1, g.shape[-1]) for g in grads]
            if ctx.needs_input_grad[0]:
                gx = g2[0].mm(ws[0])                     # a partial sum over `axis`
                for g, w in zip(g2[1:], ws[1:]):
                    gx.addmm_(g, w)
                gx = gx.view(x.shape)
                mesh._record("all_reduce", axis, _nbytes(gx), "backward")
                launched = time.perf_counter()
                handle = mesh._comm(axis).iallreduce_(gx, "sum")
            x2 = x.reshape(-1, x.shape[-1])
            for k, (g, has_bias) in enumerate(zip(g2, ctx.biases)):   # while the all_reduce runs
                if ctx.needs_input_grad[3 + 2 * k]:
                    out[2 * k] = g.t().mm(x2)
                if has_bias and ctx.needs_input_grad[4 + 2 * k]:
                    out[2 * k + 1] = g.sum(0)
            if handle is not None:
                t0 = time.perf_counter()
                handle.wait()
                mesh.async_log.append({"kind": "all_reduce", "axis": axis, "what": "input gradient of a linear",
                                       "shape": list(gx.shape), "dtype": str(gx.dtype), "launched": launched,
                                       "blocked_s": time.perf_counter() - t0})
        return (gx, None, None, *out)


def all_reduce(x: torch.Tensor, mesh: Mesh, axis) -> torch.Tensor:
    """Megatron "g": all-reduce(sum) forward over ``axis``, identity backward."""
    return _step("all_reduce", x, mesh, axis)


def all_gather(x: torch.Tensor, mesh: Mesh, axis, dim: int,
               partial_grad: bool = False) -> torch.Tensor:
    """Concatenate the shards of ``axis`` along ``dim`` in coordinate order.

    Backward: this rank's slice of the gradient (the gradient is assumed
    replicated over ``axis``), or with ``partial_grad=True`` a reduce-scatter(sum)
    of the gradient (each rank holds a partial sum). All ranks must pass shards
    of identical shape.
    """
    return _step("all_gather", x, mesh, axis, dim=_norm_dim(x, dim), partial_grad=bool(partial_grad))


def scatter(x: torch.Tensor, mesh: Mesh, axis, dim: int) -> torch.Tensor:
    """Take this rank's chunk of (replicated) ``x`` along ``dim``; backward all-gathers."""
    d = _norm_dim(x, dim)
    _check_divisible(x, d, mesh.size(axis), "scatter", axis)
    return _step("scatter", x, mesh, axis, dim=d)


def reduce_scatter(x: torch.Tensor, mesh: Mesh, axis, dim: int) -> torch.Tensor:
    """Sum over ``axis`` and keep this rank's chunk along ``dim``; backward all-gathers."""
    d = _norm_dim(x, dim)
    _check_divisible(x, d, mesh.size(axis), "reduce_scatter", axis)
    return _step("reduce_scatter", x, mesh, axis, dim=d)


def all_to_all(x: torch.Tensor, mesh: Mesh, axis, split_dim: int, concat_dim: int) -> torch.Tensor:
    """Split ``x`` along ``split_dim`` into n chunks, send chunk j to coordinate j and
    concatenate the received chunks along ``concat_dim`` in coordinate order (a
    tensor sharded on ``concat_dim`` becomes sharded on ``split_dim``). Backward is
    the inverse all-to-all."""
    sd = _norm_dim(x, split_dim, "split_dim")
    cd = _norm_dim(x, concat_dim, "concat_dim")
    _check_divisible(x, sd, mesh.size(axis), "all_to_all", axis)
    return _step("all_to_all", x, mesh, axis, split_dim=sd, concat_dim=cd)

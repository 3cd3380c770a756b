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

Collective matmuls (async tensor parallelism), for sequence-parallel blocks whose
activations are split over ``axis`` on a dim other than the features, ``dim``: the
collective runs as its ring's n - 1 steps (each rank hands one shard to the next), and the
linear computes on the shard that has arrived while the next one travels -- the bytes and
the latency of the ring all_gather / reduce_scatter, hidden behind the matmul.

- ``all_gather_linears(x, layers, mesh, axis, dim)`` is ``all_gather`` (with
  ``partial_grad=True``) followed by the linears it feeds: each shard's rows go through the
  linears as they arrive. Backward sums every linear's input gradient, launches its
  reduce_scatter and computes the weights' gradients meanwhile.
- ``linear_reduce_scatter(x, weight, bias, mesh, axis, dim)`` is a linear whose partial
  output is reduce_scattered along ``dim``: the running sum of each rank's rows travels the
  ring, every rank adding its partial rows, computed while the sum is on its way. Backward
  gathers the gradient around the ring, computing each shard's input gradient as it arrives.

Each is accounted as the one collective it replaces (its bytes, one call); the sums are the
collective's, added in ring order.

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

__all__ = ["copy_to", "copy_to_linear", "copy_to_linears", "all_gather_linears", "linear_reduce_scatter", "all_reduce", "all_gather", "scatter", "reduce_scatter", "all_to_all"]


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
        g2 = [g.reshape(-1, g.shape[-1]) for g in grads]
        gx, out = _input_grad_behind_weights(ctx, "all_reduce", "input gradient of a linear", x, ws, g2, 3)
        return (gx, None, None, *out)


def _input_grad_behind_weights(ctx, kind: str, what: str, x: torch.Tensor, ws, g2, first: int):
    """Backward of linears of one input `x` (its rows in the order of the gradients' `g2`):
    the input's gradient -- a partial sum over `ctx.axis` -- first, its `kind` collective
    (all_reduce, or reduce_scatter of the rows) launched asynchronously, the weights' and
    biases' gradients computed meanwhile, then the wait. `first`: the position of the first
    weight among the Function's inputs. Returns (the reduced input gradient or None, the
    weight and bias gradients)."""
    mesh, axis = ctx.mesh, ctx.axis
    out = [None] * (2 * len(ws))
    gx = handle = None
    with backward_scope():
        if ctx.needs_input_grad[0]:
            gx = g2[0].mm(ws[0])                     # a partial sum over `axis`
            for g, w in zip(g2[1:], ws[1:]):
                gx.addmm_(g, w)
            gx = gx.view(x.shape)
            mesh._record(kind, axis, _nbytes(gx), "backward")
            launched = time.perf_counter()
            c = mesh._comm(axis)
            handle = c.iallreduce_(gx, "sum") if kind == "all_reduce" else c.ireduce_scatter0(gx, "sum")
        x2 = x.reshape(-1, x.shape[-1])
        for k, (g, has_bias) in enumerate(zip(g2, ctx.biases)):   # while the collective runs
            if ctx.needs_input_grad[first + 2 * k]:
                out[2 * k] = g.t().mm(x2)
            if has_bias and ctx.needs_input_grad[first + 1 + 2 * k]:
                out[2 * k + 1] = g.sum(0)
        if handle is not None:
            sent, t0 = gx, time.perf_counter()
            gx = handle.wait()
            _log(mesh, kind, axis, what, sent.shape, sent.dtype, launched, time.perf_counter() - t0)
    return gx, out


def _log(mesh: Mesh, kind: str, axis, what: str, shape, dtype, launched: float, blocked: float) -> None:
    """An asynchronous collective for the timeline: what it sent (the input of the
    collective it is, or stands for) and how long the program blocked waiting for it."""
    mesh.async_log.append({"kind": kind, "axis": axis, "what": what, "shape": list(shape),
                           "dtype": str(dtype), "launched": launched, "blocked_s": blocked})


def _check_rows(x: torch.Tensor, d: int, op: str) -> None:
    if d == x.dim() - 1:
        raise ValueError(f"{op}: dim {d} is the linear's feature dim; a collective matmul moves rows "
                         "(another dim)")


def _ring_gather(mesh: Mesh, axis, shard: torch.Tensor, use, what: str) -> list[torch.Tensor]:
    """All shards of `axis` (dim 0 = rows; index = coordinate), passed around the ring: at
    step k this rank holds coordinate (r - k)'s shard, hands it to the next rank and calls
    `use(coordinate, shard)` while the previous rank's arrives. n - 1 transfers of a shard:
    an all_gather's bytes, its ring's latency."""
    c, n, r = mesh._comm(axis), mesh.size(axis), mesh.coord(axis)
    blocks: list = [None] * n
    cur, blocked, launched = shard.contiguous(), 0.0, time.perf_counter()
    for k in range(n):
        src = (r - k) % n
        h = c.ishift(cur) if k < n - 1 else None
        blocks[src] = cur
        use(src, cur)
        if h is not None:
            t0 = time.perf_counter()
            cur = h.wait()
            blocked += time.perf_counter() - t0
    _log(mesh, "all_gather", axis, what, shard.shape, shard.dtype, launched, blocked)
    return blocks


def all_gather_linears(x: torch.Tensor, layers, mesh: Mesh, axis, dim: int) -> list[torch.Tensor]:
    """`[F.linear(all_gather(x, mesh, axis, dim, partial_grad=True), w, b) for w, b in
    layers]` as a collective matmul (see the module docstring)."""
    mesh._comm(axis)
    d = _norm_dim(x, dim)
    if mesh.size(axis) == 1:
        return [torch.nn.functional.linear(x, w, b) for w, b in layers]
    _check_rows(x, d, "all_gather_linears")
    flat = [t for w, b in layers for t in (w, b)]
    return list(_AllGatherLinears.apply(x, mesh, axis, d, *flat))


class _AllGatherLinears(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axis, d, *flat):
        ws, bs = flat[0::2], flat[1::2]
        n = mesh.size(axis)
        outs = [[None] * n for _ in ws]

        def use(src, rows):                     # while the next shard travels
            for k, (w, b) in enumerate(zip(ws, bs)):
                outs[k][src] = torch.nn.functional.linear(rows, w, b)
        blocks = _ring_gather(mesh, axis, x.detach().movedim(d, 0), use, "input of linears, ring")
        full = torch.cat(blocks, 0)             # (n*s, ...): this layout's dim 0 is `d`
        mesh._record("all_gather", axis, _nbytes(full), "forward")
        ctx.save_for_backward(full, *ws)
        ctx.mesh, ctx.axis, ctx.d, ctx.biases = mesh, axis, d, [b is not None for b in bs]
        return tuple(torch.cat(o, 0).movedim(0, d) for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        full, *ws = ctx.saved_tensors
        g2 = [g.movedim(ctx.d, 0).reshape(-1, g.shape[-1]) for g in grads]
        gx, out = _input_grad_behind_weights(ctx, "reduce_scatter", "input gradient of linears", full, ws, g2, 4)
        return (gx.movedim(0, ctx.d) if gx is not None else None, None, None, None, *out)


def linear_reduce_scatter(x: torch.Tensor, weight: torch.Tensor, bias, mesh: Mesh, axis, dim: int) -> torch.Tensor:
    """`reduce_scatter(F.linear(x, weight, bias), mesh, axis, dim)` as a collective matmul
    (see the module docstring)."""
    mesh._comm(axis)
    d = _norm_dim(x, dim)
    n = mesh.size(axis)
    if n == 1:
        return torch.nn.functional.linear(x, weight, bias)
    _check_rows(x, d, "linear_reduce_scatter")
    _check_divisible(x, d, n, "linear_reduce_scatter", axis)
    return _LinearReduceScatter.apply(x, weight, bias, mesh, axis, d)


class _LinearReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mesh, axis, d):
        c, n, r = mesh._comm(axis), mesh.size(axis), mesh.coord(axis)
        xm = x.detach().movedim(d, 0)
        s = xm.shape[0] // n

        def partial(block):
            return torch.nn.functional.linear(xm[block * s:(block + 1) * s], weight, bias)
        # the running sum of block b starts at rank b + 1 and travels the ring to rank b,
        # each rank adding its partial rows of b: n - 1 transfers of a block
        acc = partial((r - 1) % n).contiguous()
        mesh._record("reduce_scatter", axis, _nbytes(acc) * n, "forward")
        blocked, launched = 0.0, time.perf_counter()
        for k in range(1, n):
            h = c.ishift(acc)
            mine = partial((r - k - 1) % n)      # while the running sum travels
            t0 = time.perf_counter()
            acc = h.wait() + mine
            blocked += time.perf_counter() - t0
        _log(mesh, "reduce_scatter", axis, "output of a linear, ring", (n * s,) + tuple(acc.shape[1:]), acc.dtype,
             launched, blocked)
        ctx.save_for_backward(x, weight)
        ctx.mesh, ctx.axis, ctx.d, ctx.bias = mesh, axis, d, bias is not None
        return acc.movedim(0, d)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        mesh, axis, d = ctx.mesh, ctx.axis, ctx.d
        n = mesh.size(axis)
        with backward_scope():
            gxs: list = [None] * n

            def use(src, rows):                 # the input gradient of those rows meanwhile
                if ctx.needs_input_grad[0]:
                    gxs[src] = rows.matmul(weight)
            blocks = _ring_gather(mesh, axis, g.movedim(d, 0), use, "gradient of a linear's output, ring")
            gfull = torch.cat(blocks, 0)
            mesh._record("all_gather", axis, _nbytes(gfull), "backward")
            gx = torch.cat(gxs, 0).movedim(0, d) if ctx.needs_input_grad[0] else None
            g2 = gfull.reshape(-1, gfull.shape[-1])
            gw = g2.t().mm(x.movedim(d, 0).reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
            gb = g2.sum(0) if ctx.bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None


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

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

Chunked collective matmuls (async tensor parallelism), for sequence-parallel blocks whose
activations are split on a dim other than the features ``dim`` over ``axis``:

- ``all_gather_linears(x, layers, mesh, axis, dim, chunks)`` is ``all_gather`` (with
  ``partial_grad=True``) followed by the linears it feeds. Forward cuts this rank's shard
  into ``chunks`` pieces along ``dim`` and gathers piece j+1 while the linears run on the
  gathered piece j; backward sums the input gradient of every linear, launches its
  reduce_scatter and computes the weights' gradients meanwhile.
- ``linear_reduce_scatter(x, weight, bias, mesh, axis, dim, chunks)`` is a linear whose
  (partial) output is reduce_scattered along ``dim``. Forward computes the output rows of
  piece j and reduce_scatters them while piece j+1 is computed; backward gathers the
  gradient piece by piece, computing the input gradient of each gathered piece meanwhile.

Chunking moves the same bytes in ``chunks`` calls of 1/``chunks`` each (the unchunked
direction in one call); the rows are the same rows, so the sums are the unchunked ones.

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


def _log(mesh: Mesh, kind: str, axis, what: str, sent: torch.Tensor, launched: float, t0: float) -> None:
    mesh.async_log.append({"kind": kind, "axis": axis, "what": what, "shape": list(sent.shape),
                           "dtype": str(sent.dtype), "launched": launched,
                           "blocked_s": time.perf_counter() - t0})


def _interleave(pieces: list[torch.Tensor], n: int) -> torch.Tensor:
    """Gathered pieces (piece j: rank r's j-th rows for every r, rank-major, on dim 0) as
    the whole gathered tensor: rank r's rows in order, r = 0..n-1."""
    c = len(pieces)
    t = torch.stack([p.reshape(n, p.shape[0] // n, *p.shape[1:]) for p in pieces], 1)
    return t.reshape(n * c * t.shape[2], *t.shape[3:])


def _rows(t: torch.Tensor, n: int, c: int, j: int) -> torch.Tensor:
    """Of a gathered tensor (dim 0 = n ranks' shards of c pieces each), the rows of piece j
    of every rank, rank-major: what gathering piece j makes."""
    v = t.reshape(n, c, t.shape[0] // (n * c), *t.shape[1:])
    return v[:, j].reshape(-1, *t.shape[1:])


def _check_chunks(x: torch.Tensor, d: int, chunks: int, op: str, whole: int) -> int:
    chunks = int(chunks)
    if chunks < 1 or x.shape[d] % (whole * chunks) != 0:
        raise ValueError(f"{op}: size {x.shape[d]} of dim {d} (shape {tuple(x.shape)}) does not split "
                         f"into {whole} x {chunks} chunks")
    if d == x.dim() - 1:
        raise ValueError(f"{op}: dim {d} is the linear's feature dim; chunking needs another dim")
    return chunks


def all_gather_linears(x: torch.Tensor, layers, mesh: Mesh, axis, dim: int, chunks: int = 2) -> list[torch.Tensor]:
    """`[F.linear(all_gather(x, mesh, axis, dim, partial_grad=True), w, b) for w, b in
    layers]`, the gather cut into `chunks` pieces that hide behind the linears (see the
    module docstring)."""
    mesh._comm(axis)
    d = _norm_dim(x, dim)
    if mesh.size(axis) == 1:
        return [torch.nn.functional.linear(x, w, b) for w, b in layers]
    chunks = _check_chunks(x, d, chunks, "all_gather_linears", 1)
    flat = [t for w, b in layers for t in (w, b)]
    return list(_AllGatherLinears.apply(x, mesh, axis, d, chunks, *flat))


class _AllGatherLinears(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axis, d, chunks, *flat):
        ws, bs = flat[0::2], flat[1::2]
        c, n = mesh._comm(axis), mesh.size(axis)
        pieces = x.detach().movedim(d, 0).contiguous().chunk(chunks, 0)
        handles = [None] * chunks
        launched = [0.0] * chunks

        def launch(j):
            launched[j] = time.perf_counter()
            handles[j] = c.iallgather0(pieces[j])
        launch(0)
        gathered, outs = [], [[] for _ in ws]
        for j in range(chunks):
            t0 = time.perf_counter()
            g = handles[j].wait()
            if j + 1 < chunks:
                launch(j + 1)                   # in flight while piece j's linears run
            _log(mesh, "all_gather", axis, "input of linears, a chunk", pieces[j], launched[j], t0)
            mesh._record("all_gather", axis, _nbytes(g), "forward")
            gathered.append(g)
            for k, (w, b) in enumerate(zip(ws, bs)):
                outs[k].append(torch.nn.functional.linear(g, w, b))
        full = _interleave(gathered, n)         # (n*s, ...), this layout's dim 0 is `d`
        ctx.save_for_backward(full, *ws)
        ctx.mesh, ctx.axis, ctx.d, ctx.biases = mesh, axis, d, [b is not None for b in bs]
        return tuple(_interleave(o, n).movedim(0, d) for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        full, *ws = ctx.saved_tensors
        mesh, axis, d = ctx.mesh, ctx.axis, ctx.d
        out = [None] * (2 * len(ws))
        gx = handle = None
        with backward_scope():
            g2 = [g.movedim(d, 0).reshape(-1, g.shape[-1]) for g in grads]
            if ctx.needs_input_grad[0]:
                gx = g2[0].mm(ws[0])                     # a partial sum over `axis`
                for g, w in zip(g2[1:], ws[1:]):
                    gx.addmm_(g, w)
                gx = gx.view(full.shape)
                mesh._record("reduce_scatter", axis, _nbytes(gx), "backward")
                launched = time.perf_counter()
                handle = mesh._comm(axis).ireduce_scatter0(gx, "sum")
            x2 = full.reshape(-1, full.shape[-1])
            for k, (g, has_bias) in enumerate(zip(g2, ctx.biases)):   # while the reduce_scatter runs
                if ctx.needs_input_grad[5 + 2 * k]:
                    out[2 * k] = g.t().mm(x2)
                if has_bias and ctx.needs_input_grad[6 + 2 * k]:
                    out[2 * k + 1] = g.sum(0)
            if handle is not None:
                t0 = time.perf_counter()
                gx = handle.wait().movedim(0, d)
                _log(mesh, "reduce_scatter", axis, "input gradient of linears", full, launched, t0)
        return (gx, None, None, None, None, *out)


def linear_reduce_scatter(x: torch.Tensor, weight: torch.Tensor, bias, mesh: Mesh, axis, dim: int,
                          chunks: int = 2) -> torch.Tensor:
    """`reduce_scatter(F.linear(x, weight, bias), mesh, axis, dim)`, the output's rows
    reduce_scattered in `chunks` pieces while the next piece is computed (see the module
    docstring)."""
    mesh._comm(axis)
    d = _norm_dim(x, dim)
    n = mesh.size(axis)
    if n == 1:
        return torch.nn.functional.linear(x, weight, bias)
    chunks = _check_chunks(x, d, chunks, "linear_reduce_scatter", n)
    return _LinearReduceScatter.apply(x, weight, bias, mesh, axis, d, chunks)


class _LinearReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mesh, axis, d, chunks):
        c, n = mesh._comm(axis), mesh.size(axis)
        xm = x.detach().movedim(d, 0)
        handles, launched, parts = [], [], []

        def finish(j):
            t0 = time.perf_counter()
            parts.append(handles[j].wait())
            _log(mesh, "reduce_scatter", axis, "output of a linear, a chunk", sent[j], launched[j], t0)
        sent = []
        for j in range(chunks):
            y = torch.nn.functional.linear(_rows(xm, n, chunks, j), weight, bias).contiguous()
            mesh._record("reduce_scatter", axis, _nbytes(y), "forward")
            sent.append(y)
            launched.append(time.perf_counter())
            handles.append(c.ireduce_scatter0(y, "sum"))
            if j:
                finish(j - 1)                   # piece j was computed while j-1 was in flight
        finish(chunks - 1)
        ctx.save_for_backward(x, weight)
        ctx.mesh, ctx.axis, ctx.d, ctx.chunks, ctx.bias = mesh, axis, d, chunks, bias is not None
        return torch.cat(parts, 0).movedim(0, d)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        mesh, axis, d, chunks = ctx.mesh, ctx.axis, ctx.d, ctx.chunks
        c, n = mesh._comm(axis), mesh.size(axis)
        with backward_scope():
            pieces = g.movedim(d, 0).contiguous().chunk(chunks, 0)
            handles, launched = [None] * chunks, [0.0] * chunks

            def launch(j):
                launched[j] = time.perf_counter()
                handles[j] = c.iallgather0(pieces[j])
            launch(0)
            gathered, gxs = [], []
            for j in range(chunks):
                t0 = time.perf_counter()
                gj = handles[j].wait()
                if j + 1 < chunks:
                    launch(j + 1)               # in flight while piece j's input gradient is made
                _log(mesh, "all_gather", axis, "gradient of a linear's output, a chunk", pieces[j], launched[j], t0)
                mesh._record("all_gather", axis, _nbytes(gj), "backward")
                gathered.append(gj)
                if ctx.needs_input_grad[0]:
                    gxs.append(gj.matmul(weight))
            gx = _interleave(gxs, n).movedim(0, d) if gxs else None
            gfull = _interleave(gathered, n)
            g2 = gfull.reshape(-1, gfull.shape[-1])
            gw = g2.t().mm(x.movedim(d, 0).reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
            gb = g2.sum(0) if ctx.bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None, None


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

"""Backend communicators for one mesh axis (or the whole world).

Every communicator works on *dim-0 layouts* only; the layout juggling for an
arbitrary ``dim`` (movedim / chunk / stack) is done once in :mod:`.mesh`, so the
torch.distributed and MPI paths are byte-for-byte the same algorithm:

* ``allreduce_(t, op)``      in place, ``t`` contiguous.
* ``allgather0(t)``          ``(s, *r) -> (n*s, *r)``, block ``j`` from coordinate ``j``.
* ``reduce_scatter0(t, op)`` ``(n*c, *r) -> (c, *r)``, block ``j`` ends on coordinate ``j``.
* ``alltoall0(t)``           ``(n, *r) -> (n, *r)``, ``out[j]`` is ``in[me]`` of coordinate ``j``.
* ``broadcast_(t, root)``    in place, ``root`` is a coordinate along the axis.
* ``iallreduce_(t, op)``     nonblocking ``allreduce_``: returns a handle with ``wait()`` and
  ``done()`` (``done`` also drives progress, which MPI needs from the caller).
* ``iallgather0(t)``, ``ireduce_scatter0(t, op)``: nonblocking, the handle's ``wait()``
  returns the result.

Only torch, numpy (``Tensor.numpy`` and the 16-bit reduction op's buffer views) and,
lazily, mpi4py are used.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

_OPS = ("sum", "max", "min", "prod")


def check_op(op: str) -> str:
    if op not in _OPS:
        raise ValueError(f"unsupported reduction op {op!r}; expected one of {_OPS}")
    return op


# --------------------------------------------------------------------------
# torch.distributed
# --------------------------------------------------------------------------
def _torch_op(op: str):
    R = dist.ReduceOp
    return {"sum": R.SUM, "max": R.MAX, "min": R.MIN, "prod": R.PRODUCT}[op]


# prefer the non-deprecated spellings when this torch has them
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
RING_TAG = 7301          # MPI tag of the ring steps of collective matmuls (pipelines use others)
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Handle:
    """A collective in flight: `wait()` blocks until it is done and returns its result."""

    def __init__(self, wait, done=lambda: True, result=None):
        self._wait, self._done, self.result = wait, done, result
        self.finished = False

    def done(self) -> bool:
        # a finished test must still run the wait: MPI's copies its result out there
        if not self.finished and self._done():
            self.wait()
        return self.finished

    def wait(self):
        if not self.finished:
            self._wait()
            self.finished = True
        return self.result


class TorchComm:
    """A torch.distributed process group restricted to ``ranks`` (coordinate order)."""

    def __init__(self, group, ranks, coord):
        self.group = group          # None means the default (world) group
        self.ranks = list(ranks)    # global ranks, index == coordinate
        self.size = len(self.ranks)
        self.coord = coord

    def allreduce_(self, t, op="sum"):
        dist.all_reduce(t, op=_torch_op(op), group=self.group)
        return t

    def allgather0(self, t):
        out = t.new_empty((self.size * t.shape[0],) + tuple(t.shape[1:]))
        _ALL_GATHER(out, t, group=self.group)
        return out

    def reduce_scatter0(self, t, op="sum"):
        out = t.new_empty((t.shape[0] // self.size,) + tuple(t.shape[1:]))
        _REDUCE_SCATTER(out, t, op=_torch_op(op), group=self.group)
        return out

    def alltoall0(self, t):
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t, group=self.group)
        return out

    def alltoallv0(self, t, send_rows, recv_rows):
        """Rows of `t` (dim 0) in runs: `send_rows[j]` rows to coordinate j; the rows
        received, `recv_rows[j]` from coordinate j, in coordinate order."""
        out = t.new_empty((sum(recv_rows),) + tuple(t.shape[1:]))
        dist.all_to_all_single(out, t.contiguous(), output_split_sizes=list(recv_rows),
                               input_split_sizes=list(send_rows), group=self.group)
        return out

    def broadcast_(self, t, root):
        dist.broadcast(t, src=self.ranks[root], group=self.group)
        return t

    def iallreduce_(self, t, op="sum"):
        work = dist.all_reduce(t, op=_torch_op(op), group=self.group, async_op=True)
        return Handle(work.wait, work.is_completed, t)

    def iallgather0(self, t):
        out = t.new_empty((self.size * t.shape[0],) + tuple(t.shape[1:]))
        work = _ALL_GATHER(out, t.contiguous(), group=self.group, async_op=True)
        return Handle(work.wait, work.is_completed, out)

    def ireduce_scatter0(self, t, op="sum"):
        out = t.new_empty((t.shape[0] // self.size,) + tuple(t.shape[1:]))
        work = _REDUCE_SCATTER(out, t.contiguous(), op=_torch_op(op), group=self.group, async_op=True)
        return Handle(work.wait, work.is_completed, out)

    def ishift(self, t):
        """Send `t` to the next coordinate of the ring and receive the previous one's tensor
        of the same shape, without waiting (one step of a ring collective)."""
        t = t.contiguous()
        out = torch.empty_like(t)
        nxt, prev = self.ranks[(self.coord + 1) % self.size], self.ranks[(self.coord - 1) % self.size]
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, t, nxt, self.group),
                                        dist.P2POp(dist.irecv, out, prev, self.group)])
        h = Handle(lambda: [w.wait() for w in works], lambda: all(w.is_completed() for w in works), out)
        h._keep = t
        return h

    def allreduce_scalar(self, value, op="sum", device=None):
        t = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=_torch_op(op), group=self.group)
        return float(t.item())

    def barrier(self):
        dist.barrier(group=self.group)

    def free(self):
        if self.group is not None:
            try:
                dist.destroy_process_group(self.group)
            except Exception:  # pragma: no cover - best effort on teardown
                pass
        self.group = None


# --------------------------------------------------------------------------
# MPI (mpi4py), through host numpy buffers
# --------------------------------------------------------------------------
_MPI_DIRECT = {torch.float32, torch.float64, torch.int32, torch.int64,
               torch.complex64, torch.complex128}


def _reduce_dtype(dt: torch.dtype) -> torch.dtype:
    """dtype the MPI reduction is carried out in (numpy/MPI-representable)."""
    if dt in _MPI_DIRECT:
        return dt
    if dt.is_floating_point:          # float16, bfloat16, float8 ...
        return torch.float32
    if dt == torch.bool:
        return torch.int32            # sum -> nonzero -> True (logical or)
    return torch.int64                # small ints


# 16-bit floats travel as themselves: MPI has no bfloat16 / float16 datatype, so their
# buffers are passed as 16-bit integers and reduced by a user-defined op that combines two
# values in fp32 and rounds back, as torch's own bf16 arithmetic does -- the bytes on the
# wire are the bf16 bytes the plan counts, not fp32 copies
_HALF = frozenset({torch.bfloat16, torch.float16})
_HALF_OPS: dict = {}


def _half_op(MPI, dtype: torch.dtype, op: str):
    key = (dtype, op)
    if key not in _HALF_OPS:
        combine = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum, "prod": torch.mul}[op]

        def reduce_half(inmem, inoutmem, datatype):
            a = torch.from_numpy(np.frombuffer(inmem, dtype=np.int16).copy()).view(dtype)
            b = torch.from_numpy(np.frombuffer(inoutmem, dtype=np.int16)).view(dtype)
            b.copy_(combine(a.float(), b.float()))
        _HALF_OPS[key] = MPI.Op.Create(reduce_half, commute=True)
    return _HALF_OPS[key]


def _half_buf(MPI, t: torch.Tensor):
    """[int16 numpy view, MPI.INT16_T] of a contiguous CPU 16-bit float tensor."""
    return [t.reshape(-1).view(torch.int16).numpy(), MPI.INT16_T]


def _bytes(t: torch.Tensor):
    """numpy uint8 view sharing memory with a contiguous CPU tensor."""
    return t.reshape(-1).view(torch.uint8).numpy()


class MpiComm:
    """An mpi4py communicator whose rank equals the coordinate along the axis."""

    def __init__(self, MPI, comm, ranks, coord, owned=True):
        self.MPI = MPI
        self.comm = comm
        self.ranks = list(ranks)
        self.size = len(self.ranks)
        self.coord = coord
        self._owned = owned
        if comm.Get_size() != self.size or comm.Get_rank() != coord:
            raise RuntimeError("MPI communicator does not match the mesh layout")

    def _op(self, op):
        M = self.MPI
        return {"sum": M.SUM, "max": M.MAX, "min": M.MIN, "prod": M.PROD}[op]

    def _reduction(self, t, op):
        """A CPU copy of `t` to reduce in, its MPI buffer and the MPI op: 16-bit floats as
        themselves (int16 buffers, the 16-bit op), others in `_reduce_dtype`."""
        if t.dtype in _HALF:
            work = t.detach().to("cpu", copy=True).contiguous()
            return work, _half_buf(self.MPI, work), _half_op(self.MPI, t.dtype, op)
        work = t.detach().to(device="cpu", dtype=_reduce_dtype(t.dtype), copy=True).contiguous()
        return work, work.numpy(), self._op(op)

    def _scatter_buffers(self, t, op):
        """(source, result, send buffer, receive buffer, MPI op) of a reduce_scatter of `t`
        over dim 0: 16-bit floats as themselves, others in `_reduce_dtype`."""
        rd = t.dtype if t.dtype in _HALF else _reduce_dtype(t.dtype)
        src = t.detach().to(device="cpu", dtype=rd).contiguous()
        out = torch.empty((src.shape[0] // self.size,) + tuple(src.shape[1:]), dtype=rd)
        if rd in _HALF:
            return src, out, _half_buf(self.MPI, src), _half_buf(self.MPI, out), _half_op(self.MPI, rd, op)
        return src, out, src.numpy(), out.numpy(), self._op(op)

    def _in_place(self, t) -> bool:
        """Whether MPI can reduce `t`'s own memory (a contiguous CPU tensor of an MPI type)."""
        return t.device.type == "cpu" and t.is_contiguous() and t.dtype in _MPI_DIRECT

    def allreduce_(self, t, op="sum"):
        if self._in_place(t):
            self.comm.Allreduce(self.MPI.IN_PLACE, t.detach().numpy(), op=self._op(op))
            return t
        work, buf, mop = self._reduction(t, op)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=mop)
        t.copy_(work)
        return t

    def iallreduce_(self, t, op="sum"):
        if self._in_place(t):
            buf = t.detach().numpy()
            req = self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self._op(op))
            h = Handle(req.Wait, req.Test, t)
            h._keep = buf               # MPI writes into it until the request completes
            return h
        work, buf, mop = self._reduction(t, op)
        req = self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=mop)

        def finish():
            req.Wait()
            t.copy_(work)
        h = Handle(finish, req.Test, t)
        h._keep = work
        return h

    def iallgather0(self, t):
        src = t.detach().cpu().contiguous()
        out = torch.empty((self.size * src.shape[0],) + tuple(src.shape[1:]), dtype=src.dtype)
        B = self.MPI.BYTE
        req = self.comm.Iallgather([_bytes(src), B], [_bytes(out), B])
        h = Handle(None, req.Test)
        h._wait = lambda: (req.Wait(), setattr(h, "result", out.to(t.device)))
        h._keep = src                   # the send buffer lives until the collective is done
        return h

    def ireduce_scatter0(self, t, op="sum"):
        src, out, send, recv, mop = self._scatter_buffers(t, op)
        req = self.comm.Ireduce_scatter_block(send, recv, op=mop)
        h = Handle(None, req.Test)
        h._wait = lambda: (req.Wait(), setattr(h, "result", out.to(device=t.device, dtype=t.dtype)))
        h._keep = src
        return h

    def allgather0(self, t):
        src = t.detach().cpu().contiguous()
        out = torch.empty((self.size * src.shape[0],) + tuple(src.shape[1:]), dtype=src.dtype)
        B = self.MPI.BYTE
        self.comm.Allgather([_bytes(src), B], [_bytes(out), B])
        return out.to(t.device)

    def reduce_scatter0(self, t, op="sum"):
        _, out, send, recv, mop = self._scatter_buffers(t, op)
        self.comm.Reduce_scatter_block(send, recv, op=mop)
        return out.to(device=t.device, dtype=t.dtype)

    def alltoall0(self, t):
        src = t.detach().cpu().contiguous()
        out = torch.empty_like(src)
        B = self.MPI.BYTE
        self.comm.Alltoall([_bytes(src), B], [_bytes(out), B])
        return out.to(t.device)

    def alltoallv0(self, t, send_rows, recv_rows):
        src = t.detach().cpu().contiguous()
        out = src.new_empty((sum(recv_rows),) + tuple(src.shape[1:]))
        row = math.prod(src.shape[1:]) * src.element_size()

        def runs(rows):
            counts = [r * row for r in rows]
            return counts, [sum(counts[:j]) for j in range(len(counts))]
        B = self.MPI.BYTE
        self.comm.Alltoallv([_bytes(src), runs(send_rows), B], [_bytes(out), runs(recv_rows), B])
        return out.to(t.device)

    def broadcast_(self, t, root):
        if t.device.type == "cpu" and t.is_contiguous():
            self.comm.Bcast([_bytes(t.detach()), self.MPI.BYTE], root=root)
            return t
        work = t.detach().cpu().contiguous().clone()
        self.comm.Bcast([_bytes(work), self.MPI.BYTE], root=root)
        t.copy_(work)
        return t

    # ---- point to point (a pipeline's activations and their gradients) ----
    def isend(self, t, dest, tag=0):
        """Send `t` to coordinate `dest` without waiting: returns the request and the CPU
        buffer, which must live until the request is waited on."""
        buf = t.detach().to("cpu").contiguous()
        return self.comm.Isend([_bytes(buf), self.MPI.BYTE], dest=dest, tag=tag), buf

    def irecv(self, buf, source, tag=0):
        """Receive into the contiguous CPU tensor `buf` from coordinate `source`."""
        return self.comm.Irecv([_bytes(buf), self.MPI.BYTE], source=source, tag=tag)

    def ishift(self, t):
        """One ring step: `t` to the next coordinate, the previous one's into a new tensor."""
        src = t.detach().cpu().contiguous()
        out = torch.empty_like(src)
        B = self.MPI.BYTE
        reqs = [self.comm.Isend([_bytes(src), B], dest=(self.coord + 1) % self.size, tag=RING_TAG),
                self.comm.Irecv([_bytes(out), B], source=(self.coord - 1) % self.size, tag=RING_TAG)]
        h = Handle(None, lambda: self.MPI.Request.Testall(reqs))
        h._wait = lambda: (self.MPI.Request.Waitall(reqs), setattr(h, "result", out.to(t.device)))
        h._keep = src
        return h

    def send_object(self, obj, dest, tag):
        self.comm.send(obj, dest=dest, tag=tag)

    def recv_object(self, source, tag):
        return self.comm.recv(source=source, tag=tag)

    def allreduce_scalar(self, value, op="sum", device=None):
        return float(self.comm.allreduce(float(value), op=self._op(op)))

    def barrier(self):
        self.comm.Barrier()

    def free(self):
        if self._owned and self.comm is not None:
            try:
                self.comm.Free()
            except Exception:  # pragma: no cover
                pass
        self.comm = None

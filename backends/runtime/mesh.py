"""Device mesh: process-group setup, non-differentiable collectives, byte accounting.

See the package docstring (``autopar.backends.runtime``) for the byte convention.
"""
from __future__ import annotations

import math
import os
import socket
import threading
from collections import OrderedDict, namedtuple
from datetime import timedelta
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from ._comm import MpiComm, TorchComm, check_op

__all__ = ["Mesh", "CommEvent", "init_mesh", "in_backward", "KINDS", "PHASES"]

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")
PHASES = ("forward", "backward", "optimizer")

#: one accounted collective call: ``(kind, axis, bytes, phase)``
CommEvent = namedtuple("CommEvent", ["kind", "axis", "bytes", "phase"])

AxisArg = Optional[str]


# --------------------------------------------------------------------------
# phase detection
# --------------------------------------------------------------------------
_tls = threading.local()
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def in_backward() -> bool:
    """True while the autograd engine is running a backward pass on this thread
    (inside Function.backward, tensor/module hooks, checkpoint recomputation)."""
    if getattr(_tls, "bw_depth", 0) > 0:
        return True
    if _graph_task_id is not None:
        try:
            return _graph_task_id() != -1
        except Exception:  # pragma: no cover
            return False
    return False


class _BackwardScope:
    """Marks our own Function.backward bodies (fallback for old torch)."""

    def __enter__(self):
        _tls.bw_depth = getattr(_tls, "bw_depth", 0) + 1

    def __exit__(self, *exc):
        _tls.bw_depth -= 1
        return False


backward_scope = _BackwardScope


def _resolve_phase(phase: Optional[str], default: str) -> str:
    if phase is None:
        return "backward" if in_backward() else default
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    return phase


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _norm_dim(t: torch.Tensor, dim: int, what: str = "dim") -> int:
    nd = t.dim()
    if nd == 0:
        raise ValueError(f"{what}={dim} is invalid for a 0-dimensional tensor")
    if not -nd <= dim < nd:
        raise ValueError(f"{what}={dim} is out of range for a tensor of shape {tuple(t.shape)}")
    return dim % nd


def _check_divisible(t: torch.Tensor, dim: int, n: int, op: str, axis) -> None:
    if t.shape[dim] % n != 0:
        raise ValueError(
            f"{op}: size {t.shape[dim]} of dim {dim} (shape {tuple(t.shape)}) is not "
            f"divisible by the size {n} of mesh axis {axis!r}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _normalize_axes(axes) -> "OrderedDict[str, int]":
    items = list(axes.items()) if isinstance(axes, Mapping) else list(axes)
    if not items:
        raise ValueError("a mesh needs at least one axis")
    out: "OrderedDict[str, int]" = OrderedDict()
    for item in items:
        try:
            name, size = item
        except (TypeError, ValueError):
            raise ValueError(f"mesh axes must be name->size pairs, got {item!r}") from None
        if not isinstance(name, str) or not name:
            raise ValueError(f"mesh axis names must be non-empty strings, got {name!r}")
        if name in out:
            raise ValueError(f"duplicate mesh axis {name!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh axis {name!r} must have a positive integer size, got {size!r}")
        out[name] = size
    return out


def _local_rank_from_env(rank: int) -> int:
    for var in ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
                "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"):
        if var in os.environ:
            return int(os.environ[var])
    n = torch.cuda.device_count()
    return rank % n if n else 0


# --------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------
class Mesh:
    """An n-dimensional process mesh (row-major, last axis fastest).

    Do not construct directly; use :func:`init_mesh`.
    """

    def __init__(self, axes, rank, world_size, backend, device, comms, world_comm, owns_world):
        self.axes: "OrderedDict[str, int]" = OrderedDict(axes)
        self.rank: int = rank
        self.world_size: int = world_size
        self.backend: str = backend
        self.device: torch.device = device
        self._comms: Dict[str, object] = comms        # axis -> comm (None for size-1 axes)
        self._world = world_comm
        self._owns_world = owns_world
        self._closed = False
        self.traffic: Dict[Tuple[str, AxisArg], int] = {}
        self.events: List[CommEvent] = []
        # nonblocking collectives of this step (overlap.py): kind, axis, shape, dtype and how
        # long the program blocked waiting for each (the exposed part)
        self.async_log: List[dict] = []

    # ---- topology ---------------------------------------------------------
    def _check_axis(self, axis: AxisArg) -> None:
        if axis is not None and axis not in self.axes:
            raise KeyError(f"unknown mesh axis {axis!r}; mesh axes are {list(self.axes)}")

    def _stride(self, axis: str) -> int:
        names = list(self.axes)
        return math.prod(self.axes[a] for a in names[names.index(axis) + 1:])

    def size(self, axis: AxisArg = None) -> int:
        """Number of ranks along ``axis`` (``None``: the whole world)."""
        if axis is None:
            return self.world_size
        self._check_axis(axis)
        return self.axes[axis]

    def coord(self, axis: AxisArg = None, rank: Optional[int] = None) -> int:
        """This rank's (or ``rank``'s) coordinate along ``axis`` (``None``: the global rank)."""
        r = self.rank if rank is None else rank
        if axis is None:
            return r
        self._check_axis(axis)
        return (r // self._stride(axis)) % self.axes[axis]

    @property
    def coords(self) -> Dict[str, int]:
        return {a: self.coord(a) for a in self.axes}

    def rank_of(self, coords: Mapping[str, int]) -> int:
        """Global rank of a full coordinate dict."""
        if set(coords) != set(self.axes):
            raise ValueError(f"need a coordinate for every axis {list(self.axes)}, got {dict(coords)}")
        r = 0
        for a, n in self.axes.items():
            c = coords[a]
            if not 0 <= c < n:
                raise ValueError(f"coordinate {c} out of range for axis {a!r} of size {n}")
            r = r * n + c
        return r

    def axis_ranks(self, axis: AxisArg, rank: Optional[int] = None) -> List[int]:
        """Global ranks of ``rank``'s slice along ``axis``, in coordinate order."""
        r = self.rank if rank is None else rank
        if axis is None:
            return list(range(self.world_size))
        st = self._stride(axis)
        base = r - self.coord(axis, r) * st
        return [base + j * st for j in range(self.axes[axis])]

    def group(self, axis: AxisArg):
        """The backend object for ``axis``: a torch ProcessGroup (``None`` = default
        group) or an ``mpi4py`` communicator; ``None`` for a size-1 axis."""
        c = self._comm(axis)
        if c is None:
            return None
        return c.group if self.backend == "torch" else c.comm

    def _comm(self, axis: AxisArg):
        if self._closed:
            raise RuntimeError("mesh has been shut down")
        if axis is None:
            return self._world if self.world_size > 1 else None
        self._check_axis(axis)
        return self._comms.get(axis)

    def subcomm(self, groups: Sequence[Sequence[int]]):
        """This rank's communicator over the one of `groups` (disjoint lists of global
        ranks, coordinate = position in the list) that holds it, or ``None``. Every rank
        calls it with the same `groups` (torch creates every group on every rank; MPI
        splits the world once)."""
        groups = [list(g) for g in groups]
        mine = next((g for g in groups if self.rank in g), None)
        if self.backend == "torch":
            out = None
            for g in groups:
                pg = dist.new_group(g)
                if g is mine:
                    out = TorchComm(pg, g, g.index(self.rank))
            return out
        MPI = self._world.MPI
        color = groups.index(mine) if mine is not None else MPI.UNDEFINED
        sub = self._world.comm.Split(color=color, key=mine.index(self.rank) if mine else 0)
        return MpiComm(MPI, sub, mine, mine.index(self.rank)) if mine is not None else None

    def chunk(self, t: torch.Tensor, axis: AxisArg, dim: int = 0) -> torch.Tensor:
        """This rank's chunk of ``t`` along ``dim`` (no communication, no autograd magic)."""
        d = _norm_dim(t, dim)
        n = self.size(axis)
        _check_divisible(t, d, n, "chunk", axis)
        return t.chunk(n, d)[self.coord(axis)] if n > 1 else t

    # ---- accounting -------------------------------------------------------
    def _record(self, kind: str, axis: AxisArg, nbytes: int, phase: str) -> None:
        key = (kind, axis)
        self.traffic[key] = self.traffic.get(key, 0) + int(nbytes)
        self.events.append(CommEvent(kind, axis, int(nbytes), phase))

    def reset_traffic(self) -> None:
        self.traffic = {}
        self.events = []
        self.async_log = []

    def traffic_bytes(self, kind: Optional[str] = None, axis: Union[AxisArg, object] = ...,
                      phase: Optional[str] = None) -> int:
        """Sum of recorded bytes, optionally filtered by kind / axis / phase."""
        return sum(e.bytes for e in self.events
                   if (kind is None or e.kind == kind)
                   and (axis is ... or e.axis == axis)
                   and (phase is None or e.phase == phase))

    # ---- non-differentiable collectives ----------------------------------
    # All of these run under no_grad, are accounted in ``traffic`` with phase
    # ``phase`` (default: "backward" inside an autograd backward, else
    # "optimizer"), and are no-ops (0 bytes, no event) on a size-1 axis.
    @torch.no_grad()
    def all_reduce_(self, t: torch.Tensor, axis: AxisArg, op: str = "sum",
                    phase: Optional[str] = None) -> torch.Tensor:
        """In-place all-reduce of ``t`` over ``axis``. ``op``: sum|max|min|prod|mean."""
        mean = op in ("mean", "avg")
        if not mean:
            check_op(op)
        c = self._comm(axis)
        if c is None:
            return t
        if mean and not (t.is_floating_point() or t.is_complex()):
            raise ValueError("op='mean' needs a floating point tensor")
        self._record("all_reduce", axis, _nbytes(t), _resolve_phase(phase, "optimizer"))
        if t.is_contiguous():
            c.allreduce_(t, "sum" if mean else op)
        else:
            work = t.contiguous()
            c.allreduce_(work, "sum" if mean else op)
            t.copy_(work)
        if mean:
            t.div_(c.size)
        return t

    @torch.no_grad()
    def all_gather_flat(self, t: torch.Tensor, axis: AxisArg, dim: int = 0,
                        phase: Optional[str] = None) -> torch.Tensor:
        """Concatenate every coordinate's ``t`` along ``dim`` (coordinate order)."""
        d = _norm_dim(t, dim)
        c = self._comm(axis)
        if c is None:
            return t
        self._record("all_gather", axis, _nbytes(t) * c.size, _resolve_phase(phase, "optimizer"))
        return _gather(c, t, d)

    @torch.no_grad()
    def reduce_scatter_flat(self, t: torch.Tensor, axis: AxisArg, dim: int = 0,
                            op: str = "sum", phase: Optional[str] = None) -> torch.Tensor:
        """Reduce ``t`` over ``axis`` and return this coordinate's chunk along ``dim``."""
        check_op(op)
        d = _norm_dim(t, dim)
        n = self.size(axis)
        _check_divisible(t, d, n, "reduce_scatter", axis)
        c = self._comm(axis)
        if c is None:
            return t
        self._record("reduce_scatter", axis, _nbytes(t), _resolve_phase(phase, "optimizer"))
        return _reduce_scatter(c, t, d, op)

    @torch.no_grad()
    def all_to_all_flat(self, t: torch.Tensor, axis: AxisArg, split_dim: int = 0,
                        concat_dim: int = 0, phase: Optional[str] = None) -> torch.Tensor:
        """Chunk ``j`` of ``t`` along ``split_dim`` goes to coordinate ``j``; received
        chunks are concatenated along ``concat_dim`` in coordinate order."""
        sd = _norm_dim(t, split_dim, "split_dim")
        cd = _norm_dim(t, concat_dim, "concat_dim")
        n = self.size(axis)
        _check_divisible(t, sd, n, "all_to_all", axis)
        c = self._comm(axis)
        if c is None:
            return t
        self._record("all_to_all", axis, _nbytes(t), _resolve_phase(phase, "optimizer"))
        return _all_to_all(c, t, sd, cd)

    @torch.no_grad()
    def broadcast_(self, t: torch.Tensor, axis: AxisArg, root_coord: int = 0,
                   phase: Optional[str] = None) -> torch.Tensor:
        """In place: every coordinate of ``axis`` gets the value held at ``root_coord``."""
        n = self.size(axis)
        if not 0 <= root_coord < n:
            raise ValueError(f"root_coord {root_coord} out of range for axis {axis!r} of size {n}")
        c = self._comm(axis)
        if c is None:
            return t
        self._record("broadcast", axis, _nbytes(t), _resolve_phase(phase, "optimizer"))
        if t.is_contiguous():
            c.broadcast_(t, root_coord)
        else:
            work = t.contiguous()
            c.broadcast_(work, root_coord)
            t.copy_(work)
        return t

    def all_reduce_scalar(self, value: float, axis: AxisArg = None, op: str = "sum") -> float:
        """Reduce a Python number over ``axis`` (``None`` = whole world). Bookkeeping
        only: NOT recorded in ``traffic``/``events``. ``op``: sum|max|min|prod|mean."""
        mean = op in ("mean", "avg")
        if not mean:
            check_op(op)
        c = self._comm(axis)
        if c is None:
            return float(value)
        out = c.allreduce_scalar(float(value), "sum" if mean else op,
                                 device=self.device if self.backend == "torch" else None)
        return out / c.size if mean else out

    # ---- lifecycle --------------------------------------------------------
    def barrier(self, axis: AxisArg = None) -> None:
        c = self._comm(axis)
        if c is not None:
            c.barrier()

    def shutdown(self) -> None:
        """Destroy the groups / communicators this mesh created (and the default
        process group if ``init_mesh`` created it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.backend == "torch" and self._owns_world:
            if dist.is_initialized():
                dist.destroy_process_group()
        else:
            for c in self._comms.values():
                if c is not None:
                    c.free()
        self._comms = {}
        self._world = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
        return False

    def __repr__(self):
        ax = ", ".join(f"{a}={n}" for a, n in self.axes.items())
        return (f"Mesh({ax}; rank={self.rank}/{self.world_size}, coords={self.coords}, "
                f"backend={self.backend!r}, device={str(self.device)!r})")


# --------------------------------------------------------------------------
# dim-aware layouts over the dim-0 primitives
# --------------------------------------------------------------------------
def _gather(c, t: torch.Tensor, d: int) -> torch.Tensor:
    x = t.movedim(d, 0).contiguous()
    return c.allgather0(x).movedim(0, d).contiguous()


def _reduce_scatter(c, t: torch.Tensor, d: int, op: str = "sum") -> torch.Tensor:
    x = t.movedim(d, 0).contiguous()
    return c.reduce_scatter0(x, op).movedim(0, d).contiguous()


def _all_to_all(c, t: torch.Tensor, sd: int, cd: int) -> torch.Tensor:
    send = torch.stack(t.chunk(c.size, sd), 0).contiguous()
    recv = c.alltoall0(send)
    return torch.cat(recv.unbind(0), cd)


# --------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------
def _slice_bases(axes: "OrderedDict[str, int]", axis: str) -> Iterable[int]:
    """Global rank of coordinate 0 of every slice along ``axis``, ascending."""
    names = list(axes)
    st = math.prod(axes[a] for a in names[names.index(axis) + 1:])
    n = axes[axis]
    world = math.prod(axes.values())
    return [r for r in range(world) if (r // st) % n == 0]


def _size_error(axes, world, how):
    need = math.prod(axes.values())
    spec = " x ".join(f"{a}={n}" for a, n in axes.items())
    return ValueError(
        f"mesh {spec} needs {need} processes but the job has world size {world} "
        f"({how}); launch with {need} processes or change the mesh")


def init_mesh(axes, backend: str = "torch", device: str = "cpu",
              timeout_s: Optional[float] = None) -> Mesh:
    """Create the process mesh.

    ``axes``: ordered mapping (or sequence of pairs) axis name -> size; rank ->
    coordinates is row-major with the last axis fastest.
    ``backend``: ``"torch"`` (torchrun-style env: RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK; a missing env means a single-process job) or
    ``"mpi"`` (mpi4py ``COMM_WORLD``).
    ``device``: ``"cpu"`` (gloo) or ``"cuda"`` (nccl, ``cuda:LOCAL_RANK``).
    If a default torch process group already exists it is reused (and left
    alive by :meth:`Mesh.shutdown`).
    """
    axes = _normalize_axes(axes)
    need = math.prod(axes.values())
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' requested but torch.cuda.is_available() is False")
    if backend == "torch":
        return _init_torch(axes, need, device, timeout_s)
    if backend == "mpi":
        return _init_mpi(axes, need, device)
    raise ValueError(f"backend must be 'torch' or 'mpi', got {backend!r}")


def _init_torch(axes, need, device, timeout_s) -> Mesh:
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    owns = False
    if not dist.is_initialized():
        pg_backend = "nccl" if device == "cuda" else "gloo"
        kw = {}
        if timeout_s is not None:
            kw["timeout"] = timedelta(seconds=timeout_s)
        if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
            env_world = int(os.environ["WORLD_SIZE"])
            if env_world != need:     # fail before a rendezvous that would hang
                raise _size_error(axes, env_world, "WORLD_SIZE")
            if device == "cuda":
                torch.cuda.set_device(_local_rank_from_env(int(os.environ["RANK"])))
            dist.init_process_group(pg_backend, **kw)
        else:
            if need != 1:
                raise _size_error(axes, 1, "no RANK/WORLD_SIZE in the environment: "
                                           "single process; use torchrun")
            if device == "cuda":
                torch.cuda.set_device(0)
            dist.init_process_group(pg_backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1, **kw)
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != need:
        if owns:
            dist.destroy_process_group()
        raise _size_error(axes, world, "torch.distributed")
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")

    mesh = Mesh(axes, rank, world, "torch", dev, {}, TorchComm(None, range(world), rank), owns)
    comms = {}
    # every rank creates every group, in the same order (torch requirement)
    for axis, n in axes.items():
        if n == 1:
            comms[axis] = None
            continue
        mine = mesh.axis_ranks(axis)
        if mine == list(range(world)):
            # the axis is the whole world in rank order: the default group serves it (another
            # group of the same ranks would only add its own connections, threads and buffers)
            comms[axis] = TorchComm(None, mine, mesh.coord(axis))
            continue
        for base in _slice_bases(axes, axis):
            ranks = mesh.axis_ranks(axis, base)
            g = dist.new_group(ranks)
            if ranks == mine:
                comms[axis] = TorchComm(g, ranks, mesh.coord(axis))
    mesh._comms = comms
    return mesh


def _init_mpi(axes, need, device) -> Mesh:
    from mpi4py import MPI  # lazy: importing initializes MPI

    world_comm = MPI.COMM_WORLD
    rank, world = world_comm.Get_rank(), world_comm.Get_size()
    if world != need:
        raise _size_error(axes, world, "MPI.COMM_WORLD")
    if device == "cuda":
        torch.cuda.set_device(_local_rank_from_env(rank))
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    mesh = Mesh(axes, rank, world, "mpi", dev, {},
                MpiComm(MPI, world_comm, range(world), rank, owned=False), False)
    comms = {}
    for axis, n in axes.items():
        if n == 1:
            comms[axis] = None
            continue
        ranks = mesh.axis_ranks(axis)
        coord = mesh.coord(axis)
        sub = world_comm.Split(color=ranks[0], key=coord)
        comms[axis] = MpiComm(MPI, sub, ranks, coord)
    mesh._comms = comms
    return mesh

"""Training-state checkpoints: sharded safetensors files, one JSON index, resharding on load.

    spec = {"fc.weight": rt.ShardSpec((256, 64), ("R", "S(0)"))}          # dp=2, tp=2 mesh
    rt.save_checkpoint("ckpt", mesh, step=3, tensors={"fc.weight": (w_local, spec["fc.weight"])},
                       optimizer_state=rt.optimizer_shards(opt, {"fc.weight": w_local}, spec),
                       rng_state=rt.capture_rng_state(), plan_json=plan, keep=3)
    # ... later, under another plan (tp=4):
    got = rt.load_checkpoint("ckpt", mesh4, {"fc.weight": rt.ShardSpec((256, 64), ("S(0)",))})
    w_local4 = got.tensors["fc.weight"]; got.step == 3

On disk (``DIR/step-N/``): ``rank{r}.safetensors`` per rank and ``index.json``, written by
rank 0 after every rank file is complete. A reader trusts only a directory whose index
exists, so a save that dies half-way leaves the previous ``step-M/`` as the latest
checkpoint.

Slices
------
A tensor's shard is described by a :class:`ShardSpec`: its global shape and a layout, one
placement per mesh axis (mesh order):

- ``"R"``: replicated along the axis. Only the ranks at coordinate 0 of every ``R`` axis
  write the shard, so each element is stored once.
- ``"S(d)"``: dim ``d`` split along the axis like ``torch.chunk`` (an earlier mesh axis
  splits first, a later one splits that piece again).
- ``"F"``: a flat chunk, as ZeRO-1/2 keep optimizer state: the block the ``S``
  placements leave, flattened row-major, padded with zeros to a multiple of ``n`` (the
  product of the sizes of all ``F`` axes) and cut into ``n`` equal chunks; the rank's chunk
  is picked by its ``F`` coordinates in mesh order. The padding is not stored; it reads
  back as zeros.

``ShardSpec.flat = (offset, length)`` gives the rank's flat range of the block explicitly
instead (chunks of unequal size); mark the axes it differs along ``"F"`` so that ranks
along them are not taken for replicas.

Index (``index.json``): ``format``, ``version``, ``step``, ``mesh``, ``world_size``,
``plan``, ``files`` (name -> bytes), ``tensors`` (name -> ``shape``, ``dtype``, ``group``
(``"model"`` or ``"optim"``), ``source`` (for a piece of a fused tensor: its state-dict name,
dim and row range) and ``pieces``: ``file``, ``key``, ``region`` (``[start, stop)`` per
dim of the global tensor), ``flat`` (``[offset, length]`` of the region's row-major
flattening, or null) and ``crc32`` of the stored bytes), ``rng`` (rank -> key -> file/key)
and ``aliases``.

A generated program's training state
-----------------------------------
:class:`TrainingCheckpoint` (with :func:`add_checkpoint_args` for the program's flags) saves
and resumes what a program trains: every tensor of its state dict under the model's own
names (pieces of fused weights keep their ``source``), the optimizer state of each parameter
or of its ZeRO chunk (``F``), the step and each rank's RNG state. Names and global shapes do
not depend on the plan, so a program of any mesh or ZeRO stage resumes from it.

No pickle anywhere: safetensors files and JSON only.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "ShardSpec", "CheckpointError", "CheckpointHandle", "LoadedCheckpoint",
    "save_checkpoint", "wait_checkpoint", "load_checkpoint", "latest_checkpoint",
    "list_checkpoints", "read_index", "read_tensor", "zero_chunk",
    "optimizer_shards", "optimizer_wanted", "restore_optimizer",
    "capture_rng_state", "restore_rng_state",
    "save_file", "load_file", "save_init", "load_init",
    "add_checkpoint_args", "stage_specs", "TrainingCheckpoint",
]

FORMAT = "autopar-checkpoint"
VERSION = 1
INDEX = "index.json"
_META_KEY = "autopar"
_RNG_PREFIX = "__rng__/"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked: the message names the file and tensor."""


# --------------------------------------------------------------------------
# slice descriptions
# --------------------------------------------------------------------------
_SHARD_RE = re.compile(r"^S\((-?\d+)\)$")


@dataclass(frozen=True)
class ShardSpec:
    """Where a rank's local tensor sits in the global one.

    ``layout``: one placement per mesh axis, ``"R"``, ``"S(d)"`` or ``"F"`` (a sequence in
    mesh order, or a dict axis -> placement with ``"R"`` for axes left out). ``flat``: this
    rank's ``(offset, length)`` range of the flattened block, instead of the equal padded
    chunks that ``"F"`` axes give.
    ``source``: ``(name, dim, start, stop)`` when the tensor is rows ``start:stop`` along
    ``dim`` of the state-dict tensor ``name`` (a fused QKV weight cut in three).
    ``held``: ``(axis, coordinate)`` when only some ranks hold the tensor at all -- a pipeline
    stage's parameters, on the ranks at that ``pp`` coordinate -- and the one writing it must
    be among them (``"R"`` on that axis otherwise means "coordinate 0 writes it"). A weight
    several stages hold (a tied embedding and head) names the first of them.

        ShardSpec((1024, 256), ("R", "S(0)"))          # dp=2, tp=2: rows split over tp
        ShardSpec((1024, 256), ("F", "S(0)"))          # ZeRO over dp of the tp shard
    """
    shape: Tuple[int, ...]
    layout: Union[Sequence[str], Mapping[str, str]] = ()
    flat: Optional[Tuple[int, int]] = None
    source: Optional[Tuple[str, int, int, int]] = None
    dtype: Optional[torch.dtype] = None
    held: Optional[Tuple[str, int]] = None

    def placements(self, axes: Mapping[str, int], what: str = "tensor") -> Tuple[str, ...]:
        """The layout as one placement string per mesh axis, checked."""
        if isinstance(self.layout, Mapping):
            extra = set(self.layout) - set(axes)
            if extra:
                raise CheckpointError(f"{what}: layout names axes {sorted(extra)} that the mesh "
                                      f"{dict(axes)} does not have")
            pl = tuple(str(self.layout.get(a, "R")) for a in axes)
        else:
            pl = tuple(str(p) for p in self.layout) or ("R",) * len(axes)
            if len(pl) != len(axes):
                raise CheckpointError(f"{what}: layout {pl} has {len(pl)} placements but the mesh "
                                      f"{dict(axes)} has {len(axes)} axes")
        nd = len(self.shape)
        for p in pl:
            m = _SHARD_RE.match(p)
            if p in ("R", "F"):
                continue
            if m is None:
                raise CheckpointError(f"{what}: placement {p!r} is not R, S(d) or F (a partial sum "
                                      f"P is not a state and cannot be saved)")
            d = int(m.group(1))
            if not -nd <= d < nd:
                raise CheckpointError(f"{what}: placement {p} names dim {d} of a {nd}-dim tensor "
                                      f"of shape {tuple(self.shape)}")
        return pl


def _norm_spec(spec, what: str) -> ShardSpec:
    if isinstance(spec, ShardSpec):
        return replace(spec, shape=tuple(int(s) for s in spec.shape))
    if isinstance(spec, (tuple, list)) and len(spec) in (1, 2, 3):
        return ShardSpec(tuple(int(s) for s in spec[0]), *spec[1:])
    raise CheckpointError(f"{what}: expected a ShardSpec or (global shape, layout[, flat]), got {spec!r}")


def zero_chunk(numel: int, n: int, index: int) -> Tuple[int, int]:
    """``(offset, length)`` of chunk ``index`` of ``n`` when ``numel`` elements are padded
    to equal chunks (ZeRO's convention); ``length`` includes the padding.

        >>> zero_chunk(10, 4, 3)
        (9, 3)
    """
    size = math.ceil(numel / n) if numel else 0
    return index * size, size


def _chunk_range(size: int, n: int, i: int) -> Tuple[int, int]:
    """Range of chunk ``i`` of ``torch.chunk(size, n)`` (empty where chunk returns fewer)."""
    c = math.ceil(size / n) if size else 0
    lo = min(i * c, size)
    return lo, min(lo + c, size)


@dataclass(frozen=True)
class _Slice:
    """A rank's part of a global tensor: a box ``region`` and, optionally, the flat range
    ``[offset, offset + length)`` of its row-major flattening (``length`` with padding)."""
    region: Tuple[Tuple[int, int], ...]
    flat: Optional[Tuple[int, int]]

    @property
    def block_shape(self) -> Tuple[int, ...]:
        return tuple(b - a for a, b in self.region)

    @property
    def real_length(self) -> int:
        """Elements that exist (the flat range clipped to the block)."""
        n = math.prod(self.block_shape)
        if self.flat is None:
            return n
        off, length = self.flat
        return max(0, min(off + length, n) - off)

    @property
    def local_shape(self) -> Tuple[int, ...]:
        return (self.flat[1],) if self.flat is not None else self.block_shape


def _slice_of(spec: ShardSpec, axes: Mapping[str, int], coords: Mapping[str, int],
              what: str) -> _Slice:
    pl = spec.placements(axes, what)
    region = [(0, s) for s in spec.shape]
    f_n, f_i = 1, 0
    for (axis, n), p in zip(axes.items(), pl):
        m = _SHARD_RE.match(p)
        if m:
            d = int(m.group(1)) % len(spec.shape)
            lo, hi = region[d]
            a, b = _chunk_range(hi - lo, n, coords[axis])
            region[d] = (lo + a, lo + b)
        elif p == "F":
            f_n, f_i = f_n * n, f_i * n + coords[axis]
    flat = None
    if spec.flat is not None:                    # the caller's own chunking
        flat = (int(spec.flat[0]), int(spec.flat[1]))
    elif "F" in pl:
        flat = zero_chunk(math.prod(b - a for a, b in region), f_n, f_i)
    return _Slice(tuple(region), flat)


def _writes(spec: ShardSpec, axes: Mapping[str, int], coords: Mapping[str, int], what: str) -> bool:
    """Whether this rank stores the shard: coordinate 0 along every replicated axis (but the
    axis of ``held``, where it is the holding coordinate)."""
    pl = spec.placements(axes, what)
    held_axis = None
    if spec.held is not None:
        held_axis, at = spec.held
        if held_axis not in axes:
            raise CheckpointError(f"{what}: held on axis {held_axis!r}, which the mesh {dict(axes)} does not have")
        if coords[held_axis] != at:
            return False
    return all(coords[a] == 0 for a, p in zip(axes, pl) if p == "R" and a != held_axis)


# --------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic_safetensors(path: Path, tensors: Dict[str, torch.Tensor],
                              metadata: Optional[Dict[str, str]]) -> int:
    """Temporary file, fsync, rename, fsync of the directory; returns the file's bytes."""
    from safetensors.torch import save_file as _st_save

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        _st_save(tensors, str(tmp), metadata=metadata)
        _fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_path(path.parent)
    return path.stat().st_size


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _dtype_of(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in the checkpoint index")
    return dt


def _crc(t: torch.Tensor) -> int:
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return 0
    return zlib.crc32(t.view(-1).view(torch.uint8).numpy())


def _unshare(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """safetensors refuses two entries over one storage; copy the later ones."""
    seen, out = set(), {}
    for k, t in tensors.items():
        t = t.detach().contiguous()
        key = (t.untyped_storage().data_ptr(), t.device) if t.numel() else None
        if key is not None and key in seen:
            t = t.clone()
        elif key is not None:
            seen.add(key)
        out[k] = t
    return out


def save_file(path, tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``tensors`` as one safetensors file, atomically (temporary file, fsync, rename).

        rt.save_file("weights.safetensors", model.state_dict(), {"step": "3"})
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = _unshare({k: v.detach().cpu() for k, v in tensors.items()})
    _write_atomic_safetensors(path, cpu, {str(k): str(v) for k, v in (metadata or {}).items()})
    return path


def load_file(path, device: str = "cpu") -> Dict[str, torch.Tensor]:
    """Read a whole safetensors file (no code runs on load); errors name the file.

        state = rt.load_file("model.safetensors")
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _file_metadata(path: Path) -> Dict[str, str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def save_init(path, state: Mapping[str, torch.Tensor], inputs: Sequence[torch.Tensor]) -> Path:
    """The initial weights and example batch of an emitted program, as one safetensors file
    (``model/<name>`` and ``inputs/<i>`` entries).

        rt.save_init("gpt.init.safetensors", model.state_dict(), [idx, targets])
    """
    tensors = {f"model/{k}": v for k, v in state.items()}
    tensors.update({f"inputs/{i}": t for i, t in enumerate(inputs)})
    return save_file(path, tensors, {"format": "autopar-init", "inputs": str(len(inputs))})


def load_init(path) -> Tuple[Dict[str, torch.Tensor], List[torch.Tensor]]:
    """``(state dict, example inputs)`` written by :func:`save_init`.

        state, inputs = rt.load_init(args.init)
    """
    allt = load_file(path)
    meta = _file_metadata(Path(path))
    if meta.get("format") != "autopar-init":
        raise CheckpointError(f"{path}: not an autopar init file (its metadata has no "
                              f"format=autopar-init); write it with rt.save_init")
    n = int(meta.get("inputs", "0"))
    state = {k[len("model/"):]: v for k, v in allt.items() if k.startswith("model/")}
    try:
        inputs = [allt[f"inputs/{i}"] for i in range(n)]
    except KeyError as e:
        raise CheckpointError(f"{path}: input {e.args[0]!r} is missing (the file says {n} inputs)") from None
    return state, inputs


# --------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------
def capture_rng_state() -> Dict[str, torch.Tensor]:
    """This rank's torch RNG states (CPU and every CUDA device) as uint8 tensors.

        rng = rt.capture_rng_state(); ...; rt.restore_rng_state(rng)
    """
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def restore_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    """Set the RNG states that :func:`capture_rng_state` returned."""
    for k, v in state.items():
        if k == "torch":
            torch.set_rng_state(v.to(torch.uint8).cpu())
        elif k.startswith("cuda.") and torch.cuda.is_available():
            i = int(k.split(".", 1)[1])
            if i < torch.cuda.device_count():
                torch.cuda.set_rng_state(v.to(torch.uint8).cpu(), i)


# --------------------------------------------------------------------------
# optimizer state
# --------------------------------------------------------------------------
def optimizer_shards(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor],
                     specs: Mapping[str, ShardSpec]) -> Dict[str, Tuple[torch.Tensor, ShardSpec]]:
    """The per-parameter state of ``optimizer`` (AdamW: ``exp_avg``, ``exp_avg_sq``,
    ``step``) as named shards: ``<param>.<key>``; a state tensor shaped like its parameter
    takes the parameter's spec, a scalar (``step``) is replicated.

        opt_state = rt.optimizer_shards(opt, dict(model.named_parameters()), specs)
    """
    out = {}
    for name, p in params.items():
        st = optimizer.state.get(p, {})
        for key, v in st.items():
            if not isinstance(v, torch.Tensor):
                v = torch.tensor(float(v))
            out[f"{name}.{key}"] = (v, _state_spec(v, p, specs[name], f"{name}.{key}"))
    return out


def _state_spec(v: torch.Tensor, p: torch.Tensor, spec: ShardSpec, what: str) -> ShardSpec:
    if v.dim() == 0:
        return ShardSpec((), (), held=spec.held)     # AdamW's step: written where its parameter is
    if tuple(v.shape) == tuple(p.shape):
        return _norm_spec(spec, what)
    raise CheckpointError(f"optimizer state {what} has shape {tuple(v.shape)}, neither a scalar nor "
                          f"the parameter's shape {tuple(p.shape)}")


def optimizer_wanted(params: Mapping[str, torch.Tensor], specs: Mapping[str, ShardSpec],
                     keys: Iterable[str] = ("step", "exp_avg", "exp_avg_sq")) -> Dict[str, ShardSpec]:
    """What :func:`load_checkpoint` should read back for :func:`restore_optimizer` (AdamW keys
    by default).

        got = rt.load_checkpoint(d, mesh, specs, optimizer=rt.optimizer_wanted(params, specs))
    """
    out = {}
    for name in params:
        for key in keys:
            out[f"{name}.{key}"] = ShardSpec((), ()) if key == "step" else _norm_spec(specs[name], name)
    return out


def restore_optimizer(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor],
                      loaded: Mapping[str, torch.Tensor]) -> None:
    """Put the state read by :func:`load_checkpoint` (``got.optimizer``) into ``optimizer``.

        rt.restore_optimizer(opt, params, got.optimizer)
    """
    for name, p in params.items():
        st = {k[len(name) + 1:]: v for k, v in loaded.items() if k.startswith(name + ".")
              and "." not in k[len(name) + 1:]}
        if not st:
            raise CheckpointError(f"the checkpoint holds no optimizer state for parameter {name!r}")
        for k, v in st.items():
            if v.dim() and tuple(v.shape) != tuple(p.shape):
                raise CheckpointError(f"optimizer state {name}.{k}: shape {tuple(v.shape)} does not match "
                                      f"the parameter's local shape {tuple(p.shape)}")
            st[k] = v.to(p.device) if v.dim() else v.to(torch.float32)
        optimizer.state[p] = st


# --------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------
class CheckpointHandle:
    """A save in flight (``async_=True``): ``wait()`` re-raises its error, ``done()`` polls."""

    def __init__(self, path: Path, thread: Optional[threading.Thread] = None):
        self.path = path
        self._thread = thread
        self.error: Optional[BaseException] = None
        self.seconds = 0.0

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> Path:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"checkpoint {self.path} still being written after {timeout} s")
        if self.error is not None:
            err, self.error = self.error, None
            raise err
        return self.path


_pending: List[CheckpointHandle] = []


def wait_checkpoint() -> None:
    """Wait for every asynchronous save of this process; re-raise the first error."""
    while _pending:
        _pending.pop(0).wait()


def _axes_of(mesh) -> Dict[str, int]:
    return dict(mesh.axes) if mesh is not None else {}


def _coords_of(mesh) -> Dict[str, int]:
    return {a: mesh.coord(a) for a in mesh.axes} if mesh is not None else {}


def _snapshot(t: torch.Tensor, copy: bool) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        return t.to("cpu")                        # a copy already
    return t.clone() if copy else t


def save_checkpoint(directory, mesh, step: int, tensors: Mapping[str, object],
                    optimizer_state: Optional[Mapping[str, object]] = None,
                    rng_state: Optional[Mapping[str, torch.Tensor]] = None,
                    plan_json=None, keep: Optional[int] = None, async_: bool = False,
                    aliases: Optional[Mapping[str, str]] = None,
                    timeout_s: float = 600.0) -> CheckpointHandle:
    """Save this rank's shards into ``directory/step-<step>/``; every rank calls it.

    ``tensors`` and ``optimizer_state``: name -> ``(local tensor, ShardSpec)`` (or
    ``(local, global shape, layout)``, or a plain tensor for a replicated full one).
    ``rng_state``: name -> uint8 tensor, kept per rank (:func:`capture_rng_state`).
    ``plan_json``: the plan (a dict or JSON text) recorded in the index. ``keep``: keep the
    last ``keep`` complete checkpoints. ``aliases``: tied state-dict name -> saved name.
    ``async_``: copy to host memory now, write in a background thread; join with the
    returned handle's ``wait()`` or :func:`wait_checkpoint` (a new save waits for the last).

        h = rt.save_checkpoint("ckpt", mesh, 100, shards, keep=3, async_=True)
        ...                                   # training continues
        rt.wait_checkpoint()
    """
    wait_checkpoint()
    root = Path(directory)
    step = int(step)
    path = root / f"step-{step}"
    axes, coords = _axes_of(mesh), _coords_of(mesh)
    rank = mesh.rank if mesh is not None else 0
    world = math.prod(axes.values()) if axes else 1
    entries, records = {}, {}
    for group, items in (("model", tensors), ("optim", optimizer_state or {})):
        for name, item in items.items():
            what = f"tensor {name!r}"
            if name in records:
                raise CheckpointError(f"{what} is given twice (model and optimizer state names must differ)")
            local, spec = _unpack(item, axes, what)
            sl = _slice_of(spec, axes, coords, what)
            if tuple(local.shape) != sl.local_shape and not (
                    sl.flat is not None and local.dim() == 1 and local.numel() == sl.real_length):
                raise CheckpointError(
                    f"{what}: local shape {tuple(local.shape)} does not match its layout "
                    f"{spec.placements(axes, what)} of global shape {tuple(spec.shape)} on rank {rank} "
                    f"(expected {sl.local_shape})")
            rec = {"shape": list(spec.shape), "dtype": _dtype_name(local.dtype), "group": group,
                   "source": list(spec.source) if spec.source else None}
            if _writes(spec, axes, coords, what) and sl.real_length > 0:
                data = local.reshape(-1)[:sl.real_length] if sl.flat is not None else local
                entries[name] = _snapshot(data, copy=async_)
                rec.update(region=[list(r) for r in sl.region],
                           flat=[sl.flat[0], sl.real_length] if sl.flat is not None else None)
            records[name] = rec
    for k, v in (rng_state or {}).items():
        entries[_RNG_PREFIX + k] = _snapshot(v, copy=async_)
    plan = json.loads(plan_json) if isinstance(plan_json, (str, bytes)) else plan_json
    meta = {"step": step, "rank": rank, "world_size": world, "mesh": axes, "tensors": records,
            "rng": sorted(rng_state or {}), "plan": plan if rank == 0 else None,
            "aliases": dict(aliases or {})}

    # rank 0 clears what an earlier, interrupted save of this step left; nobody writes
    # into the directory before that (the barrier), so every file rank 0 later finds is new
    if rank == 0:
        _remove_step_dir(path)
        path.mkdir(parents=True, exist_ok=True)
    if mesh is not None and world > 1:
        mesh.barrier()
    path.mkdir(parents=True, exist_ok=True)

    def work(handle: CheckpointHandle):
        t0 = time.perf_counter()
        try:
            try:
                _write_rank_file(path, rank, entries, meta)
            except BaseException as e:
                _note_failure(path, rank, e)     # rank 0 stops waiting for this file
                raise
            if rank == 0:
                _write_index(root, path, world, timeout_s, keep)
        except BaseException as e:               # re-raised by wait()
            handle.error = e
        handle.seconds = time.perf_counter() - t0

    def background(handle: CheckpointHandle):
        _lower_thread_priority()
        work(handle)

    if async_:
        handle = CheckpointHandle(path)
        th = threading.Thread(target=background, args=(handle,), name=f"checkpoint-step-{step}", daemon=True)
        handle._thread = th
        th.start()
        _pending.append(handle)
        return handle
    handle = CheckpointHandle(path)
    work(handle)
    if mesh is not None and world > 1:
        mesh.barrier()                           # every rank returns after the index exists
    handle.wait()
    return handle


def _lower_thread_priority() -> None:
    """Run this (writer) thread at the lowest CPU priority: where the ranks keep every core
    busy, the training steps get the CPU first and the write takes what is left. Linux
    schedules threads on their own, so only this thread is affected; best effort."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def _unpack(item, axes, what) -> Tuple[torch.Tensor, ShardSpec]:
    if isinstance(item, torch.Tensor):
        return item, ShardSpec(tuple(item.shape), ())
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor):
        return item[0], _norm_spec(item[1], what)
    if isinstance(item, (tuple, list)) and len(item) in (3, 4) and isinstance(item[0], torch.Tensor):
        return item[0], _norm_spec(tuple(item[1:]), what)
    raise CheckpointError(f"{what}: expected a tensor, (tensor, ShardSpec) or (tensor, global shape, "
                          f"layout), got {type(item).__name__}")


def _rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def _write_rank_file(path: Path, rank: int, entries: Dict[str, torch.Tensor], meta: dict) -> None:
    crcs = {k: _crc(v) for k, v in entries.items()}
    for name, rec in meta["tensors"].items():
        if name in crcs:
            rec["crc32"] = crcs[name]
    _write_atomic_safetensors(path / _rank_file(rank), _unshare(entries),
                              {_META_KEY: json.dumps(meta, sort_keys=True)})


def _failure_file(rank: int) -> str:
    return f"rank{rank}.error.json"


def _note_failure(path: Path, rank: int, err: BaseException) -> None:
    try:
        _write_atomic_text(path / _failure_file(rank), json.dumps({"rank": rank, "error": repr(err)}))
    except OSError:
        pass                                     # rank 0 then runs into its timeout


def _read_failure(note: Path) -> str:
    try:
        return json.loads(note.read_text())["error"]
    except (OSError, ValueError, KeyError):
        return "no details"


def _write_index(root: Path, path: Path, world: int, timeout_s: float, keep: Optional[int]) -> None:
    """Rank 0: wait for every rank's file, build the index from their headers, write it
    last, then drop old checkpoints."""
    deadline = time.monotonic() + timeout_s
    files = [path / _rank_file(r) for r in range(world)]
    while not all(f.exists() for f in files):
        for r in range(world):
            note = path / _failure_file(r)
            if note.exists():
                raise CheckpointError(f"{path}: rank {r} could not write its shard file "
                                      f"({_read_failure(note)}); the checkpoint stays incomplete")
        if time.monotonic() > deadline:
            missing = [f.name for f in files if not f.exists()]
            raise CheckpointError(f"{path}: ranks did not write {missing} within {timeout_s:.0f} s; "
                                  f"the checkpoint stays incomplete (no {INDEX})")
        time.sleep(0.005)
    tensors: Dict[str, dict] = {}
    rng: Dict[str, dict] = {}
    index = {"format": FORMAT, "version": VERSION, "files": {}, "tensors": tensors, "rng": rng}
    for r, f in enumerate(files):
        meta = json.loads(_file_metadata(f)[_META_KEY])
        if meta["rank"] != r or meta["world_size"] != world:
            raise CheckpointError(f"{f}: written by rank {meta['rank']} of {meta['world_size']}, "
                                  f"expected rank {r} of {world}")
        if r == 0:
            index.update(step=meta["step"], mesh=meta["mesh"], world_size=world, plan=meta["plan"],
                         aliases=meta["aliases"])
        index["files"][f.name] = f.stat().st_size
        for name, rec in meta["tensors"].items():
            have = tensors.setdefault(name, {k: rec[k] for k in ("shape", "dtype", "group", "source")}
                                      | {"pieces": []})
            if have["shape"] != rec["shape"] or have["dtype"] != rec["dtype"]:
                raise CheckpointError(f"{f}: tensor {name!r} is {rec['dtype']}{rec['shape']} on rank {r} "
                                      f"but {have['dtype']}{have['shape']} on an earlier rank")
            if "region" in rec:
                have["pieces"].append({"file": f.name, "key": name, "region": rec["region"],
                                       "flat": rec["flat"], "crc32": rec.get("crc32")})
        rng[str(r)] = {k: {"file": f.name, "key": _RNG_PREFIX + k} for k in meta["rng"]}
    for name, rec in tensors.items():
        got = sum(_piece_numel(p) for p in rec["pieces"])
        if got != math.prod(rec["shape"]):
            raise CheckpointError(f"{path}: the ranks' shards of tensor {name!r} hold {got} of its "
                                  f"{math.prod(rec['shape'])} elements; are the layouts the same on every rank?")
    _write_atomic_text(path / INDEX, json.dumps(index, indent=1, sort_keys=True))
    if keep is not None:
        _prune(root, int(index["step"]), int(keep))


def _piece_numel(p: dict) -> int:
    return p["flat"][1] if p["flat"] is not None else math.prod(b - a for a, b in p["region"])


def _remove_step_dir(path: Path) -> None:
    if not path.exists():
        return
    idx = path / INDEX
    if idx.exists():
        idx.unlink()                             # no longer trusted from here on
        _fsync_path(path)
    shutil.rmtree(path, ignore_errors=True)


def _prune(root: Path, current: int, keep: int) -> None:
    complete = [s for s, _ in list_checkpoints(root)]
    for s in complete[:-keep] if keep > 0 else complete:
        if s != current:
            _remove_step_dir(root / f"step-{s}")
    for d in root.iterdir():                     # debris of interrupted saves before this one
        m = _STEP_DIR.match(d.name)
        if m and int(m.group(1)) < current and not (d / INDEX).exists():
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------
def list_checkpoints(directory) -> List[Tuple[int, Path]]:
    """Complete checkpoints (those with an index) under ``directory``, oldest first."""
    root = Path(directory)
    out = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / INDEX).is_file():
                out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(directory) -> Path:
    """The newest complete ``step-N/`` directory (or ``directory`` itself if it holds an index).

        path = rt.latest_checkpoint("ckpt")          # ckpt/step-300
    """
    root = Path(directory)
    if (root / INDEX).is_file():
        return root
    if _STEP_DIR.match(root.name) and root.is_dir():
        raise CheckpointError(f"{root}: incomplete checkpoint (no {INDEX}: the save was interrupted "
                              f"before every rank finished); resume from an earlier step-N")
    found = list_checkpoints(root)
    if not found:
        what = "no such directory" if not root.exists() else "no complete step-N/ checkpoint in it"
        raise CheckpointError(f"{root}: {what}")
    return found[-1][1]


def read_index(directory) -> Tuple[Path, dict]:
    """``(path of the step directory, index)`` of the latest complete checkpoint."""
    path = latest_checkpoint(directory)
    try:
        index = json.loads((path / INDEX).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / INDEX}: unreadable index ({e})") from None
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{path / INDEX}: not an autopar checkpoint index (format "
                              f"{index.get('format')!r})")
    return path, index


class _Files:
    """Open safetensors files of one checkpoint, checked against the index on first use."""

    def __init__(self, path: Path, index: dict):
        self.path, self.index, self.open = path, index, {}

    def get(self, name: str, tensor: str):
        if name in self.open:
            return self.open[name]
        from safetensors import safe_open
        f = self.path / name
        want = self.index["files"].get(name)
        if not f.is_file():
            raise CheckpointError(f"{f}: shard file missing (needed for tensor {tensor!r})")
        size = f.stat().st_size
        if want is not None and size != want:
            raise CheckpointError(f"{f}: truncated or rewritten shard file ({size} bytes, the index "
                                  f"says {want}; needed for tensor {tensor!r})")
        try:
            h = safe_open(str(f), framework="pt")
        except Exception as e:
            raise CheckpointError(f"{f}: corrupted shard file, needed for tensor {tensor!r} ({e})") from None
        self.open[name] = h
        return h

    def close(self) -> None:
        for h in self.open.values():
            h.__exit__(None, None, None)
        self.open = {}

    def slice(self, piece: dict, tensor: str):
        h = self.get(piece["file"], tensor)
        try:
            return h.get_slice(piece["key"])
        except Exception as e:
            raise CheckpointError(f"{self.path / piece['file']}: tensor {tensor!r} is not in the file "
                                  f"({e})") from None


def _read_into(files: _Files, name: str, rec: dict, target: _Slice, dtype: torch.dtype,
               verify: bool) -> torch.Tensor:
    """Assemble ``target`` of tensor ``name`` from the pieces it overlaps."""
    shape = tuple(rec["shape"])
    nd = len(shape)
    out = torch.zeros(target.local_shape, dtype=dtype)
    filled = 0
    t_lo = [a for a, _ in target.region]
    t_str = _strides(target.block_shape)
    t_rows = _flat_rows(target)
    for piece in rec["pieces"]:
        s_region = [tuple(r) for r in piece["region"]]
        s_flat = tuple(piece["flat"]) if piece["flat"] is not None else None
        box = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(target.region, s_region)]
        if nd and t_rows is not None:
            box[0] = (max(box[0][0], t_lo[0] + t_rows[0]), min(box[0][1], t_lo[0] + t_rows[1]))
        if nd and s_flat is not None:
            rows = _flat_rows(_Slice(tuple(s_region), s_flat))
            box[0] = (max(box[0][0], s_region[0][0] + rows[0]), min(box[0][1], s_region[0][0] + rows[1]))
        if any(a >= b for a, b in box):
            continue
        sl = files.slice(piece, name)
        got_shape = tuple(sl.get_shape())
        want_shape = (s_flat[1],) if s_flat is not None else tuple(b - a for a, b in s_region)
        if got_shape != want_shape:
            raise CheckpointError(f"{files.path / piece['file']}: tensor {name!r} is stored with shape "
                                  f"{got_shape}, the index says {want_shape}")
        if verify and piece.get("crc32") is not None:
            whole = _read_all(files, piece, name, sl)
            if _crc(whole) != piece["crc32"]:
                raise CheckpointError(f"{files.path / piece['file']}: tensor {name!r} is corrupted "
                                      f"(crc32 differs from the one recorded at save)")
        if target.flat is None and s_flat is None:
            src = tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(box, s_region))
            dst = tuple(slice(a - c, b - c) for (a, b), c in zip(box, t_lo))
            vals = sl[src] if nd else _read_all(files, piece, name, sl)
            out[dst] = vals.to(dtype)
            filled += vals.numel()
            continue
        if tuple(s_region) == tuple(target.region):
            # one flattening on both sides (a ZeRO chunk read back under the same tp
            # layout): the overlap is one contiguous range, no index arithmetic needed
            t_a = target.flat[0] if target.flat is not None else 0
            t_b = t_a + target.real_length
            s_a = s_flat[0] if s_flat is not None else 0
            s_b = s_a + (s_flat[1] if s_flat is not None else math.prod(target.block_shape))
            a, b = max(t_a, s_a), min(t_b, s_b)
            if a >= b:
                continue
            if s_flat is not None:
                vals = sl[a - s_a:b - s_a]
            else:
                row = math.prod(target.block_shape[1:]) if nd else 1
                r0, r1 = a // row, (b - 1) // row + 1
                vals = (sl[r0:r1] if nd else _read_all(files, piece, name, sl)).reshape(-1)
                vals = vals[a - r0 * row:b - r0 * row]
            dst = out.view(-1) if target.flat is None else out
            dst[a - t_a:b - t_a] = vals.to(dtype)
            filled += b - a
            continue
        idx_t = _box_index(box, t_lo, t_str)
        idx_s = _box_index(box, [c for c, _ in s_region], _strides(tuple(b - a for a, b in s_region)))
        mask = torch.ones_like(idx_t, dtype=torch.bool)
        if target.flat is not None:
            mask &= (idx_t >= target.flat[0]) & (idx_t < target.flat[0] + target.real_length)
        if s_flat is not None:
            mask &= (idx_s >= s_flat[0]) & (idx_s < s_flat[0] + s_flat[1])
        if not bool(mask.any()):
            continue
        if s_flat is not None:
            pos = idx_s[mask] - s_flat[0]
            lo, hi = int(pos.min()), int(pos.max()) + 1
            vals = sl[lo:hi][pos - lo]
        else:
            src = tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(box, s_region))
            vals = (sl[src] if nd else _read_all(files, piece, name, sl)).reshape(-1)[mask.reshape(-1)]
        if target.flat is not None:
            out[idx_t[mask] - target.flat[0]] = vals.to(dtype)
        else:
            out.view(-1)[idx_t[mask]] = vals.to(dtype)
        filled += vals.numel()
    if filled != target.real_length:
        raise CheckpointError(f"{files.path / INDEX}: the pieces of tensor {name!r} cover {filled} of the "
                              f"{target.real_length} elements this rank needs; the checkpoint is incomplete")
    return out


def _read_all(files: _Files, piece: dict, name: str, sl) -> torch.Tensor:
    if len(sl.get_shape()) == 0:                 # a 0-dim slice cannot be indexed
        return files.get(piece["file"], name).get_tensor(piece["key"])
    return sl[:]


def _strides(shape: Tuple[int, ...]) -> List[int]:
    st, acc = [], 1
    for s in reversed(shape):
        st.append(acc)
        acc *= s
    return st[::-1]


def _flat_rows(s: _Slice) -> Optional[Tuple[int, int]]:
    """Rows (dim 0, relative to the block) that the flat range of ``s`` touches."""
    if s.flat is None or not s.region:
        return None
    row = math.prod(s.block_shape[1:])
    if row == 0 or s.real_length == 0:
        return (0, 0)
    return s.flat[0] // row, (s.flat[0] + s.real_length - 1) // row + 1


def _box_index(box, lo, strides) -> torch.Tensor:
    """Row-major flat index, in a block starting at ``lo``, of every element of ``box``."""
    idx = torch.zeros((), dtype=torch.int64)
    for d, ((a, b), c, st) in enumerate(zip(box, lo, strides)):
        shape = [1] * len(box)
        shape[d] = b - a
        idx = idx + (torch.arange(a - c, b - c, dtype=torch.int64) * st).view(shape)
    return idx


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` read: this rank's tensors under the new plan."""
    path: Path
    step: int
    tensors: Dict[str, torch.Tensor]
    optimizer: Dict[str, torch.Tensor]
    rng: Optional[Dict[str, torch.Tensor]]        # this rank's, when the world size is the same
    plan: object
    mesh: Dict[str, int]


def load_checkpoint(directory, mesh, wanted: Mapping[str, object],
                    optimizer: Optional[Mapping[str, object]] = None, strict: bool = True,
                    verify: bool = False, elsewhere: Iterable[str] = ()) -> LoadedCheckpoint:
    """Read this rank's shards of the latest complete checkpoint under ``directory`` (or of
    the ``step-N`` directory given) for the NEW plan: ``wanted`` (and ``optimizer``) map
    names to a :class:`ShardSpec` over ``mesh``. Only the overlapping slices are read.

    ``strict``: every model tensor in the checkpoint must be wanted (a subset raises) or in
    ``elsewhere``, the model's tensors that other ranks hold (a pipeline's other stages).
    ``verify``: check the crc32 of every piece read (reads those pieces whole).

        got = rt.load_checkpoint("ckpt", mesh, {"fc.weight": rt.ShardSpec((256, 64), ("S(0)",))})
    """
    path, index = read_index(directory)
    axes, coords = _axes_of(mesh), _coords_of(mesh)
    rank = mesh.rank if mesh is not None else 0
    want = {**{k: ("model", v) for k, v in wanted.items()},
            **{k: ("optim", v) for k, v in (optimizer or {}).items()}}
    have = index["tensors"]
    idx_file = path / INDEX
    missing = [k for k in want if k not in have]
    if missing:
        common = len(set(want) & set(have))
        hint = (" -- the checkpoint looks like it is from another model" if common < len(want) / 2
                else "")
        raise CheckpointError(f"{idx_file}: {len(missing)} wanted tensors are not in the checkpoint, "
                              f"e.g. {missing[:3]} (it has {len(have)}, {common} in common){hint}")
    if strict:
        others = set(elsewhere)
        extra = [k for k, r in have.items() if r["group"] == "model" and k not in want and k not in others]
        if extra:
            raise CheckpointError(f"{idx_file}: the checkpoint holds {len(extra)} tensors the model does not "
                                  f"have, e.g. {extra[:3]}; it is from another model (pass strict=False "
                                  f"to read a subset)")
    files = _Files(path, index)
    try:
        return _load(files, path, index, want, axes, coords, rank, verify)
    finally:
        files.close()


def _load(files, path, index, want, axes, coords, rank, verify) -> LoadedCheckpoint:
    have, idx_file = index["tensors"], path / INDEX
    out: Dict[str, Dict[str, torch.Tensor]] = {"model": {}, "optim": {}}
    for name, (group, spec) in want.items():
        spec = _norm_spec(spec, f"tensor {name!r}")
        rec = have[name]
        if tuple(spec.shape) != tuple(rec["shape"]):
            where = rec["pieces"][0]["file"] if rec["pieces"] else INDEX
            raise CheckpointError(f"{path / where}: tensor {name!r} has shape {tuple(rec['shape'])} in the "
                                  f"checkpoint but {tuple(spec.shape)} in the model")
        dtype = _dtype_of(rec["dtype"])
        if spec.dtype is not None and spec.dtype != dtype:
            raise CheckpointError(f"{idx_file}: tensor {name!r} is {rec['dtype']} in the checkpoint but "
                                  f"{_dtype_name(spec.dtype)} in the model")
        target = _slice_of(spec, axes, coords, f"tensor {name!r}")
        out[group][name] = _read_into(files, name, rec, target, dtype, verify)
    rng = None
    if int(index["world_size"]) == (math.prod(axes.values()) if axes else 1):
        rng = {}
        for k, ref in index["rng"].get(str(rank), {}).items():
            rng[k] = files.slice(ref, f"rng state {k!r}")[:].clone()
    return LoadedCheckpoint(path, int(index["step"]), out["model"], out["optim"], rng,
                            index.get("plan"), dict(index["mesh"]))


def read_tensor(directory, name: str, verify: bool = False) -> torch.Tensor:
    """The whole global tensor ``name`` of the latest checkpoint (no mesh needed).

        w = rt.read_tensor("ckpt", "fc.weight")
    """
    path, index = read_index(directory)
    rec = index["tensors"].get(name)
    if rec is None:
        raise CheckpointError(f"{path / INDEX}: no tensor {name!r} in the checkpoint")
    full = _Slice(tuple((0, s) for s in rec["shape"]), None)
    files = _Files(path, index)
    try:
        return _read_into(files, name, rec, full, _dtype_of(rec["dtype"]), verify)
    finally:
        files.close()


# --------------------------------------------------------------------------
# a generated program's training state
# --------------------------------------------------------------------------
# per optimizer: the state keys a resumed step needs (torch.optim's own names)
OPTIMIZER_KEYS = {"adamw": ("step", "exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}


def add_checkpoint_args(parser, defaults: Optional[Mapping[str, object]] = None) -> None:
    """The program's checkpoint flags; ``defaults`` are the plan's (``Plan.checkpoint``:
    ``directory``, ``every``, ``keep``, ``async``, ``resume``).

        rt.add_checkpoint_args(parser, {"directory": "ckpt/", "every": 100, "keep": 3})
    """
    import argparse
    d = dict(defaults or {})
    g = parser.add_argument_group("training-state checkpoints (sharded safetensors + index.json)")
    g.add_argument("--checkpoint", metavar="DIR", default=d.get("directory"),
                   help="save parameters, optimizer state, step and RNG state under DIR/step-N at the "
                        "end (and every --every steps)" + _shown(d.get("directory")))
    g.add_argument("--every", type=int, default=int(d.get("every") or 0), metavar="N",
                   help="also save every N steps (0: only at the end)" + _shown(d.get("every")))
    g.add_argument("--keep", type=int, default=d.get("keep"), metavar="K",
                   help="keep the last K complete checkpoints (default: all)" + _shown(d.get("keep")))
    g.add_argument("--async", dest="async_", action=argparse.BooleanOptionalAction,
                   default=bool(d.get("async", False)),
                   help="copy the state to host memory and write it in a background thread while "
                        "training goes on")
    g.add_argument("--resume", metavar="DIR", default=d.get("resume"),
                   help="continue from the latest complete checkpoint in DIR, resharded to this "
                        "program's plan (from the plan: a DIR without one yet starts afresh)"
                        + _shown(d.get("resume")))
    parser.set_defaults(resume_from_plan=d.get("resume"))


def _shown(value) -> str:
    return f"; the plan says {value}" if value not in (None, 0, "") else ""


def _with_zero_axis(spec: ShardSpec, axes: Mapping[str, int], axis: str, name: str) -> ShardSpec:
    """The spec of a ZeRO flat chunk of ``name``: ``F`` on the ZeRO axis instead of ``R``."""
    pl = list(spec.placements(axes, f"tensor {name!r}"))
    i = list(axes).index(axis)
    if pl[i] != "R":
        raise CheckpointError(f"ZeRO chunks of {name!r} over {axis}: the parameter is {pl[i]} on "
                              f"{axis}, not replicated")
    pl[i] = "F"
    return ShardSpec(spec.shape, tuple(pl), source=spec.source, held=spec.held)


def stage_specs(specs: Mapping[str, ShardSpec], axis: str, stage: int,
                tied: Mapping[str, Sequence[int]]) -> Dict[str, ShardSpec]:
    """A pipeline rank's specs: each tensor held by this stage (``stage`` on ``axis``), a tied
    weight by the first of the stages in ``tied`` (name -> stages), so that exactly one
    stage writes each tensor of the model.

        specs = rt.stage_specs(checkpoint_specs(model, full), "pp", stage, TIED)
    """
    return {name: replace(_norm_spec(spec, name), held=(axis, int(min(tied[name]) if name in tied else stage)))
            for name, spec in specs.items()}


class TrainingCheckpoint:
    """Save and resume a generated program's training state under its plan.

    ``specs``: name -> :class:`ShardSpec` of every tensor of ``model.state_dict()`` (global
    shape, this plan's layout, ``source`` for a piece of a fused weight). ``zero_chunks`` and
    ``zero_axis``: the flat chunks ZeRO-1/2 hands the optimizer instead of the parameters
    (name -> chunk); their state is saved as ``F`` chunks. Names in the checkpoint are the
    model's own, so a program of any other plan (mesh, ZeRO stage) resumes from it. ``masters``:
    a bf16 program's :class:`MasterWeights`: the checkpoint holds the fp32 masters in the
    parameters' place (ZeRO's fp32 chunks for its parameters), other floating tensors widened
    to fp32, the optimizer state of the masters; a resume loads the masters exactly and rounds
    the bf16 weights from them, so a bf16 run continues as if never stopped, and a checkpoint
    of either precision resumes under the other.

        ckpt = rt.TrainingCheckpoint(args, mesh, model, optimizer, checkpoint_specs(model, full))
        start = ckpt.resume()                         # 0 without --resume
        for step in range(start, start + args.steps):
            ...                                       # one training step
            ckpt.step_done(step + 1)                  # saves every --every steps
        ckpt.finish(start + args.steps)               # the last save, then waits for writers
    """

    def __init__(self, args, mesh, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 specs: Mapping[str, ShardSpec], zero_chunks: Optional[Mapping[str, torch.Tensor]] = None,
                 zero_axis: Optional[str] = None, plan=None, elsewhere: Iterable[str] = (),
                 masters=None):
        self.args, self.mesh, self.model, self.optimizer = args, mesh, model, optimizer
        self.elsewhere = tuple(elsewhere)            # the model's tensors other ranks hold
        self.masters = masters                       # bf16: the fp32 masters (MasterWeights)
        self.optimizer_name = getattr(args, "optimizer", "adamw")
        if int(getattr(args, "every", 0) or 0) < 0:
            raise CheckpointError(f"--every {args.every}: give the steps between saves (0: only at the end)")
        if getattr(args, "keep", None) is not None and args.keep < 1:
            raise CheckpointError(f"--keep {args.keep}: keep at least the latest checkpoint (or leave "
                                  f"--keep out to keep them all)")
        self.plan = _read_plan(plan)
        self.tensors: Dict[str, torch.Tensor] = {}
        self.aliases: Dict[str, str] = {}            # tied name -> the name saved
        seen: Dict[int, str] = {}
        for name, t in model.state_dict(keep_vars=True).items():
            if id(t) in seen:
                self.aliases[name] = seen[id(t)]
                continue
            seen[id(t)] = name
            if name not in specs:
                raise CheckpointError(f"tensor {name!r} of the model has no ShardSpec")
            self.tensors[name] = t
        self.specs = {n: _norm_spec(specs[n], n) for n in self.tensors}
        axes = _axes_of(mesh)
        chunks = dict(zero_chunks or {})
        self.chunk_names = set(chunks)
        self.zero_axis = zero_axis
        of = masters.of if masters is not None else {}
        # name -> (the tensor the optimizer updates, its spec)
        self.opt_params: Dict[str, Tuple[torch.Tensor, ShardSpec]] = {}
        for name, t in self.tensors.items():
            if not (isinstance(t, torch.nn.Parameter) and t.requires_grad):
                continue
            if name in chunks:
                self.opt_params[name] = (chunks[name], _with_zero_axis(self.specs[name], axes, zero_axis, name))
            else:
                self.opt_params[name] = (of.get(id(t), t), self.specs[name])
        self.saves: List[dict] = []                  # step, blocking seconds, write seconds
        self._handles: List[Tuple[dict, CheckpointHandle]] = []
        self.start = 0
        self.last_saved: Optional[int] = None

    # ---- save ----
    def save(self, step: int) -> CheckpointHandle:
        """Save the state after ``step`` steps (every rank calls it)."""
        t0 = time.perf_counter()
        tensors = {n: self._saved(n, t) for n, t in self.tensors.items()}
        params = {n: p for n, (p, _) in self.opt_params.items()}
        opt = optimizer_shards(self.optimizer, params, {n: s for n, (_, s) in self.opt_params.items()})
        h = save_checkpoint(self.args.checkpoint, self.mesh, step, tensors, opt,
                            rng_state=capture_rng_state(), plan_json=self.plan, keep=self.args.keep,
                            async_=self.args.async_, aliases=self.aliases)
        rec = {"step": step, "blocking_s": time.perf_counter() - t0, "async": bool(self.args.async_)}
        self.saves.append(rec)
        self._handles.append((rec, h))
        self.last_saved = step
        if self.mesh is None or self.mesh.rank == 0:
            how = "writing in the background" if self.args.async_ else "written"
            print(f"checkpoint: step {step} -> {h.path} ({how})", flush=True)
        return h

    def _saved(self, name: str, t: torch.Tensor) -> Tuple[torch.Tensor, ShardSpec]:
        """What is saved for tensor ``name``: itself, or under bf16 its fp32 master (a ZeRO
        parameter's: this rank's fp32 chunk), a floating buffer widened to fp32."""
        if self.masters is None:
            return t.detach(), self.specs[name]
        if name in self.opt_params and self.opt_params[name][0] is not t:
            return self.opt_params[name][0].detach(), self.opt_params[name][1]
        return (t.detach().float() if t.is_floating_point() else t.detach()), self.specs[name]

    def step_done(self, step: int) -> None:
        """After ``step`` steps in all: save if --every says so."""
        every = int(getattr(self.args, "every", 0) or 0)
        if self.args.checkpoint and every > 0 and step % every == 0:
            self.save(step)

    def finish(self, step: int) -> None:
        """The save at the end (unless this step is saved already); waits for every writer."""
        if self.args.checkpoint and self.last_saved != step:
            self.save(step)
        wait_checkpoint()
        for rec, h in self._handles:
            rec["write_s"] = h.seconds
        self._handles = []

    def stats(self) -> dict:
        return {"start_step": self.start, "saves": self.saves}

    # ---- resume ----
    def resume(self) -> int:
        """Load the latest checkpoint of ``--resume`` into the model, the optimizer and the
        RNG, resharded to this plan; returns the number of steps it was saved after (0
        without --resume, or when the plan's resume directory holds no checkpoint yet)."""
        d = getattr(self.args, "resume", None)
        if not d:
            return 0
        if d == getattr(self.args, "resume_from_plan", None) and not list_checkpoints(d) \
                and not (Path(d) / INDEX).is_file():
            if self.mesh is None or self.mesh.rank == 0:
                print(f"checkpoint: nothing to resume in {d} yet; starting from the initial weights",
                      flush=True)
            return 0
        path, index = read_index(d)
        have = index["tensors"]
        if any(n not in have for n in self.specs):
            load_checkpoint(path, self.mesh, self.specs, elsewhere=self.elsewhere)  # names what is missing
        keys = OPTIMIZER_KEYS.get(self.optimizer_name, ())
        opt_want: Dict[str, ShardSpec] = {}
        for name, (_, spec) in self.opt_params.items():
            got_keys = [k for k in keys if f"{name}.{k}" in have]
            if not got_keys and int(index["step"]) > 0:
                others = sorted({k.rsplit(".", 1)[1] for k, r in have.items() if r["group"] == "optim"})
                raise CheckpointError(
                    f"{path / INDEX}: no {self.optimizer_name} state for parameter {name!r} (the "
                    f"checkpoint's optimizer state keys: {others or 'none'}); resume with the "
                    f"optimizer it was saved with")
            for k in got_keys:
                opt_want[f"{name}.{k}"] = ShardSpec((), ()) if have[f"{name}.{k}"]["shape"] == [] else spec
        got = load_checkpoint(path, self.mesh, self.specs, opt_want, elsewhere=self.elsewhere)
        with torch.no_grad():
            for name, t in self.tensors.items():
                t.copy_(got.tensors[name].to(device=t.device, dtype=t.dtype))
            for name, (p, spec) in self.opt_params.items():
                if p is self.tensors[name]:
                    continue
                # from the values read (fp32), not the model's copy (bf16 under masters)
                full = got.tensors[name].to(device=p.device, dtype=p.dtype).reshape(-1)
                if name in self.chunk_names:         # a ZeRO chunk: this rank's part of the parameter
                    n, me = self.mesh.size(self.zero_axis), self.mesh.coord(self.zero_axis)
                    off, size = zero_chunk(full.numel(), n, me)
                    flat = torch.nn.functional.pad(full, (0, size * n - full.numel()))
                    p.copy_(flat[off:off + size])
                else:                                # a bf16 program's fp32 master
                    p.copy_(full.view(p.shape))
        if got.optimizer:
            restore_optimizer(self.optimizer, {n: p for n, (p, _) in self.opt_params.items()},
                              got.optimizer)
        if got.rng:
            restore_rng_state(got.rng)
        self.start = got.step
        self.last_saved = got.step if self.args.checkpoint and Path(self.args.checkpoint).resolve() \
            == path.parent.resolve() else None
        if self.mesh is None or self.mesh.rank == 0:
            saved = ",".join(f"{a}={n}" for a, n in got.mesh.items()) or "one device"
            rng = "" if got.rng is not None else (
                f"; RNG states not restored: saved by {index['world_size']} ranks, this run has "
                f"{self.mesh.world_size if self.mesh is not None else 1}")
            print(f"checkpoint: resumed from {path} (step {got.step}, saved on {saved}){rng}", flush=True)
        return got.step


def _read_plan(plan):
    """The plan recorded in the index: a dict, JSON text, or the path of a plan JSON file."""
    if plan is None or isinstance(plan, dict):
        return plan
    if isinstance(plan, (str, os.PathLike)) and not str(plan).lstrip().startswith("{"):
        p = Path(plan)
        return json.loads(p.read_text()) if p.is_file() else None
    return json.loads(plan)

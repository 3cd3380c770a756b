"""autopar SPMD runtime: the module generated training programs import.

    from autopar.backends import runtime as rt
    mesh = rt.init_mesh({"dp": 2, "tp": 2}, backend="torch")   # or backend="mpi"
    y = rt.all_gather(x, mesh, "tp", dim=-1)

Only torch, numpy, mpi4py (imported lazily, for ``backend="mpi"``) and the
standard library are used.

Mesh layout
-----------
Rank -> coordinates is row-major with the LAST axis fastest (like
``torch.distributed.init_device_mesh``): for ``{"dp": 2, "tp": 2}`` rank 1 is
``dp=0, tp=1``. Within an axis, "coordinate order" is ascending coordinate,
which is also ascending global rank. ``axis=None`` means the whole world
(coordinate = global rank).

Byte accounting convention
--------------------------
Every collective call -- forward and backward of the differentiable
collectives, and the non-differentiable ``Mesh`` utility ops -- adds ``S``
bytes to ``mesh.traffic[(kind, axis)]`` and appends
``CommEvent(kind, axis, S, phase)`` to ``mesh.events``. ``S`` is measured per
call, per rank, and is always the size of the FULL tensor, i.e. the one that
is unsharded along that axis:

===================  ==================================================
kind                 S
===================  ==================================================
``all_reduce``       bytes of the tensor being reduced
``all_gather``       bytes of the gathered OUTPUT (n x the local shard)
``reduce_scatter``   bytes of the INPUT (the full, pre-scatter tensor)
``all_to_all``       bytes of the local input tensor (= local output)
``broadcast``        bytes of the tensor
===================  ==================================================

(bytes = ``numel * element_size`` in the tensor's own dtype.) Operations that
move no data are not recorded: ``scatter`` forward and ``all_gather``
backward without ``partial_grad`` just slice, ``copy_to`` forward and
``all_reduce`` backward are identities, and every op on an axis of size 1 is
a no-op (0 bytes, no event). ``mesh.all_reduce_scalar`` (logging / loss
bookkeeping) is never recorded.

``phase`` is ``"backward"`` whenever the call happens while the autograd
engine runs a backward pass (our Function.backward bodies, gradient hooks,
recomputation under activation checkpointing); otherwise ``"forward"`` for
the differentiable collectives and ``"optimizer"`` for the ``Mesh`` utility
ops (which also take an explicit ``phase=`` override).
``mesh.reset_traffic()`` clears both ``traffic`` and ``events``;
``mesh.traffic_bytes(kind=None, axis=..., phase=None)`` sums filtered events.

API
---
``init_mesh(axes, backend="torch"|"mpi", device="cpu"|"cuda", timeout_s=None) -> Mesh``

Differentiable (autograd) collectives, ``x`` first, all raising ``ValueError``
when a split dimension is not divisible by the axis size:
``copy_to(x, mesh, axis)``, ``all_reduce(x, mesh, axis)``,
``all_gather(x, mesh, axis, dim, partial_grad=False)``,
``scatter(x, mesh, axis, dim)``, ``reduce_scatter(x, mesh, axis, dim)``,
``all_to_all(x, mesh, axis, split_dim, concat_dim)``.

Experts (``moe.py``): ``moe_experts(h, top_k_index, top_k_weights, gate, up, down,
mesh=None, axis=None)``, a layer of gated experts on this rank's tokens; with an axis,
expert-parallel (rows sent to the experts' ranks and back with all_to_all, recorded).

Losses (``losses.py``): ``vocab_parallel_cross_entropy(logits, target, mesh, axis,
ignore_index=-100, reduction="sum"|"none")``, cross-entropy over logits split on the class
dim, this rank's partial sum over ``axis``; two all_reduces of the rows' max and sum of exp
inside (recorded), none in backward.

``Mesh``: ``rank``, ``world_size``, ``axes``, ``backend``, ``device``,
``coord(axis)``, ``coords``, ``size(axis)``, ``rank_of(coords)``,
``axis_ranks(axis)``, ``group(axis)``, ``chunk(t, axis, dim)``,
``barrier(axis=None)``, ``shutdown()``, ``traffic``, ``events``,
``reset_traffic()``, ``traffic_bytes(...)`` and the no-autograd ops
``all_reduce_(t, axis, op="sum")``, ``all_gather_flat(t, axis, dim=0)``,
``reduce_scatter_flat(t, axis, dim=0, op="sum")``,
``all_to_all_flat(t, axis, split_dim=0, concat_dim=0)``,
``broadcast_(t, axis, root_coord=0)``,
``all_reduce_scalar(value, axis=None, op="sum") -> float``.

Overlap (``overlap.py``): ``GradBuckets(mesh, [(axes, names), ...], module)`` all-reduces
parameter gradients in buckets, asynchronously as backward produces them (``no_sync()``,
``wait()``, ``timeline``); ``ParamGather(mesh, axis, module, layout_of, blocks, prefetch)``
and ``gather_param(p, mesh, axis, dim)`` run ZeRO-3 as FSDP does (prefetch, reshard after
forward, asynchronous reduce_scatter). ``Timeline(mesh, dir, steps)`` (``timeline.py``) records
the last step's Chrome trace and how much of the asynchronous communication was hidden.

Helpers: ``set_seed(seed)``, ``one_thread()``, ``log(mesh, msg)``.

Checkpoints (``checkpoint.py``; safetensors files + one JSON index, no pickle):
``save_checkpoint(dir, mesh, step, tensors, optimizer_state, rng_state, plan_json, keep,
async_)``, ``wait_checkpoint()``, ``load_checkpoint(dir, mesh, wanted, optimizer)``
(resharding on load), ``ShardSpec(shape, layout)`` with placements ``R``/``S(d)``/``F``
(ZeRO flat chunk), ``optimizer_shards`` / ``optimizer_wanted`` / ``restore_optimizer``,
``capture_rng_state`` / ``restore_rng_state``, ``save_file`` / ``load_file``,
``save_init`` / ``load_init`` (initial weights + example batch), ``CheckpointError``;
``add_checkpoint_args(parser, defaults)`` and ``TrainingCheckpoint`` (a program's
``--checkpoint`` / ``--resume``).
"""
from .checkpoint import (CheckpointError, CheckpointHandle, LoadedCheckpoint, ShardSpec,
                         capture_rng_state, latest_checkpoint, load_checkpoint, load_file,
                         load_init, optimizer_shards, optimizer_wanted, read_tensor,
                         restore_optimizer, restore_rng_state, save_checkpoint, save_file,
                         save_init, wait_checkpoint, zero_chunk, add_checkpoint_args,
                         stage_specs, TrainingCheckpoint)
from .collectives import (all_gather, all_reduce, all_to_all, copy_to, copy_to_linear, copy_to_linears,
                          all_gather_linears, linear_reduce_scatter,
                          reduce_scatter, scatter)
from .losses import vocab_parallel_cross_entropy
from .moe import moe_experts
from .overlap import GradBuckets, ParamGather, gather_param
from .precision import MasterWeights, to_compute
from .timeline import Timeline
from .pipeline import (PipelineStageOf, StageModule, keep_stage_params, pipeline_schedule,
                       reduce_grad_buckets, reduce_tied_grads, stage_grad_order, tied_groups)
from .mesh import KINDS, PHASES, CommEvent, Mesh, in_backward, init_mesh
from .utils import log, one_thread, set_seed

__all__ = [
    "init_mesh", "Mesh", "CommEvent", "KINDS", "PHASES", "in_backward",
    "copy_to", "copy_to_linear", "copy_to_linears", "all_gather_linears", "linear_reduce_scatter",
    "all_reduce", "all_gather", "scatter", "reduce_scatter", "all_to_all",
    "vocab_parallel_cross_entropy", "moe_experts", "set_seed", "one_thread", "log", "GradBuckets", "ParamGather", "gather_param", "Timeline",
    "ShardSpec", "CheckpointError", "CheckpointHandle", "LoadedCheckpoint", "save_checkpoint",
    "wait_checkpoint", "load_checkpoint", "latest_checkpoint", "read_tensor", "zero_chunk",
    "optimizer_shards", "optimizer_wanted", "restore_optimizer", "capture_rng_state",
    "restore_rng_state", "save_file", "load_file", "save_init", "load_init",
    "add_checkpoint_args", "stage_specs", "TrainingCheckpoint", "MasterWeights", "to_compute",
    "PipelineStageOf", "StageModule", "keep_stage_params", "pipeline_schedule",
    "reduce_tied_grads", "tied_groups", "reduce_grad_buckets", "stage_grad_order",
]

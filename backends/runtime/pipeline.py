"""Pipeline parallelism for generated programs: PyTorch's own schedules
(`torch.distributed.pipelining`) over one stage of the model per pp coordinate.

    stage = rt.PipelineStageOf(model, "stage1", mesh, "pp")      # this rank's stage
    schedule = rt.pipeline_schedule("1f1b", stage, microbatches=4, loss_fn=model.loss)
    schedule.step(*stage_inputs, target=targets, losses=losses)
    rt.reduce_tied_grads(model, mesh, "pp", TIED)                  # a weight two stages hold

Every activation a stage sends to the next (forward) and every gradient it sends back
(backward) is recorded in `mesh.traffic` as `send`/`recv` over the pp axis, the bytes of the
tensor, like the collectives: the schedule's point-to-point ops are the ones counted.

Torch backend only (the MPI backend refuses a pp axis).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


def keep_stage_params(model: nn.Module, owns) -> list[str]:
    """Remove every parameter and buffer whose state-dict name lies in none of the module
    prefixes `owns` (this stage's modules): the rank keeps only its stage. A tied name
    (two names, one tensor) stays when either name is owned. Returns the removed names."""
    owns = tuple(owns)

    def mine(name):
        return any(name == p or name.startswith(p + ".") for p in owns)
    keep_ids = {id(t) for n, t in model.named_parameters(remove_duplicate=False) if mine(n)}
    keep_ids |= {id(t) for n, t in model.named_buffers(remove_duplicate=False) if mine(n)}
    removed = []
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for table in (mod._parameters, mod._buffers):
            for leaf in list(table):
                t = table[leaf]
                if t is not None and id(t) not in keep_ids:
                    del table[leaf]
                    removed.append(f"{mod_name}.{leaf}" if mod_name else leaf)
    return removed


class StageModule(nn.Module):
    """One stage of a generated model: `forward` runs the model's method `method` (its
    `stage<k>`); the parameters are the model's (those the stage kept)."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *args):
        return getattr(self.model, self.method)(*args)


def _bytes(ops) -> int:
    return sum(op.tensor.numel() * op.tensor.element_size() for op in ops)


def measured_stage_class():
    from torch.distributed.pipelining import PipelineStage

    class MeasuredStage(PipelineStage):
        """PipelineStage whose activation and gradient sends / receives are recorded in
        the mesh's traffic (kind send / recv, the pp axis, forward / backward)."""

        def __init__(self, *args, mesh=None, axis="pp", **kwargs):
            super().__init__(*args, **kwargs)
            self._mesh, self._axis = mesh, axis

        # The first step infers the shapes crossing each cut by running the stage once on
        # the first microbatch (and its backward): a one-time setup, not part of a training
        # step, so the collectives it runs are left out of the step's traffic.
        def _unrecorded(self, fn, *args, **kwargs):
            traffic, events = dict(self._mesh.traffic), list(self._mesh.events)
            try:
                return fn(*args, **kwargs)
            finally:
                self._mesh.traffic, self._mesh.events = traffic, events

        def _forward_metadata_inference(self, *args, **kwargs):
            return self._unrecorded(super()._forward_metadata_inference, *args, **kwargs)

        def _backward_metadata_inference(self, *args, **kwargs):
            return self._unrecorded(super()._backward_metadata_inference, *args, **kwargs)

        def _note(self, kind, ops, phase):
            for op in ops:
                self._mesh._record(kind, self._axis, _bytes([op]), phase)
            return ops

        def get_fwd_recv_ops(self, fwd_chunk_id):
            return self._note("recv", super().get_fwd_recv_ops(fwd_chunk_id), "forward")

        def get_fwd_send_ops(self, fwd_chunk_id):
            return self._note("send", super().get_fwd_send_ops(fwd_chunk_id), "forward")

        def get_bwd_recv_ops(self, bwd_chunk_id):
            return self._note("recv", super().get_bwd_recv_ops(bwd_chunk_id), "backward")

        def get_bwd_send_ops(self, bwd_chunk_id):
            return self._note("send", super().get_bwd_send_ops(bwd_chunk_id), "backward")
    return MeasuredStage


def PipelineStageOf(model: nn.Module, method: str, mesh, axis: str = "pp"):
    """This rank's `PipelineStage`: stage index = the rank's coordinate on `axis`, the
    point-to-point group = its slice of `axis`."""
    cls = measured_stage_class()
    return cls(StageModule(model, method), mesh.coord(axis), mesh.size(axis), mesh.device,
               group=mesh.group(axis), mesh=mesh, axis=axis)


def pipeline_schedule(name: str, stage, microbatches: int, loss_fn):
    """PyTorch's schedule `name` (gpipe | 1f1b) over `stage`. Each microbatch's loss is the
    mean over its part of the batch, so the gradients are divided by the microbatch count
    (scale_grads): M microbatches of equal size add up to the full batch's step."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name]
    return cls(stage, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=True)


def tied_groups(mesh, axis: str, tied: dict) -> dict:
    """A process group per set of stages holding a tied weight: the ranks of this rank's
    slice of `axis` at those stages (every rank creates every group, in one order, as
    torch requires)."""
    import itertools
    out = {}
    others = [a for a in mesh.axes if a != axis]
    for key in sorted({tuple(s) for s in tied.values()}):
        for coords in itertools.product(*[range(mesh.axes[a]) for a in others]):
            ranks = [mesh.rank_of({**dict(zip(others, coords)), axis: s}) for s in key]
            g = dist.new_group(ranks)
            if mesh.rank in ranks:
                out[key] = g
    return out


@torch.no_grad()
def reduce_tied_grads(model: nn.Module, mesh, axis: str, tied: dict, groups: dict) -> None:
    """Sum the gradient of each weight several stages hold over those stages (a tied
    embedding and output head): every copy then takes the same update. Recorded as
    all_reduce over `axis`."""
    params = dict(model.named_parameters())
    me = mesh.coord(axis)
    for name, stages in sorted(tied.items()):
        if me not in stages or name not in params:
            continue
        p = params[name]
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=groups[tuple(stages)])
        p.grad = g
        mesh._record("all_reduce", axis, g.numel() * g.element_size(), "optimizer")


def stage_grad_order(order, model: nn.Module) -> list[tuple]:
    """The program's GRAD_ORDER kept to the parameters this stage holds (the rows of the
    others' are dropped; the buckets fill from what is left, as the plan predicted)."""
    from autopar.compiler.buckets import expand
    have = dict(model.named_parameters(remove_duplicate=False))
    return [row for row in expand(order) if row[0] in have]


def reduce_grad_buckets(buckets) -> None:
    """Launch every bucket of an `rt.GradBuckets` whose gradients were accumulated under
    `no_sync()` (the schedule's microbatches) and wait for them: each gradient becomes its
    sum over the bucket's axes."""
    for b in buckets.buckets:
        if b.flat is None:
            buckets._launch(b)
    buckets.wait()


def first_last(mesh, axis: str) -> tuple[bool, bool]:
    c, n = mesh.coord(axis), mesh.size(axis)
    return c == 0, c == n - 1


__all__ = ["stage_grad_order", "reduce_grad_buckets", "keep_stage_params", "StageModule", "PipelineStageOf", "pipeline_schedule",
           "tied_groups", "reduce_tied_grads", "first_last"]

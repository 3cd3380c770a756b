"""Pipeline parallelism for generated programs: PyTorch's own schedules
(`torch.distributed.pipelining`) over one stage of the model per pp coordinate.

    stage = rt.PipelineStageOf(model, "stage1", mesh, "pp")      # this rank's stage
    schedule = rt.pipeline_schedule("1f1b", stage, microbatches=4, loss_fn=model.loss)
    schedule.step(*stage_inputs, target=targets, losses=losses)
    rt.reduce_tied_grads(model, mesh, "pp", TIED)                  # a weight two stages hold

Every activation a stage sends to the next (forward) and every gradient it sends back
(backward) is recorded in `mesh.traffic` as `send`/`recv` over the pp axis, the bytes of the
tensor, like the collectives: the schedule's point-to-point ops are the ones counted.

Under MPI the same calls give `MpiStage` and `MpiSchedule`: the schedule's order of
forwards and backwards run here, each activation and gradient crossing a cut by nonblocking
`Isend` / `Irecv` on the pp communicator (sends waited on at the end of the step), counted
the same way.
"""
from __future__ import annotations

import torch
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
    """This rank's stage: stage index = the rank's coordinate on `axis`, the point-to-point
    group = its slice of `axis`. A `PipelineStage` under torch.distributed, an `MpiStage`
    under MPI."""
    if mesh.backend == "mpi":
        return MpiStage(StageModule(model, method), mesh, axis)
    cls = measured_stage_class()
    return cls(StageModule(model, method), mesh.coord(axis), mesh.size(axis), mesh.device,
               group=mesh.group(axis), mesh=mesh, axis=axis)


def pipeline_schedule(name: str, stage, microbatches: int, loss_fn):
    """The schedule `name` (gpipe | 1f1b) over `stage`: PyTorch's under torch.distributed,
    `MpiSchedule` under MPI. Each microbatch's loss is the mean over its part of the batch,
    so the gradients are divided by the microbatch count (scale_grads): M microbatches of
    equal size add up to the full batch's step."""
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"pipeline schedule {name!r}: use one of {', '.join(SCHEDULE_NAMES)}")
    if isinstance(stage, MpiStage):
        return MpiSchedule(name, stage, microbatches, loss_fn)
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name]
    return cls(stage, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=True)


SCHEDULE_NAMES = ("gpipe", "1f1b")


def schedule_order(name: str, stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    """The order in which stage `stage` of `stages` runs its microbatches' forwards ("F", i)
    and backwards ("B", i). GPipe: every forward, then every backward. 1F1B: as many
    forwards as stages after this one (the warm-up), then one forward and one backward in
    turn, then the remaining backwards, so at most `stages - stage` microbatches are in
    flight (PyTorch's Schedule1F1B runs the same order).

    >>> schedule_order("1f1b", 0, 2, 3)
    [('F', 0), ('F', 1), ('B', 0), ('F', 2), ('B', 1), ('B', 2)]
    """
    m = microbatches
    if name == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warm = min(stages - 1 - stage, m)
    order = [("F", i) for i in range(warm)]
    for i in range(warm, m):
        order += [("F", i), ("B", i - warm)]
    return order + [("B", i) for i in range(m - warm, m)]


_FORWARD, _BACKWARD, _SHAPES = 0, 1, 2          # message tags on the pp communicator


class MpiStage:
    """This rank's stage of a pipeline over MPI: its module, its place on `axis` and the
    communicator of its slice of `axis`. What the previous stage sends (shapes, dtypes,
    which need a gradient) is learned from one message before the first step's first
    activation and kept."""

    def __init__(self, module: StageModule, mesh, axis: str = "pp"):
        self.submod = module
        self.mesh, self.axis = mesh, axis
        self.stage_index, self.num_stages = mesh.coord(axis), mesh.size(axis)
        self.is_first, self.is_last = self.stage_index == 0, self.stage_index == self.num_stages - 1
        self.comm = mesh._comm(axis)
        self.inputs_meta = None       # [(shape, dtype, requires_grad)] from the previous stage
        self.outputs_sent = False     # whether the next stage has been told the shapes


class MpiSchedule:
    """A GPipe or 1F1B step over an `MpiStage` (the order: `schedule_order`). Forward: the
    first stage splits the batch into microbatches (dim 0), the others receive each
    microbatch's activations (`Irecv`, then wait); the stage's outputs go to the next stage
    by `Isend`. The last stage computes each microbatch's loss. Backward: the gradients of
    the outputs come back from the next stage, autograd runs the stage's backward, and the
    gradients of its inputs go to the previous stage. Sends are waited on at the end of the
    step; the parameters' gradients are then divided by the microbatch count."""

    def __init__(self, name: str, stage: MpiStage, n_microbatches: int, loss_fn):
        self.name, self.stage, self.m, self.loss_fn = name, stage, int(n_microbatches), loss_fn

    def step(self, *args, target=None, losses=None):
        st, m = self.stage, self.m
        mesh, axis, comm = st.mesh, st.axis, st.comm
        me = st.stage_index
        sends = []                      # (request, buffer) of this step's Isends
        saved = {}                      # microbatch -> (its inputs, what its backward starts from)
        chunks = [a.tensor_split(m) for a in args] if st.is_first else None
        targets = target.tensor_split(m) if st.is_last else None

        def send(t, dest, tag, phase):
            sends.append(comm.isend(t, dest, tag))
            mesh._record("send", axis, t.numel() * t.element_size(), phase)

        def recv(shape, dtype, source, tag, phase):
            buf = torch.empty(shape, dtype=dtype)
            comm.irecv(buf, source, tag).Wait()
            mesh._record("recv", axis, buf.numel() * buf.element_size(), phase)
            return buf.to(mesh.device)

        def forward(i):
            if st.is_first:
                ins = tuple(c[i] for c in chunks)
            else:
                if st.inputs_meta is None:
                    st.inputs_meta = comm.recv_object(me - 1, _SHAPES)
                ins = tuple(recv(shape, dtype, me - 1, _FORWARD, "forward").requires_grad_(grad)
                            for shape, dtype, grad in st.inputs_meta)
            out = st.submod(*ins)
            outs = out if isinstance(out, tuple) else (out,)
            if st.is_last:
                loss = self.loss_fn(*outs, targets[i])
                if losses is not None:
                    losses.append(loss.detach())
                saved[i] = (ins, [loss], None)
                return
            if not st.outputs_sent:
                comm.send_object([(tuple(o.shape), o.dtype, o.requires_grad) for o in outs], me + 1, _SHAPES)
                st.outputs_sent = True
            for o in outs:
                send(o, me + 1, _FORWARD, "forward")
            saved[i] = (ins, [o for o in outs if o.requires_grad], [o for o in outs if o.requires_grad])

        def backward(i):
            ins, roots, need = saved.pop(i)
            grads = None
            if need is not None:
                grads = [recv(tuple(o.shape), o.dtype, me + 1, _BACKWARD, "backward") for o in need]
            if roots:
                torch.autograd.backward(roots, grads)
            if not st.is_first:
                for x in ins:
                    if x.requires_grad:
                        send(x.grad if x.grad is not None else torch.zeros_like(x), me - 1, _BACKWARD, "backward")

        for kind, i in schedule_order(self.name, me, st.num_stages, m):
            (forward if kind == "F" else backward)(i)
        for req, _ in sends:
            req.Wait()
        if m > 1:
            for p in st.submod.parameters():
                if p.grad is not None:
                    p.grad.div_(m)


def tied_groups(mesh, axis: str, tied: dict) -> dict:
    """A communicator per set of stages holding a tied weight: the ranks of this rank's
    slice of `axis` at those stages (every rank takes part in creating every one, in one
    order, as torch and MPI require)."""
    import itertools
    out = {}
    others = [a for a in mesh.axes if a != axis]
    for key in sorted({tuple(s) for s in tied.values()}):
        groups = [[mesh.rank_of({**dict(zip(others, coords)), axis: s}) for s in key]
                  for coords in itertools.product(*[range(mesh.axes[a]) for a in others])]
        comm = mesh.subcomm(groups)
        if comm is not None:
            out[key] = comm
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
        groups[tuple(stages)].allreduce_(g)
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
           "MpiStage", "MpiSchedule", "schedule_order", "tied_groups", "reduce_tied_grads", "first_last"]

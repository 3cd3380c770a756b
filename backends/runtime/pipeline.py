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


def PipelineStageOf(model: nn.Module, method, mesh, axis: str = "pp"):
    """This rank's stage: `method` names the model's method it runs (stage index = the rank's
    coordinate on `axis`), or a list of them for an interleaved schedule (model chunk k of
    the list is stage coordinate + k * size of `axis`). The point-to-point group is the
    rank's slice of `axis`. `PipelineStage`s under torch.distributed, an `MpiStage` under MPI."""
    methods = [method] if isinstance(method, str) else list(method)
    p, me = mesh.size(axis), mesh.coord(axis)
    modules = [StageModule(model, m) for m in methods]
    if mesh.backend == "mpi":
        return MpiStage(modules, mesh, axis)
    cls = measured_stage_class()
    stages = [cls(mod, me + k * p, p * len(methods), mesh.device, group=mesh.group(axis), mesh=mesh, axis=axis)
              for k, mod in enumerate(modules)]
    return stages[0] if isinstance(method, str) else stages


SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved")


def pipeline_schedule(name: str, stage, microbatches: int, loss_fn):
    """The schedule `name` (gpipe | 1f1b | interleaved, the last over a list of stages) over
    `stage`: PyTorch's under torch.distributed, `MpiSchedule` under MPI. Each microbatch's
    loss is the mean over its part of the batch, so after the step the gradients of the
    rank's parameters are divided by the microbatch count, once each (several chunks of one
    rank share the model's parameters): M microbatches of equal size add up to the full
    batch's step."""
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"pipeline schedule {name!r}: use one of {', '.join(SCHEDULE_NAMES)}")
    if isinstance(stage, MpiStage):
        return MpiSchedule(name, stage, microbatches, loss_fn)
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
    if name == "interleaved":
        stages = list(stage) if isinstance(stage, (list, tuple)) else [stage]
        inner = ScheduleInterleaved1F1B(stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    else:
        stages = [stage]
        inner = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name](
            stage, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    return ScaledSchedule(inner, stages[0].submod.model, microbatches)


class ScaledSchedule:
    """A PyTorch schedule whose `step` then divides each parameter's gradient by the
    microbatch count once (PyTorch's own scale_grads divides per stage, so twice a parameter
    two chunks of one rank share)."""

    def __init__(self, inner, model: nn.Module, microbatches: int):
        self.inner, self.model, self.m = inner, model, int(microbatches)

    def step(self, *args, **kwargs):
        out = self.inner.step(*args, **kwargs)
        scale_grads(self.model, self.m)
        return out


@torch.no_grad()
def scale_grads(model: nn.Module, m: int) -> None:
    if m > 1:
        for p in model.parameters():            # each parameter once (tied names share one)
            if p.grad is not None:
                p.grad.div_(m)


def schedule_order(name: str, stage: int, stages: int, microbatches: int,
                   chunks: int = 1) -> list[tuple[str, int, int]]:
    """The order in which the rank at pp coordinate `stage` of `stages` runs forwards
    ("F", chunk, microbatch) and backwards ("B", chunk, microbatch) of its model chunks
    (local index: chunk k is stage `stage + k * stages`; one chunk unless interleaved).
    GPipe: every forward, then every backward. 1F1B: as many forwards as stages after this
    one (the warm-up), then one forward and one backward in turn, then the remaining
    backwards, so at most `stages - stage` microbatches are in flight. Interleaved 1F1B:
    PyTorch's ScheduleInterleaved1F1B order -- the forwards cycle through the chunks a round
    of microbatches at a time, the backwards through them in reverse, after a warm-up of
    (chunks - 1) rounds plus 2 per stage after this one.

    >>> schedule_order("1f1b", 0, 2, 3)
    [('F', 0, 0), ('F', 0, 1), ('B', 0, 0), ('F', 0, 2), ('B', 0, 1), ('B', 0, 2)]
    """
    m, p, v = microbatches, stages, chunks
    if name == "gpipe":
        return [("F", 0, i) for i in range(m)] + [("B", 0, i) for i in range(m)]
    if name == "1f1b":
        warm = min(p - 1 - stage, m)
        order = [("F", 0, i) for i in range(warm)]
        for i in range(warm, m):
            order += [("F", 0, i), ("B", 0, i - warm)]
        return order + [("B", 0, i) for i in range(m - warm, m)]
    per_round = m // max(1, m // p)
    warm = min((v - 1) * per_round + 2 * (p - 1 - stage), m * v)
    done = {"F": [0] * v, "B": [0] * v}

    def op(kind, k):
        i = done[kind][k]
        done[kind][k] += 1
        return (kind, k, i)
    order = [op("F", (t // per_round) % v) for t in range(warm)]
    for t in range(warm, m * v):
        order.append(op("F", (t // per_round) % v))
        order.append(op("B", v - 1 - ((t - warm) // per_round) % v))
    for t in range(m * v, m * v + warm):
        order.append(op("B", v - 1 - ((t - warm) // per_round) % v))
    return order


class MpiStage:
    """This rank's model chunks of a pipeline over MPI (one unless interleaved: chunk k of
    `modules` is stage coordinate + k * size of `axis`), its place on `axis` and the
    communicator of its slice of `axis`. What the previous stage sends each chunk (shapes,
    dtypes, which need a gradient) is learned from one message before the first step's
    first activation and kept."""

    def __init__(self, modules, mesh, axis: str = "pp"):
        self.modules = list(modules)
        self.mesh, self.axis = mesh, axis
        self.p = mesh.size(axis)
        self.stage_index = mesh.coord(axis)
        self.num_stages = self.p * len(self.modules)          # model chunks in all
        self.comm = mesh._comm(axis)
        self.inputs_meta = [None] * len(self.modules)   # per chunk: [(shape, dtype, requires_grad)]
        self.outputs_sent = [False] * len(self.modules)  # whether the next chunk knows the shapes

    def chunk(self, k: int) -> int:
        return self.stage_index + k * self.p


class MpiSchedule:
    """A GPipe, 1F1B or interleaved 1F1B step over an `MpiStage` (the order:
    `schedule_order`). Forward: chunk 0 splits the batch into microbatches (dim 0), the
    others receive each microbatch's activations from the previous chunk's rank (`Irecv`,
    then wait); a chunk's outputs go to the next chunk's rank by `Isend`. The last chunk
    computes each microbatch's loss. Backward: the gradients of the outputs come back from
    the next chunk, autograd runs the chunk's backward, and the gradients of its inputs go
    to the previous chunk. Messages are tagged by the receiving chunk and direction, so
    each channel keeps microbatch order. Sends are waited on at the end of the step; the
    parameters' gradients are then divided by the microbatch count."""

    def __init__(self, name: str, stage: MpiStage, n_microbatches: int, loss_fn):
        self.name, self.stage, self.m, self.loss_fn = name, stage, int(n_microbatches), loss_fn

    def step(self, *args, target=None, losses=None):
        st, m = self.stage, self.m
        mesh, axis, comm, p = st.mesh, st.axis, st.comm, st.p
        last_chunk = st.num_stages - 1
        sends = []                      # (request, buffer) of this step's Isends
        saved = {}                      # (chunk, microbatch) -> (inputs, what its backward starts from)
        chunks = [a.tensor_split(m) for a in args] if st.stage_index == 0 else None
        targets = target.tensor_split(m) if st.stage_index == last_chunk % p and target is not None else None

        def tag(chunk, what):           # what: 0 activations, 1 gradients, 2 shapes
            return 3 * chunk + what

        def send(t, chunk, what, phase):
            sends.append(comm.isend(t, chunk % p, tag(chunk, what)))
            mesh._record("send", axis, t.numel() * t.element_size(), phase)

        def recv(shape, dtype, chunk, me, what, phase):
            buf = torch.empty(shape, dtype=dtype)
            comm.irecv(buf, chunk % p, tag(me, what)).Wait()
            mesh._record("recv", axis, buf.numel() * buf.element_size(), phase)
            return buf.to(mesh.device)

        def forward(k, i):
            j = st.chunk(k)
            if j == 0:
                ins = tuple(c[i] for c in chunks)
            else:
                if st.inputs_meta[k] is None:
                    st.inputs_meta[k] = comm.recv_object((j - 1) % p, tag(j, 2))
                ins = tuple(recv(shape, dtype, j - 1, j, 0, "forward").requires_grad_(grad)
                            for shape, dtype, grad in st.inputs_meta[k])
            out = st.modules[k](*ins)
            outs = out if isinstance(out, tuple) else (out,)
            if j == last_chunk:
                loss = self.loss_fn(*outs, targets[i])
                if losses is not None:
                    losses.append(loss.detach())
                saved[k, i] = (ins, [loss])
                return
            if not st.outputs_sent[k]:
                comm.send_object([(tuple(o.shape), o.dtype, o.requires_grad) for o in outs],
                                 (j + 1) % p, tag(j + 1, 2))
                st.outputs_sent[k] = True
            for o in outs:
                send(o, j + 1, 0, "forward")
            saved[k, i] = (ins, [o for o in outs if o.requires_grad])

        def backward(k, i):
            j = st.chunk(k)
            ins, roots = saved.pop((k, i))
            grads = None                # the loss starts its own backward; others the next chunk's gradients
            if j != last_chunk:
                grads = [recv(tuple(o.shape), o.dtype, j + 1, j, 1, "backward") for o in roots]
            if roots:
                torch.autograd.backward(roots, grads)
            if j > 0:
                for x in ins:
                    if x.requires_grad:
                        send(x.grad if x.grad is not None else torch.zeros_like(x), j - 1, 1, "backward")

        for kind, k, i in schedule_order(self.name, st.stage_index, p, m, len(st.modules)):
            (forward if kind == "F" else backward)(k, i)
        for req, _ in sends:
            req.Wait()
        scale_grads(st.modules[0].model, m)


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
           "MpiStage", "MpiSchedule", "ScaledSchedule", "schedule_order", "tied_groups", "reduce_tied_grads", "first_last"]

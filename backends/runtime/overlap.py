"""Gradient buckets: a data-parallel gradient reduction that runs while backward still computes.

The program lists its buckets (passes/overlap.py chose them: reverse order of use, ~25 MiB,
one dtype and one set of axes each) and hands this class the parameters of each:

    grads = rt.GradBuckets(mesh, [("head.weight", ("dp",)), ("h.*", [("fc.weight", ("dp",)), ...], 4)],
                           model, bucket_bytes=25 << 20, first_bucket_bytes=1 << 20)
    loss.backward()      # each bucket's all_reduce starts when its last gradient is accumulated;
                         # when backward ends, every bucket is waited for and written back
    optimizer.step()

A post-accumulate-grad hook on every parameter counts the gradients a bucket still waits
for; the last one flattens the bucket into one buffer and launches a nonblocking all_reduce
(`dist.all_reduce(async_op=True)` on torch, `Iallreduce` on MPI) over the bucket's first
axis. Every hook also polls the collectives in flight (MPI makes progress only when called).
`wait()` (queued as an autograd-engine callback by the first hook, so it runs when backward
ends) waits in launch order, reduces over any further axes (a replicated parameter whose
gradient is partial over dp and tp), and copies the sums back into `.grad`. Bytes and calls
are recorded like every collective (phase "backward"), one call per bucket and axis.

`no_sync()` turns the hooks off (gradient accumulation over microbatches: reduce once, on the
last one). `timeline` keeps, per bucket of the last step, when it was launched, when it was
seen done and how long `wait()` blocked on it (the exposed part).

A generated training loop does better than waiting at the end of backward. The last bucket
is launched when backward's last op (the embedding, in a GPT) has run, so the compute stream
has nothing left to hide it behind -- except the optimizer step. With `defer = True`,
backward returns with the buckets still in flight and the loop calls `step(optimizer)`: the
parameters of the buckets already reduced step first, while the others' all_reduce finishes,
then those step. Adam, AdamW and SGD update each parameter on its own, so stepping them in
two calls is the same arithmetic as one call (and a parameter without a gradient is skipped,
its state untouched). A user's own loop keeps `defer` off: `loss.backward()` returns with
every gradient reduced.
"""
from __future__ import annotations

import contextlib
import math
import time
import weakref

import torch

from torch.utils.weak import WeakIdKeyDictionary

from autopar.compiler.buckets import expand, fill

from .mesh import Mesh


class _Bucket:
    def __init__(self, index: int, axes: tuple, params: list, kind: str = "all_reduce", names=()):
        self.index, self.axes, self.params = index, tuple(axes), list(params)
        self.kind, self.names = kind, list(names)
        self.pending = len(self.params)
        self.flat = None
        self.handle = None
        self.launched = self.seen_done = None


class GradBuckets:
    """Asynchronous bucketed all-reduce of parameter gradients (see the module docstring)."""

    def __init__(self, mesh: Mesh, order, module: torch.nn.Module, bucket_bytes: int = 25 << 20,
                 first_bucket_bytes: int = 1 << 20):
        """`order`: the program's GRAD_ORDER -- (parameter name, axes) rows in the order
        backward finishes the gradients, a `*` row standing for every block of a module list
        (compiler/buckets.fold). Buckets are filled from it exactly as the plan predicted."""
        self.mesh = mesh
        named = dict(module.named_parameters(remove_duplicate=False))
        rows = expand(order)
        params = [named[row[0]] for row in rows]
        kinds = [row[2] if len(row) > 2 else "all_reduce" for row in rows]
        items = [((row[1], p.dtype, k), self._bytes(p, row[1], k)) for p, row, k in zip(params, rows, kinds)]
        self.buckets = [_Bucket(i, rows[m[0]][1], [params[k] for k in m], kinds[m[0]], [rows[k][0] for k in m])
                        for i, m in enumerate(fill(items, first_bucket_bytes, bucket_bytes))]
        # ZeRO-2: this rank's chunk of each reduce_scattered gradient, by name (ZeroShards takes it)
        self.reduced: dict[str, torch.Tensor] = {}
        self._queued = False
        self.enabled = True
        self.defer = False                       # backward leaves the buckets to step()
        self._deferred = False                   # a backward ended with buckets in flight
        self.timeline: list[dict] = []
        self._inflight: list[_Bucket] = []
        self._hooks = []
        seen = set()
        for b in self.buckets:
            for p in b.params:
                if id(p) in seen:
                    raise ValueError("a parameter is listed twice in GRAD_ORDER")
                seen.add(id(p))
                self._hooks.append(p.register_post_accumulate_grad_hook(
                    lambda p, b=b: self._accumulated(b)))

    def _bytes(self, p, axes, kind) -> int:
        if kind == "reduce_scatter":
            n = self.mesh.size(axes[0])
            return -(-p.numel() // n) * n * p.element_size()
        return p.numel() * p.element_size()

    @contextlib.contextmanager
    def no_sync(self):
        """Backward inside this block leaves gradients local (accumulate, reduce later)."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def _accumulated(self, b: _Bucket) -> None:
        if not self.enabled:
            return
        if self._deferred:                       # a new backward before step(): finish the last
            self.wait()
        for other in self._inflight:             # drive progress, note completions
            if other.seen_done is None and other.handle.done():
                other.seen_done = time.perf_counter()
        if not self._queued:
            # finish every bucket when this backward ends, so that `loss.backward()` returns
            # with reduced gradients (a user's own loop needs no extra call)
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
            self._queued = True
        b.pending -= 1
        if b.pending == 0:
            self._launch(b)

    @torch.no_grad()
    def _launch(self, b: _Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params]
        axis = b.axes[0]
        c = self.mesh._comm(axis)
        if b.kind == "reduce_scatter":
            # ZeRO-2: row r holds chunk r of every gradient (flattened, padded to n equal
            # chunks), so one reduce_scatter leaves each rank its chunk of each
            n = self.mesh.size(axis)
            b.chunks = [-(-g.numel() // n) for g in grads]
            b.flat = torch.cat([torch.nn.functional.pad(g.reshape(-1), (0, k * n - g.numel())).view(n, k)
                                for g, k in zip(grads, b.chunks)], 1)
        else:
            b.flat = torch.cat([g.reshape(-1) for g in grads])
        b.launched = time.perf_counter()
        if c is None:                            # a size-1 axis: nothing to reduce
            b.handle = None
        else:
            self.mesh._record(b.kind, axis, b.flat.numel() * b.flat.element_size(), "backward")
            b.handle = c.ireduce_scatter0(b.flat) if b.kind == "reduce_scatter" else c.iallreduce_(b.flat, "sum")
            self._inflight.append(b)

    def _backward_done(self) -> None:
        if self.defer:
            self._queued = False
            self._launch_rest()
            self._deferred = True
        else:
            self.wait()

    def _launch_rest(self) -> None:
        for b in self.buckets:
            if b.flat is None:                   # a bucket whose gradients never all arrived
                self._launch(b)

    @torch.no_grad()
    def wait(self) -> None:
        """Finish every bucket (in launch order) and write the sums back into `.grad`."""
        self._queued = False
        self._deferred = False
        if all(b.flat is None and b.pending == len(b.params) for b in self.buckets):
            return                               # nothing accumulated since the last wait
        self.timeline = []
        self._launch_rest()
        for b in sorted(self.buckets, key=lambda b: b.launched):
            self._finish(b)
        self._inflight = []

    @torch.no_grad()
    def step(self, optimizer) -> None:
        """`optimizer.step()` with the buckets still in flight hidden behind it (`defer`): the
        parameters of every bucket already reduced step first, then the rest are waited for
        and step. Without buckets in flight, one `optimizer.step()`."""
        if not self._deferred:
            optimizer.step()
            return
        self._deferred = False
        self.timeline = []
        launched = sorted((b for b in self.buckets if b.flat is not None), key=lambda b: b.launched)
        # the reduced buckets: the longest finished prefix in launch order, so that a further
        # axis' all_reduces (in _finish) run in the same order on every rank
        k = next((i for i, b in enumerate(launched) if b.handle is not None and not b.handle.done()),
                 len(launched))
        early, late = launched[:k], launched[k:]
        for b in early:
            self._finish(b)
        stepped = {}
        if early and late:
            for b in late:                       # their local gradients are not yet sums:
                for p in b.params:               # those parameters sit this step out
                    p.grad = None
            optimizer.step()
            for group in optimizer.param_groups:     # then the others sit out
                for p in group["params"]:
                    if p.grad is not None:
                        stepped[p], p.grad = p.grad, None
        for b in late:
            self._finish(b)
        self._inflight = []
        optimizer.step()
        for p, g in stepped.items():
            p.grad = g

    def _finish(self, b: _Bucket) -> None:
        """Wait for bucket `b`, reduce it over its further axes, write the sums into `.grad`."""
        t0 = time.perf_counter()
        if b.handle is not None:
            if b.seen_done is None and b.handle.done():
                b.seen_done = t0
            b.handle.wait()
        t1 = time.perf_counter()
        if b.kind == "reduce_scatter":
            row = (b.handle.wait() if b.handle is not None else b.flat[:1]).reshape(-1)
            off = 0
            for name, k in zip(b.names, b.chunks):
                self.reduced[name] = row[off:off + k].clone()
                off += k
        else:
            for axis in b.axes[1:]:              # further axes: partial sums there too
                self.mesh.all_reduce_(b.flat, axis, phase="backward")
            off = 0
            for p in b.params:                   # the gradients become views of the sums
                n = p.numel()
                p.grad = b.flat[off:off + n].view_as(p)
                off += n
        self.timeline.append({"bucket": b.index, "axes": list(b.axes),
                              "bytes": b.flat.numel() * b.flat.element_size(),
                              "launched": b.launched, "done": b.seen_done or t1,
                              "blocked_s": t1 - t0})
        if b.handle is not None:
            self.mesh.async_log.append({"kind": b.kind, "axis": b.axes[0], "what": f"bucket {b.index}",
                                        "shape": list(b.flat.shape), "dtype": str(b.flat.dtype),
                                        "launched": b.launched, "blocked_s": t1 - t0})
        b.flat = b.handle = None
        b.pending = len(b.params)
        b.launched = b.seen_done = None

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


# ---- ZeRO-3: prefetch, reshard after forward, asynchronous reduce_scatter ------------------

_OWNERS = WeakIdKeyDictionary()          # parameter -> its ParamGather (keyed by identity)


def gather_param(p: torch.Tensor, mesh: Mesh, axis, dim: int = 0, partial_grad: bool = True) -> torch.Tensor:
    """ZeRO-3's gather of a dp-sharded parameter before its use: through the model's
    ParamGather (prefetched, freed after its block, gathered again in backward, gradient
    reduce_scattered asynchronously) when it has one, else a plain all_gather whose backward
    reduce_scatters the gradient when it is a partial sum over `axis` (`partial_grad`), else
    keeps this rank's slice of it."""
    owner = _OWNERS.get(p)
    if owner is None or mesh.size(axis) == 1:
        from .collectives import all_gather
        return all_gather(p, mesh, axis, dim=dim, partial_grad=partial_grad)
    if partial_grad and owner._saving is not None and torch.is_grad_enabled():
        owner._used(p)                      # a use whose partial gradient backward will send
    return _Gathered.apply(p, owner, partial_grad)


class _Gathered(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, owner, partial):
        ctx.owner, ctx.param, ctx.partial = owner, p, partial
        return owner._forward_full(p)

    @staticmethod
    def backward(ctx, g):
        ctx.owner._reduce_grad(ctx.param, g, ctx.partial)
        return None, None, None


class _FlatGather:
    """Several parameters' shards in one all_gather: each shard with its split dim moved to
    the front, flattened and concatenated; after the wait each parameter's full value is
    cut back out of every rank's part (in rank order along its split dim)."""

    def __init__(self, owner: "ParamGather", group: list, phase: str):
        self.owner = owner
        xs = [p.detach().movedim(d, 0) for p, d in group]
        self.parts = [(id(p), x.shape, d) for (p, d), x in zip(group, xs)]
        if len(xs) == 1 and xs[0].is_contiguous():
            flat = xs[0].reshape(-1)                 # the shard itself: no copy
        else:                                        # each shard copied once, into its place
            flat = torch.empty(sum(x.numel() for x in xs), dtype=xs[0].dtype, device=xs[0].device)
            off = 0
            for x in xs:
                flat[off:off + x.numel()].view(x.shape).copy_(x)
                off += x.numel()
        c = owner.mesh._comm(owner.axis)
        self.size = c.size
        owner.mesh._record("all_gather", owner.axis, flat.numel() * flat.element_size() * c.size, phase)
        self.handle = c.iallgather0(flat)
        self.log = {"kind": "all_gather", "axis": owner.axis, "what": phase, "shape": [flat.numel()],
                    "params": len(xs), "dtype": str(flat.dtype), "launched": time.perf_counter()}
        self.full: dict | None = None

    def take(self, p) -> torch.Tensor:
        """`p` gathered whole (waits for the collective the first time)."""
        if self.full is None:
            t0 = time.perf_counter()
            rows = self.handle.wait().view(self.size, -1)
            self.owner.mesh.async_log.append({**self.log, "blocked_s": time.perf_counter() - t0})
            self.full, off = {}, 0
            for key, shape, d in self.parts:
                n = shape.numel()
                ranks = rows[:, off:off + n].unflatten(1, shape)       # (rank, split dim, rest)
                if d == 0:
                    self.full[key] = ranks.reshape((self.size * shape[0],) + tuple(shape[1:]))
                else:                                # one copy: the ranks' blocks side by side on d
                    self.full[key] = torch.cat(ranks.movedim(1, d + 1).unbind(0), dim=d)
                off += n
            if len(self.parts) > 1:
                self.handle.result = None       # the flat buffer: every weight is cut out of it
        return self.full.pop(id(p))


class _Unit:
    def __init__(self, index: int, name: str | None, params: list):
        self.index, self.name, self.params = index, name, params    # [(param, dim)]


class ParamGather:
    """ZeRO-3 as FSDP runs it, for the parameters the plan shards over `axis`.

    Units are the model's blocks (in forward order) plus the root (everything else); a unit
    is gathered by one flat all_gather per dtype (`_FlatGather`), as FSDP gathers its flat
    parameter, not one per weight. In forward, the first gather of a unit's parameter
    gathers the whole unit and launches the nonblocking gathers of the next `prefetch`
    blocks; a block's gathered weights are not kept for backward (saved
    tensors are packed as a reference), so after the block only its shards stay in memory.
    In backward the first access to a block's weight gathers the whole block again and
    launches the previous `prefetch` blocks' gathers; each weight is dropped once its
    gradient is reduced. Gradients are reduce_scattered asynchronously a unit at a time:
    once the last of a unit's weights (of one dtype) has its gradient -- every use that
    forward counted, summed -- one flat reduce_scatter sends them all (FSDP reduces its
    flat parameter's gradient the same way); each rank's part is added to the shards'
    `.grad` when the next unit's reduce_scatter is launched (one in flight, as FSDP, so a
    unit's full-size gradients do not outlive the next unit's backward), the last when
    backward ends. The root's weights stay gathered until backward (FSDP does
    not reshard the root either).
    """

    def __init__(self, mesh: Mesh, axis: str, module: torch.nn.Module, layout_of, blocks, prefetch: int = 1):
        self.mesh, self.axis, self.prefetch = mesh, axis, max(0, int(prefetch))
        i = list(mesh.axes).index(axis)
        dims = {}
        for name, p in module.named_parameters():
            placement = layout_of(name)[i]
            if p.requires_grad and placement.startswith("S("):
                dims[name] = (p, int(placement[2:-1]))
        self.units: list[_Unit] = []
        unit_of: dict[int, _Unit] = {}
        for lst in blocks:
            by_index: dict[int, list] = {}
            for n, v in dims.items():
                head, _, rest = n[len(lst) + 1:].partition(".") if n.startswith(lst + ".") else ("", "", "")
                if head.isdigit() and rest:
                    by_index.setdefault(int(head), []).append(v)
            for index in sorted(by_index):
                u = _Unit(len(self.units), f"{lst}.{index}", by_index[index])
                self.units.append(u)
                for p, _ in u.params:
                    unit_of[id(p)] = u
        root = [v for v in dims.values() if id(v[0]) not in unit_of]
        self.root = _Unit(-1, None, root)
        for p, _ in root:
            unit_of[id(p)] = self.root
        self._unit_of, self._dim = unit_of, {id(p): d for p, d in dims.values()}
        for p, _ in dims.values():
            _OWNERS[p] = self
        self._inflight: dict[int, object] = {}      # id(param) -> handle (forward prefetch)
        self._backward: dict[int, torch.Tensor] = {}  # id(param) -> gathered weight in backward
        self._bw_inflight: dict[int, object] = {}
        self._entered: set[int] = set()
        self._bw_entered: set[int] = set()
        self._live: dict[int, tuple] = {}           # storage ptr -> (weakref to full, param)
        self._grads: list[tuple] = []               # (handle, [(param, local shape, dim)])
        self._owed: dict[int, int] = {}             # id(param) -> uses whose gradient is still due
        self._slots: dict[tuple, dict] = {}         # (unit, dtype) -> {id(param): [param, grad, dim]}
        self._queued = False
        self._saving = None
        module.register_forward_pre_hook(lambda m, args: self._begin_forward())
        # always_call: a forward that raises must not leave the hooks installed
        module.register_forward_hook(lambda m, args, out: self._end_forward(), always_call=True)

    # forward
    def _begin_forward(self):
        self._entered, self._bw_entered = set(), set()
        self._owed, self._slots = {}, {}
        # weights of a forward that had no backward (evaluation) are gone: forget them
        self._live = {k: v for k, v in self._live.items() if v[0]() is not None}
        self._saving = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._saving.__enter__()

    def _end_forward(self):
        if self._saving is not None:
            self._saving.__exit__(None, None, None)
            self._saving = None

    def _launch_group(self, params, phase: str, table: dict) -> None:
        """One flat all_gather per dtype for `params` [(param, dim)] (FSDP's flat parameter:
        one collective per block, not one per weight); table[id(p)] = its gather."""
        by_dtype: dict = {}
        for p, d in params:
            by_dtype.setdefault(p.dtype, []).append((p, d))
        for group in by_dtype.values():
            g = _FlatGather(self, group, phase)
            for p, _ in group:
                table[id(p)] = g

    def _prefetch(self, start: int, step: int, phase: str, table: dict):
        for k in range(1, self.prefetch + 1):
            j = start + step * k
            if not 0 <= j < len(self.units):
                break
            self._launch_group([(p, dim) for p, dim in self.units[j].params
                                if id(p) not in table and (phase == "forward" or id(p) not in self._backward)],
                               phase, table)

    def _forward_full(self, p):
        u, dim = self._unit_of[id(p)], self._dim[id(p)]
        if u.index not in self._entered:
            # entering a unit (a block, or the root at its first weight): gather all of it
            # at once, and the next `prefetch` blocks
            self._entered.add(u.index)
            self._launch_group([(q, d) for q, d in u.params if id(q) not in self._inflight],
                               "forward", self._inflight)
            # the root prefetches the first blocks only when it comes first (an embedding)
            if u.index >= 0 or self._entered == {-1}:
                self._prefetch(u.index, +1, "forward", self._inflight)
        g = self._inflight.pop(id(p), None)
        # a weight gathered a second time in one forward: on its own
        full = (g or _FlatGather(self, [(p, dim)], "forward")).take(p)
        if u.index >= 0:
            self._live[full.untyped_storage().data_ptr()] = (weakref.ref(full), p)
        return full

    # saved tensors: a block's gathered weight is saved as a reference, gathered again later
    def _pack(self, t):
        entry = self._live.get(t.untyped_storage().data_ptr()) if t.device.type != "meta" else None
        if entry is not None and entry[0]() is not None:
            return ("autopar-zero3", entry[1], t.size(), t.stride(), t.storage_offset())
        return t

    def _unpack(self, packed):
        if not (isinstance(packed, tuple) and packed and packed[0] == "autopar-zero3"):
            return packed
        _, p, size, stride, offset = packed
        return self._backward_full(p).as_strided(size, stride, offset)

    def _backward_full(self, p):
        self._queue_finish()
        key = id(p)
        if key not in self._backward:
            u = self._unit_of[key]
            if u.index not in self._bw_entered:
                self._bw_entered.add(u.index)
                # the whole block in one gather, as FSDP's pre-backward
                self._launch_group([(q, d) for q, d in u.params
                                    if id(q) not in self._backward and id(q) not in self._bw_inflight],
                                   "backward", self._bw_inflight)
                self._prefetch(u.index, -1, "backward", self._bw_inflight)
            self._backward[key] = self._bw_inflight.pop(key).take(p)
        return self._backward[key]

    # gradients
    def _used(self, p):
        self._owed[id(p)] = self._owed.get(id(p), 0) + 1

    def _reduce_grad(self, p, g, partial=True):
        self._queue_finish()
        self._backward.pop(id(p), None)             # its weight is no longer needed
        dim = self._dim[id(p)]
        c = self.mesh._comm(self.axis)
        x = g.movedim(dim, 0)
        if not partial:                             # a whole gradient: keep this rank's slice
            from ._comm import Handle
            mine = x.chunk(c.size, 0)[c.coord].contiguous()
            self._grads.append((Handle(lambda: None, result=mine), [(p, mine.shape, dim)]))
            return
        if id(p) not in self._owed:                 # a use forward did not count: on its own
            self._launch_scatter([[p, x, dim]])
            return
        u = self._unit_of[id(p)]
        slot = self._slots.setdefault((u.index, p.dtype), {})
        if id(p) in slot:                           # a weight used twice: one gradient, summed
            slot[id(p)][1] = slot[id(p)][1] + x
        else:
            slot[id(p)] = [p, x, dim]
        self._owed[id(p)] -= 1
        if all(self._owed.get(id(q), 0) <= 0 for q, _ in u.params if q.dtype == p.dtype):
            self._launch_scatter(list(self._slots.pop((u.index, p.dtype)).values()))

    def _launch_scatter(self, parts):
        """One reduce_scatter of `parts` [[param, gradient with the split dim first, dim]]:
        row r of the flat buffer holds chunk r of each, so each rank receives its chunks.
        The one before is finished first (it had this unit's backward to run behind): one
        reduce_scatter in flight, as FSDP, so a unit's full-size gradients are freed before
        the next unit's are packed, not when backward ends."""
        self._drain()
        c = self.mesh._comm(self.axis)
        x0 = parts[0][1]
        flat = torch.empty((c.size, sum(x.numel() for _, x, _ in parts) // c.size), dtype=x0.dtype, device=x0.device)
        off = 0
        for _, x, _ in parts:                        # one copy each, chunk r into row r
            m = x.numel() // c.size
            flat[:, off:off + m].unflatten(1, (x.shape[0] // c.size,) + tuple(x.shape[1:])).copy_(
                x.unflatten(0, (c.size, -1)))
            off += m
        self.mesh._record("reduce_scatter", self.axis, flat.numel() * flat.element_size(), "backward")
        h = c.ireduce_scatter0(flat)
        h.log = {"kind": "reduce_scatter", "axis": self.axis, "what": "gradient", "shape": list(flat.shape),
                 "params": len(parts), "dtype": str(flat.dtype), "launched": time.perf_counter()}
        self._grads.append((h, [(p, (x.shape[0] // c.size,) + tuple(x.shape[1:]), dim) for p, x, dim in parts]))
        for part in parts:
            part[1] = None                           # packed: the gradients themselves go

    @torch.no_grad()
    def _drain(self) -> None:
        """Wait for the reduce_scatters in flight, oldest first, and add each rank's part to
        its shards' `.grad`; their buffers go with their handles."""
        while self._grads:
            h, parts = self._grads.pop(0)
            t0 = time.perf_counter()
            row = h.wait().reshape(-1)
            if hasattr(h, "log"):
                self.mesh.async_log.append({**h.log, "blocked_s": time.perf_counter() - t0})
            off = 0
            for p, shape, dim in parts:
                n = math.prod(shape)
                g = row[off:off + n].view(shape).movedim(0, dim)
                off += n
                if p.grad is None:
                    p.grad = g.contiguous()
                else:
                    p.grad.add_(g)

    def _queue_finish(self):
        if not self._queued:
            torch.autograd.Variable._execution_engine.queue_callback(self.wait)
            self._queued = True

    @torch.no_grad()
    def wait(self):
        """Add every reduce_scattered gradient to its shard; drop what backward gathered."""
        self._queued = False
        for slot in self._slots.values():           # units whose every gradient never came
            self._launch_scatter(list(slot.values()))
        self._slots, self._owed = {}, {}
        self._drain()
        for g in {id(g): g for g in [*self._bw_inflight.values(), *self._inflight.values()]}.values():
            g.handle.wait()                         # a prefetch nobody used (not expected)
        self._inflight, self._bw_inflight, self._backward, self._live = {}, {}, {}, {}

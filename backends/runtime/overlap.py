"""Gradient buckets: a data-parallel gradient reduction that runs while backward still computes.

The program lists its buckets (passes/overlap.py chose them: reverse order of use, ~25 MiB,
one dtype and one set of axes each) and hands this class the parameters of each:

    grads = rt.GradBuckets(mesh, [(("dp",), ["h.1.fc.weight", ...]), ...], model)
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
"""
from __future__ import annotations

import contextlib
import time

import torch

from .mesh import Mesh


class _Bucket:
    def __init__(self, index: int, axes: tuple, params: list):
        self.index, self.axes, self.params = index, tuple(axes), list(params)
        self.pending = len(self.params)
        self.flat = None
        self.handle = None
        self.launched = self.seen_done = None


class GradBuckets:
    """Asynchronous bucketed all-reduce of parameter gradients (see the module docstring)."""

    def __init__(self, mesh: Mesh, buckets, module: torch.nn.Module | None = None):
        """`buckets`: (axes, parameters) pairs, or (axes, names) with `module` to look the
        names up in (tied names included)."""
        self.mesh = mesh
        if module is not None:
            named = dict(module.named_parameters(remove_duplicate=False))
            buckets = [(axes, [named[n] if isinstance(n, str) else n for n in params])
                       for axes, params in buckets]
        self.buckets = [_Bucket(i, axes, params) for i, (axes, params) in enumerate(buckets)]
        self._queued = False
        self.enabled = True
        self.timeline: list[dict] = []
        self._inflight: list[_Bucket] = []
        self._hooks = []
        seen = set()
        for b in self.buckets:
            for p in b.params:
                if id(p) in seen:
                    raise ValueError("a parameter is listed in two gradient buckets")
                seen.add(id(p))
                self._hooks.append(p.register_post_accumulate_grad_hook(
                    lambda p, b=b: self._accumulated(b)))

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
        for other in self._inflight:             # drive progress, note completions
            if other.seen_done is None and other.handle.done():
                other.seen_done = time.perf_counter()
        if not self._queued:
            # finish every bucket when this backward ends, so that `loss.backward()` returns
            # with reduced gradients (a user's own loop needs no extra call)
            torch.autograd.Variable._execution_engine.queue_callback(self.wait)
            self._queued = True
        b.pending -= 1
        if b.pending == 0:
            self._launch(b)

    @torch.no_grad()
    def _launch(self, b: _Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params]
        b.flat = torch.cat([g.reshape(-1) for g in grads])
        axis = b.axes[0]
        c = self.mesh._comm(axis)
        b.launched = time.perf_counter()
        if c is None:                            # a size-1 axis: nothing to reduce
            b.handle = None
        else:
            self.mesh._record("all_reduce", axis, b.flat.numel() * b.flat.element_size(), "backward")
            b.handle = c.iallreduce_(b.flat, "sum")
            self._inflight.append(b)

    @torch.no_grad()
    def wait(self) -> None:
        """Finish every bucket (in launch order) and write the sums back into `.grad`."""
        self._queued = False
        if all(b.flat is None and b.pending == len(b.params) for b in self.buckets):
            return                               # nothing accumulated since the last wait
        self.timeline = []
        for b in self.buckets:
            if b.flat is None:                   # a bucket whose gradients never all arrived
                self._launch(b)
        for b in sorted(self.buckets, key=lambda b: b.launched):
            t0 = time.perf_counter()
            if b.handle is not None:
                if b.seen_done is None and b.handle.done():
                    b.seen_done = t0
                b.handle.wait()
            t1 = time.perf_counter()
            for axis in b.axes[1:]:              # further axes: partial sums there too
                self.mesh.all_reduce_(b.flat, axis, phase="backward")
            off = 0
            for p in b.params:
                n = p.numel()
                chunk = b.flat[off:off + n].view_as(p)
                if p.grad is None:
                    p.grad = chunk.clone()
                else:
                    p.grad.copy_(chunk)
                off += n
            self.timeline.append({"bucket": b.index, "axes": list(b.axes),
                                  "bytes": b.flat.numel() * b.flat.element_size(),
                                  "launched": b.launched, "done": b.seen_done or t1,
                                  "blocked_s": t1 - t0})
            b.flat = b.handle = None
            b.pending = len(b.params)
            b.launched = b.seen_done = None
        self._inflight = []

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

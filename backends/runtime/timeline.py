"""Measured timelines: what `autopar run --timeline DIR` asks each rank to record.

    timeline = rt.Timeline(mesh, args.timeline, steps=args.steps)    # dir None: does nothing
    for step in range(args.steps):
        timeline.begin(step)
        ...                                                          # the training step
        timeline.end(step)
    timeline.write()

The last step runs under `torch.profiler` and is written as a Chrome/Perfetto trace
(`DIR/rank<r>.trace.json`: every op, and the collectives as gloo/MPI record them). The
nonblocking collectives of that step (gradient buckets, ZeRO-3 gathers and reduce_scatters;
`mesh.async_log`) say how long the program blocked on each. `write()` then runs each of them
once more alone, synchronously, to time what it costs with nothing to hide behind, and
writes `DIR/rank<r>.overlap.json`: the measured step, the collectives' time alone, the time
blocked (exposed) and the hidden fraction 1 - exposed / alone.

The profiled step's tensor memory is measured too (`MemoryProbe`): the bytes of the tensors
alive when the step begins (parameters, optimizer state: every storage Python can reach,
counted once) plus the most the step allocates on top of them (CUDA: the allocator's peak;
CPU: the running total of the profiler's memory events). That is what a plan's predicted
memory per device counts -- unlike the process's RSS, which adds the interpreter, the
libraries and what the C allocator has not given back.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch

from .mesh import Mesh


def live_tensor_bytes(device: torch.device) -> int:
    """Bytes of every tensor storage on `device` that a Python object reaches (the
    parameters, their gradients, the optimizer's state, buffers), each storage once.
    Wrapper tensors (DTensor) own no storage: the local tensors they hold are counted."""
    import gc
    seen: dict[int, int] = {}
    for o in gc.get_objects():
        if not isinstance(o, torch.Tensor) or o.device.type != device.type or o.is_meta:
            continue
        try:
            st = o.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError, TypeError):
            continue                    # a wrapper subclass (its inner tensors are seen too), or freed
        if ptr:
            seen[ptr] = max(seen.get(ptr, 0), nbytes)
    return sum(seen.values())


class MemoryProbe:
    """The peak tensor memory of one step: `begin()` before it (counts what is alive, on CUDA
    resets the allocator's peak), a torch.profiler with profile_memory=True around it, and
    `peak(trace_path)` after it, from the Chrome trace the profiler exported (its CPU
    memory events)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.held = 0
        self._cuda_start = 0

    def begin(self) -> None:
        self.held = live_tensor_bytes(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_start = torch.cuda.memory_allocated(self.device)

    def peak(self, trace_path: str) -> dict:
        """{"held_at_start", "step_extra", "peak"} in bytes. CPU: the profiler's "Total
        Allocated" counts from the profile's start (tensors freed that were allocated
        before it count negative), so its maximum is what the step added at its peak."""
        if self.device.type == "cuda":
            extra = max(0, torch.cuda.max_memory_allocated(self.device) - self._cuda_start)
        else:
            with open(trace_path) as f:
                events = json.load(f).get("traceEvents", [])
            totals = [e["args"]["Total Allocated"] for e in events
                      if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
            extra = max([0] + totals)
        return {"held_at_start": self.held, "step_extra": extra, "peak": self.held + extra}


class Timeline:
    def __init__(self, mesh: Mesh, directory: str | None, steps: int):
        self.mesh, self.dir, self.steps = mesh, directory, steps
        self.prof = None
        self.step_s = None
        self.log: list[dict] = []
        self._t0 = None
        self._begun = 0                           # steps begun (a resumed run starts past 0)
        self.memory = MemoryProbe(mesh.device)

    @property
    def enabled(self) -> bool:
        return bool(self.dir)

    def begin(self, step: int) -> None:
        self._begun += 1
        if not self.enabled or self._begun != self.steps:
            return
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU]
        if self.mesh.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.memory.begin()
        self.prof = profile(activities=activities, profile_memory=True)
        self.prof.start()
        self._t0 = time.perf_counter()

    def end(self, step: int) -> None:
        if self.prof is None:
            return
        if self.mesh.device.type == "cuda":
            torch.cuda.synchronize()
        self.step_s = time.perf_counter() - self._t0
        self.prof.stop()
        self.log = list(self.mesh.async_log)

    @torch.no_grad()
    def alone(self, entry: dict, repeats: int = 3) -> float:
        """Seconds one logged collective takes on its own (median of `repeats`)."""
        c = self.mesh._comm(entry["axis"])
        x = torch.zeros(entry["shape"], dtype=getattr(torch, entry["dtype"].split(".")[-1]),
                        device=self.mesh.device)
        op = {"all_reduce": lambda: c.allreduce_(x), "all_gather": lambda: c.allgather0(x),
              "reduce_scatter": lambda: c.reduce_scatter0(x)}[entry["kind"]]
        times = []
        for _ in range(repeats):
            c.barrier()
            t0 = time.perf_counter()
            op()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def write(self) -> None:
        if not self.enabled or self.prof is None:
            return
        os.makedirs(self.dir, exist_ok=True)
        r = self.mesh.rank
        trace_path = os.path.join(self.dir, f"rank{r}.trace.json")
        self.prof.export_chrome_trace(trace_path)
        memory = self.memory.peak(trace_path)
        rows = []
        for e in self.log:                       # every rank logged the same sequence
            rows.append({**{k: e[k] for k in ("kind", "axis", "what", "shape", "dtype")},
                         "blocked_s": e["blocked_s"], "alone_s": self.alone(e)})
        alone = sum(x["alone_s"] for x in rows)
        exposed = sum(min(x["blocked_s"], x["alone_s"]) for x in rows)
        summary = {"rank": r, "step_s": self.step_s, "async_collectives": rows,
                   "alone_s": alone, "exposed_s": exposed,
                   "hidden_fraction": (1 - exposed / alone) if alone > 0 else None,
                   "memory": memory}
        with open(os.path.join(self.dir, f"rank{r}.overlap.json"), "w") as f:
            json.dump(summary, f, indent=1)

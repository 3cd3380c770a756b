"""`Plan`: the answer of the sharding search, and what every later stage reads.

A plan names the mesh, one strategy per producer (an op node keyed by its first output's
name, or a source -- input / parameter -- keyed by its own name), the derived layout of
every value, the ZeRO stage over the data-parallel axis, recompute regions, the cost
breakdown and solver statistics. It round-trips through JSON:

    >>> plan.save("plan.json"); Plan.load("plan.json") == plan      # doctest: +SKIP
    True
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


# DDP's defaults: 25 MiB buckets, a 1 MiB first bucket (the last gradients of backward);
# async_tp: a sequence-parallel all_gather into linears, or a linear's reduce_scatter, run
# as a collective matmul (its ring steps behind the matmul) -- "auto": the search simulates
# both and writes True where that is faster (a plan made without the search runs the plain
# collectives); True / False
OVERLAP_DEFAULTS = {"enabled": True, "bucket_bytes": 25 << 20, "first_bucket_bytes": 1 << 20,
                    "prefetch": 1, "async_tp": "auto"}


def check_overlap(overlap: dict, where: str) -> None:
    """Refuse overlap settings a program cannot run: keys outside OVERLAP_DEFAULTS (a typo, or
    a peer's schedule the cost model prices for benchmarks, compiler/schedule.py)."""
    unknown = sorted(set(overlap or {}) - set(OVERLAP_DEFAULTS))
    if unknown:
        raise ValueError(f"{where}: unknown overlap settings {unknown}; a program runs "
                         f"{sorted(OVERLAP_DEFAULTS)} (a peer's schedule, such as peer_unoverlapped, "
                         f"only prices another system's program and cannot be generated)")


@dataclass
class Plan:
    model: str
    mesh: dict[str, int]
    device: str = "cpu"
    memory_limit: float | None = None          # bytes per device
    # producer key -> one dim label (or None) per mesh axis, in mesh order
    strategies: dict[str, list[str | None]] = field(default_factory=dict)
    # value name -> one placement per mesh axis ("R", "P", "S(d)")
    layouts: dict[str, list[str]] = field(default_factory=dict)
    zero: int = 0                               # ZeRO stage over `dp_axis`
    dp_axis: str | None = None
    recompute: list[str] = field(default_factory=list)   # recomputed modules (paths, resolved)
    optimizer: str = "adamw"
    # the communication schedule (passes/overlap.py): gradient buckets reduced asynchronously
    # in backward, ZeRO-3 parameters gathered `prefetch` blocks ahead; enabled=False keeps
    # every collective where the plan puts it, synchronous
    overlap: dict[str, Any] = field(default_factory=lambda: dict(OVERLAP_DEFAULTS))
    # the example batch is the global batch; each step runs it as this many microbatches,
    # accumulating gradients (reduced once, after the last)
    microbatches: int = 1
    # pipeline parallelism over the mesh's pp axis (compiler/stages.py): axis, stages,
    # schedule (gpipe | 1f1b), the block list cut, each stage's block range and the stages
    # a plan file pinned; empty: none
    pipeline: dict[str, Any] = field(default_factory=dict)
    # training-state checkpoints from a plan file (the program's defaults): directory,
    # every (steps, 0 = only at the end), keep, async, resume (a directory); empty: none
    checkpoint: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)   # breakdown (seconds, bytes)
    solver: dict[str, Any] = field(default_factory=dict) # statistics
    constraints: list[str] = field(default_factory=list) # from a plan file, as written

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"plan JSON has unknown fields {sorted(unknown)}")
        plan = cls(**data)
        check_overlap(plan.overlap, "plan JSON")
        plan.overlap = {**OVERLAP_DEFAULTS, **plan.overlap}
        return plan

    def save(self, path) -> None:
        with open(path, "w") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path) -> "Plan":
        with open(path) as f:
            return cls.from_json(f.read())

    def layout(self, value: str) -> tuple[str, ...]:
        return tuple(self.layouts[value])

    def strategy(self, key: str) -> tuple:
        return tuple(self.strategies[key])


def diff(a: Plan, b: Plan) -> list[str]:
    """Human-readable differences between two plans (mesh, layouts, strategies, costs)."""
    out = []
    if a.mesh != b.mesh:
        out.append(f"mesh: {a.mesh} -> {b.mesh}")
    if a.zero != b.zero:
        out.append(f"zero: {a.zero} -> {b.zero}")
    for k in sorted(set(a.layouts) | set(b.layouts)):
        la, lb = a.layouts.get(k), b.layouts.get(k)
        if la != lb:
            out.append(f"layout %{k}: {la} -> {lb}")
    for k in sorted(set(a.strategies) | set(b.strategies)):
        sa, sb = a.strategies.get(k), b.strategies.get(k)
        if sa != sb:
            out.append(f"strategy {k}: {sa} -> {sb}")
    ta, tb = a.cost.get("step_time"), b.cost.get("step_time")
    if ta != tb and ta is not None and tb is not None:
        out.append(f"step_time: {ta:.6g} s -> {tb:.6g} s ({tb / ta:.2f}x)")
    return out

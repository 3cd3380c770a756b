"""`compile()`: the whole pipeline behind one call, as a function or a class decorator.

    >>> par = compile(model, (idx, targets), mesh="dp=2,tp=2")        # doctest: +SKIP
    >>> print(par.explain()); par.emit("out/")                         # doctest: +SKIP
    >>> loss = par(idx, targets)   # in a launched rank: this rank's shard program

    >>> @compile(mesh="dp=2", example_inputs=lambda: (torch.randn(8, 64),))   # doctest: +SKIP
    ... class Net(nn.Module): ...

The pipeline, in order:
    trace      model -> IR (torch.export; torch.fx as the second front end)
    prune      no-ops, CSE, dead code, frozen-parameter analysis
    plan       passes.shard.search (CP-SAT) -- or a plan you give (Plan, JSON or plan file)
    apply      the plan -> one rank's IR with explicit collectives
    emit       the torch.distributed or MPI program

Calling the result inside a launched job (torchrun's RANK/WORLD_SIZE, or mpiexec's
PMI_RANK / OMPI_COMM_WORLD_RANK) runs this rank's shard program: the first call builds
the mesh, takes this rank's block of the model's current weights and of the inputs, and
returns this rank's loss (a partial sum where the plan says so; backward synchronises
gradients). Outside a launched job, calling it runs the ordinary single-device model and
warns once with the command that launches the parallel program.
"""
from __future__ import annotations

import os
import warnings
from math import prod
from typing import Any, Callable

import torch
import torch.nn as nn

from autopar.compiler import sharding
from autopar.compiler.ir import Graph
from autopar.compiler.plan import Plan


# ---- planning ---------------------------------------------------------------------------

def greedy_plan(graph: Graph, mesh: dict[str, int], seeds: dict | None = None,
                flop_weight: float = 0.05, name: str | None = None, outputs: dict | None = None,
                free_params: bool = False) -> Plan:
    """A quick plan without the solver: nodes in order, each picking the strategy with the
    least resharding bytes (+ `flop_weight` bytes per local FLOP); ties go to the strategy
    that splits more. Sources take the layout their first consumer wants unless `seeds`
    fixes them (`seeds` maps producer keys -- node or source names -- to strategies).
    `outputs` maps producer keys to a wanted output layout (None per axis: any);
    `free_params` leaves parameter resharding out of the cost (data parallelism first).

        >>> plan = greedy_plan(g, {"dp": 2}, seeds={"x": ("d0",)})       # doctest: +SKIP
    """
    from autopar.compiler.ops import node_anno, node_flops
    from autopar.passes.prune import grad_info

    mesh = dict(mesh)
    seeds = {k: tuple(v) for k, v in (seeds or {}).items()}
    needs = grad_info(graph).needs_grad
    strategies: dict[str, tuple] = {}
    layouts: dict[str, tuple] = {}
    rep = tuple(None for _ in mesh)
    for v in (*graph.inputs, *graph.params):
        if v.name in seeds:
            strategies[v.name] = seeds[v.name]
            layouts[v.name] = sharding.output_layout(sharding.source_annotation(v.shape), seeds[v.name], 0)
    for node in graph.nodes:
        key = sharding.producer_key(node)
        anno = node_anno(node)
        ins = [v.shape for v in node.inputs]
        outs = [v.shape for v in node.outputs]
        cands = [seeds[key]] if key in seeds else sharding.enumerate_strategies(anno, ins, outs, mesh)
        if outputs and key in outputs:
            want = tuple(outputs[key])
            cands = [s for s in cands if all(w is None or w == p for w, p in
                                             zip(want, sharding.output_layout(anno, s, 0)))]
            if not cands:
                raise ValueError(f"no strategy of %{key} ({node.op}, {anno}) gives output layout {want}")
        flops = node_flops(node)
        best, best_cost = None, None
        for s in cands:
            splits = sharding.split_axes(s)
            cost = 0.0
            for i, v in enumerate(node.inputs):
                if v.name not in layouts or (free_params and v.kind == "param"):
                    continue
                dst = sharding.input_layout(anno, s, i)
                try:
                    cols = sharding.reshard(layouts[v.name], dst, v.shape, v.itemsize, mesh, splits,
                                            v.name in needs)
                except ValueError:
                    cost = float("inf")
                    break
                cost += sum(c.bytes for c in cols)
            ways = prod(n for lab, n in zip(s, mesh.values()) if lab is not None)
            cost += flop_weight * flops / ways
            rank = (cost, -ways)
            if best_cost is None or rank < best_cost:
                best, best_cost = s, rank
        strategies[key] = best
        for i, v in enumerate(node.inputs):
            if v.name not in layouts and v.kind in ("input", "param", "buffer"):
                lay = sharding.input_layout(anno, best, i)
                strategies[v.name] = tuple(None if p == "R" else f"d{sharding.shard_dim(p)}" for p in lay)
                layouts[v.name] = lay
        for j, v in enumerate(node.outputs):
            layouts[v.name] = sharding.output_layout(anno, best, j)
    for v in (*graph.inputs, *graph.params):
        strategies.setdefault(v.name, rep)
    full = sharding.derive_layouts(graph, mesh, strategies)
    return Plan(model=name or graph.name, mesh=mesh,
                strategies={k: list(v) for k, v in strategies.items()},
                layouts={k: list(v) for k, v in full.items()},
                dp_axis="dp" if "dp" in mesh else None,
                solver={"method": "greedy"})


def search_plan(graph: Graph, mesh: dict[str, int] | None, device: str = "cpu",
                memory: float | None = None, devices: int | None = None, **kw) -> Plan:
    """The sharding search (passes.shard, CP-SAT, deterministic) on `mesh`, or over the mesh
    shapes of `devices` when no mesh is given. `device` names the cost profile: cpu (this
    machine, measured once), a built-in accelerator (`h100`) or a profile file."""
    from autopar.passes.shard import search, search_devices
    kw.setdefault("deterministic", True)
    kw.setdefault("precision", "fp32")       # the generated programs train in fp32
    if mesh is None:
        plan, _ = search_devices(graph, int(devices), device, memory_limit=memory, **kw)
        return plan
    return search(graph, dict(mesh), device, memory_limit=memory, **kw)


def load_plan(plan, graph: Graph | None = None, mesh: dict | None = None, device: str = "cpu",
              memory: float | None = None) -> Plan:
    """A Plan object, a JSON plan, or a plan file (autopar.dsl: its constraints, then the search)."""
    if isinstance(plan, Plan):
        return plan
    path = os.fspath(plan)
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("{"):
        return Plan.from_json(text)
    from autopar.dsl import compile_plan
    return compile_plan(path, graph, mesh=mesh, device=None if device == "cpu" else device, memory=memory)


def parse_mesh(mesh, devices: int | None) -> dict[str, int] | None:
    """The mesh as a dict, or None when only a device count is given (the search then
    compares the mesh shapes)."""
    if mesh is None:
        if devices is None:
            raise ValueError("give mesh='dp=2,tp=2' or devices=N")
        return None
    if isinstance(mesh, str):
        return sharding.parse_mesh(mesh)
    return dict(mesh)


# ---- the compiled object --------------------------------------------------------------------

def in_launched_job() -> bool:
    env = os.environ
    return ("RANK" in env and "WORLD_SIZE" in env) or any(
        k in env for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MPI_LOCALRANKID"))


class Compiled:
    """The result of `compile()`: plan, sharded IR, generated program, and a callable."""

    def __init__(self, model: nn.Module, example_inputs: tuple, mesh: dict[str, int] | None, device: str,
                 memory, backend: str, plan, optimizer: str, lr: float, name: str | None,
                 devices: int | None = None, target: str = "cpu"):
        from autopar.backends.launch import build_program
        self.model = model
        self.example_inputs = tuple(example_inputs)
        self.backend = backend
        prog = build_program(model, self.example_inputs, mesh, backend=backend, plan=plan,
                             device=device, memory=memory, optimizer=optimizer, lr=lr,
                             name=name or type(model).__name__.lower(), devices=devices,
                             target=target)
        self.program = prog
        self.plan: Plan = prog.plan
        self.graph = prog.graph
        self.sharded = prog.sharded
        self.source: str = prog.source
        self._local = None
        self._warned = False

    @property
    def ir(self) -> str:
        from autopar.passes.apply import print_sharded
        return print_sharded(self.sharded)

    def explain(self) -> str:
        """The plan in words: mesh, layouts of parameters, collectives and their bytes."""
        return self.program.explain()

    def emit(self, directory) -> str:
        """Write the program, its plan and init file to `directory`; returns the launch command."""
        return self.program.write(directory)

    def __call__(self, *args):
        if not in_launched_job():
            if not self._warned:
                self._warned = True
                warnings.warn("autopar: not inside a launched job, running the single-device model. "
                              f"Run `.emit(dir)` and launch with: {self.program.launch_command()}",
                              stacklevel=2)
            return nn.Module.__call__(self.model, *args)     # the model's own forward
        if self._local is None:
            self._local = self.program.instantiate(self.model)
        return self._local(*args)


def compile(model=None, example_inputs=None, *, mesh=None, devices: int | None = None,
            device: str = "cpu", memory: float | str | None = None, backend: str = "torch", plan=None,
            optimizer: str = "adamw", lr: float = 1e-3, name: str | None = None,
            target: str = "cpu"):
    """Compile a model into a parallel program; or, without a model, a class decorator.

    `compile(model, inputs, mesh="dp=2,tp=2")` -> `Compiled` with `.plan`, `.ir`, `.explain()`,
    `.source`, `.emit(dir)`; calling it inside a launched rank runs the shard program, outside
    it runs the single-device model (and warns once how to launch).

    `@compile(mesh="dp=2", example_inputs=lambda: (x, y))` on an nn.Module class gives a class
    whose instances compile on their first call (`example_inputs` may be a tuple or a callable).

    mesh      "dp=2,tp=2" (or a dict); or `devices=N` to let the search compare mesh shapes
    device    the cost model's profile: "cpu" (this machine, measured once), "a100-80g",
              "h100", "h200", "mi250x", or a JSON/TOML profile file
    memory    the per-device limit the plan must fit ("80GB", "2MiB" or bytes)
    plan      a plan file (pins and settings, then the search), a plan JSON, or a Plan
    backend   "torch" (torchrun, gloo/NCCL) or "mpi" (mpiexec, mpi4py)
    target    where the generated program runs: "cpu" or "cuda"
    """
    if model is None or isinstance(model, type):
        def decorate(cls):
            return _compiled_class(cls, example_inputs, dict(mesh=mesh, devices=devices, device=device,
                                   memory=memory, backend=backend, plan=plan, optimizer=optimizer,
                                   lr=lr, name=name, target=target))
        return decorate(model) if isinstance(model, type) else decorate
    if example_inputs is None:
        raise ValueError("compile(model, example_inputs, ...): example_inputs are needed to trace")
    if callable(example_inputs):
        example_inputs = example_inputs()
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    return Compiled(model, tuple(example_inputs), parse_mesh(mesh, devices), device, memory, backend,
                    plan, optimizer, lr, name, devices=devices, target=target)


def _compiled_class(cls, example_inputs, options: dict):
    """A subclass whose instances compile themselves on the first call."""

    class CompiledModule(cls):
        def __call__(self, *args, **kwargs):
            compiled = self.__dict__.get("_autopar")
            if compiled is None:
                ex = example_inputs() if callable(example_inputs) else (example_inputs or args)
                opts = dict(options)
                devices = opts.pop("devices")
                mesh = parse_mesh(opts.pop("mesh"), devices)
                self.__class__ = cls                # trace the undecorated module
                try:
                    compiled = Compiled(self, tuple(ex), mesh, opts["device"], opts["memory"],
                                        opts["backend"], opts["plan"], opts["optimizer"], opts["lr"],
                                        opts["name"] or cls.__name__.lower(), devices=devices,
                                        target=opts["target"])
                finally:
                    self.__class__ = CompiledModule
                self.__dict__["_autopar"] = compiled
            return compiled(*args, **kwargs)

        @property
        def autopar(self) -> Compiled:
            """The Compiled object (after the first call)."""
            return self.__dict__["_autopar"]

    CompiledModule.__name__ = cls.__name__
    CompiledModule.__qualname__ = cls.__qualname__
    CompiledModule.__doc__ = cls.__doc__
    CompiledModule.__module__ = cls.__module__
    return CompiledModule


__all__ = ["compile", "Compiled", "greedy_plan", "search_plan", "load_plan", "in_launched_job"]

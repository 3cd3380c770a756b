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

import torch
import torch.nn as nn

from autopar.compiler.errors import InputError
from autopar.compiler.plan import Plan


def parse_mesh(mesh, devices: int | None) -> dict[str, int] | None:
    """The mesh as a dict, or None when only a device count is given (the search then
    compares the mesh shapes)."""
    from autopar.pipeline import parse_mesh as parse
    if mesh is None and devices is None:
        raise InputError("give mesh='dp=2,tp=2' or devices=N")
    return parse(mesh)


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
        from autopar.pipeline import build_program
        self.model = model
        self.example_inputs = tuple(example_inputs)
        self.backend = backend
        prog = build_program(model, self.example_inputs, mesh, backend=backend, plan=plan,
                             device=device, memory=memory, optimizer=optimizer, lr=lr,
                             name=name or type(model).__name__.lower(), devices=devices,
                             target=target,
                             # the callable runs the module in the user's own loop in fp32
                             # (no master weights there): plan and program for fp32
                             precision="fp32")
        self.program = prog
        self.plan: Plan = prog.plan
        self.graph = prog.graph
        self.sharded = prog.sharded
        self.source: str = prog.source
        self._local = None
        self._warned = False

    @property
    def ir(self) -> str:
        from autopar.compiler.sharded import print_sharded
        return print_sharded(self.sharded)

    def explain(self) -> str:
        """The plan in words: mesh, layouts of parameters, collectives and their bytes."""
        return self.program.explain()

    def emit(self, directory) -> str:
        """Write the program, its plan and init file to `directory`; returns the command that
        launches it from anywhere (`cd DIR && torchrun ...`)."""
        import shlex
        return f"cd {shlex.quote(str(directory))} && {self.program.write(directory)}"

    def __call__(self, *args):
        """Outside a launched job: the model's own forward (with a one-time warning). Inside
        one: this rank's program on its blocks of the batch (any batch the mesh divides),
        returning the global loss -- the same value on every rank -- whose backward gives
        this rank's shards their gradients (the collectives in the program synchronise them)."""
        if not in_launched_job():
            if not self._warned:
                self._warned = True
                warnings.warn("autopar: not inside a launched job, running the single-device model. "
                              f"Run `.emit(dir)` and launch with: {self.program.launch_command()}",
                              stacklevel=2)
            return nn.Module.__call__(self.model, *args)     # the model's own forward
        run = self._rank()
        loss = run(*args)
        value = loss.detach().double().item()
        for axis in self._partial_axes():
            value = run.mesh.all_reduce_scalar(value, axis)
        # the global value, this rank's gradient
        return loss + (torch.tensor(value, dtype=loss.dtype, device=loss.device) - loss).detach()

    def _rank(self):
        if self._local is None:
            self._local = self.program.instantiate(self.model)
        return self._local

    def _partial_axes(self) -> list[str]:
        loss = self.sharded.outputs[0]
        return [a for a, p in zip(self.plan.mesh, self.sharded.layouts[loss.name]) if p == "P"]

    def module(self) -> nn.Module:
        """This rank's module (its parameter shards under their original names) inside a
        launched job; the model itself outside one."""
        if not in_launched_job():
            return self.model
        if self.sharded.zero.params:
            raise InputError(f"this plan is ZeRO-{self.plan.zero}: the optimizer state is sharded "
                             "over dp by the generated program's own loop (ZeroShards), which a "
                             "user's optimizer over parameters() would bypass. Plan with zero=0 or "
                             "zero=3 (parameters sharded through the plan), or run the emitted program.")
        return self._rank().module

    def parameters(self):
        """This rank's parameter shards (for any optimizer) inside a launched job."""
        return self.module().parameters()

    def named_parameters(self):
        return self.module().named_parameters()

    def state_dict(self):
        """This rank's shards under the model's state-dict names."""
        return self.module().state_dict()


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
        raise InputError("compile(model, example_inputs, ...): example_inputs are needed to trace")
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

        def explain(self) -> str:
            """The plan in words (after the first call), as `Compiled.explain`."""
            return self.autopar.explain()

    CompiledModule.__name__ = cls.__name__
    CompiledModule.__qualname__ = cls.__qualname__
    CompiledModule.__doc__ = cls.__doc__
    CompiledModule.__module__ = cls.__module__
    return CompiledModule


__all__ = ["compile", "Compiled", "in_launched_job"]

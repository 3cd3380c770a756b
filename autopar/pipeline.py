"""The pipeline, once: model -> traced IR -> prepared IR -> plan -> sharded IR -> program.

Every entry point (the `ir`, `plan`, `emit`, `run` and `check-plan` verbs, `compile()`)
goes through these functions, so all of them plan the same graph the same way:

    trace      model -> IR (torch.export by default; torch.fx for simple modules)
    prepare    prune (no-ops, CSE, dead code) and cut fused projections into pieces
    plan       the CP-SAT search, or a plan given as a plan file, JSON or Plan
    apply      the plan -> one rank's IR with explicit collectives
    emit       the torch.distributed or MPI program

    >>> graph = prepared_graph(model, inputs, name="gpt")              # doctest: +SKIP
    >>> program = build_program(model, inputs, "dp=2,tp=2")            # doctest: +SKIP
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import torch

from autopar.backends.codegen import EmitOptions, backend_named, emit_program
from autopar.compiler import sharding
from autopar.compiler.errors import InputError
from autopar.compiler.ir import Graph
from autopar.compiler.plan import Plan

# ---- building a program ----------------------------------------------------------------------

@dataclass
class Program:
    """A plan's generated program and everything needed to write, launch and check it."""
    name: str
    model: torch.nn.Module
    inputs: tuple
    graph: Graph
    plan: Plan
    sharded: Graph
    backend: str
    opts: EmitOptions
    stem: str
    source: str = ""
    files: dict = field(default_factory=dict)

    @property
    def world(self) -> int:
        n = 1
        for s in self.plan.mesh.values():
            n *= s
        return n

    def launch_command(self, steps: int | None = None) -> str:
        return backend_named(self.backend).launch_command(f"{self.stem}.py", self.world,
                                                       f"--steps {steps or self.opts.steps}")

    def initial_state(self) -> dict:
        from autopar.compiler.interpret import model_state
        state = {k: v.detach().clone() for k, v in model_state(self.model).items()}
        for k, v in self.graph.constants.items():
            state.setdefault(k, v.detach().clone())
        return state

    def write(self, directory) -> str:
        """Program, plan JSON and init file (full state dict + example batch); returns the
        launch command (run it from `directory`)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        prog = d / f"{self.stem}.py"
        prog.write_text(self.source)
        self.plan.save(d / f"{self.stem}.plan.json")
        from autopar.backends import runtime as rt
        rt.save_init(d / self.opts.init_file, self.initial_state(), [t.detach() for t in self.inputs])
        self.files = {"program": prog, "plan": d / f"{self.stem}.plan.json", "init": d / self.opts.init_file}
        return self.launch_command()

    def predicted_traffic(self) -> dict[str, int]:
        """Bytes per step and rank the program sends, under its precision."""
        return traffic_under(self.sharded, self.opts.precision)

    def explain(self) -> str:
        from autopar.compiler.sharded import format_bytes, predict_traffic
        mesh = self.plan.mesh
        lines = [f"{self.name} on {sharding.format_mesh(mesh)} ({self.world} ranks), backend {self.backend}, "
                 f"ZeRO {self.plan.zero}" + (f", recompute {', '.join(self.plan.recompute)}"
                                            if self.plan.recompute else "")]
        lines.append("parameter layouts:")
        for p in self.graph.params:
            lay = self.sharded.layouts[p.name]                         # type: ignore[attr-defined]
            flag = "" if p.requires_grad or p.kind == "buffer" else " (frozen)"
            lines.append(f"  {p.name:<48} {sharding.format_layout(mesh, lay)}{flag}")
        if self.plan.pipeline:          # each stage moves its own bytes
            from autopar.backends.pipeline_emit import predicted_stage_traffic
            for k, per in enumerate(predicted_stage_traffic(self.sharded, self.opts.precision)):
                lines.append(f"bytes per step and rank of pipeline stage {k}:")
                lines += [f"  {kind:<24} {format_bytes(b)}" for kind, b in per.items()]
            return "\n".join(lines)
        lines.append("bytes per step and rank:")
        for k, b in self.predicted_traffic().items():
            lines.append(f"  {k:<24} {format_bytes(b)}")
        return "\n".join(lines)

    def instantiate(self, model: torch.nn.Module):
        """Inside a launched rank: build the mesh and this rank's module from the generated
        source, load this rank's block of `model`'s weights; returns a callable taking the
        full inputs."""
        from autopar.backends import runtime as rt
        if self.plan.pipeline:
            raise InputError(f"a plan with a pp axis ({sharding.format_mesh(self.plan.mesh)}) has no "
                             "single forward to call: each rank runs one stage under a pipeline "
                             "schedule. Launch its program (autopar run / emit) instead.")
        ns: dict = {"__name__": f"autopar_program_{self.stem}"}
        exec(compile(self.source, f"<autopar {self.stem}.py>", "exec"), ns)
        mesh = rt.init_mesh(self.plan.mesh, backend=backend_named(self.backend).runtime, device=self.opts.device)
        self.check_same_program(mesh)
        local = ns[self.opts.class_name](mesh)
        self.model = model
        local.load_full_state_dict(self.initial_state())
        local.to(mesh.device)
        shard = ns["shard"]
        names = [v.name for v in self.graph.inputs]

        def run(*args):
            return local(*[shard(t, n, mesh).to(mesh.device) for n, t in zip(names, args)])
        run.module, run.mesh = local, mesh
        return run

    def check_same_program(self, mesh) -> None:
        """Each rank of a job that compiles in its own loop traces and plans on its own; they
        must have built the same program, or its collectives would pair up wrongly and hang
        or compute garbage. One reduction of the program's digest at start-up says so."""
        import hashlib
        mine = float(int(hashlib.sha256(self.source.encode()).hexdigest()[:13], 16))   # exact in a float
        low, high = mesh.all_reduce_scalar(mine, None, "min"), mesh.all_reduce_scalar(mine, None, "max")
        if low != high:
            raise InputError(
                "the ranks of this job planned different programs (each rank traces and plans the "
                "model it is given): give every rank the same model, example inputs and options, "
                "and a plan all of them read: compile(..., plan=FILE) with the plan JSON that "
                "`autopar emit` writes beside its program (or `.plan.save(FILE)` of one compile), or "
                "a named device profile (device=\"h100\", ...) instead of the measured cpu one")


def mesh_tag(mesh: dict) -> str:
    return "_".join(f"{a}{n}" for a, n in mesh.items())


# ---- the stages ---------------------------------------------------------------------------------

def load_model(spec: str, batch: int | None = None, inputs: str | None = None):
    """`path/to/file.py:function` -> (model, example_inputs, name); `batch` is passed to the
    function as `batch=N` (it must take one). `path/to/model.onnx` with `inputs` (an .npz
    of example inputs by graph input name) goes through the ONNX front end."""
    from autopar.spec import load_spec
    return load_spec(spec, batch=batch, inputs=inputs)


def traced_graph(model, inputs, name: str | None = None, mode: str = "export",
                 symbolic: bool = False) -> Graph:
    """The lowered IR, exactly as the front end produced it (verified). `symbolic`: sizes
    from the batch recorded as expressions (for the generated program)."""
    from autopar.compiler.verify import verify
    from autopar.frontends.tracing import trace
    return verify(trace(model, inputs, mode=mode, name=name, symbolic=symbolic))


def prepared_graph(model, inputs, name: str | None = None, mode: str = "export",
                   after: str = "prepare", symbolic: bool = False) -> Graph:
    """The IR every plan is made for: traced, pruned, fused projections cut into pieces.
    `after="lower"` or `"prune"` stops earlier (what `autopar ir --after` shows)."""
    from autopar.compiler.verify import verify
    from autopar.passes.prepare import prepare
    from autopar.passes.prune import prune
    graph = traced_graph(model, inputs, name, mode, symbolic)
    if after == "lower":
        return graph
    if after == "prune":
        return verify(prune(graph))
    return verify(prepare(graph))


def parse_mesh(mesh) -> dict[str, int] | None:
    if mesh is None:
        return None
    return sharding.parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh)


def make_plan(graph: Graph, mesh=None, devices: int | None = None, plan=None, device="cpu",
              memory: float | str | None = None, zero: int | None = None, time_limit: float = 10.0,
              deterministic: bool = False, precision: str | None = None,
              schedule: str | None = None) -> tuple[Plan, list[str]]:
    """The plan for `graph` and the values a plan file pins (for the explanation).

    `plan`: a `Plan`, a plan JSON (used as is) or a plan file (its constraints, then the
    search; the file's settings win over the arguments, which fill in what it leaves out).
    Without one: the search on `mesh`, or over every mesh shape of `devices`. `device` is
    the cost model's profile (a name, a profile file or a DeviceProfile)."""
    from autopar.compiler.cluster import DeviceProfile, load_profile, parse_bytes
    from autopar.passes.shard import search, search_devices
    if isinstance(memory, str):
        memory = parse_bytes(memory)
    mesh = parse_mesh(mesh)
    if devices is not None and devices < 1:
        raise InputError(f"--devices {devices}: give a positive device count")
    if isinstance(plan, Plan):
        return plan, []
    if plan is not None:
        path = os.fspath(plan)
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError):
            text = ""                            # the plan-file loader words the error
        if text.lstrip().startswith("{"):
            return Plan.from_json(text), []
        return _plan_from_file(path, graph, mesh, devices, device, memory, zero, time_limit,
                               deterministic, precision)
    if mesh is None and devices is None:
        raise InputError("give the mesh (--mesh dp=2,tp=4), a device count (--devices 8) or a "
                         "plan file that names a mesh (--plan FILE.plan)")
    profile = device if isinstance(device, DeviceProfile) else load_profile(device)
    kw = dict(memory_limit=memory, zero=zero, time_limit=time_limit, deterministic=deterministic,
              precision=precision)
    if mesh is not None and "pp" in mesh:
        from autopar.compiler.stages import pipeline_plan
        plan = pipeline_plan(graph, mesh, lambda g, m, **more: search(g, m, profile, **{**kw, **more}), profile,
                             schedule=schedule, memory_limit=memory)
    elif mesh is not None:
        plan = search(graph, mesh, profile, **kw)
    else:
        # every pp x dp x tp shape too (a pipeline where the model has repeated blocks)
        plan, _ = search_devices(graph, devices, profile, pipeline=True, schedule=schedule, **kw)
    plan.solver["idle_axes"] = idle_axes(graph, plan, profile, kw)
    return plan, []


def idle_axes(graph: Graph, plan: Plan, profile, kw: dict) -> list[dict]:
    """Mesh axes the plan replicates all work on (its ranks compute the same), each with the
    cost model's reason: what dividing the work over the axis could save at most, against
    what data parallelism over it would cost at least (the gradient all_reduce)."""
    from autopar.compiler.cluster import Cluster, format_bytes, format_time
    from autopar.compiler.cost import CostModel, collective_time
    out = []
    cluster = Cluster(dict(plan.mesh), profile)
    model = CostModel(graph, cluster, precision=kw.get("precision") or plan.cost.get("precision"))
    grads = sum(p.numel * model.itemsize(p) for p in graph.params if p.requires_grad)
    for i, (axis, n) in enumerate(plan.mesh.items()):
        if n == 1 or axis == (plan.pipeline or {}).get("axis") or any(s[i] is not None for s in plan.strategies.values()):
            continue
        saved = plan.cost["compute_time"] * (1 - 1 / n)
        reduce = collective_time("all_reduce", n, grads, cluster.link(axis))
        out.append({"axis": axis, "compute_saved_at_most": saved, "gradient_all_reduce": reduce,
                    "reason": (f"dividing the work {n} ways saves at most {format_time(saved)} of "
                               f"compute per step, while data parallelism over {axis} adds a "
                               f"{format_time(reduce)} all_reduce of the {format_bytes(grads)} of "
                               f"gradients (plans splitting the work cost more than this one)")})
    return out


def idle_axis_lines(plan: Plan) -> list[str]:
    """One line per mesh axis the plan leaves idle, with the reason (for plan/emit/run)."""
    return [f"note: the plan replicates all work on {r['axis']} (its ranks compute the same): "
            f"{r['reason']}" for r in plan.solver.get("idle_axes") or []]


def _plan_from_file(path, graph, mesh, devices, device, memory, zero, time_limit, deterministic,
                    precision) -> tuple[Plan, list[str]]:
    from autopar.compiler.cluster import builtin_profiles
    from autopar.dsl import load_plan, resolve, search_with
    spec = resolve(load_plan(path), graph, mesh=mesh, devices=builtin_profiles())
    if devices is not None and prod(spec.mesh.values()) != devices:
        raise InputError(f"--devices {devices}: the plan file {path} names the mesh "
                         f"{sharding.format_mesh(spec.mesh)} of {prod(spec.mesh.values())} devices. "
                         "Drop --devices (the file's mesh is used) or change the file's mesh statement.")
    plan = search_with(spec, graph, device=device, memory=memory, zero=zero, time_limit=time_limit,
                       deterministic=deterministic, precision=precision)
    return plan, [p.value for p in spec.pins if any(x is not None for x in p.layout)]


def build_program(model, inputs, mesh=None, backend: str = "torch", plan=None, device: str = "cpu",
                  memory: float | str | None = None, optimizer: str = "adamw", lr: float = 1e-3,
                  steps: int = 10, name: str = "model", class_name: str | None = None,
                  graph: Graph | None = None, devices: int | None = None,
                  target: str = "cpu", microbatches: int | None = None,
                  schedule: str | None = None, precision: str | None = None) -> Program:
    """trace -> prepare -> plan -> apply -> emit, in that order.

    `mesh` ("dp=2,tp=2"), or `devices` (a count: the search compares mesh shapes), or a plan
    file that names its mesh. `device` is the cost model's profile (cpu, h100, a file);
    `target` is where the generated program runs (cpu: gloo, cuda: NCCL). `precision`
    (fp32 or bf16) is what the program computes and communicates in; the plan is searched
    and priced under it. Default: the recipe the plan is made under (bf16 for a mixed-
    precision profile, fp32 for cpu; fp32 with MPI or ZeRO-3), see plan_and_precision."""
    from autopar.backends.codegen import backend_named
    from autopar.passes.apply import apply_plan, predict_traffic
    from autopar.passes.overlap import overlap

    if graph is None:
        # sizes from the batch stay symbolic: the program trains on any batch the mesh divides
        graph = prepared_graph(model, inputs, name, symbolic=True)
    mesh = parse_mesh(mesh)
    plan, precision = plan_and_precision(graph, mesh, devices, plan, device, memory, precision, schedule)
    mesh = mesh or dict(plan.mesh)
    if dict(plan.mesh) != mesh:
        raise InputError(f"the plan is for mesh {sharding.format_mesh(plan.mesh)}, not "
                         f"{sharding.format_mesh(mesh)}: give --mesh {sharding.format_mesh(plan.mesh)}")
    plan.optimizer = optimizer
    if microbatches is not None:
        if microbatches < 1:
            raise InputError(f"--microbatches {microbatches}: give a count of at least 1")
        plan.microbatches = microbatches
    check_microbatches(graph, plan, inputs)
    # with --devices the schedule prices the pipeline shapes; a flat winner runs without one
    if plan.pipeline or (schedule and devices is None):
        from autopar.compiler.stages import check_pipeline
        check_pipeline(plan, schedule, backend, graph)      # and priced with the final M
    # the communication schedule: gradient buckets reduced while backward runs
    sharded = overlap(apply_plan(graph, plan))
    check_precision(precision, plan)
    plan.cost.setdefault("bytes", traffic_under(sharded, precision))
    stem = f"{name}_{mesh_tag(mesh)}_{backend}"
    opts = EmitOptions(steps=steps, optimizer=optimizer, lr=lr, device=target,
                       init_file=f"{stem}.init.safetensors", class_name=class_name or _class_name(model),
                       state_keys=frozenset(model.state_dict().keys()), precision=precision)
    source = emit_program(sharded, backend_named(backend), type(model).__name__, opts, f"{stem}.py")
    return Program(name, model, tuple(inputs), graph, plan, sharded, backend, opts, stem, source)


PRECISIONS = ("fp32", "bf16")
# the cost model's recipe for each program precision
RECIPE = {"fp32": "fp32", "bf16": "mixed"}


def resolve_precision(precision: str | None, device="cpu") -> str:
    """The program's precision: as given, else the cost profile's recipe (bf16 for a
    mixed-precision profile such as h100, fp32 for the measured cpu profile)."""
    from autopar.compiler.cluster import DeviceProfile, load_profile
    if precision is None:
        profile = device if isinstance(device, DeviceProfile) else load_profile(device)
        return "bf16" if profile.precision == "mixed" else "fp32"
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision}: use fp32 or bf16")
    return precision


def plan_and_precision(graph, mesh, devices, plan, device, memory, precision: str | None,
                       schedule: str | None = None) -> tuple:
    """The plan and the precision of the program built from it, which always agree: the
    plan is searched and priced under the recipe of the precision the program runs.

    Given `precision`, the search runs under its recipe. Without one the program takes the
    recipe the plan was made under -- the profile's (bf16 on a mixed-precision profile such
    as h100, whether named by --device or by the plan file's `device`; fp32 on cpu), or a
    plan JSON's -- except where bf16 programs do not run: where the search picks ZeRO-3 the best plan of
    ZeRO-0..2 runs bf16, or, when none fits, ZeRO-3 is planned and run in fp32. Pipeline
    programs (a pp axis) take the same rule: each stage keeps fp32 masters of its own
    parameters."""
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"--precision {precision}: use fp32 or bf16")
    given = isinstance(plan, Plan) or plan is not None and _is_plan_json(plan)
    made, _ = make_plan(graph, mesh, devices, plan, device, memory, deterministic=True,
                        precision=RECIPE.get(precision), schedule=schedule)
    if precision is None:
        recipe = made.cost.get("precision") or RECIPE[resolve_precision(None, device)]
        wanted = "bf16" if recipe == "mixed" else "fp32"
    else:
        wanted = precision
    if wanted == "bf16" and made.zero == 3:
        # bf16 programs shard fp32 masters for ZeRO-1/2 only: the best plan of those. Without
        # --precision, when none fits (or the plan is given, or its file says zero 3), ZeRO-3
        # runs in fp32; with --precision bf16 that is refused (check_precision)
        from autopar.passes.shard import PlanInfeasible
        below, error = None, None
        if not given:
            try:
                below, _ = make_plan(graph, mesh, devices, plan, device, memory, deterministic=True,
                                     precision="mixed", zero=2)
            except PlanInfeasible as e:
                error = e
            if below is not None and below.zero == 3:     # a plan file's `zero 3` wins
                below = None
        if below is not None:
            made = below
        elif precision is None:
            wanted = "fp32"
            if not given:
                made, _ = make_plan(graph, mesh, devices, plan, device, memory, deterministic=True,
                                    precision="fp32")
        elif error is not None:
            raise PlanInfeasible(f"{error} (--precision bf16 plans ZeRO-0 to 2 only: bf16 programs "
                                 "do not run ZeRO-3 yet; --precision fp32 allows it)") from error
    return made, wanted


def _is_plan_json(path) -> bool:
    """A plan JSON (used as is), not a plan file (searched), as make_plan tells them apart."""
    try:
        return Path(os.fspath(path)).read_text().lstrip().startswith("{")
    except (OSError, UnicodeDecodeError):
        return False


def precision_lines(plan, precision: str) -> list[str]:
    """A note when a given plan (JSON) was priced under another recipe than the program
    runs: its own time, memory and bytes are then for that recipe."""
    recipe = plan.cost.get("precision")
    if not recipe or recipe == RECIPE[precision]:
        return []
    other = "bf16" if recipe == "mixed" else "fp32"
    return [f"note: the plan was priced for {other} programs ({recipe} recipe); this program runs "
            f"{precision} (--precision), so its bytes are predicted for {precision} and the plan's "
            f"own figures are {'twice' if other == 'fp32' else 'half'} those. Give --precision {other} "
            "to run what the plan priced."]


def check_precision(precision: str, plan) -> None:
    """Combinations the bf16 programs do not run yet, refused with the way out."""
    if precision != "bf16":
        return
    if plan.zero == 3:
        raise InputError("--precision bf16 with ZeRO-3: bf16 programs shard their fp32 master "
                         "weights for ZeRO-1 and ZeRO-2 only, not the parameters themselves. Use "
                         "`zero 2` (or lower) in the plan with bf16, or --precision fp32 for ZeRO-3.")


def traffic_under(sharded, precision: str) -> dict[str, int]:
    """Bytes per step and rank the program sends under `precision`. The sharded graph counts
    in its own dtypes (fp32); a bf16 program sends every floating collective buffer (and every
    gradient bucket) at half that, while integer ones (token ids, targets) keep their size."""
    from autopar.compiler.ops import VOCAB_PARALLEL_CE
    from autopar.compiler.sharded import depends_on, is_collective, predict_traffic
    traffic = predict_traffic(sharded)
    if precision != "bf16":
        return dict(traffic)
    m = max(1, int(getattr(sharded.plan, "microbatches", 1) or 1))
    batch = sharded.batch_symbols() if m > 1 else set()
    again = sharded.recomputed()
    ints: dict[str, int] = {}
    for i, n in enumerate(sharded.nodes):     # as ShardedGraph.calls counts them
        # integer buffers keep their size, and so do the vocab-parallel loss's fp32 statistics
        integer = is_collective(n) and not n.inputs[0].dtype.is_floating_point
        if not (integer or n.op == VOCAB_PARALLEL_CE):
            continue
        share = m if batch and depends_on(sharded.global_shapes.get(n.inputs[0].name, ()), batch) else 1
        for kind, axis, b, phase in sharded.node_traffic(n):
            times = m * (2 if phase == "forward" and i in again else 1)
            ints[f"{kind}:{axis}"] = ints.get(f"{kind}:{axis}", 0) + times * (b // share)
    return {k: (b - ints.get(k, 0)) // 2 + ints.get(k, 0) for k, b in traffic.items()}


def check_microbatches(graph: Graph, plan, inputs) -> None:
    """A microbatched plan must split each rank's share of the example batch evenly."""
    m = getattr(plan, "microbatches", 1)
    if m <= 1 or not graph.inputs or not inputs or not hasattr(inputs[0], "shape"):
        return
    batch = int(inputs[0].shape[0])
    layout = plan.layouts.get(graph.inputs[0].name, ())
    ranks = 1
    for axis, placement in zip(plan.mesh, layout):
        if placement == "S(0)":
            ranks *= plan.mesh[axis]
    if batch % ranks or (batch // ranks) % m:
        raise InputError(f"{m} microbatches do not divide the batch: {batch} examples over {ranks} "
                         f"rank(s) is {batch / ranks:g} per rank, not a multiple of {m}. Give a "
                         f"microbatch count that divides {batch // ranks if batch % ranks == 0 else batch}"
                         " (--microbatches, or pipeline microbatches in the plan file).")


def _class_name(model) -> str:
    return type(model).__name__ + "Shard"


__all__ = ["load_model", "traced_graph", "prepared_graph", "make_plan", "idle_axes", "idle_axis_lines",
           "build_program", "Program",
           "mesh_tag"]

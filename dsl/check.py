"""Semantic checks of a plan file against a traced model, producing a `PlanSpec`: the
normalised plan the search reads (mesh, device, memory limit, ZeRO, objective, pins,
recompute patterns, pipeline stage pins).

    >>> spec = resolve(load_plan("examples/plans/megatron_gpt.plan"), graph)   # doctest: +SKIP
    >>> spec.pins[0]                                                         # doctest: +SKIP
    Pin(value='transformer.h.0.attn.c_attn.weight', layout=(None, 'S(0)'), origin='...:9:8')

Statements apply in reading order (an include stands where it is written). Pins
accumulate per value and axis; a second pin that disagrees with an earlier one is a
`ConflictingPins` error, unless an `auto` (statement or placement) released it in between
-- that is how a plan overrides a file it includes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from autopar.compiler.ir import Graph, Value
from autopar.compiler.sharding import Pin, format_mesh
from autopar.dsl import ast
from autopar.dsl import errors as E
from autopar.dsl.emit import checkpoint_lines, overlap_line, stage_lines
from autopar.compiler.patterns import PatternError, block_of, closest, generalize, model_index

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
         "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50}
OBJECTIVES = ("time", "memory")
OVERLAP_WORDS = {"enabled": "on/off", "bucket_bytes": "bucket", "first_bucket_bytes": "first",
                 "prefetch": "prefetch", "async_tp": "async_tp"}
PLACEMENT_WORDS = ("R", "S", "auto", "P")
PLACEMENT_SYNONYMS = {"replicate": "R", "replicated": "R", "Replicate": "R", "r": "R",
                      "shard": "S", "Shard": "S", "s": "S", "split": "S",
                      "free": "auto", "any": "auto", "Auto": "auto", "AUTO": "auto", "_": "auto",
                      "partial": "P", "Partial": "P", "p": "P"}


@dataclass
class PlanSpec:
    """A plan file resolved against a model. `pins` hold one `Pin` per constrained value
    (placements in mesh order, None = the search decides); `recompute_modules` are the
    modules the recompute statements select (what the search, the cost model and plan
    application read) and `recompute` the same set folded into patterns for printing
    (`transformer.h.*` where every block is selected, exact paths otherwise)."""
    mesh: dict[str, int]
    device: str | None = None
    memory_limit: float | None = None          # bytes per device
    zero: int | None = None                    # None: no zero statement, the search picks
    dp_axis: str | None = None
    objective: str = "time"
    pins: list[Pin] = field(default_factory=list)
    replicated: list[str] = field(default_factory=list)   # values pinned R by `replicate`
    free: list[str] = field(default_factory=list)         # values released by `auto`
    recompute: list[str] = field(default_factory=list)
    recompute_modules: list[str] = field(default_factory=list)
    constraints: list[str] = field(default_factory=list)  # statements as written, with origin
    files: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)   # value -> how a plan file names it
    types: dict[str, str] = field(default_factory=dict)   # value -> f32[...] (for printing)
    memory_written: str | None = None
    # training-state checkpoints (Plan.checkpoint): directory, every, keep, async, resume
    checkpoint: dict = field(default_factory=dict)
    # communication-schedule settings the file gives (Plan.overlap keys; the rest default)
    overlap: dict = field(default_factory=dict)
    microbatches: int | None = None            # None: no pipeline statement (one microbatch)
    schedule: str | None = None                # pipeline schedule over the pp axis (gpipe | 1f1b | interleaved:V)
    # `stage` pins: stage -> its [first, end) range of the blocks of module list `blocks`
    stages: dict[int, tuple[int, int]] = field(default_factory=dict)
    blocks: str | None = None

    def pin(self, value: str) -> Pin | None:
        return next((p for p in self.pins if p.value == value), None)

    def stage_ranges(self) -> list[tuple[int, int] | None] | None:
        """One entry per pp stage: its pinned block range, or None (the cut balances it);
        None without stage pins. What `compiler.stages.pipeline_plan(ranges=...)` reads."""
        if not self.stages:
            return None
        return [self.stages.get(k) for k in range(self.mesh["pp"])]

    def format(self) -> str:
        """The normalised plan: a valid plan file with one line per pinned value."""
        head = self.files[0] if self.files else "<string>"
        more = f" (with {', '.join(self.files[1:])})" if len(self.files) > 1 else ""
        lines = [f"# normalised from {head}{more}", f"mesh {format_mesh(self.mesh).replace(',', ', ')}"]
        if self.device:
            lines.append(f"device {self.device}")
        if self.memory_limit is not None:
            lines.append(f"memory {self.memory_written}    # {self.memory_limit:,.0f} bytes per device")
        if self.zero is not None:
            lines.append(f"zero {self.zero}" + (f" over {self.dp_axis}" if self.dp_axis else ""))
        lines.append(f"minimize {self.objective}")
        lines += checkpoint_lines(self.checkpoint)
        if self.overlap:
            lines.append(overlap_line(self.overlap))
        if self.microbatches is not None:
            lines.append(f"pipeline microbatches {self.microbatches}"
                         + (f", schedule {self.schedule.replace(':', ' ')}" if self.schedule else ""))
        if self.stages:
            lines += stage_lines(self.blocks, self.stages)
        if self.recompute:
            lines.append("recompute " + ", ".join(f'"{p}"' for p in self.recompute)
                         + f"    # {len(self.recompute_modules)} modules")
        lines.append(f"# {len(self.pins)} pinned values")
        rows = []
        for p in self.pins:
            body = ", ".join(f"{a}: {pl}" for a, pl in zip(self.mesh, p.layout) if pl is not None)
            target = self.names.get(p.value, f'value "{p.value}"')
            verb = (f"replicate {target}" if all(pl == "R" for pl in p.layout)
                    else f"layout {target} {{ {body} }}")
            note = f"{self.types.get(p.value, '')}  {p.origin}".strip()
            if not self.names.get(p.value, "").startswith('"') and target != f'value "{p.value}"':
                note = f"%{p.value} {note}"
            rows.append((verb, note))
        width = max((len(v) for v, _ in rows), default=0)
        lines += [f"{v:<{width}}    # {n}" for v, n in rows]
        if self.free:
            lines.append("# left to the search by auto: " + ", ".join(self.free))
        return "\n".join(lines) + "\n"


# ---- resolve ----------------------------------------------------------------------------------

def resolve(plan: ast.PlanFile, graph: Graph, mesh: dict[str, int] | None = None,
            devices: list[str] | None = None) -> PlanSpec:
    """Check `plan` against `graph` and normalise it. `mesh` is used when the file has no
    `mesh` statement (and must agree with it when it has one); `devices` lists the known
    device profiles (unchecked when None)."""
    return Resolver(plan, graph, devices).run(mesh)


def format_size(n: float, up: bool = False) -> str:
    """Bytes in the plan file's own units (`812KB`, `3.1MB`); `up` rounds up, so the text
    read back as a limit is at least `n`."""
    import math
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{(math.ceil(v * 10) / 10 if up else v):.1f}{unit}"
    return f"{math.ceil(n) if up else n:.0f}B"


class Resolver:
    def __init__(self, plan: ast.PlanFile, graph: Graph, devices):
        self.plan, self.graph, self.devices = plan, graph, devices
        self.index = model_index(graph)
        self.settings: dict[str, tuple[ast.PlanFile, ast.Statement, object]] = {}

    # errors point into the file a statement came from
    def fail(self, cls, message: str, f: ast.PlanFile, line: int, column: int, fix: str = ""):
        raise cls(message, file=f.path, line=line, column=column, text=f.text, fix=fix)

    def where(self, f: ast.PlanFile, node) -> str:
        return f"{f.path}:{node.line}:{node.column}"

    def run(self, cli_mesh) -> PlanSpec:
        statements = list(self.plan.walk())
        for f, st in statements:
            if isinstance(st, (ast.Mesh, ast.Device, ast.Memory, ast.Zero, ast.Objective,
                               ast.Checkpoint, ast.Resume, ast.Pipeline)):
                self.setting(f, st)
        mesh = self.resolve_mesh(cli_mesh)
        spec = PlanSpec(mesh=mesh, files=self.plan.files())
        self.mesh = mesh
        if "device" in self.settings:
            spec.device = self.settings["device"][2]
        if "memory" in self.settings:
            spec.memory_limit, spec.memory_written = self.settings["memory"][2]
            self.check_memory_fits(spec.memory_limit, mesh)
        if "objective" in self.settings:
            spec.objective = self.settings["objective"][2]
        if "zero" in self.settings:
            spec.zero, spec.dp_axis = self.resolve_zero()
        elif "dp" in mesh:
            spec.dp_axis = "dp"
        if "checkpoint" in self.settings:
            spec.checkpoint.update(self.settings["checkpoint"][2])
        if "resume" in self.settings:
            spec.checkpoint["resume"] = self.settings["resume"][2]
        if "pipeline" in self.settings:
            spec.microbatches, spec.schedule = self.settings["pipeline"][2]
            self.check_stages(mesh)
        elif "pp" in mesh:
            self.check_stages(mesh)
        pinned = [(f, st) for f, st in statements if isinstance(st, ast.Stage)]
        if pinned:
            spec.blocks, spec.stages = self.resolve_stage_pins(mesh, pinned)
        spec.overlap = self.resolve_overlap([(f, st) for f, st in statements if isinstance(st, ast.Overlap)])

        self.pins: dict[str, dict[str, tuple[str | None, str, ast.PlanFile, ast.Located]]] = {}
        self.pin_origin: dict[str, list[str]] = {}
        replicated: dict[str, None] = {}
        free: dict[str, None] = {}
        for f, st in statements:
            if isinstance(st, ast.Layout):
                wanted = self.check_placements(f, st)
                for target in st.targets:
                    for v in self.select(f, target):
                        self.apply(f, st, v, wanted)
                        free.pop(v.name, None)
            elif isinstance(st, ast.Replicate):
                wanted = [(axis, "R", st) for axis in mesh]
                for target in st.targets:
                    for v in self.select(f, target):
                        self.apply(f, st, v, wanted)
                        replicated[v.name] = None
                        free.pop(v.name, None)
            elif isinstance(st, ast.Auto):
                for target in st.targets:
                    for v in self.select(f, target):
                        self.pins.pop(v.name, None)
                        self.pin_origin.pop(v.name, None)
                        replicated.pop(v.name, None)
                        free[v.name] = None
            elif isinstance(st, ast.Recompute):
                for pat in st.patterns:
                    mods = self.select_modules(f, pat)
                    spec.recompute_modules += [m for m in mods if m not in spec.recompute_modules]
            if isinstance(st, ast.Statement) and not isinstance(st, ast.Include):
                spec.constraints.append(f"{st.written}    # {self.where(f, st)}")

        order = {v.name: i for i, v in enumerate(self.graph.values())}
        for name in sorted(self.pins, key=order.__getitem__):
            per_axis = self.pins[name]
            layout = tuple(per_axis[a][0] if a in per_axis else None for a in mesh)
            if all(p is None for p in layout):
                continue
            origin = ", ".join(dict.fromkeys(self.pin_origin[name]))
            spec.pins.append(Pin(name, layout, origin))
            v = self.index.values[name]
            spec.names[name] = self.index.describe(v)
            spec.types[name] = v.type_str()
        spec.recompute = self.recompute_patterns(spec.recompute_modules)
        spec.replicated = [n for n in replicated if n in self.pins]
        spec.free = list(free)
        return spec

    def recompute_patterns(self, modules: list[str]) -> list[str]:
        """The selected modules as few patterns: drop modules inside another selected one,
        then fold block indices where every instance is selected."""
        chosen = [m for m in modules if not any(m.startswith(o + ".") for o in modules)]
        out: list[str] = []
        for m in chosen:
            pat = generalize(m)
            if pat in out or m in out:
                continue
            if pat != m and set(self.index.select_modules(pat)) <= set(chosen):
                out.append(pat)
            else:
                out.append(m)
        return out

    # ---- settings ----------------------------------------------------------------------------

    def setting(self, f: ast.PlanFile, st: ast.Statement) -> None:
        key = {ast.Mesh: "mesh", ast.Device: "device", ast.Memory: "memory", ast.Zero: "zero",
               ast.Objective: "objective", ast.Checkpoint: "checkpoint", ast.Resume: "resume",
               ast.Pipeline: "pipeline"}[type(st)]
        value = {"mesh": self.check_mesh, "device": self.check_device, "memory": self.check_memory,
                 "zero": self.check_zero_syntax, "objective": self.check_objective,
                 "checkpoint": self.check_checkpoint, "resume": self.check_resume,
                 "pipeline": self.check_pipeline}[key](f, st)
        if key in self.settings:
            f0, st0, v0 = self.settings[key]
            if v0 != value:
                self.fail(E.ConflictingSetting,
                          f"{key} is set twice: '{st0.written}' at {self.where(f0, st0)}, "
                          f"now '{st.written}'", f, st.line, st.column,
                          fix=f"keep one {key} statement (a plan that includes another cannot "
                              f"change its {key}; move the {key} out of the shared file)")
            return
        self.settings[key] = (f, st, value)

    def check_mesh(self, f: ast.PlanFile, st: ast.Mesh) -> dict[str, int]:
        mesh: dict[str, int] = {}
        for ax in st.axes:
            if ax.name in mesh:
                self.fail(E.DuplicateAxis, f"the mesh names axis '{ax.name}' twice", f, ax.line, ax.column,
                          fix="give each axis once, with distinct names: mesh dp=2, tp=4")
            size_col = ax.column + len(ax.name) + 1
            n = self.whole(ax.size, f, ax.line, size_col, f"the size of mesh axis '{ax.name}'", E.BadMeshSize)
            if n < 1:
                self.fail(E.BadMeshSize, f"mesh axis '{ax.name}' has size {n}", f, ax.line, size_col,
                          fix=f"sizes are positive: {ax.name}=1 keeps the axis without splitting over it")
            mesh[ax.name] = n
        return mesh

    def resolve_mesh(self, cli_mesh) -> dict[str, int]:
        if "mesh" not in self.settings:
            if cli_mesh:
                return dict(cli_mesh)
            self.fail(E.MissingMesh, "the plan has no mesh", self.plan, 1, 1,
                      fix="add a mesh statement, e.g. mesh dp=2, tp=4 (or pass --mesh)")
        f, st, mesh = self.settings["mesh"]
        if cli_mesh and dict(cli_mesh) != mesh:
            self.fail(E.MeshMismatch, f"the plan's mesh {format_mesh(mesh)} differs from the mesh "
                      f"given on the command line ({format_mesh(cli_mesh)})", f, st.line, st.column,
                      fix="drop --mesh (the plan file names it) or make the two agree")
        return mesh

    def check_device(self, f: ast.PlanFile, st: ast.Device) -> str:
        if st.name.endswith((".json", ".toml")) or "/" in st.name:
            # a profile file, relative to the plan file; the search reads and checks it
            if f.path != "<string>" and not os.path.isabs(st.name):
                return os.path.join(os.path.dirname(f.path), st.name)
            return st.name
        if self.devices is not None and st.name not in self.devices:
            low = {d.lower(): d for d in self.devices}
            if st.name.lower() in low:
                return low[st.name.lower()]
            self.fail(E.UnknownDevice, f"no device profile '{st.name}'", f, st.line, st.name_column,
                      fix="known profiles: " + ", ".join(self.devices) + E.suggest(st.name, self.devices))
        return st.name

    def check_memory(self, f: ast.PlanFile, st: ast.Memory):
        if st.unit is None:
            self.fail(E.UnknownUnit, f"memory {st.amount} has no unit", f, st.unit_line, st.unit_column,
                      fix=f"write the unit after the amount: memory {st.amount}GB "
                          f"(units: {', '.join(UNITS)})")
        unit = st.unit if st.unit in UNITS else {u.lower(): u for u in UNITS if u != "B"}.get(st.unit.lower())
        if unit is None:
            self.fail(E.UnknownUnit, f"unknown memory unit '{st.unit}'", f, st.unit_line, st.unit_column,
                      fix=f"use one of {', '.join(UNITS)} (GB = 10^9 bytes, GiB = 2^30)"
                          + E.suggest(st.unit, list(UNITS)))
        amount = self.number(st.amount, f, st.line, st.column + len("memory "), "the memory amount")
        if amount <= 0:
            self.fail(E.BadNumber, "the memory limit must be positive", f, st.line, st.column,
                      fix="give the per-device limit, e.g. memory 80GB")
        return amount * UNITS[unit], f"{st.amount}{unit}"

    def check_memory_fits(self, limit: float, mesh: dict[str, int]) -> None:
        """A limit below the model's parameters spread evenly over every device can be met by
        no plan (gradients, optimizer state and activations only add to it)."""
        from math import prod
        devices = prod(mesh.values())
        weights = sum(prod(p.shape) * p.dtype.itemsize for p in self.graph.params)
        least = weights / devices
        if limit < least:
            f, st, _ = self.settings["memory"]
            self.fail(E.MemoryTooSmall, f"memory {st.amount}{st.unit or ''} is less than any plan "
                      f"needs: the parameters alone take {format_size(least)} per device even "
                      f"split evenly over all {devices} devices", f, st.line, st.column,
                      fix=f"give at least memory {format_size(least, up=True)} (gradients, optimizer "
                          "state and activations need more: `autopar plan` names the smallest limit "
                          "that fits)")

    def check_zero_syntax(self, f: ast.PlanFile, st: ast.Zero):
        stage = self.whole(st.stage, f, st.line, st.stage_column, "the ZeRO stage", E.ZeroStageOutOfRange)
        if stage not in (0, 1, 2, 3):
            self.fail(E.ZeroStageOutOfRange, f"ZeRO stage {stage} does not exist", f, st.line,
                      st.stage_column,
                      fix="stages: 1 shards optimizer state, 2 also gradients, 3 also parameters "
                          "over the data-parallel axis (0 turns ZeRO off)")
        return stage, st.axis

    def resolve_zero(self):
        f, st, (stage, axis) = self.settings["zero"]
        if axis is None:
            if "dp" in self.mesh:
                return stage, "dp"
            if stage == 0:
                return 0, None
            self.fail(E.ZeroWithoutDpAxis, f"zero {stage} needs a data-parallel axis and the mesh "
                      f"({format_mesh(self.mesh)}) has none called dp", f, st.line, st.column,
                      fix=f"name the axis: zero {stage} over {next(iter(self.mesh))} "
                          "(or add a dp axis to the mesh)")
        if axis not in self.mesh:
            self.fail(E.UnknownAxis, f"zero {stage} over '{axis}': the mesh has no axis '{axis}'", f,
                      st.axis_line, st.axis_column, fix=self.axes_fix(axis))
        return stage, axis

    def check_objective(self, f: ast.PlanFile, st: ast.Objective) -> str:
        if st.goal not in OBJECTIVES:
            self.fail(E.UnknownObjective, f"cannot minimize '{st.goal}'", f, st.line, st.goal_column,
                      fix="write minimize time (fastest plan that fits) or minimize memory "
                          "(smallest footprint)" + E.suggest(st.goal, OBJECTIVES))
        return st.goal

    # ---- checkpoints and overlap -------------------------------------------------------------

    def check_directory(self, f, st, directory: str, column: int, what: str) -> str:
        if not directory.strip():
            self.fail(E.BadCheckpointSetting, f'{what} "{directory}" names no directory', f, st.line, column,
                      fix=f'give the directory in quotes, e.g. {what} "ckpt/"')
        return directory

    def check_checkpoint(self, f: ast.PlanFile, st: ast.Checkpoint) -> dict:
        out: dict = {"directory": self.check_directory(f, st, st.directory, st.directory_column,
                                                        "checkpoint to")}
        if st.every is not None:
            n = self.whole(st.every, f, st.line, st.every_column, "the checkpoint interval",
                           E.BadCheckpointSetting)
            if n < 1:
                self.fail(E.BadCheckpointSetting, f"checkpoint every {st.every} steps: the interval must "
                          "be at least 1 step", f, st.line, st.every_column,
                          fix=f'leave `every` out to save only at the end: checkpoint to "{st.directory}"')
            out["every"] = n
        if st.keep is not None:
            n = self.whole(st.keep, f, st.line, st.keep_column, "the number of checkpoints kept",
                           E.BadCheckpointSetting)
            if n < 1:
                self.fail(E.BadCheckpointSetting, f"keep {st.keep}: at least the latest checkpoint must be "
                          "kept", f, st.line, st.keep_column,
                          fix="write keep 1 or more, or leave keep out to keep every checkpoint")
            out["keep"] = n
        if st.async_:
            out["async"] = True
        return out

    def check_resume(self, f: ast.PlanFile, st: ast.Resume) -> str:
        return self.check_directory(f, st, st.directory, st.directory_column, "resume from")

    def check_stages(self, mesh) -> None:
        """A schedule needs a pp axis; a pp axis at most one stage per block."""
        from autopar.compiler.stages import block_list
        if "pipeline" in self.settings:
            f, st, (_, schedule) = self.settings["pipeline"]
            if schedule is not None and "pp" not in mesh:
                self.fail(E.NoPipelineStages, f"schedule {schedule} runs pipeline stages over a pp axis, "
                          f"and the mesh {format_mesh(mesh)} has none", f, st.line, st.schedule_column,
                          fix="add a pp axis to the mesh (mesh pp=2, ...), or remove the schedule clause: "
                              f"pipeline microbatches {st.microbatches or 'N'} accumulates gradients on any mesh")
        if "pp" not in mesh:
            return
        found = block_list(self.graph.nodes)
        blocks = len(found[1]) if found else 0
        if mesh["pp"] > blocks:
            if "mesh" in self.settings:
                f, st, _ = self.settings["mesh"]
                ax = next(a for a in st.axes if a.name == "pp")
                line, col = ax.line, ax.column
            else:
                f, line, col = self.plan, 1, 1
            what = f"{found[0]} has {blocks} blocks" if found else "the model has no module list of repeated blocks"
            self.fail(E.NoPipelineStages, f"pp={mesh['pp']}: more stages than blocks ({what}; a stage "
                      "holds at least one whole block)", f, line, col,
                      fix=f"use pp={max(1, blocks)} or fewer" if blocks else "drop the pp axis")

    def resolve_stage_pins(self, mesh, pinned) -> tuple[str, dict[int, tuple[int, int]]]:
        """The module list of blocks and stage -> [first, end) block range the `stage`
        statements pin. Each stage's blocks must be one run, the stages in order, every
        block between two pinned stages in a stage, and every unpinned stage left a block."""
        from autopar.compiler.stages import block_list, block_range
        f0, st0 = pinned[0]
        if "pp" not in mesh:
            self.fail(E.StageWithoutPp, f"stage {st0.index} pins blocks to a pipeline stage, and the "
                      f"mesh {format_mesh(mesh)} has no pp axis", f0, st0.line, st0.column,
                      fix="add a pp axis to the mesh (mesh pp=2, ...), or remove the stage statements")
        p = mesh["pp"]
        kind, indices = block_list(self.graph.nodes)       # check_stages: pp <= blocks
        nblocks = len(indices)
        owner: dict[int, tuple[int, ast.PlanFile, ast.Pattern]] = {}    # block -> its stage's pin
        first: dict[int, tuple[ast.PlanFile, ast.Stage]] = {}           # stage -> its first statement
        for f, st in pinned:
            k = self.whole(st.index, f, st.line, st.index_column, "the stage number", E.StageOutOfRange)
            if k >= p:
                self.fail(E.StageOutOfRange, f"stage {k}: the mesh's pp={p} has stages 0 to {p - 1}",
                          f, st.line, st.index_column,
                          fix=f"number the stages 0 to {p - 1}, or give the mesh pp={k + 1} or more")
            first.setdefault(k, (f, st))
            for pat in st.patterns:
                for b in self.stage_blocks(f, pat, kind, k):
                    if b in owner and owner[b][0] != k:
                        k0, f1, pat1 = owner[b]
                        self.fail(E.StageOverlap, f"{kind}.{b} is pinned to stage {k} here and to stage "
                                  f"{k0} at {self.where(f1, pat1)}", f, pat.line, pat.column,
                                  fix="pin each block to one stage")
                    owner.setdefault(b, (k, f, pat))
        ranges: dict[int, tuple[int, int]] = {}
        for k in sorted(first):
            mine = sorted(b for b, (j, _, _) in owner.items() if j == k)
            a, b = mine[0], mine[-1] + 1
            if len(mine) != b - a:
                hole = next(i for i in range(a, b) if i not in mine)
                _, f, pat = owner[next(i for i in mine if i > hole)]
                self.fail(E.StageNotContiguous, f"stage {k} is pinned {kind}.{a} and {kind}.{b - 1} but "
                          f"not {kind}.{hole} between them: a stage runs one contiguous range of blocks",
                          f, pat.line, pat.column,
                          fix=f'pin {kind}.{hole} to stage {k} too, or move the blocks after it to a later stage')
            ranges[k] = (a, b)
        order = sorted(ranges)
        for j, k in zip(order, order[1:]):
            if ranges[k][0] < ranges[j][1]:
                f, st = first[k]
                self.fail(E.StagesOutOfOrder, f"stage {k} is pinned {block_range(kind, ranges[k])}, before "
                          f"stage {j}'s {block_range(kind, ranges[j])}: the stages run the blocks in order",
                          f, st.line, st.column,
                          fix=f"pin stage {k} to blocks after {kind}.{ranges[j][1] - 1}, or swap the two "
                              "stage numbers")
        # the blocks between two pinned stages go to the unpinned stages between them
        prev, end = -1, 0
        for k in [*order, p]:
            start = ranges[k][0] if k < p else nblocks
            f, st = first[k] if k < p else first[prev]
            free = k - prev - 1                      # unpinned stages between
            if free == 0 and start > end:
                left = block_range(kind, (end, start))
                where = (f"between stage {prev} ({block_range(kind, ranges[prev])}) and stage {k}"
                         if 0 <= prev and k < p else f"before stage {k}" if k < p else f"after stage {prev}")
                beside = [str(j) for j in (prev, k) if 0 <= j < p]
                self.fail(E.StageGap, f"{left} would run on no stage: it lies {where} (the stages run "
                          f"the blocks in order, stage 0 from {kind}.0, stage {p - 1} through "
                          f"{kind}.{nblocks - 1})", f, st.line, st.column,
                          fix=f"pin {left} to stage {' or '.join(beside)}")
            if free > start - end:
                empty = prev + 1 + (start - end)
                self.fail(E.EmptyStage, f"stage {empty} would have no block: the pins leave "
                          + (f"{block_range(kind, (end, start))}" if start > end else "no block")
                          + f" to stage{'s' if free > 1 else ''} {prev + 1}"
                          + (f" to {k - 1}" if free > 1 else ""), f, st.line, st.column,
                          fix=f"leave at least {free} block(s) to the unpinned stages (each stage needs one), "
                              "or pin fewer blocks")
            if k < p:
                prev, end = k, ranges[k][1]
        return kind, ranges

    def stage_blocks(self, f: ast.PlanFile, pat: ast.Pattern, kind: str, k: int) -> list[int]:
        """The blocks of `kind` a stage pattern selects: whole blocks only."""
        whole, part = set(), {}
        for m in self.select_modules(f, pat):
            b = block_of(m)
            if b is None or b[0] != kind:
                holds = m == kind or kind.startswith(m + ".")
                self.fail(E.StageNotABlock, f'"{pat.text}" selects {m}, '
                          + (f"which holds the blocks of {kind}" if holds else f"which is not a block of {kind}")
                          + ": stage pins name blocks", f, pat.line, pat.column,
                          fix=f'name the blocks: stage {k} "{kind}.0" or "{kind}.[0-3]"'
                              + ("" if holds else "; the modules before the first block run on stage 0, "
                                                  "those after the last on the last stage"))
            i = int(b[1].rsplit(".", 1)[1])
            if m == b[1]:
                whole.add(i)
            else:
                part.setdefault(i, m)
        for i, m in sorted(part.items()):
            if i not in whole:
                self.fail(E.StageSplitsBlock, f'"{pat.text}" selects {m}, part of block {kind}.{i}: '
                          "a stage holds whole blocks", f, pat.line, pat.column,
                          fix=f'pin the whole block: stage {k} "{kind}.{i}"')
        return sorted(whole)

    def check_pipeline(self, f: ast.PlanFile, st: ast.Pipeline) -> tuple[int, str | None]:
        """The microbatch count: a whole number >= 1 dividing the model's batch (the first
        input's dim 0, as traced), and the schedule (gpipe, 1f1b or interleaved V; it needs a pp axis,
        checked once the mesh is known)."""
        schedule = st.schedule.lower() if st.schedule is not None else None
        if schedule is not None:
            from autopar.compiler.errors import InputError
            from autopar.compiler.stages import format_schedule, parse_schedule
            try:
                name, v = parse_schedule(schedule)
            except InputError:
                self.fail(E.NoPipelineStages, f"schedule {st.schedule}: the pipeline runs GPipe, 1F1B or "
                          "interleaved 1F1B with V model chunks per rank (zero-bubble schedules are not "
                          "built yet)", f, st.line, st.schedule_column,
                          fix="write schedule gpipe, schedule 1f1b or schedule interleaved 2")
            schedule = format_schedule(name, v)
        n = self.whole(st.microbatches, f, st.line, st.microbatches_column, "the microbatch count",
                       E.BadMicrobatches)
        if n < 1:
            self.fail(E.BadMicrobatches, f"pipeline microbatches {n}: a step runs at least one microbatch",
                      f, st.line, st.microbatches_column, fix="write pipeline microbatches 1 or more")
        batch = next((v.shape[0] for v in self.graph.inputs if v.shape), None)
        if isinstance(batch, int) and batch % n:
            ok = [d for d in range(1, batch + 1) if batch % d == 0]
            self.fail(E.BadMicrobatches, f"pipeline microbatches {n} does not divide the batch of {batch} "
                      f"(input '{self.graph.inputs[0].name}', dim 0)", f, st.line, st.microbatches_column,
                      fix=f"use a divisor of {batch}: {', '.join(map(str, ok))}")
        return n, schedule

    def resolve_overlap(self, statements) -> dict:
        """The `overlap` statements' settings by Plan.overlap key; a key set twice to different
        values is a ConflictingSetting."""
        out: dict = {}
        where: dict = {}
        for f, st in statements:
            for item in st.items:
                value = self.overlap_value(f, item)
                if item.key in out and out[item.key] != value:
                    f0, i0 = where[item.key]
                    self.fail(E.ConflictingSetting,
                              f"overlap {OVERLAP_WORDS[item.key]} is set twice: at {f0.path}:{i0.line}:"
                              f"{i0.column}, and differently here", f, item.line, item.column,
                              fix=f"keep one overlap {OVERLAP_WORDS[item.key]} setting")
                out[item.key], where[item.key] = value, (f, item)
        return out

    def overlap_value(self, f: ast.PlanFile, item: ast.OverlapItem):
        if item.key == "enabled":
            return item.amount == "on"
        if item.key == "prefetch":
            n = self.whole(item.amount, f, item.line, item.amount_column, "the prefetch depth",
                           E.BadOverlapSetting)
            return n                       # the grammar has no sign: >= 0 by construction
        if item.key == "async_tp":
            return {"on": True, "off": False}.get(item.amount, "auto")     # the grammar: on | off | auto
        word = OVERLAP_WORDS[item.key]
        if item.unit is None:
            self.fail(E.UnknownUnit, f"overlap {word} {item.amount} has no unit", f, item.unit_line,
                      item.unit_column, fix=f"write the unit after the size: {word} {item.amount}MB "
                                             f"(units: {', '.join(UNITS)})")
        unit = item.unit if item.unit in UNITS else {u.lower(): u for u in UNITS if u != "B"}.get(item.unit.lower())
        if unit is None:
            self.fail(E.UnknownUnit, f"unknown size unit '{item.unit}'", f, item.unit_line, item.unit_column,
                      fix=f"use one of {', '.join(UNITS)} (MB = 10^6 bytes, MiB = 2^20; DDP's buckets are "
                          "25MiB, the first 1MiB)" + E.suggest(item.unit, list(UNITS)))
        size = self.number(item.amount, f, item.line, item.amount_column, f"the {word} size") * UNITS[unit]
        if not 1 <= size <= 2 ** 50:
            self.fail(E.BadOverlapSetting, f"overlap {word} {item.amount}{item.unit}: a bucket holds between "
                      "1 byte and 1PiB", f, item.line, item.amount_column,
                      fix="give a positive size, e.g. bucket 25MiB (DDP's default); overlap off turns "
                          "the buckets off")
        return int(size)

    # ---- numbers ---------------------------------------------------------------------------

    def whole(self, text: str, f, line: int, column: int, what: str, cls=E.BadNumber) -> int:
        if "." in text or len(text.lstrip("+-")) > 9:
            self.fail(cls, f"{what} must be a whole number below 10^9, not {text[:20]}", f, line, column,
                      fix=f"write {what} as a whole number")
        return int(text)

    def number(self, text: str, f, line: int, column: int, what: str) -> float:
        if len(text) > 24:
            self.fail(E.BadNumber, f"{what} is too long a number", f, line, column,
                      fix="write it with a larger unit, e.g. 80GB")
        return float(text)

    # ---- layouts ---------------------------------------------------------------------------

    def axes_fix(self, axis: str) -> str:
        f, st, _ = self.settings.get("mesh", (None, None, None))
        declared = f" (declared at {self.where(f, st)})" if st is not None else ""
        return (f"use one of the mesh axes {', '.join(self.mesh)}{declared}"
                + E.suggest(axis, list(self.mesh)))

    def check_placements(self, f: ast.PlanFile, st: ast.Layout) -> list[tuple[str, str | None, ast.Located]]:
        """[(axis, "R" | "S(d)" (d possibly negative) | None, where)] for a layout body."""
        if not st.placements:
            self.fail(E.EmptyLayout, "the layout names no axis", f, st.close_line, st.close_column,
                      fix=f"give a placement per axis, e.g. {{ {next(iter(self.mesh))}: R }}; to leave "
                          f"the values to the search write auto {st.targets[0]}")
        seen: dict[str, ast.AxisPlacement] = {}
        out = []
        for ap in st.placements:
            if ap.axis not in self.mesh:
                self.fail(E.UnknownAxis, f"the mesh has no axis '{ap.axis}'", f, ap.line, ap.column,
                          fix=self.axes_fix(ap.axis))
            if ap.axis in seen:
                self.fail(E.DuplicateAxis, f"axis '{ap.axis}' is given twice in this layout "
                          f"(first at column {seen[ap.axis].column})", f, ap.line, ap.column,
                          fix="give one placement per axis")
            seen[ap.axis] = ap
            out.append((ap.axis, self.placement(f, ap.placement), ap.placement))
        return out

    def placement(self, f: ast.PlanFile, pl: ast.Placement) -> str | None:
        word, arg = pl.word, pl.arg
        if word == "P":
            self.fail(E.PartialPin, "P (partial sum) cannot be pinned", f, pl.line, pl.column,
                      fix="a partial sum is what an op produces mid-reduction, before the "
                          "all-reduce the search inserts; pin the reduced layout R, the "
                          "reduce-scattered S(<dim>), or write auto")
        if word == "S":
            if arg is None:
                self.fail(E.BadShardDim, "S needs the dim it shards", f, pl.line, pl.column,
                          fix="write S(0) for dim 0, S(1) for dim 1, S(-1) for the last")
            if "." in arg or len(arg.lstrip("+-")) > 6:
                self.fail(E.BadShardDim, f"S({arg}): a dim is a whole number", f, pl.line,
                          pl.column + 2, fix="write S(0), S(1), ... or S(-1) for the last dim")
            return f"S({int(arg)})"
        if word in ("R", "auto"):
            if arg is not None:
                self.fail(E.UnknownPlacement, f"{word} takes no dim", f, pl.line, pl.column,
                          fix=f"write {word} alone; S(<dim>) is the placement that names a dim")
            return "R" if word == "R" else None
        guess = PLACEMENT_SYNONYMS.get(word)
        hint = (f"; did you mean {guess}{'(' + arg + ')' if guess == 'S' and arg else ''}?"
                if guess else E.suggest(word, PLACEMENT_WORDS))
        self.fail(E.UnknownPlacement, f"'{pl}' is not a placement", f, pl.line, pl.column,
                  fix="placements are R (replicate), S(<dim>) (shard that dim over the axis) "
                      "and auto (the search decides)" + hint)

    def apply(self, f: ast.PlanFile, st: ast.Statement, v: Value, wanted) -> None:
        """Merge one statement's placements for one value into the pins."""
        per_axis = self.pins.setdefault(v.name, {})
        origins = self.pin_origin.setdefault(v.name, [])
        pinned = False
        for axis, pl, where in wanted:
            if pl is not None and pl.startswith("S("):
                pl = self.check_shard(f, st, v, axis, pl, where)
            if pl is None:
                per_axis.pop(axis, None)
                continue
            if self.mesh[axis] == 1 and pl.startswith("S("):
                pl = "R"        # an axis of size 1 splits nothing; the search writes R there
            old = per_axis.get(axis)
            if old is not None and old[0] != pl:
                of, owhere = old[2], old[3]
                self.fail(E.ConflictingPins,
                          f"{self.index.describe(v)}: axis {axis} is pinned "
                          f"{old[0]} at {of.path}:{owhere.line}:{owhere.column} and {pl} here",
                          f, where.line, where.column,
                          fix="remove one of the two, or release the first with "
                              f"auto {self.index.describe(v)} (or {axis}: auto) before this statement")
            per_axis[axis] = (pl, axis, f, where)
            pinned = True
        if pinned:
            origins.append(self.where(f, st))
        self.check_dims_once(f, st, v, wanted)

    def check_shard(self, f, st, v: Value, axis: str, pl: str, where) -> str:
        d = int(pl[2:-1])
        rank = len(v.shape)
        named = self.index.describe(v)
        if not -rank <= d < rank:
            dims = f"dims 0..{rank - 1}" if rank else "no dims (a scalar)"
            self.fail(E.DimOutOfRange,
                      f"{pl} is out of range for {named} ({v.type_str()}, {dims})", f,
                      where.line, where.column,
                      fix=("choose a dim of the value" if rank else "a scalar can only be R")
                      + ("; if the pattern selects values of different ranks, narrow it"
                         if self.selected_many else ""))
        d %= rank
        n = self.mesh[axis]
        if v.shape[d] % n:
            ok = [str(i) for i, s in enumerate(v.shape) if s % n == 0]
            self.fail(E.IndivisibleSplit,
                      f"{axis}={n} does not divide dim {d} of {named} ({v.type_str()}: size {v.shape[d]})",
                      f, where.line, where.column,
                      fix=(f"shard a dim whose size {n} divides (dims {', '.join(ok)}), " if ok else "")
                      + f"leave {axis} auto, or use a mesh where {axis} divides {v.shape[d]}")
        return f"S({d})"

    def check_dims_once(self, f, st, v: Value, wanted) -> None:
        """Two axes may not shard the same dim (the search splits a dim over one axis)."""
        per_axis = self.pins.get(v.name, {})
        by_dim: dict[str, str] = {}
        for axis in self.mesh:
            if axis in per_axis and per_axis[axis][0].startswith("S("):
                pl = per_axis[axis][0]
                if pl in by_dim:
                    where = per_axis[axis][3]
                    self.fail(E.DimSplitTwice,
                              f"{self.index.describe(v)} would be sharded on dim {pl[2:-1]} over both "
                              f"{by_dim[pl]} and {axis}", per_axis[axis][2], where.line, where.column,
                              fix=f"shard another dim over {axis}, or replicate it (R); autopar splits "
                                  "a dim over one mesh axis at most")
                by_dim[pl] = axis

    # ---- selections ----------------------------------------------------------------------------

    def select(self, f: ast.PlanFile, target: ast.Target) -> list[Value]:
        try:
            found = self.index.select(target.kind, target.pattern)
        except PatternError as e:
            self.fail(E.BadPattern, f"bad pattern \"{target.pattern}\": {e}", f, target.line,
                      target.column, fix="patterns use * (within one path component), ** (any "
                                         "number of components), ? and [0-9]")
        self.selected_many = len(found) > 1
        if found:
            return found
        cls, what = {"param": (E.UnknownParameter, "no parameter or buffer"),
                     "output": (E.UnknownModule, "no module"),
                     "input": (E.UnknownInput, "no model input"),
                     "value": (E.UnknownValue, "no IR value")}[target.kind]
        self.fail(cls, f"{what} of the model matches \"{target.pattern}\"", f, target.line,
                  target.column, fix=self.selection_fix(target))

    def selection_fix(self, target: ast.Target) -> str:
        pat = target.pattern
        hints = []
        close = closest(pat, self.index.names(target.kind))
        if close:
            hints.append(f'did you mean "{close[0]}"?')
        # the name exists, but as another kind of thing
        other = {"param": "parameters", "output": "modules", "input": "inputs", "value": "values"}
        for kind in ("output", "param", "input", "value"):
            if kind == target.kind:
                continue
            try:
                hit = self.index.select(kind, pat)
            except PatternError:
                hit = []
            if hit:
                form = str(ast.Target(kind=kind, pattern=pat, line=0, column=0))
                extra = f' (or "{pat}.*" for its parameters)' if kind == "output" else ""
                hints.append(f"\"{pat}\" names {other[kind]}: write {form}{extra}")
                break
        if target.kind == "param" and not hints:
            params = self.index.param_names()
            hints.append("parameters look like " + ", ".join(f'"{p}"' for p in params[:3]))
        if target.kind == "input":
            hints.append("the model's inputs are " + ", ".join(self.index.inputs))
        if target.kind == "output" and not close:
            hints.append("module paths look like " + ", ".join(f'"{m}"' for m in list(self.index.modules)[:3]))
        if not close and "*" in pat and "**" not in pat:
            hints.append("* matches within one path component; ** spans several")
        return "; ".join(hints) or "run `autopar ir SPEC` to see the names"

    def select_modules(self, f: ast.PlanFile, pat: ast.Pattern) -> list[str]:
        target = ast.Target(kind="output", pattern=pat.text, line=pat.line, column=pat.column)
        try:
            mods = self.index.select_modules(pat.text)
        except PatternError as e:
            self.fail(E.BadPattern, f"bad pattern \"{pat.text}\": {e}", f, pat.line, pat.column,
                      fix="patterns use * (within one path component), ** (any number of "
                          "components), ? and [0-9]")
        if not mods:
            self.fail(E.UnknownModule, f"no module of the model matches \"{pat.text}\"", f, pat.line,
                      pat.column, fix=self.selection_fix(target))
        return mods


__all__ = ["PlanSpec", "resolve", "UNITS", "generalize"]

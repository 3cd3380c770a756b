"""Write a solved `Plan` back out as a plan file that reproduces it when read back.

    >>> print(write_plan(plan, graph))                                  # doctest: +SKIP
    mesh dp=2, tp=4
    layout input "idx" { dp: S(0), tp: R }
    layout "transformer.h.*.attn.c_attn.weight" { dp: R, tp: S(0) }
    replicate "transformer.h.*.ln_1.*"
    layout output of "transformer.h.*.mlp.c_fc" { dp: S(0), tp: S(2) }
    ...

Every input and parameter layout is pinned, and the output of every module (where the
layout is not a pending partial sum `P`, which cannot be pinned: that axis is written
`auto` and the pins around it leave the search one choice). Lines repeat across blocks,
so names are folded into patterns: first block indices (`h.0`, `h.1` -> `h.*`) where every
block agrees, then whole subtrees (`transformer.h.*.ln_1.*`, `**`) where everything under
them agrees. A pattern is only written if every value it selects has its layout, so the
file means exactly the plan.
"""
from __future__ import annotations

from typing import Callable

from autopar.compiler.ir import Graph
from autopar.compiler.plan import OVERLAP_DEFAULTS, Plan
from autopar.compiler.sharding import format_mesh
from autopar.compiler.patterns import fold_modules, generalize, is_pattern, model_index

PinLayout = tuple   # per axis "R" | "S(d)" | None


def pin_layout(layout) -> PinLayout:
    return tuple(None if p == "P" else p for p in layout)


def write_plan(plan: Plan, graph: Graph, activations: str = "modules") -> str:
    """Plan file text for `plan` on `graph`. `activations`: "modules" pins module outputs,
    "all" also values outside any module (as `value "name"`), "none" pins no activation."""
    index = model_index(graph)
    mesh = plan.mesh
    layouts = {name: pin_layout(lay) for name, lay in plan.layouts.items()}

    lines = [f"# autopar plan for {plan.model} on mesh {format_mesh(mesh).replace(',', ', ')}"]
    step = plan.cost.get("step_time") if isinstance(plan.cost, dict) else None
    if isinstance(step, (int, float)):
        lines.append(f"# estimated step time {step * 1e3:.3f} ms")
    lines.append("# written by autopar.dsl.write_plan: reading it back reproduces the plan")
    lines.append("mesh " + ", ".join(f"{a}={n}" for a, n in mesh.items()))
    if plan.device:
        lines.append(f"device {plan.device}" if plan.device.isidentifier() else f'device "{plan.device}"')
    if plan.memory_limit:
        lines.append(f"memory {format_bytes(plan.memory_limit)}")
    if plan.dp_axis:          # stage 0 too: without it the search would pick a stage again
        lines.append(f"zero {plan.zero} over {plan.dp_axis}")
    elif plan.zero:
        lines.append(f"zero {plan.zero}")
    if isinstance(plan.solver, dict) and plan.solver.get("minimize") == "memory":
        lines.append("minimize memory")         # time is the default
    if plan.recompute:
        lines.append("recompute " + ", ".join(f'"{p}"' for p in fold_modules(plan.recompute, graph)))
    lines += checkpoint_lines(getattr(plan, "checkpoint", None) or {})
    overlap = {k: v for k, v in (plan.overlap or {}).items()
               if k in OVERLAP_DEFAULTS and v != OVERLAP_DEFAULTS[k]}
    if overlap:                   # only what differs from DDP's defaults
        lines.append(overlap_line(overlap))
    pp = getattr(plan, "pipeline", None) or {}
    if getattr(plan, "microbatches", 1) > 1 or pp:
        lines.append(f"pipeline microbatches {plan.microbatches}"
                     + (f", schedule {pp['schedule']}" + (f" {pp['virtual']}" if pp.get("virtual", 1) > 1 else "")
                        if pp else ""))
    if pp.get("pinned"):          # the stages a plan file pinned (the others are balanced again)
        lines += stage_lines(pp["blocks"], {k: pp["ranges"][k] for k in pp["pinned"]})

    def section(title: str, kind: str, items: dict[str, PinLayout], universe: list[str],
                select: Callable[[str], list[str]], layout_of: Callable[[str], PinLayout | None]):
        entries = compact(items, universe, select, layout_of)
        if entries:
            lines.append(f"\n# {title}")
            lines.extend(statement(kind, [pattern], layout, mesh) for pattern, layout in entries)

    # inputs are few and named by the user: list them, one statement per layout
    inputs = {v.name: pin_layout(layouts[v.name]) for v in graph.inputs if v.name in layouts}
    by_layout: dict[PinLayout, list[str]] = {}
    for name, lay in inputs.items():
        if any(p is not None for p in lay):
            by_layout.setdefault(lay, []).append(name)
    if by_layout:
        lines.append("\n# inputs")
        lines.extend(statement("input", names, lay, mesh) for lay, names in by_layout.items())
    params = {v.name: layouts[v.name] for v in graph.params if v.name in layouts}
    section("parameters", "param", params, list(index.params),
            lambda p: [v.name for v in index.select_params(p)], layouts.get)
    if activations in ("modules", "all"):
        # one line per value: the deepest module that outputs it names it
        outputs = {path: layouts[v.name] for path, v in index.modules.items()
                   if index.output_of.get(v.name) == path and v.name in layouts}
        section("activations (module outputs)", "output", outputs, list(index.modules),
                index.select_modules, lambda m: layouts.get(index.modules[m].name))
    if activations == "all":
        covered = set(index.output_of) | set(index.inputs) | set(index.params)
        rest = {v.name: layouts[v.name] for n in graph.nodes for v in n.outputs[:1]
                if v.name not in covered and v.name in layouts}
        section("other values", "value", rest, list(index.values),
                lambda p: [v.name for v in index.select_values(p)], layouts.get)
    return "\n".join(lines) + "\n"


def checkpoint_lines(c: dict) -> list[str]:
    """The `checkpoint` and `resume` statements for settings `c` (Plan.checkpoint)."""
    lines = []
    if c.get("directory"):
        every = f"every {c['every']} steps " if c.get("every") else ""
        keep = f" keep {c['keep']}" if c.get("keep") else ""
        lines.append(f'checkpoint {every}to "{c["directory"]}"{keep}{" async" if c.get("async") else ""}')
    if c.get("resume"):
        lines.append(f'resume from "{c["resume"]}"')
    return lines


def stage_lines(blocks: str, ranges: dict) -> list[str]:
    """One `stage` statement per pinned stage: `ranges` maps a stage to its [first, end)
    range of the blocks of module list `blocks`, each block written by name."""
    return [f"stage {k} " + ", ".join(f'"{blocks}.{i}"' for i in range(a, b))
            for k, (a, b) in sorted(ranges.items())]


def overlap_line(o: dict) -> str:
    """One `overlap` statement with the settings `o` (keys of Plan.overlap)."""
    words = []
    if "enabled" in o:
        words.append("on" if o["enabled"] else "off")
    if "bucket_bytes" in o:
        words.append(f"bucket {format_bytes(o['bucket_bytes'])}")
        if "first_bucket_bytes" in o:
            words.append(f"first {format_bytes(o['first_bucket_bytes'])}")
    elif "first_bucket_bytes" in o:
        words.append(f"bucket {format_bytes(OVERLAP_DEFAULTS['bucket_bytes'])} "
                     f"first {format_bytes(o['first_bucket_bytes'])}")
    if "prefetch" in o:
        words.append(f"prefetch {o['prefetch']}")
    if "async_tp" in o:
        words.append("async_tp " + {True: "on", False: "off"}.get(o["async_tp"], "auto"))
    return "overlap " + " ".join(words)


def statement(kind: str, patterns: list[str], layout: PinLayout, mesh: dict[str, int]) -> str:
    prefix = {"param": "", "input": "input ", "output": "output of ", "value": "value "}[kind]
    target = ", ".join(f'{prefix}"{p}"' for p in patterns)
    if all(p == "R" for p in layout):
        return f"replicate {target}"
    body = ", ".join(f"{a}: {p if p is not None else 'auto'}" for a, p in zip(mesh, layout))
    line = f"layout {target} {{ {body} }}"
    if any(p is None for p in layout):
        line += "    # auto: a partial sum there, left to the search"
    return line


def format_bytes(n: float) -> str:
    """The shortest exact spelling: 80GB, 80GiB, 1234567B."""
    n = int(round(n))
    units = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10),
             ("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))
    exact = [(n // size, unit) for unit, size in units if n >= size and n % size == 0]
    if not exact:
        return f"{n}B"
    count, unit = min(exact)
    return f"{count}{unit}"


def compact(items: dict[str, PinLayout], universe: list[str], select: Callable[[str], list[str]],
            layout_of: Callable[[str], PinLayout | None]) -> list[tuple[str, PinLayout]]:
    """[(pattern, layout)] covering `items` (name -> layout; names from `universe`).

    `select(pattern)` lists the names of `universe` a pattern selects, `layout_of(name)`
    their layouts. A pattern is used only when every name it selects has the same layout, so the lines
    never pin anything to a layout the plan did not give it. All-auto layouts are skipped."""
    items = {n: lay for n, lay in items.items() if any(p is not None for p in lay)}
    if not items:
        return []

    def uniform(pattern: str, layout: PinLayout) -> bool:
        hit = select(pattern)
        return bool(hit) and all(layout_of(h) == layout for h in hit)

    # 1. fold block indices: transformer.h.0.x, transformer.h.1.x -> transformer.h.*.x
    groups: dict[str, list[str]] = {}
    for name in items:
        groups.setdefault(generalize(name), []).append(name)
    entries: list[tuple[str, PinLayout, list[str]]] = []
    for pat, names in groups.items():
        lays = {items[n] for n in names}
        if is_pattern(pat) and len(lays) == 1 and uniform(pat, items[names[0]]):
            entries.append((pat, items[names[0]], names))
        else:
            entries += [(n, items[n], [n]) for n in names]

    # 2. fold subtrees whose entries all agree: a.b.x, a.b.y -> a.b.* (or a.b.** if deeper)
    order = {n: i for i, n in enumerate(universe)}

    def first(entry) -> int:
        return min(order.get(n, len(order)) for n in entry[2])

    out: list[tuple[str, PinLayout, int]] = []

    def fold(prefix: list[str], group: list[tuple[str, PinLayout, list[str]]]) -> None:
        depth = len(prefix)
        if len(group) > 1 and len({e[1] for e in group}) == 1:
            shallow = all(e[0].count(".") == depth for e in group)
            pat = ".".join(prefix + ["*" if shallow else "**"])
            if uniform(pat, group[0][1]):
                out.append((pat, group[0][1], min(first(e) for e in group)))
                return
        children: dict[str, list] = {}
        for e in group:
            parts = e[0].split(".")
            if len(parts) == depth + 1:
                out.append((e[0], e[1], first(e)))
            else:
                children.setdefault(parts[depth], []).append(e)
        for part, sub in children.items():
            fold(prefix + [part], sub)

    fold([], entries)
    out.sort(key=lambda e: e[2])
    return [(p, lay) for p, lay, _ in out]

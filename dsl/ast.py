"""The plan file's syntax tree: one frozen dataclass per statement, each keeping where it
was written (`line`, `column`, 1-based) so semantic errors point at the source.

    >>> plan = parse_plan('mesh dp=2, tp=4\\nlayout "fc1.weight" { tp: S(0) }')  # doctest: +SKIP
    >>> plan.statements[1]                                                      # doctest: +SKIP
    Layout(targets=(Target(kind='param', pattern='fc1.weight', ...),), placements=(...), line=2, column=1)

Words the grammar leaves open are kept as written (`Placement.word`, `Memory.unit`,
`Objective.goal`) and checked by `autopar.dsl.check`, which knows what they may be.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class Located:
    line: int
    column: int


# ---- pieces ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class MeshAxis(Located):
    name: str
    size: str                   # as written; check makes it a positive int


@dataclass(frozen=True, kw_only=True)
class Target(Located):
    """What a statement selects. kind: param (state-dict name pattern), output (a module's
    output, by module-path pattern), input (a model input by name), value (an IR value name,
    as `autopar ir` prints it)."""
    kind: str
    pattern: str

    def __str__(self) -> str:
        prefix = {"param": "", "output": "output of ", "input": "input ", "value": "value "}[self.kind]
        return f'{prefix}"{self.pattern}"'


@dataclass(frozen=True, kw_only=True)
class Placement(Located):
    """`R`, `S(0)`, `P`, `auto` -- or anything else written there (check explains)."""
    word: str
    arg: str | None = None      # the parenthesised number, as written

    def __str__(self) -> str:
        return self.word if self.arg is None else f"{self.word}({self.arg})"


@dataclass(frozen=True, kw_only=True)
class AxisPlacement(Located):
    axis: str
    placement: Placement


# ---- statements ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Statement(Located):
    written: str = ""             # the statement as written, whitespace collapsed


@dataclass(frozen=True, kw_only=True)
class Mesh(Statement):
    axes: tuple[MeshAxis, ...]


@dataclass(frozen=True, kw_only=True)
class Device(Statement):
    name: str
    name_column: int


@dataclass(frozen=True, kw_only=True)
class Memory(Statement):
    amount: str
    unit: str | None
    unit_line: int = 0
    unit_column: int = 0


@dataclass(frozen=True, kw_only=True)
class Zero(Statement):
    stage: str
    stage_column: int
    axis: str | None = None
    axis_line: int = 0
    axis_column: int = 0


@dataclass(frozen=True, kw_only=True)
class Objective(Statement):
    goal: str
    goal_column: int


@dataclass(frozen=True, kw_only=True)
class Layout(Statement):
    targets: tuple[Target, ...]
    placements: tuple[AxisPlacement, ...]
    close_line: int = 0           # the closing brace, for "empty layout" errors
    close_column: int = 0


@dataclass(frozen=True, kw_only=True)
class Replicate(Statement):
    targets: tuple[Target, ...]


@dataclass(frozen=True, kw_only=True)
class Auto(Statement):
    targets: tuple[Target, ...]


@dataclass(frozen=True, kw_only=True)
class Pattern(Located):
    text: str


@dataclass(frozen=True, kw_only=True)
class Recompute(Statement):
    patterns: tuple[Pattern, ...]


@dataclass(frozen=True, kw_only=True)
class Include(Statement):
    path: str                     # as written
    path_column: int
    plan: "PlanFile | None" = None   # the included file, once loaded


@dataclass(frozen=True, kw_only=True)
class Checkpoint(Statement):
    """`checkpoint [every N steps] to "DIR" [keep K] [async]`: numbers as written."""
    directory: str
    directory_column: int
    every: str | None = None
    every_column: int = 0
    keep: str | None = None
    keep_column: int = 0
    async_: bool = False


@dataclass(frozen=True, kw_only=True)
class Resume(Statement):
    """`resume from "DIR"`."""
    directory: str
    directory_column: int


@dataclass(frozen=True, kw_only=True)
class OverlapItem(Located):
    """One setting of an `overlap` statement: key `enabled` (amount "on"/"off"),
    `bucket_bytes`, `first_bucket_bytes` (amount and unit as written), `prefetch` or
    `async_tp` ("on", "off" or "auto")."""
    key: str
    amount: str
    unit: str | None = None
    unit_line: int = 0
    unit_column: int = 0
    amount_column: int = 0


@dataclass(frozen=True, kw_only=True)
class Overlap(Statement):
    """`overlap off`, `overlap bucket 25MB [first 1MB]`, `overlap prefetch 2`,
    `overlap async_tp on` (several
    settings may share one statement)."""
    items: tuple[OverlapItem, ...]


@dataclass(frozen=True, kw_only=True)
class Pipeline(Statement):
    """`pipeline microbatches N [, schedule NAME [V]]`: numbers and words as written."""
    microbatches: str | None = None
    microbatches_column: int = 0
    schedule: str | None = None
    schedule_column: int = 0


@dataclass(frozen=True, kw_only=True)
class Stage(Statement):
    """`stage N "pattern", ...`: the blocks the patterns select pinned to pipeline stage N
    (the index as written)."""
    index: str
    index_column: int
    patterns: tuple[Pattern, ...]


@dataclass(frozen=True)
class PlanFile:
    """One parsed file: its path (as given, or `<string>`), its text (for error context)
    and its statements in order. Includes hold their own `PlanFile`."""
    path: str
    text: str
    statements: tuple[Statement, ...] = field(default=())

    def walk(self):
        """(file, statement) pairs in reading order, includes expanded where they stand."""
        for st in self.statements:
            if isinstance(st, Include):
                if st.plan is not None:
                    yield from st.plan.walk()
            else:
                yield self, st

    def files(self) -> list[str]:
        out = [self.path]
        for st in self.statements:
            if isinstance(st, Include) and st.plan is not None:
                out += [p for p in st.plan.files() if p not in out]
        return out

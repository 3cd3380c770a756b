"""Every way a plan file can be wrong, as a named error class, and the catalogue of bad
examples that maps a parser error to its class (`UnexpectedInput.match_examples`).

Each error names the file, line and column, shows the line with a caret under the spot and
says how to fix it:

    gpt.plan:4:47: UnknownAxis: the mesh has no axis 'pt'
        4 | layout "transformer.h.*.attn.c_attn.weight" { pt: S(0) }
          |                                               ^
      fix: use one of the mesh axes dp, tp (declared at gpt.plan:1:1); did you mean 'tp'?

All derive from `PlanFileError`, which the CLI reports as bad input (exit code 2). The
catalogue `SYNTAX_EXAMPLES` doubles as a test: each example must raise its own class.
"""
from __future__ import annotations

import difflib

from autopar.compiler.errors import UserError


class PlanFileError(UserError):
    """A plan file is malformed or does not fit the model. `where` is `file:line:col`."""

    def __init__(self, message: str, *, file: str = "<string>", line: int = 1, column: int = 1,
                 text: str | None = None, fix: str = ""):
        self.message, self.file, self.line, self.column = message, file, line, column
        self.text, self.fix = text, fix
        super().__init__(message)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"

    def context(self) -> str:
        """The offending line with a caret under the column (empty if the text is unknown)."""
        return source_context(self.text, self.line, self.column)

    def __str__(self) -> str:
        out = f"{self.where}: {type(self).__name__}: {self.message}"
        ctx = self.context()
        if ctx:
            out += "\n" + ctx
        if self.fix:
            out += f"\n  fix: {self.fix}"
        return out


def source_context(text: str | None, line: int, column: int) -> str:
    """`    4 | <line>` then a caret line under `column` (tabs expanded like the line)."""
    if text is None:
        return ""
    lines = text.split("\n")           # lark counts lines by \n only
    if not 1 <= line <= len(lines):
        return ""
    src = lines[line - 1].rstrip("\r")
    num = f"{line:5d}"
    before = src[:max(column - 1, 0)].expandtabs()
    return f"{num} | {src.expandtabs()}\n{' ' * len(num)} | {' ' * len(before)}^"


def suggest(word: str, choices, n: int = 1, cutoff: float = 0.5) -> str:
    """`; did you mean 'x'?` or '' (difflib)."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=cutoff)
    if not close:
        return ""
    return "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?"


# ---- syntax (raised by the parser) ---------------------------------------------------------

class PlanSyntaxError(PlanFileError):
    """A syntax error the catalogue does not name more precisely."""


class UnknownStatement(PlanSyntaxError):
    """A line starts with a word that is not a statement."""


class ExtraText(PlanSyntaxError):
    """Something after a complete statement on the same line."""


class BadMeshAxis(PlanSyntaxError):
    """A mesh axis is not written `name=size`."""


class MissingComma(PlanSyntaxError):
    """Two mesh axes, targets or placements with no comma between them."""


class LayoutWithoutBraces(PlanSyntaxError):
    """`layout "x"` not followed by `{ axis: placement, ... }`."""


class UnclosedBrace(PlanSyntaxError):
    """A `{` with no `}`."""


class MissingColon(PlanSyntaxError):
    """`{ tp S(0) }`: an axis and its placement need a colon."""


class MissingPlacement(PlanSyntaxError):
    """`{ tp: }` or a placement written as a string."""


class BadShardDim(PlanSyntaxError):
    """`S()`, `S(x)`, `S(0` or `S(1.5)`: a shard needs one whole dim in parentheses."""


class UnquotedPattern(PlanSyntaxError):
    """A module path, pattern or file name without double quotes."""


class MissingTarget(PlanSyntaxError):
    """`layout { ... }`, `replicate` or `recompute` with nothing named."""


class OutputWithoutOf(PlanSyntaxError):
    """`output "m"` instead of `output of "m"`."""


class UnterminatedString(PlanSyntaxError):
    """A `"` with no closing `"` on the same line."""


class StrayCharacter(PlanSyntaxError):
    """A character the language has no use for (`;`, `'`, `@` ...)."""


class BadMemory(PlanSyntaxError):
    """`memory` not followed by an amount like 80GB."""


class BadZero(PlanSyntaxError):
    """`zero` not written `zero <stage> over <axis>`."""


class BadObjective(PlanSyntaxError):
    """`minimize` not followed by `time` or `memory`."""


class BadDevice(PlanSyntaxError):
    """`device` not followed by a profile name."""


class BadCheckpoint(PlanSyntaxError):
    """`checkpoint` not written `checkpoint [every N steps] to "DIR" [keep K] [async]`."""


class BadResume(PlanSyntaxError):
    """`resume` not written `resume from "DIR"`."""


class BadOverlap(PlanSyntaxError):
    """`overlap` not followed by off, on, bucket SIZE [first SIZE], prefetch N or async_tp on|off|auto."""


class BadPipeline(PlanSyntaxError):
    """`pipeline` not written `pipeline microbatches N [, schedule NAME]`."""


class BadStage(PlanSyntaxError):
    """`stage` not written `stage N "pattern"`."""


# ---- semantic (raised by check.resolve and the include loader) ------------------------------

class PlanNotFound(PlanFileError):
    """The plan file given on the command line cannot be read."""


class PlanNotText(PlanFileError):
    """The plan file exists but is not UTF-8 text (a binary file, a plan JSON's wrong cousin)."""


class MemoryTooSmall(PlanFileError):
    """A `memory` limit below what the model's parameters alone take on every device."""


class IncludeNotFound(PlanFileError):
    """An included file does not exist or cannot be read."""


class IncludeCycle(PlanFileError):
    """A file includes itself, directly or through others."""


class BadNumber(PlanFileError):
    """A number where a whole number is needed, or one too large to mean anything."""


class BadMeshSize(PlanFileError):
    """A mesh axis size that is not a positive whole number."""


class DuplicateAxis(PlanFileError):
    """The same axis twice in a mesh or in one layout."""


class MissingMesh(PlanFileError):
    """No `mesh` statement and no mesh given on the command line."""


class MeshMismatch(PlanFileError):
    """The file's mesh differs from the one given on the command line."""


class ConflictingSetting(PlanFileError):
    """mesh / device / memory / zero / objective given twice with different values."""


class UnknownDevice(PlanFileError):
    """A device profile autopar does not know."""


class UnknownUnit(PlanFileError):
    """A memory amount without a unit or with one autopar does not know."""


class UnknownObjective(PlanFileError):
    """`minimize` something other than time or memory."""


class ZeroStageOutOfRange(PlanFileError):
    """A ZeRO stage other than 0, 1, 2, 3."""


class ZeroWithoutDpAxis(PlanFileError):
    """`zero N` with no `over AXIS` and no mesh axis called dp."""


class UnknownAxis(PlanFileError):
    """A placement (or zero) names an axis the mesh does not have."""


class UnknownPlacement(PlanFileError):
    """A placement word other than R, S(d), auto (and P, which is refused)."""


class PartialPin(PlanFileError):
    """`P` as a pin: a partial sum is an op's intermediate result, not a layout to ask for."""


class EmptyLayout(PlanFileError):
    """`layout "x" { }`: no axis named."""


class BadPattern(PlanFileError):
    """An empty pattern or one with unbalanced brackets."""


class UnknownParameter(PlanFileError):
    """A parameter pattern that matches no parameter or buffer of the model."""


class UnknownModule(PlanFileError):
    """An `output of` / `recompute` / `stage` pattern that matches no module path of the model."""


class UnknownInput(PlanFileError):
    """`input "x"` naming no model input."""


class UnknownValue(PlanFileError):
    """`value "x"` naming no IR value."""


class DimOutOfRange(PlanFileError):
    """S(d) with d not a dim of the selected value."""


class IndivisibleSplit(PlanFileError):
    """S(d) over an axis whose size does not divide dim d."""


class DimSplitTwice(PlanFileError):
    """Two axes shard the same dim (autopar splits a dim over one axis at most)."""


class ConflictingPins(PlanFileError):
    """Two statements pin the same value's axis to different placements."""


class BadCheckpointSetting(PlanFileError):
    """A checkpoint interval or count below 1, or an empty directory."""


class BadOverlapSetting(PlanFileError):
    """A bucket size that is not positive, or a prefetch depth that is not a whole number."""


class BadMicrobatches(PlanFileError):
    """A microbatch count below 1, or one that does not divide the model's batch."""


class NoPipelineStages(PlanFileError):
    """A pipeline the mesh cannot cut into stages: a schedule without a pp axis, a schedule
    autopar does not run (interleaved, zero-bubble), or more stages than the model has blocks."""


# `stage N "pattern"` pins whole blocks of the model's module list of repeated blocks to
# pipeline stage N; the cut balances the other stages around the pinned ones.

class StageWithoutPp(PlanFileError):
    """A `stage` pin on a mesh with no pp axis (nothing to pin the blocks to)."""


class StageOutOfRange(PlanFileError):
    """`stage N` with N not a whole number below the pp axis's size."""


class StageNotABlock(PlanFileError):
    """A stage pattern selecting a module that is not one of the repeated blocks (the
    embedding or head, which go with the first and last stage, or the list holding them)."""


class StageSplitsBlock(PlanFileError):
    """A stage pattern selecting part of a block (`transformer.h.0.attn`): stages hold whole blocks."""


class StageNotContiguous(PlanFileError):
    """One stage pinned to blocks with a gap between them: a stage runs one contiguous range."""


class StagesOutOfOrder(PlanFileError):
    """Stage pins whose blocks are not in stage order (stage 1 before stage 0's blocks)."""


class StageOverlap(PlanFileError):
    """A block pinned to two stages."""


class StageGap(PlanFileError):
    """Blocks the pins leave to no stage: between two consecutive pinned stages, before
    stage 0's or after the last stage's."""


class EmptyStage(PlanFileError):
    """Pins that leave a stage without a block (each stage needs at least one)."""



# ---- the catalogue: bad examples -> the class that names the mistake -------------------------
#
# The parser's error state (plus the offending token) is compared with these examples'
# (lark's `match_examples`); order matters only for ties within one parser state.

KEYWORDS = ("mesh", "device", "memory", "zero", "minimize", "layout", "replicate", "auto",
            "recompute", "include", "checkpoint", "resume", "overlap", "pipeline", "stage")

SYNTAX_EXAMPLES: dict[type[PlanSyntaxError], list[str]] = {
    UnclosedBrace: [
        'layout "x" { tp: S(0)',
        'layout "x" { tp: S(0)\nlayout "y" { tp: R }',
        'layout "x" { tp: S(0)\nmesh dp=2',
        'layout "x" { tp: S(0)\nreplicate "y"',
        'layout "x" { tp: R,',
        'layout "x" { tp: R',
        'layout "x" { tp: R\nlayout "y" { tp: R }',
        'layout "x" { tp: R\nreplicate "y"',
        'layout "x" { tp: auto',
        'layout "x" { tp: auto\nlayout "y" { tp: R }',
        'layout "x" { tp: auto\nreplicate "y"',
        'layout "x" {',
    ],
    MissingComma: [
        'mesh dp=2 tp=4',
        'layout "x" { tp: S(0) dp: R }',
        'layout "x" { tp: R dp: R }',
        'layout "x" { tp: auto dp: R }',
        'layout "x" "y" { tp: R }',
        'replicate "x" "y"',
        'recompute "x" "y"',
    ],
    BadMeshAxis: [
        'mesh dp, tp=4',
        'mesh dp tp',
        'mesh dp',
        'mesh dp: 2',
        'mesh dp 2',
        'mesh dp=x',
        'mesh dp=',
        'mesh 2, 4',
        'mesh',
        'mesh "dp"=2',
        'mesh dp=2,',
        'mesh dp=2, 4',
        'mesh { dp: 2 }',
        'mesh dp=(2)',
        'mesh dp=-2',
    ],
    LayoutWithoutBraces: [
        'layout "x" tp: S(0)',
        'layout "x"',
        'layout "x" (tp: S(0))',
        'layout "x" = { tp: R }',
        'layout "x" S(0)',
        'layout input "x" tp: R }',
        'layout output of "x" tp: R }',
        'layout value "x" tp: R }',
        'layout "a", "b" tp: R }',
    ],
    MissingColon: [
        'layout "x" { tp S(0) }',
        'layout "x" { tp = S(0) }',
        'layout "x" { tp }',
        'layout "x" { tp, dp: R }',
        'layout "x" { tp(0) }',
    ],
    MissingPlacement: [
        'layout "x" { tp: }',
        'layout "x" { tp: "R" }',
        'layout "x" { tp: , dp: R }',
        'layout "x" { tp: 0 }',
        'layout "x" { tp:',
        'layout "x" { : R }',
        'layout "x" { "tp": R }',
        'layout "x" { 0: R }',
    ],
    BadShardDim: [
        'layout "x" { tp: S() }',
        'layout "x" { tp: S(x) }',
        'layout "x" { tp: S(0 }',
        'layout "x" { tp: S(0, 1) }',
        'layout "x" { tp: S("0") }',
        'layout "x" { tp: S(',
        'layout "x" { tp: S(0',
    ],
    OutputWithoutOf: [
        'layout output "x" { tp: R }',
        'replicate output "x"',
        'layout output { tp: R }',
        'layout output',
    ],
    UnquotedPattern: [
        'layout x.weight { tp: R }',
        'layout output of x { tp: R }',
        'layout input idx { tp: R }',
        'layout value x { tp: R }',
        'replicate x.weight',
        'auto x.weight',
        'recompute transformer.h',
        'include other.plan',
        'layout "x", y { tp: R }',
        'recompute "x", y',
        'layout 0 { tp: R }',
        'layout output of 0 { tp: R }',
    ],
    MissingTarget: [
        'layout { tp: R }',
        'layout',
        'replicate',
        'auto',
        'recompute',
        'include',
        'layout output of { tp: R }',
        'layout output of',
        'layout input { tp: R }',
        'layout input',
        'layout value { tp: R }',
        'layout value',
        'replicate "x",',
        'recompute "x",',
        'layout "x", { tp: R }',
    ],
    BadMemory: [
        'memory',
        'memory GB',
        'memory "80GB"',
        'memory 80 GB GB',
        'memory = 80GB',
    ],
    BadZero: [
        'zero over dp',
        'zero',
        'zero 1 over',
        'zero 1 over "dp"',
        'zero dp',
        'zero 1 dp',
        'zero 1 over 2',
        'zero "1"',
    ],
    BadObjective: [
        'minimize',
        'minimize "time"',
        'minimize 1',
    ],
    BadDevice: [
        'device',
        'device 80',
        'device = h100',
        'device h100 sxm',
    ],
    BadCheckpoint: [
        'checkpoint',
        'checkpoint "ckpt/"',
        'checkpoint to ckpt',
        'checkpoint to',
        'checkpoint every',
        'checkpoint every steps to "c"',
        'checkpoint every 100 to "c"',
        'checkpoint every 100 steps',
        'checkpoint every 100 steps "c"',
        'checkpoint every "100" steps to "c"',
        'checkpoint to "c" keep',
        'checkpoint to "c" keep "3"',
        'checkpoint to "c" keep all',
        'checkpoint keep 3 to "c"',
        'checkpoint async to "c"',
        'checkpoint to "c" every 100 steps',
    ],
    BadResume: [
        'resume',
        'resume "ckpt/"',
        'resume from',
        'resume from ckpt',
        'resume to "c"',
    ],
    BadOverlap: [
        'overlap',
        'overlap 25MB',
        'overlap bucket',
        'overlap bucket MB',
        'overlap bucket "25MB"',
        'overlap bucket 25MB first',
        'overlap prefetch',
        'overlap prefetch -1',
        'overlap prefetch "2"',
        'overlap async_tp',
        'overlap async_tp 4',
        'overlap first 1MB',
        'overlap yes',
        'overlap = off',
    ],
    BadPipeline: [
        'pipeline',
        'pipeline 4',
        'pipeline microbatches',
        'pipeline microbatches "4"',
        'pipeline microbatches four',
        'pipeline microbatches 4 schedule 1f1b',
        'pipeline microbatches 4,',
        'pipeline schedule',
        'pipeline microbatches 4, schedule',
        'pipeline = 4',
    ],
    BadStage: [
        'stage',
        'stage 0',
        'stage "transformer.h.0"',
        'stage 0 transformer',
    ],
}


def classify_characters(char: str) -> tuple[type[PlanSyntaxError], str, str]:
    """(class, message, fix) for a character the lexer cannot start a token with."""
    if char == '"':
        return (UnterminatedString, "this string has no closing quote on its line",
                'close it on the same line: "transformer.h.*.mlp.c_fc.weight"')
    if char == "'":
        return (StrayCharacter, "single quotes are not strings here",
                'write module paths and patterns in double quotes: "transformer.h.*"')
    if char == ";":
        return (StrayCharacter, "';' is not needed",
                "statements need no separator; put each on its own line (and separate "
                "placements inside { } with commas)")
    shown = repr(char) if char.isprintable() else f"U+{ord(char):04X}"
    return (StrayCharacter, f"the character {shown} has no meaning in a plan file",
            "remove it; comments start with #, names and patterns go in double quotes")


FIXES: dict[type[PlanSyntaxError], str] = {
    UnknownStatement: "statements start with one of: " + ", ".join(KEYWORDS),
    ExtraText: "remove it, or start a new statement (mesh, layout, replicate, ...) on its own line",
    BadMeshAxis: "write each axis as name=size, separated by commas: mesh dp=2, tp=4",
    MissingComma: "separate the items with a comma: mesh dp=2, tp=4 / { tp: S(0), dp: R }",
    LayoutWithoutBraces: 'give one placement per axis in braces: layout "fc1.weight" { tp: S(0), dp: R }',
    UnclosedBrace: "close the placements with }: { tp: S(0), dp: R }",
    MissingColon: "write each placement as axis: placement, e.g. { tp: S(0) }",
    MissingPlacement: "name an axis, then one of R, S(<dim>), auto: { tp: S(0), dp: R }",
    BadShardDim: "a shard names one whole dim in parentheses: S(0), S(1), S(-1)",
    OutputWithoutOf: 'select a module\'s output with output of "module.path"',
    UnquotedPattern: 'put module paths, patterns and file names in double quotes: "transformer.h.*.mlp.c_fc.weight"',
    MissingTarget: 'name what the statement applies to, in double quotes: replicate "transformer.ln_f.*"',
    BadMemory: "give the per-device limit as an amount and a unit: memory 80GB",
    BadZero: "write the stage and the data-parallel axis: zero 1 over dp",
    BadObjective: "write minimize time or minimize memory",
    BadDevice: "name a device profile: device h100",
    BadCheckpoint: 'write checkpoint [every N steps] to "DIR" [keep K] [async], e.g. '
                   'checkpoint every 100 steps to "ckpt/" keep 3 async',
    BadResume: 'write resume from "DIR"',
    BadOverlap: "write overlap off, overlap bucket 25MB [first 1MB], overlap prefetch 2 or overlap async_tp on",
    BadPipeline: "write pipeline microbatches 4 (the batch of each step as 4 microbatches)",
    BadStage: 'write stage 0 "transformer.h.[0-5]" (a stage number, then quoted module patterns)',
    PlanSyntaxError: "compare with the examples in examples/plans/",
}

MESSAGES: dict[type[PlanSyntaxError], str] = {
    UnknownStatement: "'{token}' does not start a statement",
    ExtraText: "{token_desc} follows a complete statement",
    BadMeshAxis: "a mesh axis must be written name=size",
    MissingComma: "expected a comma before '{token}'",
    LayoutWithoutBraces: "a layout needs its placements in braces",
    UnclosedBrace: "the layout's '{{' is not closed before {token_desc}",
    MissingColon: "expected ':' between the axis and its placement",
    MissingPlacement: "expected an axis name and a placement word here",
    BadShardDim: "a shard needs one dim in parentheses",
    OutputWithoutOf: "expected 'of' after 'output'",
    UnquotedPattern: "expected a quoted module path or pattern, found {token_desc}",
    MissingTarget: "expected a quoted module path or pattern, found {token_desc}",
    BadMemory: "expected an amount like 80GB",
    BadZero: "expected zero <stage> over <axis>",
    BadObjective: "expected minimize time or minimize memory",
    BadDevice: "expected a device profile name",
    BadCheckpoint: 'expected checkpoint [every N steps] to "DIR" [keep K] [async]',
    BadResume: 'expected resume from "DIR"',
    BadOverlap: "expected off, on, bucket SIZE [first SIZE], prefetch N or async_tp on|off after overlap",
    BadPipeline: "expected pipeline microbatches N [, schedule NAME]",
    BadStage: 'expected stage N "pattern"',
    PlanSyntaxError: "unexpected {token_desc}",
}

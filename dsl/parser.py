"""Plan file text -> `PlanFile` (the syntax tree of `ast.py`), includes loaded.

    >>> plan = load_plan("examples/plans/megatron_gpt.plan")          # doctest: +SKIP
    >>> plan = parse_plan('mesh dp=2\\nreplicate "**"')                 # doctest: +SKIP

The grammar is `plan.lark` (LALR). A syntax error becomes the `PlanSyntaxError` subclass
whose catalogue example (`errors.SYNTAX_EXAMPLES`) fails in the same parser state, and is
shown with its line and a caret. `include "x.plan"` is read relative to the including
file; a file that includes itself (directly or not) is an `IncludeCycle`.
"""
from __future__ import annotations

import os
import re

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput

from autopar.dsl import ast
from autopar.dsl import errors as E

PARSER = Lark.open("plan.lark", rel_to=__file__, parser="lalr", propagate_positions=True,
                   maybe_placeholders=False)


def parse_plan(text: str, path: str = "<string>", *, base_dir: str | None = None,
               _stack: tuple[str, ...] = ()) -> ast.PlanFile:
    """Parse plan text; load its includes (relative to `path`'s folder, or `base_dir`)."""
    try:
        tree = PARSER.parse(text)
    except UnexpectedCharacters as e:
        raise character_error(e, text, path) from None
    except UnexpectedInput as e:
        raise token_error(e, text, path) from None
    statements = tuple(ToAst(text).transform(tree).children)
    plan = ast.PlanFile(path, text, statements)
    folder = base_dir if base_dir is not None else (
        os.path.dirname(path) if path != "<string>" else os.getcwd())
    return load_includes(plan, folder, _stack)


def load_plan(path: str, *, _stack: tuple[str, ...] = ()) -> ast.PlanFile:
    """Read and parse a plan file with its includes. `PlanNotFound` if it cannot be read."""
    text = read_text(path)
    if text is None and os.path.isfile(path):
        raise E.PlanNotText(f"'{path}' is not a plan file: it is not UTF-8 text "
                            f"({not_text_reason(path)})", file=path, line=1, column=1,
                            fix="give the .plan text file (or a plan JSON written by autopar plan -o); "
                                "`autopar plan SPEC --emit-plan out.plan` writes one to start from")
    if text is None:
        raise E.PlanNotFound(f"cannot read the plan file '{path}'", file=path, line=1, column=1,
                             fix=f"check the path (working folder: {os.getcwd()})")
    return parse_plan(text, path, _stack=_stack)


def not_text_reason(path: str) -> str:
    """Where a file stops being UTF-8: `byte 0x89 at offset 0`."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"byte 0x{data[e.start]:02x} at offset {e.start}"
    except OSError as e:
        return str(e)
    return "it could not be decoded"


def read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
        return data.decode("utf-8")
    except (OSError, ValueError):      # missing, a folder, NUL in the name, not UTF-8
        return None


def load_includes(plan: ast.PlanFile, folder: str, stack: tuple[str, ...]) -> ast.PlanFile:
    here = os.path.realpath(plan.path) if plan.path != "<string>" else "<string>"
    stack = stack + (here,)
    out = []
    for st in plan.statements:
        if isinstance(st, ast.Include):
            target = os.path.join(folder, st.path)
            try:
                real = os.path.realpath(target)
            except (OSError, ValueError):
                real = target
            err = dict(file=plan.path, line=st.line, column=st.path_column, text=plan.text)
            if real in stack:
                chain = " -> ".join(os.path.relpath(p) if p != "<string>" else p
                                    for p in stack[stack.index(real):] + (real,))
                raise E.IncludeCycle(f"including '{st.path}' here closes a cycle: {chain}",
                                     fix="remove this include or the one that leads back here; "
                                         "put what both files need in a third file they both include",
                                     **err)
            text = read_text(target)
            if text is None or os.path.isdir(target):
                listing = sorted(f for f in safe_listdir(os.path.dirname(target) or ".")
                                 if f.endswith(".plan"))
                hint = E.suggest(os.path.basename(st.path), listing)
                raise E.IncludeNotFound(
                    f"cannot read the included file '{st.path}' (looked for {target})",
                    fix=("include paths are relative to the including file's folder"
                         + (f"; plan files there: {', '.join(listing[:8])}" if listing else "")
                         + hint),
                    **err)
            sub = parse_plan(text, target, _stack=stack)
            st = ast.Include(path=st.path, path_column=st.path_column, plan=sub,
                             line=st.line, column=st.column, written=st.written)
        out.append(st)
    return ast.PlanFile(plan.path, plan.text, tuple(out))


def safe_listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except (OSError, ValueError):
        return []


# ---- tree -> dataclasses ----------------------------------------------------------------------

def unquote(tok: Token) -> str:
    return str(tok)[1:-1]


@v_args(meta=True)
class ToAst(Transformer):
    """Builds `ast` nodes; each keeps the line/column of its first token."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def written(self, meta) -> str:
        return collapse(self.text[meta.start_pos:meta.end_pos])

    def mesh(self, meta, axes):
        return ast.Mesh(axes=tuple(axes), line=meta.line, column=meta.column, written=self.written(meta))

    def mesh_axis(self, meta, ch):
        name, size = ch
        return ast.MeshAxis(name=str(name), size=str(size), line=name.line, column=name.column)

    def device(self, meta, ch):
        (tok,) = ch
        name = unquote(tok) if tok.type == "STRING" else str(tok)
        return ast.Device(name=name, name_column=tok.column, line=meta.line, column=meta.column,
                          written=self.written(meta))

    def memory(self, meta, ch):
        ch = ch[1:]                                  # the MEMORY keyword
        amount, unit = ch[0], (ch[1] if len(ch) > 1 else None)
        return ast.Memory(amount=str(amount), unit=str(unit) if unit is not None else None,
                          unit_line=unit.line if unit is not None else amount.line,
                          unit_column=unit.column if unit is not None else amount.end_column,
                          line=meta.line, column=meta.column, written=self.written(meta))

    def zero(self, meta, ch):
        stage, axis = ch[0], (ch[1] if len(ch) > 1 else None)
        return ast.Zero(stage=str(stage), stage_column=stage.column,
                        axis=str(axis) if axis is not None else None,
                        axis_line=axis.line if axis is not None else 0,
                        axis_column=axis.column if axis is not None else 0,
                        line=meta.line, column=meta.column, written=self.written(meta))

    def objective(self, meta, ch):
        (goal,) = ch
        return ast.Objective(goal=str(goal), goal_column=goal.column, line=meta.line,
                             column=meta.column, written=self.written(meta))

    def layout(self, meta, ch):
        targets, placements = ch[0], tuple(ch[1:])
        return ast.Layout(targets=targets, placements=placements, line=meta.line, column=meta.column,
                          close_line=meta.end_line, close_column=meta.end_column - 1,
                          written=self.written(meta))

    def replicate(self, meta, ch):
        return ast.Replicate(targets=ch[0], line=meta.line, column=meta.column, written=self.written(meta))

    def auto(self, meta, ch):
        return ast.Auto(targets=ch[-1], line=meta.line, column=meta.column, written=self.written(meta))

    def targets(self, meta, ch):
        return tuple(ch)

    def _target(kind):
        def build(self, meta, ch):
            (tok,) = ch
            return ast.Target(kind=kind, pattern=unquote(tok), line=tok.line, column=tok.column)
        return build

    param_target = _target("param")
    output_target = _target("output")
    input_target = _target("input")
    value_target = _target("value")
    del _target

    def axis_placement(self, meta, ch):
        name, placement = ch
        return ast.AxisPlacement(axis=str(name), placement=placement, line=name.line, column=name.column)

    def placement(self, meta, ch):
        word, arg = ch[0], (ch[1] if len(ch) > 1 else None)
        return ast.Placement(word=str(word), arg=str(arg) if arg is not None else None,
                             line=word.line, column=word.column)

    def recompute(self, meta, ch):
        pats = tuple(ast.Pattern(text=unquote(t), line=t.line, column=t.column) for t in ch)
        return ast.Recompute(patterns=pats, line=meta.line, column=meta.column, written=self.written(meta))

    def include(self, meta, ch):
        (tok,) = ch
        return ast.Include(path=unquote(tok), path_column=tok.column, line=meta.line,
                           column=meta.column, written=self.written(meta))


    def checkpoint(self, meta, ch):
        every = next((c for c in ch if isinstance(c, tuple) and c[0] == "every"), None)
        keep = next((c for c in ch if isinstance(c, tuple) and c[0] == "keep"), None)
        (to,) = [c for c in ch if isinstance(c, Token) and c.type == "STRING"]
        return ast.Checkpoint(directory=unquote(to), directory_column=to.column,
                              every=str(every[1]) if every else None,
                              every_column=every[1].column if every else 0,
                              keep=str(keep[1]) if keep else None,
                              keep_column=keep[1].column if keep else 0,
                              async_=any(isinstance(c, Token) and c.type == "ASYNC" for c in ch),
                              line=meta.line, column=meta.column, written=self.written(meta))

    def every(self, meta, ch):
        return ("every", ch[1])

    def keep(self, meta, ch):
        return ("keep", ch[1])

    def resume(self, meta, ch):
        tok = ch[-1]
        return ast.Resume(directory=unquote(tok), directory_column=tok.column, line=meta.line,
                          column=meta.column, written=self.written(meta))

    def overlap(self, meta, ch):
        items = tuple(i for group in ch for i in group)
        return ast.Overlap(items=items, line=meta.line, column=meta.column, written=self.written(meta))

    def overlap_off(self, meta, ch):
        (tok,) = ch
        return [ast.OverlapItem(key="enabled", amount="off", line=tok.line, column=tok.column,
                                amount_column=tok.column)]

    def overlap_on(self, meta, ch):
        (tok,) = ch
        return [ast.OverlapItem(key="enabled", amount="on", line=tok.line, column=tok.column,
                                amount_column=tok.column)]

    def overlap_bucket(self, meta, ch):
        out, key, i = [], "bucket_bytes", 0
        while i < len(ch):
            word, amount = ch[i], ch[i + 1]
            unit = ch[i + 2] if i + 2 < len(ch) and ch[i + 2].type == "NAME" else None
            out.append(ast.OverlapItem(
                key=key, amount=str(amount), unit=str(unit) if unit is not None else None,
                unit_line=unit.line if unit is not None else amount.line,
                unit_column=unit.column if unit is not None else amount.end_column,
                amount_column=amount.column, line=word.line, column=word.column))
            i += 3 if unit is not None else 2
            key = "first_bucket_bytes"
        return out

    def overlap_prefetch(self, meta, ch):
        word, amount = ch
        return [ast.OverlapItem(key="prefetch", amount=str(amount), amount_column=amount.column,
                                line=word.line, column=word.column)]

    def overlap_async_tp(self, meta, ch):
        word, amount = ch
        return [ast.OverlapItem(key="async_tp", amount=str(amount), amount_column=amount.column,
                                line=word.line, column=word.column)]

    def pipeline(self, meta, ch):
        items = dict(i for i in ch)
        mb, sched = items.get("microbatches"), items.get("schedule")
        return ast.Pipeline(microbatches=str(mb) if mb is not None else None,
                            microbatches_column=mb.column if mb is not None else 0,
                            schedule=" ".join(str(t) for t in sched[1:]) if sched else None,
                            schedule_column=sched[0].column if sched else 0,
                            line=meta.line, column=meta.column, written=self.written(meta))

    def pipeline_microbatches(self, meta, ch):
        return ("microbatches", ch[1])

    def pipeline_schedule(self, meta, ch):
        return ("schedule", ch)

    def stage(self, meta, ch):
        pats = tuple(ast.Pattern(text=unquote(t), line=t.line, column=t.column) for t in ch[1:])
        return ast.Stage(index=str(ch[0]), index_column=ch[0].column, patterns=pats,
                         line=meta.line, column=meta.column, written=self.written(meta))


COMMENT = re.compile(r'("[^"\n]*")|#[^\n]*')


def collapse(text: str) -> str:
    """Drop comments (not inside strings) and collapse whitespace."""
    text = COMMENT.sub(lambda m: m.group(1) or "", text)
    return " ".join(text.split())


# ---- syntax errors -------------------------------------------------------------------------------

def character_error(e: UnexpectedCharacters, text: str, path: str) -> E.PlanSyntaxError:
    char = text[e.pos_in_stream] if 0 <= e.pos_in_stream < len(text) else ""
    cls, message, fix = E.classify_characters(char)
    return cls(message, file=path, line=e.line, column=e.column, text=text, fix=fix)


def state_id(e: UnexpectedInput):
    """The LALR state of an error: lark gives an int from the parser and a `ParserState`
    from the contextual lexer (a token valid elsewhere in the grammar)."""
    state = getattr(e, "state", None)
    return getattr(state, "position", state)


_catalogue: list[tuple[type, object, str, str]] | None = None


def catalogue_index() -> list[tuple[type, object, str, str]]:
    """(class, state, token type, token text) of every catalogue example, computed once."""
    global _catalogue
    if _catalogue is None:
        rows = []
        for cls, examples in E.SYNTAX_EXAMPLES.items():
            for example in examples:
                try:
                    PARSER.parse(example)
                except UnexpectedInput as ut:
                    tok = getattr(ut, "token", None)
                    rows.append((cls, state_id(ut), getattr(tok, "type", "$CHAR"), str(tok or "")))
                else:
                    raise AssertionError(f"catalogue example parses: {example!r}")
        _catalogue = rows
    return _catalogue


def match_example(e: UnexpectedInput):
    """The catalogue class whose example fails in the same parser state: the one with the
    same token if any, else the same token type, else the first in that state. This is
    `UnexpectedInput.match_examples` (token_type_match_fallback=True) without comparing
    `accepts` (the contextual lexer reports a smaller set than the parser for the same
    state) and without its debug logging, which fails on lark 1.3.1 for lexer-raised errors
    (`%d` applied to a ParserState)."""
    state = state_id(e)
    tok = getattr(e, "token", None)
    ttype, text = getattr(tok, "type", "$CHAR"), str(tok or "")
    by_type = first = None
    for cls, st, et, ev in catalogue_index():
        if st != state:
            continue
        if et == ttype and ev == text:
            return cls
        if et == ttype and by_type is None:
            by_type = cls
        if first is None:
            first = cls
    return by_type or first


def token_error(e: UnexpectedInput, text: str, path: str) -> E.PlanSyntaxError:
    tok = getattr(e, "token", None)
    at_end = tok is None or tok.type == "$END"
    if at_end:
        line, column = end_position(text)
        token_desc = "the end of the file"
        word = ""
    else:
        line, column = tok.line, tok.column
        word = str(tok)
        token_desc = f"'{word}'"
    cls = None
    accepts = getattr(e, "accepts", None) or getattr(e, "expected", None) or set()
    # Where a statement may start: something at the start of a line is a misspelt statement
    # (or a comment without its #) -- unless it reads `name=` (a mesh axis after a missing
    # comma); something later on the line is text after a complete statement, unless the
    # catalogue knows better (`zero 1 dp`).
    boundary = not at_end and "LAYOUT" in accepts
    if boundary and not text[:tok.start_pos].rsplit("\n", 1)[-1].strip():
        after = text[tok.end_pos:].lstrip(" \t")
        named_axis = tok.type == "NAME" and after.startswith("=") and "COMMA" in accepts
        cls = E.MissingComma if named_axis else E.UnknownStatement
    if cls is None:
        cls = match_example(e)
    if cls is E.LayoutWithoutBraces and current_statement(text, tok.start_pos) != "layout":
        cls = E.ExtraText                  # `replicate "x" foo`: the states are shared
    if cls is None and boundary:
        cls = E.ExtraText
    cls = cls or E.PlanSyntaxError
    message = E.MESSAGES[cls].format(token=word, token_desc=token_desc)
    fix = E.FIXES[cls]
    if cls is E.UnknownStatement:
        fix += E.suggest(word, E.KEYWORDS) or "; comments start with #"
    elif cls is E.PlanSyntaxError and accepts:
        fix = "expected " + ", ".join(sorted(describe_terminal(t) for t in accepts))
    return cls(message, file=path, line=line, column=column, text=text, fix=fix)


STATEMENT_WORD = re.compile(r'"[^"\n]*"|#[^\n]*|\b(' + "|".join(E.KEYWORDS) + r')\b')


def current_statement(text: str, pos: int) -> str | None:
    """The statement word last seen before `pos` (outside strings and comments)."""
    word = None
    for m in STATEMENT_WORD.finditer(text, 0, pos):
        if m.group(1):
            word = m.group(1)
    return word


def end_position(text: str) -> tuple[int, int]:
    """Line and column just after the last token (comments and blank lines skipped)."""
    lines = text.split("\n")
    for i in range(len(lines) - 1, -1, -1):
        code = collapse_line(lines[i])
        if code.strip():
            return i + 1, len(code.rstrip()) + 1
    return 1, 1


def collapse_line(line: str) -> str:
    return COMMENT.sub(lambda m: m.group(1) or "", line)


def describe_terminal(name: str) -> str:
    try:
        term = PARSER.get_terminal(name)
        pattern = term.pattern
        if pattern.type == "str":
            return f"'{pattern.value}'"
        word = re.fullmatch(r"([a-z]+)\??\\b", pattern.value)      # a whole-word keyword: /steps?\b/
        if word:
            return f"'{word.group(1)}'"
    except KeyError:
        pass
    return {"NAME": "a name", "NUMBER": "a number", "SIGNED_NUMBER": "a number",
            "STRING": 'a quoted "pattern"', "$END": "the end of the file"}.get(name, name)

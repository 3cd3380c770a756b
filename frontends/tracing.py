"""Front ends: trace a model with torch.export (default) or torch.fx and lower it.

    >>> graph = trace(model, (idx, targets))                 # doctest: +SKIP
    >>> graph = trace(model, (x, y), mode="fx")               # doctest: +SKIP

Models built on the `meta` device trace without allocating weights, which is how plans
for models larger than this machine are made.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import time
import traceback
import warnings

import torch
import torch.nn as nn

from autopar.compiler.errors import UserError
from autopar.compiler.interpret import loss_of
from autopar.compiler.ir import Graph
from autopar.frontends import cache
from autopar.frontends.lower import LoweringError, lower_export, lower_fx


class TraceError(UserError):
    """The model could not be traced; the message names the cause and a fix."""


def trace(model: nn.Module, example_inputs: tuple, mode: str = "export",
          name: str | None = None, symbolic: bool = False) -> Graph:
    """Trace `model(*example_inputs)` and lower it to an autopar Graph.

    `symbolic=True` (export only) keeps the inputs' sizes symbolic where the model allows
    (`torch.export.Dim.AUTO` on every dim), so sizes that come from the batch are recorded
    as `SymInt` expressions and the generated program reads them from its input; where the
    model pins a size (or the symbolic trace fails) it stays the example's, with a note."""
    from autopar.compiler.interpret import IRModule
    if isinstance(model, IRModule):
        return model.graph.copy(name=name or model.graph.name)
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, tuple):
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,)
    name = name or type(model).__name__.lower()
    t0 = time.perf_counter()

    def traced() -> Graph:
        graph = _trace(model, example_inputs, mode, name, symbolic)
        graph.trace_seconds = time.perf_counter() - t0   # type: ignore[attr-defined]
        return graph
    if not (cache.enabled() and mode in ("export", "fx")):
        return traced()
    key = cache.key_of(model, example_inputs, mode, name, symbolic)
    graph = _cached(key, t0)
    if graph is not None:
        return graph
    # one process traces a key at a time: the ranks of a job compiling the same model wait
    # for the first one's graph instead of all tracing it on the cores they share
    with cache.tracing(key) as waited:
        graph = _cached(key, t0) if waited else None
        if graph is None:
            graph = traced()
            cache.store(key, graph, opaque_ops(graph))
    return graph


def _cached(key: str, t0: float) -> Graph | None:
    hit = cache.load(key)
    if hit is None:
        return None
    graph, warned = hit
    cache.replay(warned)
    graph.trace_seconds = time.perf_counter() - t0   # type: ignore[attr-defined]
    graph.trace_cached = True                        # type: ignore[attr-defined]
    return graph


def opaque_ops(graph: Graph) -> list[tuple[str, str]]:
    """(op, where) of the first node of each op without a sharding rule: the warnings a
    trace of this graph issues (`ops.warn_opaque`), replayed when it comes from the cache."""
    from autopar.compiler.ops import REGISTRY
    seen, out = set(), []
    for n in graph.nodes:
        d = REGISTRY.get(n.op)
        if d is not None and not d.has_rule and n.op not in seen:
            seen.add(n.op)
            out.append((n.op, f"from {n.meta.module or 'the root module'}"))
    return out


def _trace(model: nn.Module, example_inputs: tuple, mode: str, name: str, symbolic: bool) -> Graph:
    if mode == "export":
        captured = io.StringIO()
        seen = OutputsSeen()
        ep, note = None, None
        try:
            with quiet_torch(captured), loss_only(model, seen), refuse_custom_functions(seen), \
                    experts_as_one_op(model):
                if symbolic:
                    ep, note = export_symbolic(model, example_inputs)
                if ep is None:
                    ep = torch.export.export(model, example_inputs)
        except Exception as e:  # torch raises many kinds; the user needs the cause and line
            if seen.error is not None:
                raise seen.error from None
            at = user_location(str(e) + "\n" + captured.getvalue()) or user_frame(e)
            if data_dependent(e):
                fix = ("Rewrite that line without data-dependent Python control flow (or try "
                       "trace='fx' for simple modules).")
            else:
                fix = ("The model's own code fails there on the example inputs (calling it "
                       "without autopar fails the same way): fix that line or the inputs.")
            raise TraceError(f"torch.export could not trace {type(model).__name__}"
                             f"{' at ' + at if at else ''}: {first_line(e).rstrip('.')}. {fix}") from e
        if seen.error is not None:
            raise seen.error
        graph = lower_export(ep, model, name)
        if note:
            graph.notes.append(note)
        if seen.note:
            graph.notes.append(seen.note)
    elif mode == "fx":
        seen = OutputsSeen()
        try:
            with refuse_custom_functions(seen):
                gm = torch.fx.symbolic_trace(model)
        except Exception as e:
            if seen.error is not None:
                raise seen.error from None
            raise TraceError(f"torch.fx.symbolic_trace could not trace {type(model).__name__}: "
                             f"{first_line(e)}. Shape-dependent Python (x.size() in "
                             "asserts, slicing with traced sizes) needs trace='export'.") from e
        graph = lower_fx(gm, model, example_inputs, name)
    else:
        raise TraceError(f"unknown trace mode '{mode}': use 'export' or 'fx'")
    return graph


def hf_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """A Hugging Face experts module (`use_experts_implementation`: gate and up stacked in
    `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I], SiLU) as one `moe_experts` op."""
    from autopar.compiler.moe import moe_experts
    half = self.gate_up_proj.shape[1] // 2
    gate, up = self.gate_up_proj[:, :half], self.gate_up_proj[:, half:]
    return moe_experts(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype),
                       gate, up, self.down_proj)


def one_op_experts(module: nn.Module) -> bool:
    """Whether `module` is a Hugging Face experts layer `hf_experts_forward` computes
    exactly: concatenated gate/up, not transposed, no biases, no norm after, SiLU."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor)
            and gu.dim() == 3 and down.dim() == 3):
        return False
    act = getattr(module, "act_fn", None)
    silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    layout = (getattr(module, "has_gate", False) and getattr(module, "is_concatenated", False)
              and not getattr(module, "is_transposed", True) and not getattr(module, "has_bias", True)
              and not getattr(module, "has_post_expert_norm", True))
    return silu and layout and gu.shape[1] == 2 * down.shape[2] and gu.shape[2] == down.shape[1]


@contextlib.contextmanager
def experts_as_one_op(model: nn.Module):
    """While tracing, Hugging Face experts layers run as one `moe_experts` op
    (compiler/moe.py), so the search can split them by tokens, by their intermediate or by
    expert (with all_to_all dispatch); their sort-by-expert would otherwise gather every
    token on every rank. The model itself is left as it was."""
    patched = [m for m in model.modules() if one_op_experts(m)]
    for m in patched:
        m.forward = functools.partial(hf_experts_forward, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


class OutputsSeen:
    """What tracing learnt about the model's forward: a note on the outputs dropped, or the
    user error to raise once torch.export has unwound."""

    def __init__(self):
        self.note = ""
        self.error: UserError | None = None


@contextlib.contextmanager
def loss_only(model: nn.Module, seen: OutputsSeen):
    """Export the model's loss alone: (loss, logits), {"loss": ...} and Hugging Face
    `ModelOutput`s (whose `past_key_values` cache torch.export cannot even return) are cut
    down to the loss inside forward, so the other outputs never reach the IR and the state
    dict keeps its names (the model itself is traced, not a wrapper)."""
    original = model.forward
    had_own = "forward" in model.__dict__

    @functools.wraps(original)
    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        try:
            loss, seen.note = loss_of(out)
        except UserError as e:
            seen.error = e
            raise
        return loss

    model.forward = forward
    try:
        yield
    finally:
        if had_own:
            model.forward = original
        else:
            del model.forward


class CustomFunctionError(TraceError):
    """The model calls a user-defined torch.autograd.Function (see `refuse_custom_functions`)."""


@contextlib.contextmanager
def refuse_custom_functions(seen: OutputsSeen):
    """Refuse a user-defined `torch.autograd.Function` at trace time.

    torch.export (non-strict, torch 2.13) runs a Function's forward and records the ATen ops
    it calls, nothing of its backward: a straight-through estimator (sign forward, identity
    backward) would become `sign`, whose gradient is zero, and training would be silently
    wrong. Until the IR has an opaque node that calls the Function both ways, the call is
    refused with the class and the line that applies it. Functions defined inside torch
    itself (checkpointing and the like) trace to their real ATen graph and pass."""
    base = torch.autograd.Function
    original = base.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        module = getattr(cls, "__module__", "") or ""
        if not (module == "torch" or module.startswith("torch.")):
            if seen.error is None:
                seen.error = CustomFunctionError(
                    f"{caller_line()}{cls.__qualname__}.apply: {cls.__qualname__} is a custom "
                    "torch.autograd.Function; torch.export records its forward only, so its "
                    "own backward would be lost and training silently wrong. Write it with "
                    "differentiable torch ops (a straight-through sign is "
                    "`x + (torch.sign(x) - x).detach()`), or train that part outside autopar.")
            raise seen.error
        return original.__func__(cls, *args, **kwargs)

    base.apply = classmethod(apply)
    try:
        yield
    finally:
        base.apply = original


def caller_line() -> str:
    """`file.py:12: ` of the innermost frame outside torch and autopar, or ''."""
    import traceback
    for frame in reversed(traceback.extract_stack()[:-2]):
        f = frame.filename
        if "site-packages" in f or "/torch/" in f or f.endswith("frontends/tracing.py") \
                or f.startswith("<"):
            continue
        return f"{f}:{frame.lineno}: "
    return ""


def export_symbolic(model: nn.Module, example_inputs: tuple):
    """torch.export with every dim of every tensor input symbolic where the model allows
    (Dim.AUTO specialises the rest); (None, note) when that trace fails."""
    from torch.export import Dim
    shapes = tuple({d: Dim.AUTO for d in range(t.dim())} if isinstance(t, torch.Tensor) and t.dim() else None
                   for t in example_inputs)
    try:
        return torch.export.export(model, example_inputs, dynamic_shapes=shapes), None
    except Exception as e:     # the static trace that follows words a real failure
        return None, (f"sizes are the example batch's: tracing with symbolic sizes failed "
                      f"({first_line(e)})")


@contextlib.contextmanager
def quiet_torch(sink: io.StringIO):
    """torch.export prints graphs, warnings and error logs while it fails; keep them for
    the error (torch's log handlers hold the real stderr, so they are swapped out too)."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    into_sink = logging.StreamHandler(sink)
    swapped = [lg for name, lg in logging.root.manager.loggerDict.items()
               if isinstance(lg, logging.Logger) and lg.handlers and (name == "torch" or name.startswith("torch."))]
    saved = [lg.handlers for lg in swapped]
    for lg in swapped:
        lg.handlers = [into_sink]
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
                contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)
        for lg, handlers in zip(swapped, saved):
            lg.handlers = handlers


_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, contextlib))
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN_DIRS = tuple(os.path.join(_ROOT, stage) + os.sep for stage in ("autopar", "frontends", "compiler", "passes", "backends"))


def user_frame(e: BaseException) -> str:
    """`file.py:12 (code)`: the innermost frame of the traceback in the user's own files
    (not torch's, the standard library's or autopar's), or ""."""
    for fr in reversed(traceback.extract_tb(e.__traceback__)):
        path = os.path.abspath(fr.filename)
        if fr.filename.startswith("<") or "site-packages" in path or path.startswith(_LIBRARY_DIRS + _OWN_DIRS):
            continue
        return f"{fr.filename}:{fr.lineno}" + (f" ({fr.line.strip()})" if fr.line else "")
    return ""


def data_dependent(e: BaseException) -> bool:
    """Whether torch.export failed on Python control flow over tensor values."""
    text = f"{type(e).__name__} {e}".lower()
    return any(k in text for k in ("datadependent", "data-dependent", "data dependent",
                                   "dynamic control flow"))


def user_location(text: str) -> str:
    """`file.py:12 (if x.sum() > 0:)` from torch's `# File: ...:12 in forward, code: ...`."""
    for m in re.finditer(r"File: ([^\s:]+):(\d+) in \w+, code: (.*)", text):
        if "site-packages" not in m.group(1):
            return f"{m.group(1)}:{m.group(2)} ({m.group(3).strip()})"
    return ""


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


__all__ = ["trace", "TraceError", "CustomFunctionError", "LoweringError"]

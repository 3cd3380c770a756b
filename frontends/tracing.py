"""Front ends: trace a model with torch.export (default) or torch.fx and lower it.

    >>> graph = trace(model, (idx, targets))                 # doctest: +SKIP
    >>> graph = trace(model, (x, y), mode="fx")               # doctest: +SKIP

Models built on the `meta` device trace without allocating weights, which is how plans
for models larger than this machine are made.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import time
import warnings

import torch
import torch.nn as nn

from autopar.compiler.errors import UserError
from autopar.compiler.ir import Graph
from autopar.frontends.lower import LoweringError, lower_export, lower_fx


class TraceError(UserError):
    """The model could not be traced; the message names the cause and a fix."""


def trace(model: nn.Module, example_inputs: tuple, mode: str = "export",
          name: str | None = None) -> Graph:
    """Trace `model(*example_inputs)` and lower it to an autopar Graph. An `IRModule`
    (a graph from the ONNX front end) is not traced: its graph is returned (a copy)."""
    from autopar.compiler.interpret import IRModule
    if isinstance(model, IRModule):
        return model.graph.copy(name=name or model.graph.name)
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, tuple):
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,)
    name = name or type(model).__name__.lower()
    t0 = time.perf_counter()
    if mode == "export":
        captured = io.StringIO()
        try:
            with quiet_torch(captured):
                ep = torch.export.export(model, example_inputs)
        except Exception as e:  # torch raises many kinds; the user needs the cause and line
            at = user_location(str(e) + "\n" + captured.getvalue())
            raise TraceError(f"torch.export could not trace {type(model).__name__}"
                             f"{' at ' + at if at else ''}: {first_line(e)}. Rewrite that "
                             "line without data-dependent Python control flow (or try "
                             "trace='fx' for simple modules).") from e
        graph = lower_export(ep, model, name)
    elif mode == "fx":
        try:
            gm = torch.fx.symbolic_trace(model)
        except Exception as e:
            raise TraceError(f"torch.fx.symbolic_trace could not trace {type(model).__name__}: "
                             f"{first_line(e)}. Shape-dependent Python (x.size() in "
                             "asserts, slicing with traced sizes) needs trace='export'.") from e
        graph = lower_fx(gm, model, example_inputs, name)
    else:
        raise TraceError(f"unknown trace mode '{mode}': use 'export' or 'fx'")
    graph.trace_seconds = time.perf_counter() - t0   # type: ignore[attr-defined]
    return graph


@contextlib.contextmanager
def quiet_torch(sink: io.StringIO):
    """torch.export prints graphs and warnings while it fails; keep them for the error."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
                contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def user_location(text: str) -> str:
    """`file.py:12 (if x.sum() > 0:)` from torch's `# File: ...:12 in forward, code: ...`."""
    for m in re.finditer(r"File: ([^\s:]+):(\d+) in \w+, code: (.*)", text):
        if "site-packages" not in m.group(1):
            return f"{m.group(1)}:{m.group(2)} ({m.group(3).strip()})"
    return ""


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


__all__ = ["trace", "TraceError", "LoweringError"]

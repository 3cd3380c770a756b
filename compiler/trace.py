"""Front ends: trace a model with torch.export (default) or torch.fx and lower it.

    >>> graph = trace(model, (idx, targets))                 # doctest: +SKIP
    >>> graph = trace(model, (x, y), mode="fx")               # doctest: +SKIP

Models built on the `meta` device trace without allocating weights, which is how plans
for models larger than this machine are made.
"""
from __future__ import annotations

import time
import warnings

import torch
import torch.nn as nn

from autopar.compiler.ir import Graph
from autopar.passes.lower import LoweringError, lower_export, lower_fx


class TraceError(Exception):
    """The model could not be traced; the message names the cause and a fix."""


def trace(model: nn.Module, example_inputs: tuple, mode: str = "export",
          name: str | None = None) -> Graph:
    """Trace `model(*example_inputs)` and lower it to an autopar Graph."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, tuple):
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,)
    name = name or type(model).__name__.lower()
    t0 = time.perf_counter()
    if mode == "export":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=FutureWarning)
                ep = torch.export.export(model, example_inputs)
        except Exception as e:  # torch raises many kinds; the user needs the first line
            raise TraceError(f"torch.export could not trace {type(model).__name__}: "
                             f"{first_line(e)}. Fix the model code at the line torch names "
                             "above, or try trace='fx' for simple modules.") from e
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


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


__all__ = ["trace", "TraceError", "LoweringError"]

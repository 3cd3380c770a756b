"""SPEC loading: `path/to/file.py:function`, where the function returns
`(model, example_inputs)`. Every failure is a `SpecError` with one paragraph naming the
cause and the fix.

    >>> model, inputs, name = load_spec("examples/gpt.py:build")   # doctest: +SKIP
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import traceback

import torch.nn as nn

from autopar.compiler.errors import UserError


class SpecError(UserError):
    """The SPEC cannot be loaded: the message names the file, line and fix."""


def load_spec(spec: str, batch: int | None = None, inputs: str | None = None):
    """Import the file, call the function (with `batch=N` when `batch` is given: the
    function must take it), check its result. Returns (model, inputs, name).
    An `.onnx` SPEC is read by the ONNX front end, its example inputs from the `.npz`
    file `inputs` (arrays by graph input name) or made from the input types."""
    if batch is not None and batch < 1:
        raise SpecError(f"--batch {batch}: give a positive batch size")
    if spec.lower().endswith(".onnx"):
        if batch is not None:
            raise SpecError(f"--batch {batch}: an ONNX graph has fixed shapes; give example inputs "
                            "of the batch you want with --inputs FILE.npz instead")
        from autopar.frontends.onnx import load_onnx
        return load_onnx(spec, inputs)
    if inputs is not None:
        raise SpecError(f"--inputs {inputs}: example inputs from a file are for .onnx SPECs; "
                        f"{spec} returns its own (model, example_inputs)")
    if ":" not in spec:
        raise SpecError(f"SPEC '{spec}' must be path/to/file.py:function, e.g. "
                        "examples/gpt.py:build (the function returns (model, example_inputs))")
    path, func = spec.rsplit(":", 1)
    if not os.path.isfile(path):
        raise SpecError(f"SPEC '{spec}': no file '{path}' (from {os.getcwd()}). Check the path.")
    name = os.path.splitext(os.path.basename(path))[0]
    mod_name = f"autopar_spec_{name}"
    try:
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        loader_spec.loader.exec_module(module)
    except Exception as e:
        raise SpecError(f"SPEC '{spec}': importing {path} failed: {where(e, path)}"
                        f"{type(e).__name__}: {e}. Fix the file so `python {path}` imports.") from e
    fn = getattr(module, func, None)
    if fn is None or not callable(fn):
        names = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")
                 and getattr(getattr(module, n), "__module__", None) == mod_name]
        raise SpecError(f"SPEC '{spec}': {path} has no function '{func}'. "
                        f"Functions defined there: {', '.join(sorted(names)) or 'none'}.")
    kwargs = {}
    if batch is not None:
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        if "batch" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            raise SpecError(f"--batch {batch}: {path}:{func}() takes no 'batch' argument "
                            f"(its parameters: {', '.join(params) or 'none'}). Add `batch: int = ...` to "
                            "it, or leave --batch out to use the example inputs as they are.")
        kwargs["batch"] = batch
    call = f"{func}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    try:
        result = fn(**kwargs)
    except Exception as e:
        raise SpecError(f"SPEC '{spec}': calling {call} failed: {where(e, path)}"
                        f"{type(e).__name__}: {e}") from e
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise SpecError(f"SPEC '{spec}': {func}() must return (model, example_inputs) with model an "
                        f"nn.Module; it returned {describe(result)}.")
    model, inputs = result
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    return model, tuple(inputs), name


def where(e: BaseException, path: str) -> str:
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if os.path.abspath(f.filename) == os.path.abspath(path)]
    return f"{path}:{frames[-1].lineno}: " if frames else ""


def describe(x) -> str:
    if isinstance(x, tuple):
        return "a tuple of " + ", ".join(type(v).__name__ for v in x)
    return f"a {type(x).__name__}"


class WeightsError(UserError):
    """A `--weights` file that does not fit the model: the message names the file and tensor."""


def load_weights(model: nn.Module, path: str) -> list[str]:
    """Copy a single-device state dict from a safetensors file (a Hugging Face
    `model.safetensors`, or what `autopar checkpoint consolidate` writes) into `model`, in
    place, under the model's own state-dict names. Every tensor of the model must be there
    with its shape, and nothing else; a tied name (`lm_head.weight` sharing the embedding)
    may be left out. Floating tensors are cast to the model's dtype. Returns notes to print.

        >>> notes = load_weights(model, "model.safetensors")      # doctest: +SKIP
    """
    import torch
    from autopar.backends.runtime.checkpoint import CheckpointError, load_file
    try:
        given = load_file(path)
    except CheckpointError as e:
        raise WeightsError(f"--weights {e}") from None
    own = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, t in own.items():
        if id(t) in first:
            tied[name] = first[id(t)]
        else:
            first[id(t)] = name
    missing = [n for n in own if n not in given and not (n in tied and tied[n] in given)
               and not any(tied.get(m) == n and m in given for m in tied)]
    extra = [n for n in given if n not in own]
    fix = ("give the single-device state dict of this model under its own names "
           "(`model.state_dict()` saved with safetensors, or `autopar checkpoint consolidate DIR -o FILE`)")
    if missing:
        close = ""
        if extra:
            import difflib
            guess = difflib.get_close_matches(missing[0], extra, n=1, cutoff=0.6)
            close = f" (the file has {guess[0]!r}: saved under other names?)" if guess else ""
        raise WeightsError(f"--weights {path}: tensor {missing[0]!r} of {type(model).__name__} is not in the "
                           f"file{f' ({len(missing) - 1} more missing)' if len(missing) > 1 else ''}{close}; {fix}")
    if extra:
        raise WeightsError(f"--weights {path}: tensor {extra[0]!r} is not in {type(model).__name__}"
                           f"{f' ({len(extra) - 1} more like it)' if len(extra) > 1 else ''}; it holds "
                           f"{len(own)} tensors, e.g. {list(own)[:2]}; {fix}")
    notes = []
    with torch.no_grad():
        for name, t in own.items():
            src = given.get(name)
            if src is None:
                src = given.get(tied.get(name, ""))
            if src is None:                    # the tied name is in the file, this one is not
                continue
            if tuple(src.shape) != tuple(t.shape):
                raise WeightsError(f"--weights {path}: tensor {name!r} has shape {tuple(src.shape)} in the "
                                   f"file but {tuple(t.shape)} in {type(model).__name__}; the file is of a "
                                   "model of another size or configuration")
            if src.dtype != t.dtype:
                if not (src.is_floating_point() and t.is_floating_point()):
                    raise WeightsError(f"--weights {path}: tensor {name!r} is {src.dtype} in the file but "
                                       f"{t.dtype} in the model")
                if not notes:
                    notes.append(f"note: --weights {path}: {src.dtype} tensors cast to the model's {t.dtype}")
            t.copy_(src.to(t.dtype))
    for name, target in tied.items():
        if name in given and target in given and not torch.equal(given[name], given[target]):
            raise WeightsError(f"--weights {path}: {name!r} and {target!r} are one tied tensor in "
                               f"{type(model).__name__} but differ in the file")
    return notes

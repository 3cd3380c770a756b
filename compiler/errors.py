"""The one base class of "bad input" errors.

Every stage derives the errors a user can act on (a bad SPEC, a model torch.export cannot
trace, a malformed plan file, a memory limit no plan meets, a flag out of range) from
`UserError`. The command line prints those as one paragraph and exits 2; any other
exception is a bug in autopar and is shown with its traceback.

    >>> raise InputError("--devices 0: give a positive device count")   # doctest: +SKIP
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the file, line or flag and the fix."""


class InputError(UserError, ValueError):
    """A value given on the command line or to the API is out of range or malformed."""


__all__ = ["UserError", "InputError"]


class PlanInfeasible(UserError):
    """No plan satisfies the pins / memory limit; the message names which and why (raised by
    the search, passes/shard.py, and by the pipeline's microbatch choice, compiler/stages.py)."""

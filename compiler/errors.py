"""The exceptions that mean "bad input": the CLI prints them as one paragraph (no
traceback) and exits 2. Each stage registers its own user-facing error classes here."""
from __future__ import annotations

from autopar.compiler.spec import SpecError
from autopar.compiler.trace import LoweringError, TraceError

USER_ERRORS: tuple[type[BaseException], ...] = (SpecError, TraceError, LoweringError, ValueError,
                                                FileNotFoundError)


def register_user_error(cls: type[BaseException]) -> None:
    global USER_ERRORS
    if cls not in USER_ERRORS:
        USER_ERRORS = USER_ERRORS + (cls,)

"""Front ends: a model (torch.export, torch.fx) becomes autopar's IR.

    >>> from autopar.frontends import trace
    >>> graph = trace(model, (idx, targets))          # doctest: +SKIP
"""


def __getattr__(name):
    # `autopar.frontends.trace` without importing torch.export with the package
    if name in ("trace", "TraceError", "LoweringError"):
        from autopar.frontends import tracing as _trace
        return getattr(_trace, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

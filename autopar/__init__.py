"""autopar: automatic parallelization of PyTorch training.

    >>> import autopar
    >>> par = autopar.compile(model, (idx, targets), mesh="dp=2,tp=2")   # doctest: +SKIP

The stages, one folder each: `autopar.frontends` (torch.export / torch.fx -> IR),
`autopar.compiler` (the core: IR, ops, placement algebra, cost model, Plan),
`autopar.passes` (pruning, the sharding search, plan application, scheduling),
`autopar.backends` (code generators and the runtime programs import) and `autopar.dsl`
(plan files). This package's own modules are the drivers above them: `pipeline` (the
stages in order), `api` (`compile()`), `cli` and its verbs."""
__version__ = "0.1.0"


def __getattr__(name):
    # `autopar.compile` without importing torch.export & co. with the package
    if name == "compile":
        from autopar.api import compile
        return compile
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

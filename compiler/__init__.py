"""The IR, front ends, device/cluster specs, cost model, Plan, compile() and CLI."""


def __getattr__(name):
    # `autopar.compiler.compile` without importing torch.export & co. with the package
    if name == "compile":
        from autopar.compiler.api import compile
        return compile
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

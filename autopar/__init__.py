"""autopar: automatic parallelization of PyTorch models.

The stages live in `autopar.compiler` (IR, tracing, cost model, plan, CLI),
`autopar.passes` (lowering, pruning, sharding search), `autopar.backends` (code
generators and the runtime) and `autopar.dsl` (plan files)."""
__version__ = "0.1.0"

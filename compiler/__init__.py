"""The core: the IR, the op registry, the placement algebra and its collective table, device
and cluster specs, the cost model, module patterns, `Plan` and the sharded program it
describes. Nothing here imports the front ends, passes, DSL or backends."""

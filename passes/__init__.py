"""Sharding search, lowering, pruning and the rewrites between them: one module per pass family."""

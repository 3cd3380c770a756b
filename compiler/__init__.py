"""The IR, front ends, device/cluster specs, cost model, Plan, compile() and CLI."""

"""`autopar check-plan FILE SPEC`: validate a plan file against a model and print it
normalised (one line per pinned value, with where each pin came from).

    $ autopar check-plan examples/plans/megatron_gpt.plan examples/gpt.py:build
    # normalised from examples/plans/megatron_gpt.plan
    mesh dp=2, tp=4
    ...
    layout "transformer.h.0.attn.c_attn.weight" { dp: R, tp: S(0) }   # f32[192,64]  ...:9:1
"""
from __future__ import annotations

import argparse
import sys


def add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan_file", metavar="FILE", help="the plan file (.plan)")
    p.add_argument("spec", metavar="SPEC", help="path/to/file.py:function returning (model, example_inputs)")
    p.add_argument("--mesh", default=None,
                   help="mesh like dp=2,tp=4, for a plan file without a mesh statement")
    p.add_argument("--trace", choices=["export", "fx"], default="export", help="front end")


def check_main(args) -> int:
    from autopar.compiler.sharding import parse_mesh
    from autopar.compiler.spec import load_spec
    from autopar.compiler.trace import trace
    from autopar.dsl import load_plan, resolve
    from autopar.passes.pipeline import prepare

    planfile = load_plan(args.plan_file)            # syntax errors before the slow trace
    model, inputs, name = load_spec(args.spec)
    graph = prepare(trace(model, inputs, mode=args.trace, name=name))
    mesh = parse_mesh(args.mesh) if args.mesh else None
    spec = resolve(planfile, graph, mesh=mesh, devices=known_devices())
    sys.stdout.write(spec.format())
    print(f"# ok: {args.plan_file} fits {name} ({len(spec.pins)} pins, "
          f"{len(spec.recompute_modules)} recomputed modules)")
    return 0


def known_devices() -> list[str] | None:
    """Names of the device profiles, or None when the cluster module is not there yet."""
    try:
        from autopar.compiler import cluster
    except ImportError:
        return None
    for attr in ("builtin_profiles", "profile_names", "list_profiles"):
        fn = getattr(cluster, attr, None)
        if callable(fn):
            return list(fn())
    for attr in ("PROFILES", "DEVICES"):
        table = getattr(cluster, attr, None)
        if isinstance(table, dict):
            return list(table)
    return None

"""The `autopar` command line. Each verb's arguments and handler live with what it drives;
this file dispatches (handlers import lazily, so `autopar ir` does not load the solver) and
holds the two small verbs, `ir` and `check-plan`.

    autopar ir SPEC [--after lower|prune|prepare] [--trace export|fx] [--verify]
    autopar plan SPEC (--mesh dp=2,tp=4 | --devices N | --plan FILE) [--emit-plan F] [...]
    autopar emit SPEC (--mesh ... | --devices N | --plan FILE) --backend torch|mpi -o DIR
    autopar run SPEC (--mesh ... | --devices N | --plan FILE) --backend torch|mpi --steps N [--check]
    autopar check-plan FILE SPEC
    autopar checkpoint info DIR | consolidate DIR -o model.safetensors

Bad input (`autopar.compiler.errors.UserError`) is printed as one paragraph, exit status 2;
anything else is a bug in autopar and is shown with its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

# verb -> (module, add-arguments function, handler, one-line help)
COMMANDS = {
    "ir": ("autopar.cli", "add_ir_args", "ir_main", "print the IR of a model"),
    "plan": ("autopar.explain", "add_plan_args", "plan_main",
             "search the fastest sharding plan that fits and explain it"),
    "emit": ("autopar.run", "add_emit_args", "emit_main",
             "write the parallel program of a plan"),
    "run": ("autopar.run", "add_run_args", "run_main",
            "emit, launch local ranks, compare with the single device"),
    "check-plan": ("autopar.cli", "add_check_args", "check_main",
                   "validate a plan file against a model and print it normalised"),
    "checkpoint": ("autopar.checkpoint", "add_checkpoint_args", "checkpoint_main",
                   "inspect (info) or consolidate a training checkpoint"),
}
BUG_REPORT = ("autopar: this is a bug in autopar, not in your input; please report it with the "
              "command line and the traceback above")


def add_ir_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="path/to/file.py:function returning (model, example_inputs), or an .onnx file")
    p.add_argument("--inputs", metavar="FILE.npz",
                   help="example inputs of an .onnx SPEC, by graph input name (default: made from the input types)")
    p.add_argument("--after", choices=["lower", "prune", "prepare"], default="prepare",
                   help="print the IR after this stage (default: prepare, the graph that is planned)")
    p.add_argument("--trace", choices=["export", "fx"], default="export", help="front end")
    p.add_argument("--verify", action="store_true", help="run the interpreter against the eager model (an .onnx SPEC: against onnx.reference)")


def ir_main(args) -> int:
    from autopar.pipeline import load_model, prepared_graph

    model, inputs, name = load_model(args.spec, inputs=args.inputs)
    graph = prepared_graph(model, inputs, name, mode=args.trace, after=args.after)
    sys.stdout.write(str(graph))
    if args.verify:
        return verify_report(model, graph, inputs)
    return 0


def verify_report(model, graph, inputs) -> int:
    """`verify: ok ...` when the interpreted IR reproduces the eager loss and every trainable
    parameter's gradient (both within 1e-6 of their scale), `verify: FAILED ...` otherwise."""
    import torch

    from autopar.compiler.interpret import max_abs_error, max_grad_error
    if any(t.is_meta for t in (*model.parameters(), *inputs) if isinstance(t, torch.Tensor)):
        print("verify: skipped (the model or its inputs are on the meta device: no values to compare)")
        return 0
    err, scale = max_abs_error(model, graph, inputs)
    gerr, gscale, worst = max_grad_error(model, graph, inputs)
    tol, gtol = 1e-6 * max(scale, 1.0), 1e-6 * max(gscale, 1.0)
    if err <= tol and gerr <= gtol:
        print(f"verify: ok max_abs_err={err:.3g} max_grad_err={gerr:.3g}")
        return 0
    if err > tol:
        print(f"verify: FAILED max_abs_err={err:.3g} (loss scale {scale:.3g}, tolerance {tol:.3g})")
    if gerr > gtol:
        print(f"verify: FAILED gradients differ: max_grad_err={gerr:.3g} at {worst} (gradient "
              f"scale {gscale:.3g}, tolerance {gtol:.3g}); an op's backward in the IR is not the "
              "model's (a custom autograd Function, a detach)")
    return 1


def add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan_file", metavar="FILE", help="the plan file (.plan)")
    p.add_argument("spec", metavar="SPEC", help="path/to/file.py:function returning (model, example_inputs), or an .onnx file")
    p.add_argument("--inputs", metavar="FILE.npz",
                   help="example inputs of an .onnx SPEC, by graph input name (default: made from the input types)")
    p.add_argument("--mesh", default=None,
                   help="mesh like dp=2,tp=4, for a plan file without a mesh statement")
    p.add_argument("--trace", choices=["export", "fx"], default="export", help="front end")


def check_main(args) -> int:
    """`autopar check-plan FILE SPEC`: the file resolved against the model, normalised (one
    line per pinned value, with where each pin came from)."""
    from autopar.compiler.cluster import builtin_profiles
    from autopar.compiler.sharding import parse_mesh
    from autopar.dsl import load_plan, resolve
    from autopar.pipeline import load_model, prepared_graph

    if looks_like_spec(args.plan_file) and not looks_like_spec(args.spec):
        from autopar.compiler.errors import InputError
        raise InputError(f"check-plan takes the plan file first, then the SPEC: "
                         f"autopar check-plan {args.spec} {args.plan_file}")
    planfile = load_plan(args.plan_file)            # syntax errors before the slow trace
    model, inputs, name = load_model(args.spec, inputs=args.inputs)
    graph = prepared_graph(model, inputs, name, mode=args.trace)
    mesh = parse_mesh(args.mesh) if args.mesh else None
    spec = resolve(planfile, graph, mesh=mesh, devices=builtin_profiles())
    sys.stdout.write(spec.format())
    print(f"# ok: {args.plan_file} fits {name} ({len(spec.pins)} pins, "
          f"{len(spec.recompute_modules)} recomputed modules)")
    return 0


def looks_like_spec(text: str) -> bool:
    """`examples/gpt.py:build` (a Python file and a function), not a plan file."""
    path, _, func = text.rpartition(":")
    return path.endswith(".py") and func.isidentifier()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, import just that subcommand's module (fast start)."""
    parser = argparse.ArgumentParser(prog="autopar", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd, (mod, add, _, help_) in COMMANDS.items():
        p = sub.add_parser(cmd, help=help_, description=help_)
        if only is None or cmd == only:
            getattr(importlib.import_module(mod), add)(p)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    mod, _, handler, _ = COMMANDS[args.command]
    from autopar.compiler.errors import UserError
    try:
        return getattr(importlib.import_module(mod), handler)(args) or 0
    except UserError as e:
        print(f"autopar {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:    # launch.Interrupted carries 143 for SIGTERM
        print(f"autopar {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except Exception:
        traceback.print_exc()
        print(BUG_REPORT, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

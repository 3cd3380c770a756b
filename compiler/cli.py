"""The `autopar` command line. Each subcommand's arguments and handler live with the stage
that owns them; this file only dispatches (handlers import lazily, so `autopar ir` does not
load the solver).

    autopar ir SPEC [--after lower|prune] [--trace export|fx] [--verify]
    autopar plan SPEC (--mesh dp=2,tp=4 | --devices N | --plan FILE) [--emit-plan F] [...]
    autopar emit SPEC (--mesh ... | --devices N | --plan FILE) --backend torch|mpi -o DIR
    autopar run SPEC (--mesh ... | --devices N | --plan FILE) --backend torch|mpi --steps N [--check]
    autopar check-plan FILE SPEC
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, add-arguments function, handler, one-line help)
COMMANDS = {
    "ir": ("autopar.compiler.cli", "add_ir_args", "ir_main", "print the IR of a model"),
    "plan": ("autopar.compiler.explain", "add_plan_args", "plan_main",
             "search the fastest sharding plan that fits and explain it"),
    "emit": ("autopar.backends.launch", "add_emit_args", "emit_main",
             "write the parallel program of a plan"),
    "run": ("autopar.backends.launch", "add_run_args", "run_main",
            "emit, launch local ranks, compare with the single device"),
    "check-plan": ("autopar.dsl.cli", "add_check_args", "check_main",
                   "validate a plan file against a model and print it normalised"),
}


class UserError(Exception):
    """Bad input: printed as one paragraph, exit code 2."""


def add_ir_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="path/to/file.py:function returning (model, example_inputs)")
    p.add_argument("--after", choices=["lower", "prune"], default="prune", help="print the IR after this stage")
    p.add_argument("--trace", choices=["export", "fx"], default="export", help="front end")
    p.add_argument("--verify", action="store_true", help="run the interpreter against the eager model")


def ir_main(args) -> int:
    from autopar.compiler.interpret import max_abs_error
    from autopar.compiler.spec import load_spec
    from autopar.compiler.trace import trace
    from autopar.compiler.verify import verify
    from autopar.passes.prune import prune

    model, inputs, name = load_spec(args.spec)
    graph = verify(trace(model, inputs, mode=args.trace, name=name))
    if args.after == "prune":
        graph = verify(prune(graph))
    sys.stdout.write(str(graph))
    if args.verify:
        err, scale = max_abs_error(model, graph, inputs)
        if err <= 1e-6 * max(scale, 1.0):
            print(f"verify: ok max_abs_err={err:.3g}")
            return 0
        print(f"verify: FAILED max_abs_err={err:.3g} (output scale {scale:.3g}, "
              f"tolerance {1e-6 * max(scale, 1.0):.3g})")
        return 1
    return 0


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
    from autopar.compiler import errors
    try:
        return getattr(importlib.import_module(mod), handler)(args) or 0
    except Exception as e:
        if not isinstance(e, errors.USER_ERRORS):
            raise
        print(f"autopar {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

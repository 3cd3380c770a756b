"""`autopar emit` and `autopar run`: write a plan's program, launch local ranks, check parity.

    autopar emit examples/gpt.py:build --mesh dp=2,tp=2 --backend torch -o out/
    autopar run  examples/gpt.py:build --mesh dp=2,tp=2 --backend mpi --steps 3 --check

`run` writes the program to a temporary directory (or -o), starts one process per rank
(torch: RANK/WORLD_SIZE env as torchrun sets it; mpi: mpiexec) with OMP_NUM_THREADS=1,
streams rank 0's per-step losses, then prints the bytes every collective moved per step
and rank next to the prediction (they must be equal). `--check` trains the single-device
model with the same optimizer and compares every step's loss and every rank's final
parameter shards (relative error, norm-wise, fp32: <= 1e-5), ending with
`check: ok max_rel_err=<x>` (exit 0) or `check: FAILED ...` (exit 1).

A rank that crashes ends the job at once (the others are killed, its log tail printed); a
job that runs past --timeout is killed as a whole (all ranks share one process group).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from autopar.backends.launch import launch
from autopar.compiler import sharding
from autopar.pipeline import Program, build_program

TOLERANCE = 1e-5


# ---- the single-device reference --------------------------------------------------------------

def reference_run(model: torch.nn.Module, state: dict, inputs: tuple, steps: int, optimizer: str,
                  lr: float) -> tuple[list[float], dict]:
    """Train the unmodified model on one device from `state`: losses and final state dict."""
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name in state:
                t.copy_(state[name])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # as the ranks run: the same kernels, the same rounding
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(trainable, lr=lr) if optimizer == "adamw"
           else torch.optim.SGD(trainable, lr=lr, momentum=0.9))
    losses = []
    for _ in range(steps):
        loss = model(*inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    torch.set_num_threads(threads)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


def block(full: torch.Tensor, layout, mesh: dict, coords: dict) -> torch.Tensor:
    for (axis, n), p in zip(mesh.items(), layout):
        d = sharding.shard_dim(p)
        if d is not None:
            full = full.chunk(n, d)[coords[axis]]
    return full


@dataclass
class Check:
    ok: bool
    max_rel_err: float
    worst: str
    problems: list[str]
    tensor_err: float = 0.0
    tensor: str = ""
    tensor_abs: float = 0.0         # max |shard - reference| of that tensor
    tensor_scale: float = 0.0       # max |reference| of that tensor


def compare(program: Program, stats: list[dict], shard_dir: Path, ref_losses, ref_state) -> Check:
    """Every rank's losses and final shards against the single-device run.

    The error of the parameters is norm-wise over all of a rank's shards together,
    ||shards - reference blocks|| / ||reference blocks||: AdamW turns the rounding noise of
    a gradient that is zero in exact arithmetic (the key bias of attention) into updates of
    ~1e-6, which no reduction order avoids; per tensor that is large for a zero-initialised
    bias, over the whole model it is not. The worst single tensor is reported as well."""
    layouts = program.sharded.layouts                  # type: ignore[attr-defined]
    aliases = program.graph.aliases
    mesh = program.plan.mesh
    worst, where, problems = 0.0, "", []
    tensor_worst, tensor_where, tensor_abs, tensor_scale = 0.0, "", 0.0, 0.0
    for s in stats:
        for i, (a, b) in enumerate(zip(s["losses"], ref_losses)):
            e = abs(a - b) / max(abs(b), 1e-30)
            if e > worst:
                worst, where = e, f"loss at step {i} on rank {s['rank']}"
        shards = torch.load(shard_dir / f"rank{s['rank']}.pt")
        diff2, ref2 = 0.0, 0.0
        for key, t in shards.items():
            canon = aliases.get(key, key)
            piece = program.graph.pieces.get(key)
            if piece is not None and piece.source in ref_state:
                full = piece.cut(ref_state[piece.source])
            elif canon in layouts and key in ref_state and key == canon:
                full = ref_state[key]
            else:
                continue
            want = block(full, layouts[canon], mesh, s["coords"])
            if tuple(want.shape) != tuple(t.shape):
                problems.append(f"rank {s['rank']} {key}: shape {tuple(t.shape)} != {tuple(want.shape)}")
                continue
            if not t.is_floating_point():
                if not torch.equal(t, want):
                    problems.append(f"rank {s['rank']} {key}: values differ")
                continue
            diff2 += (t.double() - want.double()).norm().item() ** 2
            ref2 += want.double().norm().item() ** 2
            e = rel_err(t, want)
            if e > tensor_worst:
                tensor_worst, tensor_where = e, f"{key} on rank {s['rank']}"
                tensor_abs = (t.double() - want.double()).abs().max().item()
                tensor_scale = want.double().abs().max().item()
        e = (diff2 ** 0.5) / max(ref2 ** 0.5, 1e-30)
        if e > worst:
            worst, where = e, f"parameters of rank {s['rank']}"
    ok = worst <= TOLERANCE and not problems
    return Check(ok, worst, where, problems, tensor_worst, tensor_where, tensor_abs, tensor_scale)


# ---- CLI -----------------------------------------------------------------------------------------

def parse_memory(text: str) -> float:
    from autopar.compiler.cluster import parse_bytes
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="path/to/file.py:function returning (model, example_inputs), or an .onnx file")
    p.add_argument("--inputs", metavar="FILE.npz",
                   help="example inputs of an .onnx SPEC, by graph input name (default: made from the input types)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--mesh", help="mesh axes, e.g. dp=2,tp=2")
    where.add_argument("--devices", type=int, metavar="N",
                       help="device count: the search compares the mesh shapes (dp x tp)")
    p.add_argument("--backend", choices=["torch", "mpi"], default="torch")
    p.add_argument("--plan", metavar="FILE",
                   help="a plan file (constraints, then the search) or a plan JSON (used as is)")
    p.add_argument("--device", default="cpu",
                   help="cost-model profile: cpu (this machine, measured), a100-80g, h100, h200, "
                        "mi250x, or a JSON/TOML profile file")
    p.add_argument("--target", choices=["cpu", "cuda"], default="cpu",
                   help="where the generated program runs (gloo on cpu, NCCL on cuda)")
    p.add_argument("--memory", type=parse_memory, default=None,
                   help="memory per device for the search, e.g. 80GB, 2MiB")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)


def add_emit_args(p: argparse.ArgumentParser) -> None:
    _common_args(p)
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="directory for the program")
    p.add_argument("--steps", type=int, default=10, help="default steps of the generated loop")


def add_run_args(p: argparse.ArgumentParser) -> None:
    _common_args(p)
    p.add_argument("-o", "--out", metavar="DIR", help="keep the program here (default: a temp dir)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--check", action="store_true", help="compare with the single-device run")
    p.add_argument("--timeout", type=float, default=300, help="seconds before the job is killed")


def _program_from_args(args) -> Program:
    from autopar.spec import load_spec
    model, inputs, name = load_spec(args.spec, inputs=args.inputs)
    return build_program(model, inputs, args.mesh, backend=args.backend, plan=args.plan,
                         device=args.device, memory=args.memory, optimizer=args.optimizer,
                         lr=args.lr, steps=args.steps, name=name, devices=args.devices,
                         target=args.target)


def emit_main(args) -> int:
    prog = _program_from_args(args)
    cmd = prog.write(args.out)
    print(f"wrote {prog.files['program']}")
    print(f"wrote {prog.files['plan']}")
    print(f"wrote {prog.files['init']}")
    print(f"launch (from {args.out}):\n    {cmd}")
    return 0


def traffic_table(predicted: dict, plan_bytes: dict, stats: list[dict]) -> tuple[bool, list[str]]:
    """Measured bytes (every rank, every step) against the prediction."""
    from autopar.passes.apply import format_bytes
    keys = sorted(set(predicted) | {k for s in stats for step in s["traffic"] for k in step})
    lines = [f"{'bytes per step and rank':<26}{'predicted':>14}{'measured':>14}"]
    ok = True
    for k in keys:
        want = predicted.get(k, 0)
        got = {step.get(k, 0) for s in stats for step in s["traffic"]}
        same = got == {want}
        ok &= same
        shown = ", ".join(f"{g:,}" for g in sorted(got))
        lines.append(f"  {k:<24}{want:>14,}{shown:>14}  {'ok' if same else 'DIFFERENT'}"
                     f"  ({format_bytes(want)})")
    if plan_bytes and plan_bytes != predicted:
        lines.append(f"  note: the plan's own prediction differs: {plan_bytes}")
    if not keys:
        lines.append("  (no collectives)")
    return ok, lines


def plan_line(plan) -> str:
    """One line on what the search chose and why it fits (`autopar plan` explains in full)."""
    from autopar.compiler.cluster import format_bytes, format_time
    cost, solver = plan.cost, plan.solver
    parts = [f"plan: {sharding.format_mesh(plan.mesh)}, ZeRO-{plan.zero}"]
    if "step_time" in cost:
        parts.append(f"estimated step {format_time(cost['step_time'])}")
    mem = cost.get("memory", {}).get("total")
    if mem is not None:
        limit = plan.memory_limit
        parts.append(f"memory/device {format_bytes(mem)}" + (f" of {format_bytes(limit)}" if limit else ""))
    cands = solver.get("mesh_candidates")
    if cands:
        parts.append(f"{len(cands)} mesh shapes compared")
    if plan.recompute:
        parts.append(f"recompute {', '.join(plan.recompute)}")
    return "; ".join(parts)


def run_main(args) -> int:
    from autopar.passes.apply import predict_traffic
    search_bytes = None
    prog = _program_from_args(args)
    search_bytes = prog.plan.cost.get("bytes")
    tmp = None
    if args.out:
        out = Path(args.out)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="autopar-run-")
        out = Path(tmp.name)
    try:
        prog.write(out)
        state = prog.initial_state()
        print(f"autopar run: {prog.name} on {sharding.format_mesh(prog.plan.mesh)} "
              f"({prog.world} ranks, {args.backend}); program {prog.files['program']}", flush=True)
        print(plan_line(prog.plan), flush=True)
        run_args = ["--steps", str(args.steps), "--optimizer", args.optimizer, "--lr", repr(args.lr),
                    "--device", args.target, "--save", str(out / "shards"), "--stats", str(out / "stats")]
        res = launch(prog.files["program"], prog.world, args.backend, run_args, args.timeout, out / "logs")
        if not res.ok:
            print(f"autopar run: FAILED: {res.message}", flush=True)
            return 1
        stats = []
        for r in range(prog.world):
            path = out / f"stats.rank{r}.json"
            if not path.exists():
                print(f"autopar run: FAILED: rank {r} wrote no statistics ({path})")
                return 1
            stats.append(json.loads(path.read_text()))
        predicted = predict_traffic(prog.sharded)
        same, lines = traffic_table(predicted, search_bytes or {}, stats)
        print("\n".join(lines))
        print(f"job: {res.seconds:.1f} s wall, step times (rank 0): "
              + ", ".join(f"{t * 1e3:.1f} ms" for t in stats[0]["times"]))
        if not same:
            print("bytes: FAILED measured != predicted")
        if not args.check:
            return 0 if same else 1
        ref_losses, ref_state = reference_run(prog.model, state, prog.inputs, args.steps,
                                              args.optimizer, args.lr)
        print("single device: " + ", ".join(f"{x:.6f}" for x in ref_losses))
        chk = compare(prog, stats, out / "shards", ref_losses, ref_state)
        if chk.ok and same:
            print(f"worst single tensor: {chk.tensor} rel_err={chk.tensor_err:.3g} "
                  f"(max abs err {chk.tensor_abs:.2g} on values up to {chk.tensor_scale:.2g})")
            print(f"check: ok max_rel_err={chk.max_rel_err:.3g}")
            return 0
        why = [f"max_rel_err={chk.max_rel_err:.3g} ({chk.worst}), tolerance {TOLERANCE:g}"]
        why += chk.problems
        if not same:
            why.append("measured bytes differ from the prediction")
        print("check: FAILED " + "; ".join(why))
        return 1
    finally:
        if tmp is not None:
            tmp.cleanup()


__all__ = ["reference_run", "compare", "add_emit_args", "emit_main", "add_run_args", "run_main"]

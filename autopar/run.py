"""`autopar emit` and `autopar run`: write a plan's program, launch local ranks, check parity.

    autopar emit examples/gpt.py:build --mesh dp=2,tp=2 --backend torch -o out/
    autopar run  examples/gpt.py:build --mesh dp=2,tp=2 --backend mpi --steps 3 --check

`run` writes the program to a temporary directory (or -o), starts one process per rank
(torch: RANK/WORLD_SIZE env as torchrun sets it; mpi: mpiexec) with OMP_NUM_THREADS=1,
streams rank 0's per-step losses, then prints the bytes every collective moved per step
and rank next to the prediction (they must be equal). `--check` trains the single-device
model with the same optimizer and compares every step's loss and every rank's final
parameter shards (relative error, norm-wise, fp32: <= 1e-5; a parameter whose gradient is
zero in exact arithmetic absolutely, within about 2 x lr x steps), ending with `check: ok
max_rel_err=<x>` (exit 0) or `check: FAILED ...` naming the worst tensor (exit 1). Every
flag is checked before the trace (`check_flags`), and a model that cannot be trained or
checked (meta weights, all frozen, dropout with --check) is refused before any rank starts.

`--weights FILE` loads a single-device state dict into the model before the trace (so the
program's init file and the --check reference start from it). `--checkpoint DIR` and
`--resume DIR` (or the plan file's `checkpoint ... to` / `resume from`) go to the program as
absolute paths; after a resume the reference trains the steps before the checkpoint too and
compares the steps after it.

A rank that crashes ends the job at once (the others are killed, its log tail printed); a
job that runs past --timeout is killed as a whole (all ranks share one process group); a
SIGINT or SIGTERM is forwarded to the ranks, the run directory removed, exit 130 or 143.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from autopar.backends import runtime as rt
from autopar.backends.launch import launch
from autopar.compiler import sharding
from autopar.pipeline import Program, build_program

TOLERANCE = 1e-5
# bf16 programs: bf16's unit roundoff u = 2^-8, times 4 for the few orders the ranks sum in
# (tensor-parallel partial sums, the gradient all_reduce, the loss) -- 1/64, about 1.6%. A
# skipped reduction or a wrong learning rate moves the weights or losses by far more.
BF16_TOLERANCE = 4 * 2.0 ** -8


def tolerance(precision: str) -> float:
    return BF16_TOLERANCE if precision == "bf16" else TOLERANCE


# ---- the single-device reference --------------------------------------------------------------

def reference_run(model: torch.nn.Module, state: dict, inputs: tuple, steps: int, optimizer: str,
                  lr: float, grad_peaks: dict | None = None, pieces: dict | None = None,
                  precision: str = "fp32") -> tuple[list[float], dict]:
    """Train a copy of the unmodified model on one device from `state`: losses and final
    state dict. The model given is left as it was (a check must not train the user's model,
    nor change what later programs are built from).
    `grad_peaks`, when given, is filled with each trainable parameter's largest |gradient|
    over the steps (how `compare` recognises a gradient that is zero in exact arithmetic),
    and with each piece's of `pieces` (name -> `Piece` of a fused weight: the k bias of a
    fused qkv bias has a zero gradient, the q and v biases do not).

    `precision` "bf16": the programs' policy on one device -- a bf16 copy of the model for
    forward and backward, fp32 masters stepped by the optimizer (rt.MasterWeights); the
    state returned is the masters'."""
    import copy
    from autopar.compiler.interpret import loss_of
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name in state:
                t.copy_(state[name])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # as the ranks run: the same kernels, the same rounding
    masters = None
    if precision == "bf16":
        masters = rt.MasterWeights(model)
        inputs = tuple(rt.to_compute(t) if isinstance(t, torch.Tensor) else t for t in inputs)
    trainable = [p for p in model.parameters() if p.requires_grad]
    stepped = masters.params() if masters is not None else trainable
    opt = (torch.optim.AdamW(stepped, lr=lr, fused=True) if optimizer == "adamw"
           else torch.optim.SGD(stepped, lr=lr, momentum=0.9))
    losses = []
    names = {id(p): n for n, p in model.named_parameters()}
    for _ in range(steps):
        loss, _ = loss_of(model(*inputs))
        loss.backward()
        if grad_peaks is not None:
            for p in trainable:
                g = 0.0 if p.grad is None or not p.numel() else p.grad.abs().max().item()
                grad_peaks[names[id(p)]] = max(grad_peaks.get(names[id(p)], 0.0), g)
            grads = {names[id(p)]: p.grad for p in trainable if p.grad is not None}
            for key, piece in (pieces or {}).items():
                if piece.source in grads:
                    cut = piece.cut(grads[piece.source])
                    g = cut.abs().max().item() if cut.numel() else 0.0
                    grad_peaks[key] = max(grad_peaks.get(key, 0.0), g)
        if masters is not None:
            masters.grads_to_masters()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if masters is not None:
            masters.refresh()
        losses.append(loss.item())
    torch.set_num_threads(threads)
    if masters is not None:
        return losses, {k: v.clone() for k, v in masters.state_dict().items()}
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
    flat: list[str] = field(default_factory=list)   # compared absolutely (zero gradient)
    flat_abs: float = 0.0           # their largest |shard - reference|
    flat_tol: float = 0.0           # the bound they are held to


# a gradient this far below the model's largest is zero in exact arithmetic: rounding noise
FLAT_GRADIENT = 1e-6


def adam_drift(steps: int, betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """The farthest AdamW can move a parameter in `steps` steps, in units of lr, whatever its
    gradients: step t moves it by |m_hat| / sqrt(v_hat) <= sqrt(sum_i w_i^2 / u_i) (Cauchy-
    Schwarz over the bias-corrected weights w of the first moment and u of the second), which
    is 1 at step 1, 1.0014 at step 2, 1.011 at step 5, 1.043 at step 10."""
    b1, b2 = betas
    total = 0.0
    for t in range(1, steps + 1):
        total += sum(((1 - b1) * b1 ** (t - i) / (1 - b1 ** t)) ** 2
                     / ((1 - b2) * b2 ** (t - i) / (1 - b2 ** t)) for i in range(1, t + 1)) ** 0.5
    return total


def compare(program: Program, stats: list[dict], shard_dir: Path, ref_losses, ref_state,
            grad_peaks: dict | None = None, lr: float | None = None, steps: int | None = None,
            optimizer: str = "adamw", tol: float = TOLERANCE) -> Check:
    """Every rank's losses and final shards against the single-device run.

    The error of the parameters is norm-wise over all of a rank's shards together,
    ||shards - reference blocks|| / ||reference blocks||, held to TOLERANCE: per tensor a
    small, zero-initialised bias amplifies rounding noise that over the whole model is
    negligible.

    A parameter whose gradient is zero in exact arithmetic (a bias before a normalisation
    over the batch, a softmax over the batch dim) is different: its reference gradient is
    pure rounding noise, and AdamW divides noise by its own magnitude, so each step moves it
    by up to lr in a direction no reduction order reproduces. The program and the reference
    each take such steps, independently, so they can end up twice AdamW's largest drift apart,
    2 x lr x adam_drift(steps) (about 2 x lr x steps over the first steps). With
    `grad_peaks` from `reference_run`, such parameters (peak |gradient| below FLAT_GRADIENT
    of the model's largest) are compared absolutely against that bound and left out of the
    norm-wise error."""
    layouts = program.sharded.layouts                  # type: ignore[attr-defined]
    aliases = program.graph.aliases
    mesh = program.plan.mesh
    flat_names: set[str] = set()
    flat_tol = 0.0
    if grad_peaks and lr and steps and optimizer == "adamw":
        top = max(grad_peaks.values(), default=0.0)
        flat_names = {n for n, g in grad_peaks.items() if g <= FLAT_GRADIENT * top}
        flat_tol = 2 * lr * adam_drift(steps)
    worst, where, problems = 0.0, "", []
    tensor_worst, tensor_where, tensor_abs, tensor_scale = 0.0, "", 0.0, 0.0
    flat_seen, flat_abs = set(), 0.0
    for s in stats:
        for i, (a, b) in enumerate(zip(s["losses"], ref_losses)):
            e = abs(a - b) / max(abs(b), 1e-30)
            if e > worst:
                worst, where = e, f"loss at step {i} on rank {s['rank']}"
        shards = rt.load_file(shard_dir / f"rank{s['rank']}.safetensors")
        diff2, ref2 = 0.0, 0.0
        for key, t in shards.items():
            canon = aliases.get(key, key)
            piece = program.graph.pieces.get(key)
            source = key
            if piece is not None and piece.source in ref_state:
                full = piece.cut(ref_state[piece.source])
                source = piece.source
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
            delta = (t.double() - want.double()).abs().max().item() if t.numel() else 0.0
            flat_key = key if key in (grad_peaks or {}) else source    # a piece has its own peak
            if flat_key in flat_names:
                flat_seen.add(flat_key)
                flat_abs = max(flat_abs, delta)
                if delta > flat_tol:
                    problems.append(f"rank {s['rank']} {key}: its gradient is zero, yet it moved "
                                    f"{delta:.3g} away from the reference (more than AdamW's farthest drift of each, 2 x {flat_tol / 2:.3g})")
                continue
            diff2 += (t.double() - want.double()).norm().item() ** 2
            ref2 += want.double().norm().item() ** 2
            e = rel_err(t, want)
            if e > tensor_worst:
                tensor_worst, tensor_where = e, f"{key} on rank {s['rank']}"
                tensor_abs = delta
                tensor_scale = want.double().abs().max().item() if t.numel() else 0.0
        e = (diff2 ** 0.5) / max(ref2 ** 0.5, 1e-30)
        if e > worst:
            worst, where = e, f"parameters of rank {s['rank']}"
    ok = worst <= tol and not problems
    return Check(ok, worst, where, problems, tensor_worst, tensor_where, tensor_abs, tensor_scale,
                 sorted(flat_seen), flat_abs, flat_tol)


def dropout_sites(graph) -> list[str]:
    """`p=0.1 in lm.transformer.h.0.attn` for every dropout that is random in training."""
    sites = []
    for n in graph.nodes:
        if n.op in ("dropout", "native_dropout") and n.attr.get("p", 0.5) > 0 \
                and n.attr.get("train", True) is not False:
            sites.append(f"p={n.attr.get('p', 0.5):g} in {n.meta.module or 'the root module'}")
    return list(dict.fromkeys(sites))


# ---- CLI -----------------------------------------------------------------------------------------

def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="path/to/file.py:function returning (model, example_inputs), or an .onnx file")
    p.add_argument("--inputs", metavar="FILE.npz",
                   help="example inputs of an .onnx SPEC, by graph input name (default: made from the input types)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--mesh", help="mesh axes, e.g. dp=2,tp=2")
    where.add_argument("--devices", type=int, metavar="N",
                       help="device count: the search compares the mesh shapes (dp x tp, and pp x dp x tp "
                            "where the model has repeated blocks)")
    p.add_argument("--backend", choices=["torch", "mpi"], default="torch")
    p.add_argument("--plan", metavar="FILE",
                   help="a plan file (constraints, then the search) or a plan JSON (used as is)")
    p.add_argument("--device", default="cpu",
                   help="cost-model profile: cpu (this machine, measured), a100-80g, h100, h200, "
                        "mi250x, or a JSON/TOML profile file")
    p.add_argument("--target", choices=["cpu", "cuda"], default="cpu",
                   help="where the generated program runs (gloo on cpu, NCCL on cuda)")
    p.add_argument("--memory", default=None,
                   help="memory per device for the search, e.g. 80GB, 2MiB")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="what the program computes and communicates in: fp32, or bf16 with fp32 "
                        "master weights (default: the recipe the plan is made under: bf16 on "
                        "mixed-precision profiles such as h100, fp32 on cpu and for ZeRO-3)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--microbatches", type=int, default=None, metavar="M",
                   help="run each step's batch as M microbatches, gradients accumulated (the "
                        "batch each rank holds must divide by M)")
    from autopar.compiler.stages import schedule_arg
    p.add_argument("--schedule", type=schedule_arg, default=None, metavar="{gpipe,1f1b,interleaved[:V]}",
                   help="pipeline schedule of a mesh with a pp axis (default 1f1b); interleaved runs V "
                        "model chunks per rank (default 2)")
    p.add_argument("--weights", metavar="FILE.safetensors",
                   help="start from these weights: a single-device state dict under the model's own "
                        "names (a Hugging Face model.safetensors, `autopar checkpoint consolidate`)")


def add_emit_args(p: argparse.ArgumentParser) -> None:
    _common_args(p)
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="directory for the program")
    p.add_argument("--steps", type=int, default=10, help="default steps of the generated loop")


def add_run_args(p: argparse.ArgumentParser) -> None:
    _common_args(p)
    p.add_argument("-o", "--out", metavar="DIR", help="keep the program here (default: a temp dir)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--check", action="store_true", help="compare with the single-device run "
                   "(of all steps, those before the --resume checkpoint too)")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="save the training state under DIR at the end (and as the plan file says)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue from the latest checkpoint in DIR, saved under any plan")
    p.add_argument("--timeout", type=float, default=300, help="seconds before the job is killed")
    p.add_argument("--timeline", metavar="DIR", default=None,
                   help="write each rank's measured trace of the last step (Chrome/Perfetto JSON) "
                        "and print predicted vs measured step time and hidden communication")


# 1 PB per device: more than any accelerator has, and well inside the solver's integers
MAX_MEMORY = 1e15


def check_memory(value, flag: str = "--memory") -> float | None:
    """A memory limit in bytes (a number or text like "80GB"), or InputError naming the flag.

    >>> check_memory("80GB")
    80000000000.0
    """
    from autopar.compiler.cluster import parse_bytes
    from autopar.compiler.errors import InputError
    if value is None:
        return None
    shown = value if isinstance(value, str) else f"{value:g} bytes"
    b = parse_bytes(value)
    if not b > 0 or b != b:
        raise InputError(f"{flag} {shown}: a memory limit must be positive, e.g. {flag} 80GB")
    if b > MAX_MEMORY:
        raise InputError(f"{flag} {shown}: more than any device has (the largest limit autopar "
                         f"takes is 1PB per device); give the device's memory, e.g. {flag} 80GB")
    return b


def check_flags(args, verb: str) -> None:
    """Every flag of `plan`, `emit` and `run` checked before the slow trace and search, so a
    bad value ends at once with one paragraph (InputError, exit 2) rather than late or in a
    traceback. Checks only the flags `args` has."""
    from autopar.compiler.errors import InputError
    devices = getattr(args, "devices", None)
    if devices is not None and devices < 1:
        raise InputError(f"--devices {devices}: give a positive device count, e.g. --devices 4")
    mesh = sharding.parse_mesh(args.mesh) if getattr(args, "mesh", None) else None
    if getattr(args, "memory", None) is not None:
        args.memory = check_memory(args.memory)
    zero = getattr(args, "zero", None)
    if zero and mesh is not None and mesh.get("dp", 1) <= 1:
        raise InputError(f"--zero {zero}: ZeRO shards optimizer state over the data-parallel "
                         f"axis dp, and the mesh {sharding.format_mesh(mesh)} has "
                         f"{'none' if 'dp' not in mesh else 'dp=1'}. Add one (e.g. --mesh dp=2,"
                         f"{sharding.format_mesh({a: n for a, n in mesh.items() if a != 'dp'})}) "
                         "or leave --zero out.")
    steps = getattr(args, "steps", None)
    if steps is not None and steps < 0:
        raise InputError(f"--steps {steps}: give a number of training steps >= 0")
    if getattr(args, "check", False) and not steps:
        raise InputError(f"--steps {steps} --check: a check of zero steps compares nothing; "
                         "give --steps 1 or more")
    lr = getattr(args, "lr", None)
    if lr is not None and not (0 < lr < float("inf")):
        raise InputError(f"--lr {lr}: the learning rate must be a positive number, e.g. --lr 1e-3")
    timeout = getattr(args, "timeout", None)
    if timeout is not None and not timeout > 0:
        raise InputError(f"--timeout {timeout}: give the seconds the job may run, e.g. --timeout 300")
    out = getattr(args, "out", None)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise InputError(f"-o {out}: that is an existing file; -o names the directory the "
                         "program is written to. Give a new or existing directory.")
    weights = getattr(args, "weights", None)
    if weights is not None and not Path(weights).is_file():
        raise InputError(f"--weights {weights}: no such file; give a .safetensors state dict "
                         "(e.g. one `autopar checkpoint consolidate DIR -o FILE` wrote)")
    resume = getattr(args, "resume", None)
    if resume is not None:
        from autopar.backends.runtime.checkpoint import CheckpointError, latest_checkpoint
        try:
            latest_checkpoint(resume)
        except CheckpointError as e:
            raise InputError(f"--resume {e}") from None
    if verb == "run" and getattr(args, "target", "cpu") == "cuda" and not torch.cuda.is_available():
        raise InputError("--target cuda: this machine has no CUDA device (torch.cuda.is_available() "
                         "is False). Run on the CPU (--target cpu), or write the program with "
                         "`autopar emit ... --target cuda` and launch it on a GPU machine.")


def check_model(model: torch.nn.Module, verb: str) -> None:
    """A model `emit` and `run` can train: real weights, something trainable."""
    from autopar.compiler.errors import InputError
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        raise InputError(f"autopar {verb}: the model's weights are on the meta device ({meta[0]}"
                         f"{f' and {len(meta) - 1} more' if len(meta) > 1 else ''}): they have no "
                         "values to train or save. `autopar plan` plans a meta model; for emit "
                         "and run, build it with real weights on the CPU.")
    if not any(p.requires_grad for p in model.parameters()):
        raise InputError(f"autopar {verb}: every parameter of {type(model).__name__} is frozen "
                         "(requires_grad=False), so there is nothing to train. Unfreeze what "
                         "should learn (e.g. the adapters of a LoRA model).")


def _program_from_args(args, verb: str) -> Program:
    from autopar.spec import load_spec
    check_flags(args, verb)
    model, inputs, name = load_spec(args.spec, inputs=args.inputs)
    check_model(model, verb)
    if getattr(args, "weights", None):
        # before the trace: the program, its init file and the --check reference all start here
        from autopar.spec import load_weights
        for line in load_weights(model, args.weights):
            print(line)
    return build_program(model, inputs, args.mesh, backend=args.backend, plan=args.plan,
                         device=args.device, memory=args.memory, optimizer=args.optimizer,
                         lr=args.lr, steps=args.steps, name=name, devices=args.devices,
                         target=args.target, microbatches=getattr(args, "microbatches", None),
                         schedule=getattr(args, "schedule", None),
                         precision=getattr(args, "precision", None))


def emit_main(args) -> int:
    prog = _program_from_args(args, "emit")
    cmd = prog.write(args.out)
    print(f"wrote {prog.files['program']}")
    print(f"wrote {prog.files['plan']}")
    print(f"wrote {prog.files['init']}")
    print(f"launch (from {args.out}):\n    {cmd}")
    from autopar.pipeline import idle_axis_lines, precision_lines
    for line in idle_axis_lines(prog.plan) + precision_lines(prog.plan, prog.opts.precision):
        print(line)
    return 0


def traffic_table(predicted: dict, plan_bytes: dict, stats: list[dict],
                  predicted_calls: dict | None = None) -> tuple[bool, list[str]]:
    """Measured bytes and calls (every rank, every step) against the prediction."""
    from autopar.compiler.sharded import format_bytes
    keys = sorted(set(predicted) | {k for s in stats for step in s["traffic"] for k in step})
    lines = [f"{'bytes per step and rank':<26}{'predicted':>14}{'measured':>14}"
             + ("   calls predicted/measured" if predicted_calls is not None else "")]
    ok = True
    for k in keys:
        want = predicted.get(k, 0)
        got = {step.get(k, 0) for s in stats for step in s["traffic"]}
        same = got == {want}
        calls = ""
        if predicted_calls is not None:
            want_n = predicted_calls.get(k, 0)
            got_n = {step.get(k, 0) for s in stats for step in s.get("calls", [{}])}
            same &= got_n == {want_n}
            calls = f"   {want_n} / {', '.join(map(str, sorted(got_n)))}"
        ok &= same
        shown = ", ".join(f"{g:,}" for g in sorted(got))
        lines.append(f"  {k:<24}{want:>14,}{shown:>14}  {'ok' if same else 'DIFFERENT'}"
                     f"  ({format_bytes(want)}){calls}")
    if plan_bytes and plan_bytes != predicted:
        lines.append(f"  note: the plan's own prediction differs: {plan_bytes}")
    if not keys:
        lines.append("  (no collectives)")
    return ok, lines


def timeline_lines(prog, directory: Path, stats: list[dict]) -> list[str]:
    """Predicted vs measured step time, and how much of the asynchronous communication each
    rank hid (backends/runtime/timeline.py wrote DIR/rank<r>.overlap.json)."""
    from autopar.compiler.cluster import format_time
    rows = []
    for r in range(len(stats)):
        path = directory / f"rank{r}.overlap.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
    if not rows:
        return [f"timeline: no rank wrote {directory}/rank<r>.overlap.json (fewer than 1 step?)"]
    predicted = prog.plan.cost.get("step_time")
    lines = [f"timeline: traces in {directory}/rank<r>.trace.json (chrome://tracing, ui.perfetto.dev)",
             f"  {'rank':<6}{'predicted step':>16}{'measured step':>16}{'async comm alone':>18}"
             f"{'exposed':>10}{'hidden':>8}"]
    for row in rows:
        hidden = row["hidden_fraction"]
        lines.append(f"  {row['rank']:<6}{format_time(predicted) if predicted else '-':>16}"
                     f"{format_time(row['step_s']):>16}{format_time(row['alone_s']):>18}"
                     f"{format_time(row['exposed_s']):>10}{'-' if hidden is None else f'{hidden:.0%}':>8}")
    exposed, hidden = prog.plan.cost.get("exposed_comm") or {}, prog.plan.cost.get("hidden_comm") or {}
    if any(exposed.values()) or any(hidden.values()):   # the schedule the cost model predicted
        per_axis = []
        for axis in prog.plan.mesh:
            e, h = exposed.get(axis, 0.0), hidden.get(axis, 0.0)
            if e or h:
                per_axis.append(f"{axis} {format_time(h)} hidden, {format_time(e)} exposed ({h / (e + h):.0%})")
        lines.append("  predicted: " + "; ".join(per_axis))
    measured = [(row["rank"], row["memory"]) for row in rows if row.get("memory")]
    if measured:
        from autopar.compiler.cluster import format_bytes
        want = (prog.plan.cost.get("memory") or {}).get("total")
        lines.append("  tensor memory per rank (held at the step's start + its peak on top): "
                     + ", ".join(f"{r}: {format_bytes(m['peak'])} ({format_bytes(m['held_at_start'])} + "
                                 f"{format_bytes(m['step_extra'])})" for r, m in measured)
                     + (f"; predicted {format_bytes(want)}" if want else ""))
    fractions = [row["hidden_fraction"] for row in rows if row["hidden_fraction"] is not None]
    if fractions:
        lines.append(f"  hidden behind compute: {min(fractions):.0%} (worst rank) of the asynchronous "
                     "communication (gradient buckets, ZeRO-3 gathers and reduce_scatters)")
    return lines
def checkpoint_args(args, plan) -> list[str]:
    """The program's --checkpoint / --resume for `autopar run`: the flags, else the plan's
    directories, made absolute (the ranks run in the program's folder, relative paths mean
    the caller's working directory)."""
    out = []
    settings = getattr(plan, "checkpoint", None) or {}
    from autopar.backends.runtime.checkpoint import list_checkpoints
    directory = args.checkpoint or settings.get("directory")
    if directory:
        out += ["--checkpoint", str(Path(directory).resolve())]
    resume = args.resume
    if resume is None and settings.get("resume") and list_checkpoints(settings["resume"]):
        resume = settings["resume"]           # the plan's: only once there is something to resume
    if resume:
        out += ["--resume", str(Path(resume).resolve())]
    elif settings.get("resume"):
        print(f"note: the plan resumes from {settings['resume']}, which holds no checkpoint yet: "
              "starting from the initial weights")
        out += ["--resume", ""]
    return out


def check_resume(prog: Program, directory: str) -> None:
    """A --resume checkpoint of another model is refused before any rank starts, naming a
    parameter of this one it does not hold."""
    from autopar.backends.runtime.checkpoint import read_index
    from autopar.compiler.errors import InputError
    path, index = read_index(directory)
    have = {k for k, r in index["tensors"].items() if r["group"] == "model"} | set(index.get("aliases", {}))
    want = [v.name for v in prog.graph.params if v.kind == "param" and v.name not in prog.graph.aliases]
    missing = [n for n in want if n not in have]
    if missing:
        raise InputError(f"--resume {path}: the checkpoint holds no {missing[0]!r} of {type(prog.model).__name__}"
                         f"{f' (nor {len(missing) - 1} more of its parameters)' if len(missing) > 1 else ''}; "
                         f"it was saved by another model (it holds e.g. {sorted(have)[:2]}). Resume from a "
                         f"checkpoint of this model, or start afresh without --resume.")


def plan_line(plan, precision: str | None = None) -> str:
    """One line on what the search chose and why it fits (`autopar plan` explains in full)."""
    from autopar.compiler.cluster import format_bytes, format_time
    cost, solver = plan.cost, plan.solver
    parts = [f"plan: {sharding.format_mesh(plan.mesh)}, ZeRO-{plan.zero}"
             + (f", {precision} program" if precision else "")]
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
        # instances of one block kind as one pattern (`transformer.h.* (12 modules)`)
        from autopar.compiler.patterns import generalize
        kinds: dict[str, list[str]] = {}
        for m in plan.recompute:
            kinds.setdefault(generalize(m), []).append(m)
        shown = [f"{k} ({len(v)} modules)" if len(v) > 1 else v[0] for k, v in kinds.items()]
        parts.append(f"recompute {', '.join(shown)}")
    from autopar.pipeline import idle_axis_lines, precision_lines
    return "\n".join(["; ".join(parts), *idle_axis_lines(plan),
                      *(precision_lines(plan, precision) if precision else [])])


def run_main(args) -> int:
    """`autopar run`; SIGINT/SIGTERM stop the ranks and remove the temporary directory
    (the launcher forwards them; the exit status is 130/143)."""
    from autopar.backends.launch import forward_signals
    with forward_signals():
        return _run(args)


def _run(args) -> int:
    from autopar.compiler.errors import InputError
    from autopar.compiler.sharded import predict_traffic
    prog = _program_from_args(args, "run")
    dropout = dropout_sites(prog.graph)
    if args.check and dropout:
        raise InputError(f"--check: {type(prog.model).__name__} applies dropout in training mode "
                         f"({', '.join(dropout[:3])}{', ...' if len(dropout) > 3 else ''}); its random "
                         "masks differ between the ranks and the single-device run, so no "
                         "comparison can pass. Check with dropout off (p=0, or model.eval()), "
                         "or run without --check.")
    search_bytes = prog.plan.cost.get("bytes")
    tmp = None
    if args.out:
        out = Path(args.out).resolve()        # the ranks run in the program's folder
    else:
        tmp = tempfile.TemporaryDirectory(prefix="autopar-run-")
        out = Path(tmp.name)
    try:
        prog.write(out)
        state = prog.initial_state()
        print(f"autopar run: {prog.name} on {sharding.format_mesh(prog.plan.mesh)} "
              f"({prog.world} ranks, {args.backend}); program {prog.files['program']}", flush=True)
        print(plan_line(prog.plan, prog.opts.precision), flush=True)
        run_args = ["--steps", str(args.steps), "--optimizer", args.optimizer, "--lr", repr(args.lr),
                    "--device", args.target, "--save", str(out / "shards"), "--stats", str(out / "stats")]
        if getattr(args, "timeline", None):
            run_args += ["--timeline", str(Path(args.timeline).resolve())]
        run_args += checkpoint_args(args, prog.plan)
        if "--resume" in run_args and run_args[run_args.index("--resume") + 1]:
            check_resume(prog, run_args[run_args.index("--resume") + 1])
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
        if prog.plan.pipeline:          # each pipeline stage has its own traffic
            from autopar.backends.pipeline_emit import stage_traffic_table
            same, lines = stage_traffic_table(prog.sharded, stats, traffic_table, prog.opts.precision)
        else:
            predicted = prog.predicted_traffic()
            same, lines = traffic_table(predicted, search_bytes or {}, stats, prog.sharded.call_counts())
        print("\n".join(lines))
        print(f"job: {res.seconds:.1f} s wall, step times (rank 0): "
              + ", ".join(f"{t * 1e3:.1f} ms" for t in stats[0]["times"]))
        if getattr(args, "timeline", None):
            print("\n".join(timeline_lines(prog, Path(args.timeline), stats)))
        if not same:
            print("bytes: FAILED measured != predicted (bytes or calls)")
        if not args.check:
            return 0 if same else 1
        peaks: dict = {}
        start = int(stats[0].get("checkpoint", {}).get("start_step", 0))
        ref_losses, ref_state = reference_run(prog.model, state, prog.inputs, start + args.steps,
                                              args.optimizer, args.lr, grad_peaks=peaks,
                                              pieces=prog.graph.pieces, precision=prog.opts.precision)
        if start:
            print(f"single device: {start} steps before the checkpoint, then "
                  + ", ".join(f"{x:.6f}" for x in ref_losses[start:]))
        else:
            print("single device: " + ", ".join(f"{x:.6f}" for x in ref_losses))
        chk = compare(prog, stats, out / "shards", ref_losses[start:], ref_state, grad_peaks=peaks,
                      lr=args.lr, steps=start + args.steps, optimizer=args.optimizer,
                      tol=tolerance(prog.opts.precision))
        if chk.flat:
            print(f"zero gradient (rounding noise only), compared absolutely against 2 x AdamW's drift = "
                  f"{chk.flat_tol:.3g}: {', '.join(chk.flat[:4])}{', ...' if len(chk.flat) > 4 else ''} "
                  f"(max abs err {chk.flat_abs:.2g})")
        if chk.ok and same:
            print(f"check: ok max_rel_err={chk.max_rel_err:.3g}")
            return 0
        why = [f"max_rel_err={chk.max_rel_err:.3g} ({chk.worst}), tolerance "
               f"{tolerance(prog.opts.precision):g} ({prog.opts.precision})"]
        if chk.tensor:
            why.append(f"worst single tensor {chk.tensor}: rel_err={chk.tensor_err:.3g} (max abs "
                       f"err {chk.tensor_abs:.2g} on values up to {chk.tensor_scale:.2g})")
        why += chk.problems
        if not same:
            why.append("measured bytes differ from the prediction")
        print("check: FAILED " + "; ".join(why))
        return 1
    finally:
        if tmp is not None:
            tmp.cleanup()


__all__ = ["reference_run", "compare", "check_flags", "check_model", "check_memory", "dropout_sites", "add_emit_args", "emit_main", "add_run_args", "run_main"]

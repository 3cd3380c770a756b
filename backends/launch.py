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
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from autopar.backends.codegen import EmitOptions, emit_program
from autopar.compiler import sharding
from autopar.compiler.ir import Graph
from autopar.compiler.plan import Plan

TOLERANCE = 1e-5


def backend_of(name: str):
    if name == "torch":
        from autopar.backends.torch_backend import TORCH
        return TORCH
    if name == "mpi":
        from autopar.backends.mpi_backend import MPI
        return MPI
    raise ValueError(f"unknown backend '{name}': use torch or mpi")


# ---- building a program ----------------------------------------------------------------------

@dataclass
class Program:
    """A plan's generated program and everything needed to write, launch and check it."""
    name: str
    model: torch.nn.Module
    inputs: tuple
    graph: Graph
    plan: Plan
    sharded: Graph
    backend: str
    opts: EmitOptions
    stem: str
    source: str = ""
    files: dict = field(default_factory=dict)

    @property
    def world(self) -> int:
        n = 1
        for s in self.plan.mesh.values():
            n *= s
        return n

    def launch_command(self, steps: int | None = None) -> str:
        return backend_of(self.backend).launch_command(f"{self.stem}.py", self.world,
                                                       f"--steps {steps or self.opts.steps}")

    def initial_state(self) -> dict:
        from autopar.compiler.interpret import model_state
        state = {k: v.detach().clone() for k, v in model_state(self.model).items()}
        for k, v in self.graph.constants.items():
            state.setdefault(k, v.detach().clone())
        return state

    def write(self, directory) -> str:
        """Program, plan JSON and init file (full state dict + example batch); returns the
        launch command (run it from `directory`)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        prog = d / f"{self.stem}.py"
        prog.write_text(self.source)
        self.plan.save(d / f"{self.stem}.plan.json")
        torch.save({"model": self.initial_state(), "inputs": [t.detach().clone() for t in self.inputs]},
                   d / self.opts.init_file)
        self.files = {"program": prog, "plan": d / f"{self.stem}.plan.json", "init": d / self.opts.init_file}
        return self.launch_command()

    def explain(self) -> str:
        from autopar.passes.apply import format_bytes, predict_traffic
        mesh = self.plan.mesh
        lines = [f"{self.name} on {sharding.format_mesh(mesh)} ({self.world} ranks), backend {self.backend}, "
                 f"ZeRO {self.plan.zero}" + (f", recompute {', '.join(self.plan.recompute)}"
                                            if self.plan.recompute else "")]
        lines.append("parameter layouts:")
        for p in self.graph.params:
            lay = self.sharded.layouts[p.name]                         # type: ignore[attr-defined]
            flag = "" if p.requires_grad or p.kind == "buffer" else " (frozen)"
            lines.append(f"  {p.name:<48} {sharding.format_layout(mesh, lay)}{flag}")
        lines.append("bytes per step and rank:")
        for k, b in predict_traffic(self.sharded).items():
            lines.append(f"  {k:<24} {format_bytes(b)}")
        return "\n".join(lines)

    def instantiate(self, model: torch.nn.Module):
        """Inside a launched rank: build the mesh and this rank's module from the generated
        source, load this rank's block of `model`'s weights; returns a callable taking the
        full inputs."""
        from autopar.backends import runtime as rt
        ns: dict = {"__name__": f"autopar_program_{self.stem}"}
        exec(compile(self.source, f"<autopar {self.stem}.py>", "exec"), ns)
        mesh = rt.init_mesh(self.plan.mesh, backend=backend_of(self.backend).runtime, device=self.opts.device)
        local = ns[self.opts.class_name](mesh)
        self.model = model
        local.load_full_state_dict(self.initial_state())
        local.to(mesh.device)
        shard, layouts = ns["shard"], ns["LAYOUTS"]
        names = [v.name for v in self.graph.inputs]

        def run(*args):
            return local(*[shard(t, layouts[n], mesh).to(mesh.device) for n, t in zip(names, args)])
        run.module, run.mesh = local, mesh
        return run


def mesh_tag(mesh: dict) -> str:
    return "_".join(f"{a}{n}" for a, n in mesh.items())


def build_program(model, inputs, mesh=None, backend: str = "torch", plan=None, device: str = "cpu",
                  memory: float | None = None, optimizer: str = "adamw", lr: float = 1e-3,
                  steps: int = 10, name: str = "model", class_name: str | None = None,
                  graph: Graph | None = None, devices: int | None = None,
                  target: str = "cpu") -> Program:
    """trace -> prepare -> plan -> apply -> emit, in that order.

    `mesh` ("dp=2,tp=2"), or `devices` (a count: the search compares mesh shapes), or a plan
    file that names its mesh. `device` is the cost model's profile (cpu, h100, a file);
    `target` is where the generated program runs (cpu: gloo, cuda: NCCL)."""
    from autopar.compiler.api import load_plan, search_plan
    from autopar.compiler.trace import trace
    from autopar.passes.apply import apply_plan, predict_traffic
    from autopar.passes.pipeline import prepare

    if graph is None:
        graph = prepare(trace(model, inputs, name=name))
    if isinstance(memory, str):
        from autopar.compiler.cluster import parse_bytes
        memory = parse_bytes(memory)
    if mesh is not None:
        mesh = sharding.parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh)
    if plan is None:
        if mesh is None and devices is None:
            raise ValueError("give a mesh (e.g. --mesh dp=2,tp=2), a device count (--devices 4) "
                             "or a plan file that names its mesh (--plan FILE)")
        plan = search_plan(graph, mesh, device=device, memory=memory, devices=devices)
    else:
        plan = load_plan(plan, graph, mesh=mesh, device=device, memory=memory)
    mesh = mesh or dict(plan.mesh)
    if dict(plan.mesh) != mesh:
        raise ValueError(f"the plan is for mesh {sharding.format_mesh(plan.mesh)}, not "
                         f"{sharding.format_mesh(mesh)}: give --mesh {sharding.format_mesh(plan.mesh)}")
    plan.optimizer = optimizer
    sharded = apply_plan(graph, plan)
    plan.cost.setdefault("bytes", predict_traffic(sharded))
    stem = f"{name}_{mesh_tag(mesh)}_{backend}"
    opts = EmitOptions(steps=steps, optimizer=optimizer, lr=lr, device=target,
                       init_file=f"{stem}.init.pt", class_name=class_name or _class_name(model),
                       state_keys=frozenset(model.state_dict().keys()))
    source = emit_program(sharded, backend_of(backend), type(model).__name__, opts, f"{stem}.py")
    return Program(name, model, tuple(inputs), graph, plan, sharded, backend, opts, stem, source)


def _class_name(model) -> str:
    return type(model).__name__ + "Shard"


# ---- launching ----------------------------------------------------------------------------------

@dataclass
class JobResult:
    ok: bool
    message: str
    seconds: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 20) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in lines[-n:])


def _stream(pipe, sink, prefix: str = "") -> threading.Thread:
    def pump():
        for line in iter(pipe.readline, ""):
            sink.write(prefix + line)
            sink.flush()
        pipe.close()
    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


def _kill_group(pgid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        time.sleep(0.5)


def launch(program: Path, world: int, backend: str, args: list[str], timeout: float,
           log_dir: Path, out=sys.stdout) -> JobResult:
    """Start `world` ranks of `program` (torch: env like torchrun; mpi: mpiexec), stream
    rank 0's output, stop everything when a rank fails or time runs out."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    if backend == "mpi":
        mpiexec = Path(sys.executable).with_name("mpiexec")
        cmd = [str(mpiexec) if mpiexec.exists() else "mpiexec", "-n", str(world),
               sys.executable, str(program), *args]
        logs.append(log_dir / "mpiexec.log")
        p = subprocess.Popen(cmd, env=env, cwd=program.parent, stdout=subprocess.PIPE,
                             stderr=open(logs[0], "w"), text=True, start_new_session=True)
        procs.append(p)
        readers = [_stream(p.stdout, out)]
    else:
        port = _free_port()
        readers = []
        pgid = None
        for r in range(world):
            renv = dict(env, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                        LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            log = log_dir / f"rank{r}.log"
            logs.append(log)
            kw = {"process_group": 0 if pgid is None else pgid}
            p = subprocess.Popen([sys.executable, str(program), *args], env=renv, cwd=program.parent,
                                 stdout=subprocess.PIPE if r == 0 else open(log, "w"),
                                 stderr=open(log if r else log_dir / "rank0.err", "w")
                                 if r == 0 else subprocess.STDOUT, text=True, **kw)
            if pgid is None:
                pgid = p.pid
            procs.append(p)
        logs[0] = log_dir / "rank0.err"
        readers.append(_stream(procs[0].stdout, out))
    pgid = procs[0].pid
    failed: tuple[int, int] | None = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if bad and failed is None:
                failed = bad[0]
                grace = time.monotonic() + 3.0
            if all(c is not None for c in codes):
                break
            if failed is not None and time.monotonic() > grace:
                break
            if time.monotonic() - t0 > timeout:
                _kill_group(pgid)
                for t in readers:
                    t.join(timeout=1)
                running = [i for i, p in enumerate(procs) if p.poll() is None or p.returncode < 0]
                who = "mpiexec" if backend == "mpi" else f"ranks {running}"
                return JobResult(False, f"timed out after {timeout:.0f} s ({who} still running; killed). "
                                        f"Last lines of {logs[0].name}:\n{_tail(logs[0])}",
                                 time.monotonic() - t0)
            time.sleep(0.05)
    finally:
        _kill_group(pgid)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for t in readers:
            t.join(timeout=1)
    if failed is not None:
        i, code = failed
        what = "mpiexec" if backend == "mpi" else f"rank {i}"
        log = logs[i] if i < len(logs) else logs[0]
        return JobResult(False, f"{what} exited with code {code}; the job was stopped. "
                                f"Last lines of {log}:\n{_tail(log)}", time.monotonic() - t0)
    return JobResult(True, "", time.monotonic() - t0)


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
    p.add_argument("spec", metavar="SPEC", help="path/to/file.py:function returning (model, example_inputs)")
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
    from autopar.compiler.spec import load_spec
    model, inputs, name = load_spec(args.spec)
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


__all__ = ["build_program", "Program", "launch", "reference_run", "compare", "add_emit_args",
           "emit_main", "add_run_args", "run_main"]

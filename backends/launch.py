"""Starting the ranks of a generated program on this machine and stopping them.

    res = launch(Path("out/gpt_dp2_tp2_torch.py"), world=4, backend="torch", args=["--steps", "3"],
                 timeout=300, log_dir=Path("out/logs"))

torch: one process per rank with the environment torchrun would give it (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, LOCAL_RANK); mpi: `mpiexec -n N`. Every rank runs with
OMP_NUM_THREADS=1 in one process group of its own, rank 0's output is streamed, and a rank
that fails or a job that runs past its timeout ends the whole job.

The ranks' own process group keeps a terminal's Ctrl-C away from them, so the launcher
forwards it: inside `forward_signals()`, SIGINT or SIGTERM to the launcher is passed on to
every rank, which get `GRACE_S` seconds to exit before they are killed, and `Interrupted`
(exit status 130 or 143) reaches the caller, whose `finally` blocks then remove what the
job wrote.

    with forward_signals():
        res = launch(...)            # raises Interrupted(signal.SIGTERM) on `kill PID`
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

GRACE_S = 3.0     # seconds the ranks get to exit on a forwarded signal before SIGKILL


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the launcher; `exit_code` is the shell's 128 + signal. A
    KeyboardInterrupt, so no `except Exception` on the way up swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


@contextlib.contextmanager
def forward_signals():
    """SIGINT and SIGTERM raise `Interrupted` in the main thread while the block runs (a
    no-op outside the main thread, where Python cannot install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_ignored():
    """While the ranks are being stopped a second Ctrl-C must not cut the cleanup short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _stop(procs: list[subprocess.Popen], pgid: int, signum: int) -> None:
    """Pass `signum` to the ranks' process group, wait up to GRACE_S for them, kill the rest."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


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


def _start(program: Path, world: int, backend: str, args: list[str], env: dict, log_dir: Path,
           out, procs: list, logs: list) -> list[threading.Thread]:
    """Start the ranks into `procs` (filled as they start, so a caller can stop a partial
    start); returns the threads streaming rank 0's output."""
    if backend == "mpi":
        mpiexec = Path(sys.executable).with_name("mpiexec")
        cmd = [str(mpiexec) if mpiexec.exists() else "mpiexec", "-n", str(world),
               sys.executable, str(program), *args]
        logs.append(log_dir / "mpiexec.log")
        with open(logs[0], "w") as err:     # the child keeps its own copy of the descriptor
            p = subprocess.Popen(cmd, env=env, cwd=program.parent, stdout=subprocess.PIPE,
                                 stderr=err, text=True, start_new_session=True)
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
            # rank 0: stdout streamed, stderr to rank0.err; the others: both into their log
            with open(log_dir / "rank0.err" if r == 0 else log, "w") as f:
                p = subprocess.Popen([sys.executable, str(program), *args], env=renv, cwd=program.parent,
                                     stdout=subprocess.PIPE if r == 0 else f,
                                     stderr=f if r == 0 else subprocess.STDOUT, text=True, **kw)
            if pgid is None:
                pgid = p.pid
            procs.append(p)
        logs[0] = log_dir / "rank0.err"
        readers.append(_stream(procs[0].stdout, out))
    return readers


def launch(program: Path, world: int, backend: str, args: list[str], timeout: float,
           log_dir: Path, out=sys.stdout) -> JobResult:
    """Start `world` ranks of `program` (torch: env like torchrun; mpi: mpiexec), stream
    rank 0's output, stop everything when a rank fails or time runs out."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    try:
        readers = _start(program, world, backend, args, env, log_dir, out, procs, logs)
    except Interrupted as e:           # a signal while the ranks start: stop those started
        if procs:
            with _signals_ignored():
                _stop(procs, procs[0].pid, e.signum)
        raise
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
    except Interrupted as e:
        with _signals_ignored():
            _stop(procs, pgid, e.signum)
            for p in procs:
                try:
                    p.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    pass
        raise
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



__all__ = ["launch", "JobResult", "Interrupted", "forward_signals", "GRACE_S"]

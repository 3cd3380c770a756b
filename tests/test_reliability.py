"""Models as users write them, interrupts and flags: each case ends in a working run or a
one-paragraph error, never a traceback or a silently wrong result (issue 14)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from autopar.backends.launch import GRACE_S, Interrupted, forward_signals, launch
from autopar.cli import main
from conftest import EXAMPLES, ROOT

MODELS = Path(__file__).resolve().parent / "models"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def processes_running(needle: str) -> list[str]:
    """Command lines of live (not zombie) processes that mention `needle`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmd and state != "Z":
            found.append(f"{pid}: {cmd}")
    return found


# ---- 1. signals reach every rank -----------------------------------------------------------

def test_sigint_inside_launch_stops_every_rank(tmp_path):
    """The launcher's own handling: a Ctrl-C while ranks run is forwarded, nothing survives."""
    prog = tmp_path / "sleeper.py"
    prog.write_text("import time\nprint('step 0', flush=True)\nwhile True:\n    time.sleep(0.05)\n")
    threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    t0 = time.monotonic()
    with pytest.raises(Interrupted) as e:
        with forward_signals():
            launch(prog, 3, "torch", [], timeout=60, log_dir=tmp_path / "logs", out=open(os.devnull, "w"))
    assert e.value.exit_code == 130
    assert time.monotonic() - t0 < 1.5 + GRACE_S + 3
    assert processes_running(str(prog)) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handlers restored


def test_sigterm_on_autopar_run_leaves_nothing_behind(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    p = subprocess.Popen([sys.executable, "-m", "autopar.cli", "run", f"{EXAMPLES}/mlp.py:build",
                          "--mesh", "dp=2", "--steps", "100000", "--timeout", "600"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in p.stdout:
            lines.append(line)
            if line.startswith("step "):
                break
        assert lines and lines[-1].startswith("step "), "".join(lines)
        run_dirs = list(tmp_path.glob("autopar-run-*"))
        assert len(run_dirs) == 1 and processes_running(str(run_dirs[0]))
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        rest, _ = p.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, "".join(lines) + rest
    assert "interrupted by SIGTERM" in rest and "Traceback" not in rest
    assert took < GRACE_S + 10, took
    assert processes_running(str(run_dirs[0])) == []
    assert not run_dirs[0].exists()

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
import torch.nn.functional as F

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


# ---- 2. custom autograd Functions ------------------------------------------------------------

class Sign(torch.autograd.Function):
    """sign forward, identity backward: a straight-through estimator."""

    @staticmethod
    def forward(ctx, x):
        return torch.sign(x)

    @staticmethod
    def backward(ctx, g):
        return g


class Binarised(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x, y):
        h = Sign.apply(self.a(x))
        return ((self.b(h) - y) ** 2).mean()


@pytest.mark.parametrize("mode", ["export", "fx"])
def test_custom_autograd_function_is_refused_with_class_and_line(mode):
    from autopar.frontends.tracing import CustomFunctionError, trace
    with pytest.raises(CustomFunctionError) as e:
        trace(Binarised(), (torch.randn(4, 8), torch.randn(4, 1)), mode=mode)
    msg = str(e.value)
    assert "Sign.apply" in msg and "custom torch.autograd.Function" in msg
    line = Binarised.forward.__code__.co_firstlineno + 1
    assert f"test_reliability.py:{line}:" in msg
    assert torch.autograd.Function.apply.__func__.__qualname__ == "Function.apply"   # restored


def test_gradient_verification_catches_a_lost_backward():
    """What tracing without the refusal gives (the Function's forward only): the forward
    matches exactly, the gradients do not, and max_grad_error says where."""
    from autopar.compiler.interpret import max_abs_error, max_grad_error
    from autopar.frontends.lower import lower_export
    torch.manual_seed(0)
    model, inputs = Binarised(), (torch.randn(4, 8), torch.randn(4, 1))
    graph = lower_export(torch.export.export(model, inputs), model, "binarised")
    assert max_abs_error(model, graph, inputs)[0] == 0
    err, scale, worst = max_grad_error(model, graph, inputs)
    assert err > 1e-3 * scale and worst in ("a.weight", "a.bias")


def test_ir_verify_checks_gradients_of_a_detach_straight_through(capsys):
    code, out, err = run(capsys, "ir", f"{MODELS}/user_models.py:straight_through", "--verify")
    assert code == 0, err
    assert out.splitlines()[-1] == "verify: ok max_abs_err=0 max_grad_err=0"
    assert "detach(" in out          # kept: it is what stops the gradient


# ---- 3. model outputs -------------------------------------------------------------------------

class Outputs(nn.Module):
    """Returns whatever `kind` says, around a scalar MSE loss."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.fc = kind, nn.Linear(4, 2)

    def forward(self, x, y):
        out = self.fc(x)
        loss = F.mse_loss(out, y)
        return {"tuple": (loss, out), "list": [loss, out, out * 2], "dict": {"logits": out, "loss": loss},
                "scalar": loss, "logits": out, "no_loss": {"logits": out}, "none": None,
                "logits_first": (out, loss)}[self.kind]


XY = (torch.randn(3, 4), torch.randn(3, 2))


@pytest.mark.parametrize("kind,note", [
    ("scalar", None),
    ("tuple", "the loss is element 0 of tuple(Tensor[] float32, Tensor[3, 2] float32); dropped the rest"),
    ("list", "the loss is element 0 of list("),
    ("dict", 'the loss is the "loss" entry of dict; dropped logits'),
])
def test_loss_is_taken_from_tuples_lists_and_dicts(kind, note):
    from autopar.compiler.interpret import max_abs_error
    from autopar.frontends.tracing import trace
    model = Outputs(kind)
    g = trace(model, XY)
    assert len(g.outputs) == 1 and g.outputs[0].shape == ()
    notes = [n for n in g.notes if n.startswith("model output:")]
    assert (notes == []) if note is None else (len(notes) == 1 and note in notes[0]), g.notes
    assert max_abs_error(model, g, XY)[0] == 0
    assert "forward" not in model.__dict__          # the model is left as it was


def test_fx_front_end_takes_the_loss_by_the_same_rule():
    from autopar.compiler.interpret import max_abs_error
    from autopar.frontends.lower import LoweringError
    from autopar.frontends.tracing import trace
    for kind, note in (("tuple", "element 0 of a tuple of 2"), ("dict", 'the "loss" entry of a dict')):
        g = trace(Outputs(kind), XY, mode="fx")
        assert [v.shape for v in g.outputs] == [()] and note in " ".join(g.notes)
        assert max_abs_error(Outputs(kind), g, XY)[0] == 0
    with pytest.raises(LoweringError, match=r"returned a tensor of shape \[3, 2\]"):
        trace(Outputs("logits"), XY, mode="fx")


@pytest.mark.parametrize("kind,needle", [
    ("logits", "returned Tensor[3, 2] float32: it is Tensor[3, 2] float32, not a scalar"),
    ("no_loss", 'returned dict(logits) without a "loss" entry'),
    ("none", "returned NoneType"),
    ("logits_first", "its first element is Tensor[3, 2] float32, not a scalar"),
])
def test_other_outputs_are_refused_naming_what_was_returned(capsys, tmp_path, kind, needle):
    spec = tmp_path / "outs.py"
    spec.write_text(f"import sys, torch\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                    f"from test_reliability import Outputs, XY\n"
                    f"def build():\n    return Outputs({kind!r}), XY\n")
    code, out, err = run(capsys, "ir", f"{spec}:build")
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_hf_model_output_without_labels_gets_a_hint():
    from transformers import GPT2Config, GPT2LMHeadModel
    from autopar.compiler.interpret import ModelOutputError
    from autopar.frontends.tracing import trace
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(ModelOutputError, match="labels=targets"):
        trace(lm, (torch.randint(0, 32, (2, 8)),))


def test_hf_gpt2_with_its_cache_verifies(capsys):
    """Default GPT-2 (use_cache=True, a DynamicCache concatenated onto `torch.tensor([])`)."""
    code, out, err = run(capsys, "ir", f"{MODELS}/hf_causal_lm.py:gpt2", "--verify")
    assert code == 0, err
    assert '# model output: the loss is the "loss" entry of CausalLMOutputWithCrossAttentions' in out
    assert out.splitlines()[-1].startswith("verify: ok max_abs_err=0 max_grad_err=")


SPECS = {
    "frozen": """
        import torch
        def build():
            m = torch.nn.Linear(4, 1)
            m.requires_grad_(False)
            return m, (torch.randn(2, 4),)
        """,
    "meta": """
        import torch, torch.nn.functional as F
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(4, 2, device="meta")
            def forward(self, x, y):
                return F.mse_loss(self.fc(x), y)
        def build():
            return M(), (torch.randn(2, 4, device="meta"), torch.randn(2, 2, device="meta"))
        """,
    "dropout": """
        import torch, torch.nn.functional as F
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc, self.drop = torch.nn.Linear(4, 2), torch.nn.Dropout(0.1)
            def forward(self, x, y):
                return F.mse_loss(self.drop(self.fc(x)), y)
        def build():
            return M(), (torch.randn(2, 4), torch.randn(2, 2))
        """,
}


def spec_file(tmp_path, kind) -> str:
    import textwrap
    p = tmp_path / f"{kind}.py"
    p.write_text(textwrap.dedent(SPECS[kind]))
    return f"{p}:build"


@pytest.mark.parametrize("verb,kind,extra,needle", [
    ("run", "frozen", [], "every parameter of Linear is frozen"),
    ("emit", "frozen", ["-o", "OUT"], "nothing to train"),
    ("run", "meta", [], "on the meta device (fc.weight and 1 more)"),
    ("emit", "meta", ["-o", "OUT"], "`autopar plan` plans a meta model"),
    ("run", "dropout", ["--check"], "applies dropout in training mode (p=0.1 in drop)"),
])
def test_models_run_cannot_train_are_refused_before_any_rank(capsys, tmp_path, verb, kind, extra, needle):
    extra = [str(tmp_path / "out") if a == "OUT" else a for a in extra]
    code, out, err = run(capsys, verb, spec_file(tmp_path, kind), "--mesh", "dp=2", *extra)
    assert code == 2, out + err
    assert needle in err and "Traceback" not in err
    assert "autopar run:" not in out and not (tmp_path / "out").exists()


def test_meta_model_still_plans(capsys, tmp_path):
    code, out, err = run(capsys, "plan", spec_file(tmp_path, "meta"), "--mesh", "dp=2", "--device", "h100")
    assert code == 0, err


# ---- 5. flags ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["plan", "MLP", "--mesh", "tp=2", "--zero", "1"], "--zero 1: ZeRO shards optimizer state over the data-parallel axis dp"),
    (["plan", "MLP", "--mesh", "dp=1,tp=2", "--zero", "3"], "has dp=1"),
    (["plan", "MLP", "--mesh", "dp=2", "--memory=-5GB"], "--memory -5GB: a memory limit must be positive"),
    (["run", "MLP", "--mesh", "dp=2", "--memory", "1e30GB"], "--memory 1e30GB: more than any device has"),
    (["emit", "MLP", "--mesh", "dp=2", "--memory", "0GB", "-o", "OUT"], "must be positive"),
    (["plan", "MLP", "--devices", "0"], "--devices 0: give a positive device count"),
    (["run", "MLP", "--devices", "-2"], "--devices -2"),
    (["emit", "MLP", "--mesh", "dp=2", "-o", "FILE"], "that is an existing file"),
    (["run", "MLP", "--mesh", "dp=2", "--steps", "0", "--check"], "--steps 0 --check: a check of zero steps"),
    (["run", "MLP", "--mesh", "dp=2", "--steps", "-1"], "--steps -1"),
    (["run", "MLP", "--mesh", "dp=2", "--lr", "0"], "--lr 0.0: the learning rate must be a positive"),
    (["run", "MLP", "--mesh", "dp=2", "--timeout", "0"], "--timeout 0.0"),
    (["check-plan", "MLP", "PLAN"], "check-plan takes the plan file first, then the SPEC: autopar check-plan "),
    (["check-plan", "BINARY", "MLP"], "PlanNotText: "),
    (["check-plan", "SMALL", "MLP"], "MemoryTooSmall: memory 1KB is less than any plan needs"),
    (["run", "MLP", "--plan", "BINARY"], "is not a plan file: it is not UTF-8 text (byte 0x89 at offset 0)"),
])
def test_bad_flags_are_one_paragraph_before_planning(capsys, tmp_path, monkeypatch, argv, needle):
    import autopar.passes.shard as shard
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "bin.plan").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (tmp_path / "small.plan").write_text("mesh dp=2\nmemory 1KB\n")
    paths = {"MLP": f"{EXAMPLES}/mlp.py:build", "OUT": str(tmp_path / "out"),
             "FILE": str(tmp_path / "a_file"), "PLAN": str(EXAMPLES / "plans" / "tensor_parallel_mlp.plan"),
             "BINARY": str(tmp_path / "bin.plan"), "SMALL": str(tmp_path / "small.plan")}

    def no_search(*a, **k):
        raise AssertionError("the search ran before the flags were checked")
    monkeypatch.setattr(shard, "search", no_search)
    monkeypatch.setattr(shard, "search_devices", no_search)
    code, out, err = run(capsys, *[paths.get(a, a) for a in argv])
    assert code == 2, out + err
    assert needle in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 4


def test_target_cuda_without_a_gpu_is_refused_before_planning(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    import autopar.passes.shard as shard
    monkeypatch.setattr(shard, "search", lambda *a, **k: pytest.fail("planned"))
    code, out, err = run(capsys, "run", f"{EXAMPLES}/mlp.py:build", "--mesh", "dp=2", "--target", "cuda")
    assert code == 2 and "--target cuda: this machine has no CUDA device" in err


# ---- done-when models: parity on dp=2,tp=2 in one 4-rank job ----------------------------------

CHECK_MODELS = ["user_models.py:straight_through", "user_models.py:loss_and_logits",
                "hf_causal_lm.py:llama"]
STEPS = 3


def test_user_models_match_single_device_on_2x2(tmp_path):
    """The straight-through model (dict output, a zero-gradient bias), `(loss, logits)` and a
    default-configured HF Llama returning its ModelOutput: each planned on dp=2,tp=2 with
    the least memory under ZeRO-1 (`minimize memory`), trained 3 AdamW steps, compared as `autopar run
    --check` compares (losses, every shard, zero-gradient parameters against 2 x lr x steps,
    measured bytes against the prediction)."""
    import json
    from autopar.passes.apply import predict_traffic
    from autopar.pipeline import build_program
    from autopar.run import compare, dropout_sites, reference_run, traffic_table
    from autopar.spec import load_spec
    from plan_helpers import launch_programs, program_entry
    progs = []
    for spec in CHECK_MODELS:
        model, inputs, name = load_spec(str(MODELS / spec))
        prog = build_program(model, inputs, "dp=2,tp=2", plan=str(MODELS / "sharded_2x2.plan"),
                             steps=STEPS, name=name + "_" + spec.split(":")[1])
        assert not dropout_sites(prog.graph)
        d = tmp_path / prog.name
        prog.write(d)
        progs.append((spec, prog, d, prog.initial_state()))
    # one 4-rank job runs the three programs in turn, in one process group
    launch_programs(tmp_path, [program_entry(p, d, STEPS, None) for _, p, d, _ in progs], 4, "torch",
                    timeout=400)
    for spec, prog, d, state in progs:
        stats = [json.loads((d / f"stats.rank{r}.json").read_text()) for r in range(4)]
        same, lines = traffic_table(predict_traffic(prog.sharded), {}, stats)
        assert same, spec + "\n" + "\n".join(lines)
        assert predict_traffic(prog.sharded), f"{spec}: the plan moves nothing; the check would be vacuous"
        peaks: dict = {}
        losses, ref = reference_run(prog.model, state, prog.inputs, STEPS, "adamw", 1e-3, grad_peaks=peaks)
        chk = compare(prog, stats, d / "shards", losses, ref, grad_peaks=peaks, lr=1e-3, steps=STEPS)
        assert chk.ok, f"{spec}: {chk.max_rel_err:.3g} at {chk.worst}; {chk.problems}"
        if spec.endswith("straight_through"):
            assert chk.flat == ["up.bias"], chk.flat          # the bias before the normalisation




class SquaredOutput(nn.Module):
    """A loss-returning model: the mean square of a two-layer MLP's output."""
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x).pow(2).mean()


def test_the_check_leaves_the_users_model_untouched():
    """`reference_run` (what --check trains on one device) trains a copy: the model it is
    given keeps its weights, in fp32 and under bf16, even when started from another state;
    otherwise every program built from that model afterwards would start from trained
    weights."""
    from autopar.run import reference_run
    torch.manual_seed(0)
    model = SquaredOutput()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = {k: v + 0.5 for k, v in before.items()}
    x = torch.randn(6, 4)
    for precision in ("fp32", "bf16"):
        losses, after = reference_run(model, start, (x,), 3, "adamw", 1e-2, precision=precision)
        assert len(losses) == 3 and losses[-1] < losses[0], losses
        assert not torch.equal(after["net.0.weight"], start["net.0.weight"])
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), precision


def test_ranks_that_planned_different_programs_stop_at_start_up():
    """Every rank of a job compiling in its own loop plans on its own. Before any weight is
    loaded, the ranks compare their programs' digests (one min and one max reduction):
    programs that differ -- another profile, another model -- stop every rank with what to
    do, instead of collectives that pair up wrongly."""
    from types import SimpleNamespace
    from autopar.compiler.errors import InputError
    from autopar.pipeline import Program

    class World:                      # this rank's value reduced with the other ranks'
        def __init__(self, others, seen=None):
            self.others, self.seen = others, seen

        def all_reduce_scalar(self, value, axis=None, op="sum"):
            assert axis is None                   # over the whole job
            if self.seen is not None:
                self.seen.append(value)
            return {"min": min, "max": max}[op]([value, *self.others])
    source = "class GPTShard: ...\n"
    seen = []
    Program.check_same_program(SimpleNamespace(source=source), World([], seen))
    Program.check_same_program(SimpleNamespace(source=source), World([seen[0]]))
    with pytest.raises(InputError, match="planned different programs.*plan=FILE"):
        Program.check_same_program(SimpleNamespace(source=source + "# tp=2\n"), World([seen[0]]))

"""Training-state checkpoints (autopar.backends.runtime.checkpoint, `autopar checkpoint`).

Most tests run the save/load protocol of several ranks inside one process: each virtual
rank is a thread with its own mesh coordinates and a shared threading.Barrier for
`mesh.barrier()`, which exercises the same files, index and resharding code as real
ranks. One launch per backend (tests/checkpoint_ranks.py) does it with 4 real processes.
"""
from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from autopar.backends import runtime as rt
from autopar.backends.runtime import checkpoint as ck
from autopar.backends.runtime.checkpoint import CheckpointError, ShardSpec
from autopar.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------
# virtual ranks
# --------------------------------------------------------------------------
class ThreadMesh:
    """The part of rt.Mesh a checkpoint uses, for one virtual rank."""

    def __init__(self, axes, rank, barrier):
        self.axes, self.rank, self._barrier = dict(axes), rank, barrier

    def coord(self, axis):
        names = list(self.axes)
        stride = math.prod(self.axes[a] for a in names[names.index(axis) + 1:])
        return (self.rank // stride) % self.axes[axis]

    def size(self, axis):
        return self.axes[axis]

    def barrier(self, axis=None):
        self._barrier.wait(timeout=60)


def on_ranks(axes, fn):
    """Run fn(mesh) on every virtual rank of `axes` at once; results by rank."""
    world = math.prod(axes.values())
    barrier = threading.Barrier(world)
    results, errors = [None] * world, []

    def go(r):
        try:
            results[r] = fn(ThreadMesh(axes, r, barrier))
        except BaseException as e:                 # noqa: BLE001 - re-raised below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=go, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    return results


def local_of(full: torch.Tensor, spec: ShardSpec, mesh) -> torch.Tensor:
    """What a rank holds of `full` under `spec`, computed the slow, obvious way."""
    t, f_n, f_i = full, 1, 0
    for (axis, n), p in zip(mesh.axes.items(), spec.placements(mesh.axes)):
        if p.startswith("S("):
            d = int(p[2:-1])
            parts, c = t.chunk(n, d), mesh.coord(axis)
            t = parts[c] if c < len(parts) else t.narrow(d, 0, 0)
        elif p == "F":
            f_n, f_i = f_n * n, f_i * n + mesh.coord(axis)
    if "F" in spec.placements(mesh.axes):
        size = math.ceil(t.numel() / f_n)
        return F.pad(t.reshape(-1), (0, size * f_n - t.numel()))[f_i * size:(f_i + 1) * size].clone()
    return t.clone()


def make_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "emb": torch.randn(10, 6, generator=g),
        "w": torch.randn(6, 9, generator=g),
        "b": torch.randn(9, generator=g),
        "odd": torch.randn(5, 3, 2, generator=g),
        "scalar": torch.tensor(3.5),
        "half": torch.randn(4, 4, generator=g).to(torch.bfloat16),
        "count": torch.arange(12, dtype=torch.int64).view(3, 4),
        "rep": torch.randn(3, 5, generator=g),
    }


SAVE_LAYOUTS = {   # on dp=2, tp=2
    "emb": ("R", "S(0)"), "w": ("S(1)", "S(0)"), "b": ("F", "S(0)"), "odd": ("F", "R"),
    "scalar": ("R", "R"), "half": ("R", "S(1)"), "count": ("S(0)", "R"), "rep": ("R", "R"),
}
LOAD_CASES = [
    ({"tp": 4}, {"emb": ("S(1)",), "w": ("S(0)",), "b": ("S(0)",), "odd": ("S(2)",), "scalar": ("R",),
                 "half": ("F",), "count": ("S(1)",), "rep": ("F",)}),
    ({"dp": 4}, {k: ("F",) for k in SAVE_LAYOUTS}),
    ({"pp": 2, "dp": 3}, {"emb": ("S(0)", "F"), "w": ("R", "S(1)"), "b": ("F", "F"), "odd": ("S(0)", "S(1)"),
                          "scalar": ("R", "F"), "half": ("S(0)", "R"), "count": ("F", "S(0)"),
                          "rep": ("F", "F")}),
    ({"x": 1}, {k: () for k in SAVE_LAYOUTS}),
]


def save_virtual(directory, state, axes, layouts, step=1, **kw):
    def save(mesh):
        tensors = {}
        for k, full in state.items():
            spec = ShardSpec(tuple(full.shape), layouts[k])
            tensors[k] = (local_of(full, spec, mesh), spec)
        return rt.save_checkpoint(directory, mesh, step, tensors, plan_json={"mesh": axes}, **kw)
    return on_ranks(axes, save)


# --------------------------------------------------------------------------
# resharding
# --------------------------------------------------------------------------
def test_reshard_on_load_every_element(tmp_path):
    state = make_state()
    save_virtual(tmp_path, state, {"dp": 2, "tp": 2}, SAVE_LAYOUTS, step=4)
    index = json.loads((tmp_path / "step-4" / "index.json").read_text())
    # replicated copies are stored once: each piece list covers the tensor exactly
    assert len(index["tensors"]["emb"]["pieces"]) == 2 and len(index["tensors"]["scalar"]["pieces"]) == 1
    assert len(index["tensors"]["b"]["pieces"]) == 4 and len(index["tensors"]["w"]["pieces"]) == 4
    for axes, layouts in LOAD_CASES:
        def load(mesh):
            want = {k: ShardSpec(tuple(v.shape), layouts[k]) for k, v in state.items()}
            got = rt.load_checkpoint(tmp_path, mesh, want)
            for k, full in state.items():
                exp = local_of(full, want[k], mesh)
                assert got.tensors[k].dtype == full.dtype, k
                assert torch.equal(got.tensors[k], exp), (axes, k, mesh.rank)
            return got.step
        assert on_ranks(axes, load) == [4] * math.prod(axes.values())
    for k, full in state.items():
        assert torch.equal(rt.read_tensor(tmp_path, k), full)


def test_explicit_unequal_flat_ranges(tmp_path):
    full = torch.arange(30.0).view(5, 6)
    ranges = [(0, 10), (10, 5), (15, 15)]

    def save(mesh, ranges=ranges, step=1):
        off, n = ranges[mesh.rank]
        spec = ShardSpec((5, 6), ("F",), flat=(off, n))
        rt.save_checkpoint(tmp_path, mesh, step, {"a": (full.reshape(-1)[off:off + n].clone(), spec)})
    on_ranks({"x": 3}, save)

    def load(mesh):
        return rt.load_checkpoint(tmp_path, mesh, {"a": ShardSpec((5, 6), ("S(0)",))}).tensors["a"]
    assert torch.equal(torch.cat(on_ranks({"x": 2}, load)), full)
    with pytest.raises(CheckpointError, match=r"shards of tensor 'a' hold 25 of its 30 elements"):
        on_ranks({"x": 3}, lambda m: save(m, [(0, 10), (10, 5), (20, 10)], step=2))
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1]


def test_shapes_refused_at_save(tmp_path):
    with pytest.raises(CheckpointError, match=r"tensor 'w'.*local shape \(3, 4\).*expected \(5, 4\)"):
        rt.save_checkpoint(tmp_path, None, 1, {"w": (torch.zeros(3, 4), ShardSpec((5, 4), ()))})
    with pytest.raises(CheckpointError, match=r"placement 'P' is not R, S\(d\) or F"):
        on_ranks({"tp": 1}, lambda m: rt.save_checkpoint(
            tmp_path, m, 1, {"w": (torch.zeros(5, 4), ShardSpec((5, 4), ("P",)))}))
    with pytest.raises(CheckpointError, match=r"layout \('R', 'R'\) has 2 placements but the mesh"):
        rt.save_checkpoint(tmp_path, None, 1, {"w": (torch.zeros(5, 4), ShardSpec((5, 4), ("R", "R")))})


# --------------------------------------------------------------------------
# atomicity: a process killed mid-save
# --------------------------------------------------------------------------
KILL_CHILD = r"""
import sys, time
from pathlib import Path
import torch
from autopar.backends.runtime import checkpoint as ck
d, where = Path(sys.argv[1]), sys.argv[2]
state = {f"w{i}": torch.full((64, 64), float(i)) for i in range(4)}
ck.save_checkpoint(d, None, 1, state, keep=3)
def hang(*a, **k):
    (d / "marker").write_text("x")
    time.sleep(600)
if where == "rank-file":            # the rank file is written but not yet renamed
    fsync = ck._fsync_path
    ck._fsync_path = lambda p: hang() if ".tmp-" in str(p) else fsync(p)
else:                               # every rank file is in place, the index is not
    ck._write_atomic_text = hang
ck.save_checkpoint(d, None, 2, {k: v + 1 for k, v in state.items()}, keep=3)
"""


@pytest.mark.parametrize("where", ["rank-file", "index"])
def test_kill_during_save_keeps_previous(tmp_path, where):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(tmp_path), where], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "marker").exists():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"child never reached the save of step 2: {p.communicate()[0][-3000:]}")
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    step2 = tmp_path / "step-2"
    left = sorted(f.name for f in step2.iterdir())
    if where == "rank-file":
        assert any(".tmp-" in n for n in left) and "rank0.safetensors" not in left, left
    else:
        assert "rank0.safetensors" in left and "index.json" not in left, left
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "step-1"
    got = rt.load_checkpoint(tmp_path, None, {f"w{i}": ShardSpec((64, 64), ()) for i in range(4)})
    assert got.step == 1 and all(torch.equal(got.tensors[f"w{i}"], torch.full((64, 64), float(i)))
                                 for i in range(4))
    with pytest.raises(CheckpointError, match="step-2: incomplete checkpoint"):
        rt.load_checkpoint(step2, None, {"w0": ShardSpec((64, 64), ())})
    # the next save of that step replaces the debris; keep=1 drops step-1
    rt.save_checkpoint(tmp_path, None, 2, {f"w{i}": torch.zeros(64, 64) for i in range(4)}, keep=1)
    assert sorted(f.name for f in tmp_path.iterdir() if f.is_dir()) == ["step-2"]
    assert sorted(f.name for f in step2.iterdir()) == ["index.json", "rank0.safetensors"]


# --------------------------------------------------------------------------
# damaged and mismatched checkpoints
# --------------------------------------------------------------------------
@pytest.fixture()
def two_rank_ckpt(tmp_path):
    state = {"a.weight": torch.randn(8, 4), "a.bias": torch.randn(8)}
    layouts = {"a.weight": ("S(0)",), "a.bias": ("S(0)",)}
    save_virtual(tmp_path, state, {"tp": 2}, layouts, step=3)
    want = {k: ShardSpec(tuple(v.shape), ()) for k, v in state.items()}
    return tmp_path, tmp_path / "step-3", state, want


def test_truncated_missing_and_corrupted_files(two_rank_ckpt):
    root, step, state, want = two_rank_ckpt
    f = step / "rank1.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"rank1\.safetensors: truncated .*tensor 'a\.(weight|bias)'"):
        rt.load_checkpoint(root, None, want)
    f.write_bytes(data[:8] + b"\x00" * 24 + data[32:])          # same size, header garbage
    with pytest.raises(CheckpointError, match=r"rank1\.safetensors: corrupted shard file, needed for tensor"):
        rt.load_checkpoint(root, None, want)
    f.unlink()
    with pytest.raises(CheckpointError, match=r"rank1\.safetensors: shard file missing \(needed for tensor"):
        rt.load_checkpoint(root, None, want)
    f.write_bytes(data[:-4] + bytes(b ^ 0xFF for b in data[-4:]))  # flip the last value's bytes
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    got = rt.load_checkpoint(root, None, want)                   # unverified reads take it
    assert not torch.equal(got.tensors[last], state[last])
    with pytest.raises(CheckpointError, match=rf"rank1\.safetensors: tensor '{last}' is corrupted \(crc32"):
        rt.load_checkpoint(root, None, want, verify=True)
    rc, _, err = run_cli(["checkpoint", "info", str(root), "--verify"])
    assert rc == 2 and f"rank1.safetensors: tensor '{last}' is corrupted" in err


def test_mismatched_model_and_incomplete(two_rank_ckpt):
    root, step, state, want = two_rank_ckpt
    with pytest.raises(CheckpointError, match=r"rank0\.safetensors: tensor 'a\.weight' has shape \(8, 4\) in "
                                              r"the checkpoint but \(4, 8\) in the model"):
        rt.load_checkpoint(root, None, {**want, "a.weight": ShardSpec((4, 8), ())})
    with pytest.raises(CheckpointError, match="another model"):
        rt.load_checkpoint(root, None, {"x.weight": ShardSpec((8, 4), ()), "y": ShardSpec((2,), ())})
    with pytest.raises(CheckpointError, match=r"holds 1 tensors the model does not have, e\.g\. \['a\.bias'\]"):
        rt.load_checkpoint(root, None, {"a.weight": want["a.weight"]})
    got = rt.load_checkpoint(root, None, {"a.weight": want["a.weight"]}, strict=False)
    assert torch.equal(got.tensors["a.weight"], state["a.weight"])
    with pytest.raises(CheckpointError, match="is float32 in the checkpoint but float64"):
        rt.load_checkpoint(root, None, {**want, "a.bias": ShardSpec((8,), (), dtype=torch.float64)})
    (step / "index.json").unlink()
    with pytest.raises(CheckpointError, match="no complete step-N/ checkpoint"):
        rt.load_checkpoint(root, None, want)
    with pytest.raises(CheckpointError, match="step-3: incomplete checkpoint"):
        rt.load_checkpoint(step, None, want)


# --------------------------------------------------------------------------
# keep-last-K, async
# --------------------------------------------------------------------------
def test_keep_last_k_and_debris(tmp_path):
    (tmp_path / "step-0").mkdir(parents=True)                    # an interrupted older save
    (tmp_path / "step-0" / "rank0.safetensors").write_bytes(b"partial")
    for s in range(1, 6):
        rt.save_checkpoint(tmp_path, None, s, {"w": torch.full((3,), float(s))}, keep=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [4, 5]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["step-4", "step-5"]
    assert torch.equal(rt.read_tensor(tmp_path, "w"), torch.full((3,), 5.0))
    assert torch.equal(rt.read_tensor(tmp_path / "step-4", "w"), torch.full((3,), 4.0))


def test_async_equals_sync_and_snapshots(tmp_path):
    state = make_state(1)
    save_virtual(tmp_path / "sync", state, {"dp": 2, "tp": 2}, SAVE_LAYOUTS, step=6)

    def save_async(mesh):
        tensors = {}
        for k, full in state.items():
            spec = ShardSpec(tuple(full.shape), SAVE_LAYOUTS[k])
            tensors[k] = (local_of(full, spec, mesh), spec)
        h = rt.save_checkpoint(tmp_path / "async", mesh, 6, tensors, plan_json={"mesh": {"dp": 2, "tp": 2}},
                               async_=True)
        for t, _ in tensors.values():      # the training step goes on meanwhile
            t.zero_()
        h.wait()
        mesh.barrier()                     # the index exists once rank 0's handle is done
        return h.seconds
    on_ranks({"dp": 2, "tp": 2}, save_async)
    a = json.loads((tmp_path / "async" / "step-6" / "index.json").read_text())
    s = json.loads((tmp_path / "sync" / "step-6" / "index.json").read_text())
    assert a == s
    for k, full in state.items():
        assert torch.equal(rt.read_tensor(tmp_path / "async", k), full), k
    for r in range(4):
        a_file = rt.load_file(tmp_path / "async" / "step-6" / f"rank{r}.safetensors")
        s_file = rt.load_file(tmp_path / "sync" / "step-6" / f"rank{r}.safetensors")
        assert a_file.keys() == s_file.keys() and all(torch.equal(a_file[k], s_file[k]) for k in a_file)


def test_async_error_surfaces_on_wait(tmp_path):
    (tmp_path / "step-1").write_text("a file where the step directory should go")
    with pytest.raises((OSError, CheckpointError)):
        h = rt.save_checkpoint(tmp_path, None, 1, {"w": torch.zeros(2)}, async_=True)
        rt.wait_checkpoint()
        h.wait()


def test_a_rank_that_cannot_write_fails_the_save_fast(tmp_path, monkeypatch):
    write = ck._write_rank_file

    def fail_on_rank_1(path, rank, entries, meta):
        if rank == 1:
            raise OSError(28, "No space left on device")
        return write(path, rank, entries, meta)
    monkeypatch.setattr(ck, "_write_rank_file", fail_on_rank_1)

    def save(mesh):
        t0 = time.monotonic()
        try:
            rt.save_checkpoint(tmp_path, mesh, 1, {"w": (torch.zeros(2), ShardSpec((4,), ("S(0)",)))},
                               timeout_s=120)
        except (OSError, CheckpointError) as e:
            return type(e).__name__, str(e), time.monotonic() - t0
        return None
    (k0, msg0, s0), (k1, msg1, _) = on_ranks({"tp": 2}, save)
    assert k1 == "OSError" and "No space left" in msg1
    assert k0 == "CheckpointError" and "rank 1 could not write its shard file" in msg0 and "No space left" in msg0
    assert s0 < 60 and not ck.list_checkpoints(tmp_path)


def test_optimizer_state_round_trip(tmp_path):
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.randn(6, 4)
    opt.step()
    specs = {"w": ShardSpec((6, 4), ())}
    shards = rt.optimizer_shards(opt, {"w": p}, specs)
    assert set(shards) == {"w.step", "w.exp_avg", "w.exp_avg_sq"}
    rt.save_checkpoint(tmp_path, None, 1, {"w": p.detach()}, optimizer_state=shards,
                       rng_state=rt.capture_rng_state())
    torch.rand(3)                                         # move the generator on
    got = rt.load_checkpoint(tmp_path, None, specs, optimizer=rt.optimizer_wanted({"w": p}, specs))
    q = torch.nn.Parameter(got.tensors["w"].clone())
    opt2 = torch.optim.AdamW([q], lr=0.1)
    rt.restore_optimizer(opt2, {"w": q}, got.optimizer)
    rt.restore_rng_state(got.rng)
    g = torch.randn(6, 4)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


# --------------------------------------------------------------------------
# consolidate / info
# --------------------------------------------------------------------------
def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    so, se = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        rc = cli_main(argv)
    finally:
        sys.stdout, sys.stderr = so, se
    return rc, out.getvalue(), err.getvalue()


def test_consolidate_equals_the_full_state_and_info(tmp_path):
    g = torch.Generator().manual_seed(3)
    full = {"h.0.c_attn.weight": torch.randn(12, 4, generator=g), "h.0.c_attn.bias": torch.randn(12, generator=g),
            "wte.weight": torch.randn(10, 4, generator=g), "ln_f.weight": torch.randn(4, generator=g)}
    pieces = {f"h.0.c_attn.weight.{i}": ShardSpec((4, 4), ("R", "S(0)"),
                                                  source=("h.0.c_attn.weight", 0, 4 * i, 4 * i + 4))
              for i in range(3)}
    specs = {**pieces, "h.0.c_attn.bias": ShardSpec((12,), ("R", "S(0)")),
             "wte.weight": ShardSpec((10, 4), ("R", "S(0)")), "ln_f.weight": ShardSpec((4,), ("R", "R"))}
    opt_specs = {k: ShardSpec(s.shape, ("F", "S(0)") if k != "ln_f.weight" else ("F", "R")) for k, s in specs.items()}

    def value(k):                          # the saved tensor: a whole one or a fused piece
        if k in full:
            return full[k]
        src, dim, start, stop = pieces[k].source
        return full[src].narrow(dim, start, stop - start)

    def save(mesh):
        tensors = {k: (local_of(value(k), s, mesh), s) for k, s in specs.items()}
        opt = {f"{k}.exp_avg": (local_of(value(k) * 0.5, s, mesh), s) for k, s in opt_specs.items()}
        rt.save_checkpoint(tmp_path, mesh, 7, tensors, opt, plan_json={"model": "toy", "zero": 1, "dp_axis": "dp"},
                           aliases={"lm_head.weight": "wte.weight"})
    on_ranks({"dp": 2, "tp": 2}, save)
    out_file = tmp_path / "model.safetensors"
    rc, out, err = run_cli(["checkpoint", "consolidate", str(tmp_path), "-o", str(out_file)])
    assert rc == 0, err
    got = rt.load_file(out_file)
    assert set(got) == set(full) | {"lm_head.weight"}
    for k, v in full.items():
        assert torch.equal(got[k], v), k
    assert torch.equal(got["lm_head.weight"], full["wte.weight"])
    rc, _, err = run_cli(["checkpoint", "consolidate", str(tmp_path), "-o", str(out_file), "--optimizer"])
    got = rt.load_file(out_file)
    assert rc == 0 and torch.equal(got["optim/h.0.c_attn.weight.1.exp_avg"], full["h.0.c_attn.weight"][4:8] * 0.5)
    rc, out, err = run_cli(["checkpoint", "info", str(tmp_path), "--verify"])
    assert rc == 0, err
    assert "step 7; complete steps" in out and "saved on mesh dp=2, tp=2 (4 ranks)" in out
    assert "plan: model toy; zero 1; dp_axis dp" in out and "model: 6 tensors" in out
    assert "h.0.c_attn.weight rows 4:8 of dim 0" in out and "verify: ok (12 tensors" in out
    files = sorted(p.name for p in (tmp_path / "step-7").iterdir())
    assert files == ["index.json"] + [f"rank{r}.safetensors" for r in range(4)]   # nothing but these
    rc, _, err = run_cli(["checkpoint", "info", str(tmp_path / "nowhere")])
    assert rc == 2 and "autopar checkpoint: error:" in err and "nowhere: no such directory" in err


# --------------------------------------------------------------------------
# init files (weights + example batch), no pickle
# --------------------------------------------------------------------------
def test_init_file_round_trip_and_no_pickle(tmp_path):
    state = {"w": torch.randn(3, 2), "tok": torch.arange(4), "h": torch.ones(2, dtype=torch.bfloat16)}
    shared = torch.randn(4, 4)
    state["tied.a"], state["tied.b"] = shared, shared             # tied weights share storage
    inputs = [torch.randint(0, 9, (2, 5)), torch.randn(2, 5)]
    rt.save_init(tmp_path / "m.init.safetensors", state, inputs)
    got_state, got_inputs = rt.load_init(tmp_path / "m.init.safetensors")
    assert set(got_state) == set(state) and all(torch.equal(got_state[k], v) for k, v in state.items())
    assert len(got_inputs) == 2 and all(torch.equal(a, b) for a, b in zip(got_inputs, inputs))
    torch.save({"model": state}, tmp_path / "old.init.pt")
    with pytest.raises(CheckpointError, match=r"old\.init\.pt: not a readable safetensors file"):
        rt.load_init(tmp_path / "old.init.pt")
    rt.save_file(tmp_path / "plain.safetensors", {"w": state["w"]})
    with pytest.raises(CheckpointError, match="not an autopar init file"):
        rt.load_init(tmp_path / "plain.safetensors")
    assert not list(tmp_path.glob(".*tmp*"))


# --------------------------------------------------------------------------
# real ranks: one launch per backend
# --------------------------------------------------------------------------
def _launch_ranks(backend, tmp_path):
    from autopar.backends.launch import launch
    out = io.StringIO()
    res = launch(REPO / "tests" / "checkpoint_ranks.py", world=4, backend=backend,
                 args=[backend, str(tmp_path / "ck")], timeout=240, log_dir=tmp_path / "logs", out=out)
    assert res.ok, res.message + "\n" + out.getvalue()[-4000:]
    assert "checkpoint ranks: ok" in out.getvalue()
    for r in range(4):
        assert json.loads((tmp_path / "ck" / f"rank{r}.json").read_text())["problems"] == []
    index = json.loads((tmp_path / "ck" / "sync" / "step-1" / "index.json").read_text())
    assert index["mesh"] == {"dp": 2, "tp": 2} and index["world_size"] == 4
    assert len(index["tensors"]["fc.weight.exp_avg"]["pieces"]) == 4    # ZeRO-1 chunks x tp


def test_torch_4_ranks_save_dp2tp2_load_tp4_and_dp4(tmp_path):
    _launch_ranks("torch", tmp_path)


def test_mpi_4_ranks_save_dp2tp2_load_tp4_and_dp4(tmp_path):
    pytest.importorskip("mpi4py")
    if not (Path(sys.executable).parent / "mpiexec").exists():
        pytest.skip(f"no mpiexec next to {sys.executable}")
    _launch_ranks("mpi", tmp_path)


# --------------------------------------------------------------------------
# generated programs: save, resume under another plan, --check over all steps
# --------------------------------------------------------------------------
GPT = f"{REPO}/examples/gpt.py:build"
BLOCKS = REPO / "examples" / "plans" / "gpt_blocks.plan"


def _has_mpi() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return (Path(sys.executable).parent / "mpiexec").exists()


def test_programs_save_and_resume_across_plans_and_backends(tmp_path, monkeypatch):
    """Three launches, each checked against the single-device run of every step so far:
    torch on dp=2,tp=2 with ZeRO-1, from --weights, saving every 2 steps asynchronously as
    its plan file says (keep 2) -> mpi on tp=4, resuming and saving -> torch on dp=4 with
    ZeRO-3, resuming. Then the consolidated checkpoint equals the single-device state."""
    from autopar.run import adam_drift, reference_run
    from autopar.spec import load_spec
    monkeypatch.chdir(tmp_path)                      # the plan's relative directories
    model, inputs, _ = load_spec(GPT)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():                            # tied weights stay tied
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    rt.save_file(tmp_path / "start.safetensors", start)
    (tmp_path / "a.plan").write_text(
        f'mesh dp=2, tp=2\ninclude "{BLOCKS}"\nlayout input "idx", input "targets" {{ dp: S(0), tp: R }}\n'
        'zero 1 over dp\ncheckpoint every 2 steps to "ck" keep 2 async\n')
    (tmp_path / "b.plan").write_text(f'mesh tp=4\ninclude "{BLOCKS}"\n')
    (tmp_path / "c.plan").write_text('mesh dp=4\nzero 3 over dp\nlayout input "idx", input "targets" { dp: S(0) }\n'
                                     'resume from "ck2"\n')
    common = [GPT, "--check", "--weights", str(tmp_path / "start.safetensors")]

    rc, out, err = run_cli(["run", *common, "--plan", "a.plan", "--steps", "3", "-o", "p1"])
    assert rc == 0 and "check: ok" in out, out + err
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "ck")] == [2, 3]          # keep 2 of 2, 3
    stats = json.loads((tmp_path / "p1" / "stats.rank0.json").read_text())["checkpoint"]
    assert [(s["step"], s["async"]) for s in stats["saves"]] == [(2, True), (3, True)]
    assert all(s["write_s"] > 0 for s in stats["saves"])
    index = json.loads((tmp_path / "ck" / "step-3" / "index.json").read_text())
    assert index["mesh"] == {"dp": 2, "tp": 2} and index["plan"]["zero"] == 1
    assert index["plan"]["checkpoint"]["every"] == 2
    # ZeRO-1: each rank's flat chunk of its tp block of the AdamW moments
    assert [p["flat"] for p in index["tensors"]["transformer.h.0.mlp.c_fc.weight.exp_avg"]["pieces"]] \
        == [[0, 4096], [0, 4096], [4096, 4096], [4096, 4096]]
    assert sorted(f.name for f in (tmp_path / "ck" / "step-3").iterdir()) == \
        ["index.json"] + [f"rank{r}.safetensors" for r in range(4)]

    backend = "mpi" if _has_mpi() else "torch"
    rc, out, err = run_cli(["run", *common, "--plan", "b.plan", "--backend", backend, "--steps", "2",
                            "--resume", "ck", "--checkpoint", "ck2"])
    assert rc == 0 and "check: ok" in out, out + err
    assert "single device: 3 steps before the checkpoint, then" in out
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "ck2")] == [5]

    rc, out, err = run_cli(["run", *common, "--plan", "c.plan", "--steps", "1"])     # resume from the plan
    assert rc == 0 and "check: ok" in out, out + err
    assert "single device: 5 steps before the checkpoint, then" in out and "ZeRO-3" in out

    # consolidation: the single-device state dict after the same 5 steps
    rc, _, err = run_cli(["checkpoint", "consolidate", "ck2", "-o", "five.safetensors"])
    assert rc == 0, err
    _, ref = reference_run(model, start, inputs, 5, "adamw", 1e-3)
    got = rt.load_file(tmp_path / "five.safetensors")
    assert set(got) == set(ref) and all(got[k].shape == ref[k].shape for k in ref)
    # norm-wise over the model, as --check holds it; the fused qkv bias holds the k bias,
    # whose gradient is zero in exact arithmetic: rounding noise moves it in both runs, each
    # by at most AdamW's drift
    normal = [k for k in ref if not k.endswith("c_attn.bias")]
    diff = sum((got[k].double() - ref[k].double()).norm() ** 2 for k in normal) ** 0.5
    assert diff / sum(ref[k].double().norm() ** 2 for k in normal) ** 0.5 < 1e-5
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) < 2 * 1e-3 * adam_drift(5)


def test_pipeline_checkpoints_resume_under_tensor_parallelism_and_back(tmp_path, monkeypatch):
    """pp=2 -> tp=2 (the MPI backend) -> pp=2,dp=2, each launch checked against the
    single-device run of every step so far. A pipeline rank holds only its stage's parameters: each tensor of the model
    is written once, by the stage holding it (the tied embedding and head by the first), and
    a pipeline program resumes its stage's tensors from a tensor-parallel checkpoint."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tp.plan").write_text(f'mesh tp=2\ninclude "{BLOCKS}"\n')

    rc, out, err = run_cli(["run", GPT, "--check", "--mesh", "pp=2", "--steps", "3", "--checkpoint", "ck"])
    assert rc == 0 and "check: ok" in out and "stage 1 (pp=1, ranks 1)" in out, out + err
    index = json.loads((tmp_path / "ck" / "step-3" / "index.json").read_text())
    assert index["mesh"] == {"pp": 2}
    tensors = index["tensors"]
    # one piece per tensor (nothing written twice, nothing lost), from the stage that holds it
    assert all(len(rec["pieces"]) == 1 for rec in tensors.values()), \
        {k: len(r["pieces"]) for k, r in tensors.items() if len(r["pieces"]) != 1}
    file_of = {k: rec["pieces"][0]["file"] for k, rec in tensors.items()}
    assert file_of["transformer.wte.weight"] == "rank0.safetensors"               # tied: stage 0
    assert file_of["transformer.wte.weight.exp_avg"] == "rank0.safetensors"
    assert file_of["transformer.h.1.mlp.c_fc.weight"] == "rank1.safetensors"      # stage 1's block
    assert file_of["transformer.h.1.mlp.c_fc.weight.step"] == "rank1.safetensors"
    assert file_of["transformer.ln_f.weight"] == "rank1.safetensors"
    assert "lm_head.weight" not in tensors                                        # saved once, as wte

    backend = "mpi" if _has_mpi() else "torch"          # a pipeline is torch's; its checkpoint is not
    rc, out, err = run_cli(["run", GPT, "--check", "--plan", "tp.plan", "--backend", backend, "--steps", "2",
                            "--resume", "ck", "--checkpoint", "ck2"])
    assert rc == 0 and "check: ok" in out and "all_reduce:tp" in out, out + err
    assert "single device: 3 steps before the checkpoint, then" in out
    assert json.loads((tmp_path / "ck2" / "step-5" / "index.json").read_text())["mesh"] == {"tp": 2}

    rc, out, err = run_cli(["run", GPT, "--check", "--mesh", "pp=2,dp=2", "--steps", "1", "--resume", "ck2"])
    assert rc == 0 and "check: ok" in out, out + err
    assert "single device: 5 steps before the checkpoint, then" in out


def test_bf16_checkpoints_hold_the_fp32_masters(tmp_path, monkeypatch):
    """bf16 programs checkpoint their fp32 masters (ZeRO's fp32 chunks) and the masters'
    AdamW state, so a resume continues exactly: bf16 on dp=2,tp=2 with ZeRO-1 -> bf16 on tp=2
    (MPI) -> bf16 on dp=2 with ZeRO-2 and on pp=2, each with --check against the bf16
    single-device run of every step so far."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.plan").write_text(
        f'mesh dp=2, tp=2\ninclude "{BLOCKS}"\nlayout input "idx", input "targets" {{ dp: S(0), tp: R }}\n'
        'zero 1 over dp\n')
    (tmp_path / "tp.plan").write_text(f'mesh tp=2\ninclude "{BLOCKS}"\n')
    bf16 = ["--precision", "bf16"]
    rc, out, err = run_cli(["run", GPT, "--check", *bf16, "--plan", "a.plan", "--steps", "3", "--checkpoint", "ck",
                            "-o", "p1"])
    assert rc == 0 and "check: ok" in out and "bf16 program" in out and "ZeRO-1" in out, out + err
    index = json.loads((tmp_path / "ck" / "step-3" / "index.json").read_text())
    tensors = index["tensors"]
    dtypes = {r["dtype"] for r in tensors.values()}
    assert "float32" in dtypes and dtypes <= {"float32", "int64"}, dtypes
    # a ZeRO-1 parameter is saved as its fp32 chunks (the masters), flat over dp
    assert all(p["flat"] is not None for p in tensors["transformer.h.0.mlp.c_fc.weight"]["pieces"])
    # the saved values are the masters the program ends with, not their bf16 roundings
    name = "transformer.ln_f.weight"
    saved, final = ck.read_tensor(tmp_path / "ck", name), rt.load_file(tmp_path / "p1" / "shards" / "rank0.safetensors")[name]
    assert torch.equal(saved, final) and not torch.equal(saved, saved.bfloat16().float())

    backend = "mpi" if _has_mpi() else "torch"
    rc, out, err = run_cli(["run", GPT, "--check", *bf16, "--plan", "tp.plan", "--backend", backend, "--steps", "2",
                            "--resume", "ck", "--checkpoint", "ck2"])
    assert rc == 0 and "check: ok" in out and "single device: 3 steps before the checkpoint" in out, out + err

    (tmp_path / "c.plan").write_text('mesh dp=2\nzero 2 over dp\nlayout input "idx", input "targets" { dp: S(0) }\n')
    rc, out, err = run_cli(["run", GPT, "--check", *bf16, "--plan", "c.plan", "--steps", "1", "--resume", "ck2"])
    assert rc == 0 and "check: ok" in out and "ZeRO-2" in out, out + err
    assert "single device: 5 steps before the checkpoint" in out
    # and a bf16 pipeline: each stage's masters from the same checkpoint
    rc, out, err = run_cli(["run", GPT, "--check", *bf16, "--mesh", "pp=2", "--steps", "1", "--resume", "ck2"])
    assert rc == 0 and "check: ok" in out and "stage 1 (pp=1" in out, out + err
    assert "single device: 5 steps before the checkpoint" in out


def _program_args(argv, defaults=None, optimizer="adamw"):
    import argparse
    parser = argparse.ArgumentParser()
    rt.add_checkpoint_args(parser, defaults)
    args = parser.parse_args(argv)
    args.optimizer = optimizer
    return args


def _toy(seed=0, optimizer="adamw"):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    model.register_buffer("scale", torch.tensor(2.0))
    opt = (torch.optim.AdamW(model.parameters(), lr=0.01) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    specs = {k: ShardSpec(tuple(v.shape), ()) for k, v in model.state_dict().items()}
    return model, opt, specs


def _train(model, opt, steps, x):
    for _ in range(steps):
        (model(x).square().mean() * model.scale).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_training_checkpoint_every_keep_resume_and_errors(tmp_path, optimizer):
    x = torch.randn(5, 4)
    model, opt, specs = _toy(0, optimizer)
    args = _program_args(["--checkpoint", str(tmp_path / "ck"), "--every", "2", "--keep", "2"], optimizer=optimizer)
    ckpt = rt.TrainingCheckpoint(args, None, model, opt, specs, plan={"model": "toy"})
    assert ckpt.resume() == 0
    for step in range(5):
        _train(model, opt, 1, x)
        ckpt.step_done(step + 1)
    ckpt.finish(5)
    assert [s["step"] for s in ckpt.saves] == [2, 4, 5]
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "ck")] == [4, 5]
    _train(model, opt, 2, x)                       # the run that never stopped
    want = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, _ = _toy(1, optimizer)           # other weights: all of them come from the checkpoint
    ckpt2 = rt.TrainingCheckpoint(_program_args(["--resume", str(tmp_path / "ck")], optimizer=optimizer),
                                  None, model2, opt2, specs)
    assert ckpt2.resume() == 5 and ckpt2.stats()["start_step"] == 5
    _train(model2, opt2, 2, x)
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in want.items())

    # the plan's resume directory may be empty (a first run); one given on the command line may not
    fresh = _program_args([], {"resume": str(tmp_path / "none")}, optimizer)
    assert rt.TrainingCheckpoint(fresh, None, *_toy(2, optimizer)).resume() == 0
    with pytest.raises(CheckpointError, match="none: no such directory"):
        rt.TrainingCheckpoint(_program_args(["--resume", str(tmp_path / "none")]), None, *_toy()).resume()
    other = "sgd" if optimizer == "adamw" else "adamw"
    with pytest.raises(CheckpointError, match=rf"no {other} state for parameter '0.weight'.*resume with the optimizer"):
        rt.TrainingCheckpoint(_program_args(["--resume", str(tmp_path / "ck")], optimizer=other), None,
                              *_toy(0, other)).resume()
    wide = torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.Linear(7, 3))
    wide.register_buffer("scale", torch.tensor(2.0))
    with pytest.raises(CheckpointError, match=r"tensor '0.weight' has shape \(6, 4\) in the checkpoint but \(7, 4\)"):
        rt.TrainingCheckpoint(_program_args(["--resume", str(tmp_path / "ck")], optimizer=optimizer), None, wide,
                              torch.optim.SGD(wide.parameters(), lr=0.1),
                              {k: ShardSpec(tuple(v.shape), ()) for k, v in wide.state_dict().items()}).resume()


def test_program_checkpoint_flags_and_plan_defaults():
    args = _program_args([], {"directory": "ckpt/", "every": 100, "keep": 3, "async": True, "resume": "ckpt/"})
    assert (args.checkpoint, args.every, args.keep, args.async_, args.resume) == ("ckpt/", 100, 3, True, "ckpt/")
    args = _program_args(["--no-async", "--every", "0", "--resume", ""], {"directory": "c", "async": True})
    assert (args.async_, args.every, args.resume) == (False, 0, "")
    assert _program_args([]).checkpoint is None
    with pytest.raises(CheckpointError, match="--keep 0: keep at least the latest"):
        rt.TrainingCheckpoint(_program_args(["--keep", "0"]), None, *_toy())
    with pytest.raises(CheckpointError, match="--every -1"):
        rt.TrainingCheckpoint(_program_args(["--every", "-1"]), None, *_toy())


# --------------------------------------------------------------------------
# --weights: start from a given single-device state dict
# --------------------------------------------------------------------------
def test_weights_file_errors_name_file_and_tensor(tmp_path):
    from autopar.spec import WeightsError, load_weights
    from autopar.spec import load_spec
    model, _, _ = load_spec(GPT)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def weights(name, tensors):
        rt.save_file(tmp_path / name, tensors)
        return str(tmp_path / name)
    no_head = {k: v for k, v in state.items() if k != "lm_head.weight"}     # tied to the embedding
    no_head["transformer.wte.weight"] = torch.ones_like(state["transformer.wte.weight"])
    assert load_weights(model, weights("hf.safetensors", no_head)) == []
    assert torch.equal(model.lm_head.weight, torch.ones_like(model.lm_head.weight))
    missing = {k: v for k, v in state.items() if k != "transformer.ln_f.bias"}
    with pytest.raises(WeightsError, match=r"missing\.safetensors: tensor 'transformer\.ln_f\.bias' of GPT is not in the file"):
        load_weights(model, weights("missing.safetensors", missing))
    renamed = {("model." + k if k == "transformer.ln_f.bias" else k): v for k, v in state.items()}
    with pytest.raises(WeightsError, match=r"the file has 'model\.transformer\.ln_f\.bias': saved under other names"):
        load_weights(model, weights("renamed.safetensors", renamed))
    with pytest.raises(WeightsError, match=r"extra\.safetensors: tensor 'head\.extra' is not in GPT"):
        load_weights(model, weights("extra.safetensors", {**state, "head.extra": torch.zeros(2)}))
    bad = {**state, "transformer.wpe.weight": torch.zeros(3, 3)}
    with pytest.raises(WeightsError, match=r"tensor 'transformer\.wpe\.weight' has shape \(3, 3\) in the file but"):
        load_weights(model, weights("shape.safetensors", bad))
    untied = {**state, "lm_head.weight": state["lm_head.weight"] + 1}
    with pytest.raises(WeightsError, match="are one tied tensor in GPT but differ in the file"):
        load_weights(model, weights("untied.safetensors", untied))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=r"junk\.safetensors: not a readable safetensors file"):
        load_weights(model, str(tmp_path / "junk.safetensors"))
    half = {k: v.to(torch.bfloat16) for k, v in state.items()}
    notes = load_weights(model, weights("bf16.safetensors", half))
    assert notes and "cast to the model's torch.float32" in notes[0]
    assert torch.equal(model.transformer.wpe.weight, half["transformer.wpe.weight"].float())
    # the CLI: one paragraph, exit 2, before any trace
    rc, _, err = run_cli(["emit", GPT, "--mesh", "tp=2", "-o", str(tmp_path / "out"),
                          "--weights", str(tmp_path / "missing.safetensors")])
    assert rc == 2 and "tensor 'transformer.ln_f.bias' of GPT is not in the file" in err
    rc, _, err = run_cli(["emit", GPT, "--mesh", "tp=2", "-o", str(tmp_path / "out"),
                          "--weights", str(tmp_path / "nowhere.safetensors")])
    assert rc == 2 and "--weights" in err and "no such file" in err


def test_emit_with_weights_and_plan_checkpoint_settings(tmp_path):
    """`emit --weights`: the init file holds those weights; a plan file's checkpoint
    statement becomes the program's defaults and its header says so."""
    from autopar.spec import load_spec
    model, _, _ = load_spec(GPT)
    state = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    rt.save_file(tmp_path / "w.safetensors", state)
    (tmp_path / "p.plan").write_text('mesh tp=2\ncheckpoint every 10 steps to "ck" keep 2 async\n'
                                     'resume from "ck"\noverlap bucket 4MiB\n')
    rc, out, err = run_cli(["emit", GPT, "--plan", str(tmp_path / "p.plan"), "-o", str(tmp_path / "out"),
                            "--weights", str(tmp_path / "w.safetensors")])
    assert rc == 0, err
    init, _ = rt.load_init(tmp_path / "out" / "gpt_tp2_torch.init.safetensors")
    assert all(torch.equal(init[k], v) for k, v in state.items())
    src = (tmp_path / "out" / "gpt_tp2_torch.py").read_text()
    assert 'the plan saves every 10 steps and at the end to "ck", keeping the last 2, asynchronously' in src
    assert "rt.add_checkpoint_args(parser, {'directory': 'ck', 'every': 10, 'keep': 2, 'async': True, " \
           "'resume': 'ck'})" in src
    assert "for step in range(start, start + args.steps):" in src
    plan = json.loads((tmp_path / "out" / "gpt_tp2_torch.plan.json").read_text())
    assert plan["checkpoint"]["every"] == 10 and plan["overlap"]["bucket_bytes"] == 4 << 20


def test_run_refuses_a_checkpoint_of_another_model_before_starting_ranks(tmp_path):
    model, opt, specs = _toy()
    ckpt = rt.TrainingCheckpoint(_program_args(["--checkpoint", str(tmp_path / "toy")]), None, model, opt, specs)
    ckpt.finish(0)
    rc, out, err = run_cli(["run", f"{REPO}/examples/mlp.py:build", "--mesh", "tp=2", "--steps", "1",
                            "--resume", str(tmp_path / "toy")])
    assert rc == 2 and "the checkpoint holds no 'net.0.weight' of MLP" in err and "another model" in err, err
    rc, out, err = run_cli(["run", f"{REPO}/examples/mlp.py:build", "--mesh", "tp=2", "--steps", "1",
                            "--resume", str(tmp_path / "nothing")])
    assert rc == 2 and "--resume" in err and "nothing: no such directory" in err, err

"""Tests for autopar.backends.runtime.

Each backend is exercised by ONE 4-rank launch (process-group start-up is the
expensive part): this file doubles as the worker script -- run as
``python tests/test_runtime.py <torch|mpi>`` under torchrun / mpiexec it checks
forward values, gradients and byte counters of every collective on a
{"dp": 2, "tp": 2} mesh against single-process references and prints
``RANK <r> ok``.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNTIME_DIR = REPO / "backends" / "runtime"
WORLD = 4
LAUNCH_TIMEOUT_S = 120


# ==========================================================================
# worker (runs inside each rank)
# ==========================================================================
def _worker(backend: str) -> None:  # noqa: C901 - one long scripted check
    import torch
    from torch.testing import assert_close

    from autopar.backends import runtime as rt

    rt.one_thread()
    rt.set_seed(0)
    mesh = rt.init_mesh({"dp": 2, "tp": 2}, backend=backend)
    r = mesh.rank
    assert mesh.backend == backend
    assert mesh.world_size == WORLD and list(mesh.axes.items()) == [("dp", 2), ("tp", 2)]
    assert (mesh.coord("dp"), mesh.coord("tp")) == (r // 2, r % 2)  # last axis fastest
    assert mesh.size("dp") == mesh.size("tp") == 2 and mesh.size(None) == WORLD
    assert mesh.axis_ranks("tp") == [r - r % 2, r - r % 2 + 1]
    assert mesh.axis_ranks("dp") == [r % 2, r % 2 + 2]
    assert mesh.rank_of(mesh.coords) == r
    if backend == "torch":
        import torch.distributed as dist
        assert dist.get_process_group_ranks(mesh.group("tp")) == mesh.axis_ranks("tp")
        assert dist.get_process_group_ranks(mesh.group("dp")) == mesh.axis_ranks("dp")
    else:
        assert mesh.group("tp").Get_rank() == mesh.coord("tp")
        assert mesh.group("dp").Get_rank() == mesh.coord("dp")

    def gen(*key, shape, dtype=torch.float64):
        g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    def nb(t):
        return t.numel() * t.element_size()

    cursor = [0]

    def expect(events):
        new = [tuple(e) for e in mesh.events[cursor[0]:]]
        assert new == events, f"rank {r}: events {new} != expected {events}"
        cursor[0] = len(mesh.events)

    def chunk(t, d, c):
        return t.chunk(2, d)[c]

    shape = (4, 6, 8)
    for axis in ("dp", "tp"):
        peers = mesh.axis_ranks(axis)
        base = peers[0]            # identifies this rank's slice along `axis`
        c = mesh.coord(axis)

        # -- copy_to: identity / all_reduce(grad)
        x = gen("cp_x", base, shape=shape).requires_grad_()
        y = rt.copy_to(x, mesh, axis)
        assert_close(y, x.detach())
        expect([])
        (y * gen("cp_w", r, shape=shape)).sum().backward()
        assert_close(x.grad, sum(gen("cp_w", p, shape=shape) for p in peers))
        expect([("all_reduce", axis, nb(x), "backward")])

        # -- all_reduce: all_reduce / identity
        x = gen("ar_x", r, shape=shape).requires_grad_()
        y = rt.all_reduce(x, mesh, axis)
        assert_close(y, sum(gen("ar_x", p, shape=shape) for p in peers))
        assert_close(x.detach(), gen("ar_x", r, shape=shape))  # input untouched
        expect([("all_reduce", axis, nb(x), "forward")])
        (y * gen("ar_w", r, shape=shape)).sum().backward()
        assert_close(x.grad, gen("ar_w", r, shape=shape))
        expect([])

        for d in (0, 1, -1):
            # -- all_gather, replicated grad: gather / own slice
            full = gen("ag_F", base, d, shape=shape)
            x = chunk(full, d, c).clone().requires_grad_()
            y = rt.all_gather(x, mesh, axis, dim=d)
            assert_close(y, full)
            expect([("all_gather", axis, nb(full), "forward")])
            w = gen("ag_W", base, d, shape=shape)
            (y * w).sum().backward()
            assert_close(x.grad, chunk(w, d, c))
            expect([])

            # -- all_gather, partial grad: gather / reduce_scatter
            x = chunk(full, d, c).clone().requires_grad_()
            y = rt.all_gather(x, mesh, axis, dim=d, partial_grad=True)
            assert_close(y, full)
            expect([("all_gather", axis, nb(full), "forward")])
            (y * gen("agp_W", r, d, shape=shape)).sum().backward()
            wsum = sum(gen("agp_W", p, d, shape=shape) for p in peers)
            assert_close(x.grad, chunk(wsum, d, c))
            expect([("reduce_scatter", axis, nb(full), "backward")])

            # -- scatter: own chunk / all_gather
            full = gen("sc_F", base, d, shape=shape)
            x = full.clone().requires_grad_()
            y = rt.scatter(x, mesh, axis, dim=d)
            assert_close(y, chunk(full, d, c))
            expect([])
            cshape = chunk(full, d, 0).shape
            (y * gen("sc_W", r, d, shape=cshape)).sum().backward()
            assert_close(x.grad, torch.cat([gen("sc_W", p, d, shape=cshape) for p in peers], d))
            expect([("all_gather", axis, nb(full), "backward")])

            # -- reduce_scatter: reduce_scatter / all_gather
            x = gen("rs_X", r, d, shape=shape).requires_grad_()
            y = rt.reduce_scatter(x, mesh, axis, dim=d)
            assert_close(y, chunk(sum(gen("rs_X", p, d, shape=shape) for p in peers), d, c))
            expect([("reduce_scatter", axis, nb(x), "forward")])
            (y * gen("rs_W", r, d, shape=cshape)).sum().backward()
            assert_close(x.grad, torch.cat([gen("rs_W", p, d, shape=cshape) for p in peers], d))
            expect([("all_gather", axis, nb(x), "backward")])

        for sd, cd in ((0, 2), (2, 1), (-1, 0)):
            # -- all_to_all: G sharded on cd -> G sharded on sd; backward inverse
            G = gen("a2a_G", base, sd, cd, shape=shape)
            x = chunk(G, cd, c).clone().requires_grad_()
            y = rt.all_to_all(x, mesh, axis, split_dim=sd, concat_dim=cd)
            assert_close(y, chunk(G, sd, c))
            expect([("all_to_all", axis, nb(x), "forward")])
            (y * gen("a2a_W", r, sd, cd, shape=y.shape)).sum().backward()
            wfull = torch.cat([gen("a2a_W", p, sd, cd, shape=y.shape) for p in peers], sd)
            assert_close(x.grad, chunk(wfull, cd, c))
            expect([("all_to_all", axis, nb(x), "backward")])

    # -- Megatron MLP on tp (column- then row-parallel) vs a single-process reference
    b, h, f = 3, 8, 12
    X, A, B = gen("mlp_X", shape=(b, h)), gen("mlp_A", shape=(h, f)), gen("mlp_B", shape=(f, h))
    Wout = gen("mlp_W", shape=(b, h))
    Xr, Ar, Br = (t.clone().requires_grad_() for t in (X, A, B))
    (torch.nn.functional.gelu(Xr @ Ar) @ Br * Wout).sum().backward()
    tc = mesh.coord("tp")
    xs = X.clone().requires_grad_()
    a_s = chunk(A, 1, tc).clone().requires_grad_()
    b_s = chunk(B, 0, tc).clone().requires_grad_()
    out = rt.all_reduce(torch.nn.functional.gelu(rt.copy_to(xs, mesh, "tp") @ a_s) @ b_s, mesh, "tp")
    assert_close(out, torch.nn.functional.gelu(X @ A) @ B)
    (out * Wout).sum().backward()
    assert_close(xs.grad, Xr.grad)
    assert_close(a_s.grad, chunk(Ar.grad, 1, tc))
    assert_close(b_s.grad, chunk(Br.grad, 0, tc))
    expect([("all_reduce", "tp", b * h * 8, "forward"), ("all_reduce", "tp", b * h * 8, "backward")])

    # -- dtypes are kept (MPI: byte path for gathers, a 16-bit op for bf16/fp16 sums, upcast for bool)
    tpeers = mesh.axis_ranks("tp")
    xb = gen("bf", r, shape=(2, 4), dtype=torch.bfloat16)
    yb = rt.all_gather(xb, mesh, "tp", dim=0)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, torch.cat([gen("bf", p, shape=(2, 4), dtype=torch.bfloat16) for p in tpeers]))
    xh = torch.full((4,), float(r), dtype=torch.float16)
    yh = rt.reduce_scatter(xh, mesh, "tp", dim=0)
    assert yh.dtype == torch.float16 and torch.equal(yh, torch.full((2,), float(sum(tpeers)), dtype=torch.float16))
    ti = torch.arange(6, dtype=torch.int64) * (r + 1)
    mesh.all_reduce_(ti, "dp")
    assert torch.equal(ti, torch.arange(6) * sum(p + 1 for p in mesh.axis_ranks("dp")))
    tb = torch.tensor([r == 0, False])
    mesh.all_reduce_(tb, None, op="max")
    assert tb.dtype == torch.bool and tb.tolist() == [True, False]
    # 16-bit floats are reduced as themselves (MPI: int16 buffers and a user op that adds in
    # fp32 and rounds to bf16): over the 4 ranks the sum within bf16 rounding of its 3 adds,
    # the max exact
    parts = [gen("b16", p, shape=(3, 5), dtype=torch.bfloat16) for p in range(WORLD)]
    t16 = parts[r].clone()
    mesh.all_reduce_(t16, None)
    exact = sum(x.double() for x in parts)
    bound = 3 * 2 ** -8 * sum(x.double().abs() for x in parts)
    assert t16.dtype == torch.bfloat16 and bool(((t16.double() - exact).abs() <= bound).all())
    m16 = parts[r].clone()
    mesh.all_reduce_(m16, None, op="max")
    assert torch.equal(m16, torch.stack(parts).max(0).values)
    expect([("all_gather", "tp", 32, "forward"), ("reduce_scatter", "tp", 8, "forward"),
            ("all_reduce", "dp", 48, "optimizer"), ("all_reduce", None, 2, "optimizer"),
            ("all_reduce", None, 30, "optimizer"), ("all_reduce", None, 30, "optimizer")])

    # -- utility (non-autograd) ops, on both axes and on the whole world
    for axis in ("dp", "tp", None):
        peers = mesh.axis_ranks(axis)
        c = mesh.coord(axis)
        n = len(peers)
        t = gen("u_ar", r, shape=(4, 6))
        assert mesh.all_reduce_(t, axis) is t
        assert_close(t, sum(gen("u_ar", p, shape=(4, 6)) for p in peers))
        t = gen("u_ar", r, shape=(4, 6))
        mesh.all_reduce_(t, axis, op="max")
        assert_close(t, torch.stack([gen("u_ar", p, shape=(4, 6)) for p in peers]).amax(0))
        t = gen("u_ar", r, shape=(4, 6))
        mesh.all_reduce_(t, axis, op="mean")
        assert_close(t, sum(gen("u_ar", p, shape=(4, 6)) for p in peers) / n)
        tnc = gen("u_nc", r, shape=(6, 4)).t()           # non-contiguous, in place
        mesh.all_reduce_(tnc, axis)
        assert_close(tnc, sum(gen("u_nc", p, shape=(6, 4)) for p in peers).t())
        g = mesh.all_gather_flat(gen("u_ag", r, shape=(2, 3)), axis, dim=1)
        assert_close(g, torch.cat([gen("u_ag", p, shape=(2, 3)) for p in peers], 1))
        s = mesh.reduce_scatter_flat(gen("u_rs", r, shape=(8, 3)), axis)
        assert_close(s, sum(gen("u_rs", p, shape=(8, 3)) for p in peers).chunk(n, 0)[c])
        a2 = mesh.all_to_all_flat(gen("u_a2a", r, shape=(4, 4)), axis, split_dim=0, concat_dim=1)
        assert_close(a2, torch.cat([gen("u_a2a", p, shape=(4, 4)).chunk(n, 0)[c] for p in peers], 1))
        t = gen("u_bc", r, shape=(5,))
        assert mesh.broadcast_(t, axis, root_coord=n - 1) is t
        assert_close(t, gen("u_bc", peers[-1], shape=(5,)))
        assert mesh.all_reduce_scalar(float(r), axis) == float(sum(peers))
        assert mesh.all_reduce_scalar(float(r), axis, op="max") == float(max(peers))
        assert mesh.all_reduce_scalar(float(r), axis, op="mean") == sum(peers) / n
        expect([("all_reduce", axis, 192, "optimizer")] * 4
               + [("all_gather", axis, 48 * n, "optimizer"), ("reduce_scatter", axis, 192, "optimizer"),
                  ("all_to_all", axis, 128, "optimizer"), ("broadcast", axis, 40, "optimizer")])
    mesh.all_reduce_(torch.zeros(2), "tp", phase="forward")
    expect([("all_reduce", "tp", 8, "forward")])

    # -- a utility op called from a gradient hook is accounted as "backward"
    a = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    a.register_hook(lambda grad: mesh.all_reduce_(grad.clone(), "dp"))
    (a * gen("hook", r, shape=(3,))).sum().backward()
    assert_close(a.grad, sum(gen("hook", p, shape=(3,)) for p in mesh.axis_ranks("dp")))
    expect([("all_reduce", "dp", 24, "backward")])
    assert not rt.in_backward()

    # -- clear errors (raised locally, identically on every rank: no hang)
    for bad in (lambda: rt.scatter(torch.zeros(3, 4), mesh, "tp", 0),
                lambda: rt.reduce_scatter(torch.zeros(4, 3), mesh, "dp", 1),
                lambda: rt.all_to_all(torch.zeros(3, 4), mesh, "tp", 0, 1),
                lambda: mesh.reduce_scatter_flat(torch.zeros(5), None),
                lambda: rt.all_gather(torch.zeros(2), mesh, "tp", dim=1),
                lambda: rt.init_mesh({"dp": 3, "tp": 2}, backend=backend)):
        try:
            bad()
        except ValueError as e:
            assert "divisible" in str(e) or "range" in str(e) or "world size" in str(e), e
        else:
            raise AssertionError("expected ValueError")
    try:
        rt.copy_to(torch.zeros(2), mesh, "pp")
    except KeyError:
        pass
    else:
        raise AssertionError("expected KeyError for an unknown axis")
    expect([])

    # -- byte totals agree with the event log; reset clears both
    totals = {}
    for e in mesh.events:
        totals[(e.kind, e.axis)] = totals.get((e.kind, e.axis), 0) + e.bytes
    assert mesh.traffic == totals and all(k[0] in rt.KINDS for k in totals)
    assert mesh.traffic_bytes(kind="all_to_all", axis="tp", phase="backward") == 3 * 1536 // 2
    mesh.reset_traffic()
    assert mesh.traffic == {} and mesh.events == []
    cursor[0] = 0

    # -- a second mesh over the same processes, with a size-1 axis
    m2 = rt.init_mesh({"dp": 2, "one": 1, "tp": 2}, backend=backend)
    assert (m2.coord("dp"), m2.coord("one"), m2.coord("tp")) == (r // 2, 0, r % 2)
    assert m2.axis_ranks("one") == [r] and m2.group("one") is None
    x = gen("one", r, shape=(2, 4)).requires_grad_()
    y = rt.copy_to(x, m2, "one")
    y = rt.all_reduce(y, m2, "one")
    y = rt.all_gather(y, m2, "one", dim=0, partial_grad=True)
    y = rt.scatter(y, m2, "one", dim=1)
    y = rt.reduce_scatter(y, m2, "one", dim=1)
    y = rt.all_to_all(y, m2, "one", 0, 1)
    y.sum().backward()
    assert y is x
    assert_close(x.grad, torch.ones(2, 4, dtype=torch.float64))
    t = torch.ones(4)
    m2.all_reduce_(t, "one")
    m2.broadcast_(t, "one")
    assert torch.equal(m2.all_gather_flat(t, "one"), torch.ones(4))
    assert torch.equal(m2.reduce_scatter_flat(t, "one"), torch.ones(4))
    assert m2.all_reduce_scalar(2.5, "one") == 2.5
    assert m2.traffic == {} and m2.events == []
    yt = rt.all_gather(torch.full((1,), float(r)), m2, "tp", dim=0)   # m2's groups work too
    assert yt.tolist() == [float(p) for p in m2.axis_ranks("tp")]
    assert m2.traffic == {("all_gather", "tp"): 8}
    m2.shutdown()

    mesh.barrier()
    assert mesh.all_reduce_scalar(1.0) == float(WORLD)
    overlap_checks(mesh, gen)
    expert_parallel_checks(mesh, gen)
    rt.log(mesh, "rank-0-only log line")
    mesh.shutdown()
    mesh.shutdown()  # idempotent
    sys.stdout.flush()
    os.write(1, f"RANK {r} ok\n".encode())  # one write: lines of different ranks can't interleave


def overlap_checks(mesh, gen) -> None:
    """Gradient buckets and ZeRO-3's schedule against the plain per-use collectives: the same
    gradients, the same bytes, one call per bucket, and a block's gathered weights gone after
    its forward."""
    import gc

    import torch
    from torch.testing import assert_close

    from autopar.backends import runtime as rt

    def blocks(n=3, d=8):
        torch.manual_seed(0)
        m = torch.nn.Module()
        m.h = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(n))
        m.head = torch.nn.Linear(d, 2)
        return m
    x = gen("ov", mesh.coord("dp"), shape=(4, 8), dtype=torch.float32)

    # data parallel: per-use copy_to (all_reduce in backward) vs buckets
    def dp_loss(m, wrap):
        h = x
        for blk in m.h:
            h = torch.tanh(torch.nn.functional.linear(h, wrap(blk.weight), wrap(blk.bias)))
        return torch.nn.functional.linear(h, wrap(m.head.weight), wrap(m.head.bias)).sum()
    plain, bucketed = blocks(), blocks()
    mesh.reset_traffic()
    dp_loss(plain, lambda p: rt.copy_to(p, mesh, "dp")).backward()
    per_use = dict(mesh.traffic)
    order = [("head.bias", ("dp",)), ("head.weight", ("dp",)),
             ("h.*", [("bias", ("dp",)), ("weight", ("dp",))], 3)]
    grads = rt.GradBuckets(mesh, order, bucketed, bucket_bytes=300, first_bucket_bytes=40)
    assert len(grads.buckets) >= 3
    mesh.reset_traffic()
    dp_loss(bucketed, lambda p: p).backward()          # the hooks reduce; backward's end waits
    assert dict(mesh.traffic) == per_use
    assert sum(e.kind == "all_reduce" for e in mesh.events) == len(grads.buckets)
    for (name, a), b in zip(plain.named_parameters(), bucketed.parameters()):
        assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-6, msg=name)
    with grads.no_sync():                               # accumulate locally, reduce nothing
        mesh.reset_traffic()
        dp_loss(bucketed, lambda p: p).backward()
        assert not mesh.events

    # the optimizer step behind the last bucket (`defer`): the same update as waiting first
    class Late:                                         # a bucket still in flight at step()
        def __init__(self, h):
            self.h = h

        def done(self):
            return False

        def wait(self):
            return self.h.wait()
    deferred, waited = blocks(), blocks()
    gd = rt.GradBuckets(mesh, order, deferred, bucket_bytes=300, first_bucket_bytes=40)
    gw = rt.GradBuckets(mesh, order, waited, bucket_bytes=300, first_bucket_bytes=40)
    gd.defer = True
    opt_d = torch.optim.AdamW(deferred.parameters(), lr=0.1, weight_decay=0.1)
    opt_w = torch.optim.AdamW(waited.parameters(), lr=0.1, weight_decay=0.1)
    steps = []
    opt_d.register_step_post_hook(lambda opt, args, kw: steps.append(
        sum(p.grad is not None for p in deferred.parameters())))
    for it in range(3):
        mesh.reset_traffic()
        dp_loss(deferred, lambda p: p).backward()
        flying = sorted((b for b in gd.buckets if b.handle is not None), key=lambda b: b.launched)
        assert len(flying) == len(gd.buckets) and gd._deferred     # backward waited for none
        for b in flying[:-1]:
            b.handle.wait()
        flying[-1].handle = Late(flying[-1].handle)
        late = len(flying[-1].params)
        steps.clear()
        gd.step(opt_d)
        # two steps: every parameter but the late bucket's, then those
        assert steps == [sum(1 for _ in deferred.parameters()) - late, late], steps
        assert sum(e.kind == "all_reduce" for e in mesh.events) == len(gd.buckets)
        dp_loss(waited, lambda p: p).backward()
        opt_w.step()
        for (name, a), b in zip(waited.named_parameters(), deferred.parameters()):
            assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)
            assert_close(b, a, rtol=0, atol=0, msg=name)
        opt_d.zero_grad(set_to_none=True)
        opt_w.zero_grad(set_to_none=True)
    steps.clear()
    gd.step(opt_d)                                      # nothing in flight: one plain step
    assert len(steps) == 1

    # ZeRO-3: plain all_gather per use vs ParamGather (prefetch, reshard after forward)
    def shards(m):
        for p in m.parameters():
            p.data = mesh.chunk(p.data, "dp", 0).clone()
        return m
    plain, z3 = shards(blocks()), shards(blocks())
    live = []
    gather = None

    def z3_forward(m, gathered):
        h = x
        for blk in m.h:
            w, b = gathered(blk.weight), gathered(blk.bias)
            h = torch.tanh(torch.nn.functional.linear(h, w, b))
            if m is z3:
                live.append(len([1 for ref, _ in gather._live.values() if ref() is not None]))
            del w, b
        return torch.nn.functional.linear(h, gathered(m.head.weight), gathered(m.head.bias)).sum()

    class Net(torch.nn.Module):                         # forward hooks install the packing
        def __init__(self, m, gathered):
            super().__init__()
            self.m, self.gathered = m, gathered

        def forward(self):
            return z3_forward(self.m, self.gathered)
    mesh.reset_traffic()
    z3_forward(plain, lambda p: rt.all_gather(p, mesh, "dp", dim=0, partial_grad=True)).backward()
    before = dict(mesh.traffic)
    net = Net(z3, lambda p: rt.gather_param(p, mesh, "dp", dim=0))
    gather = rt.ParamGather(mesh, "dp", net, lambda n: ("S(0)", "R"), blocks=["m.h"], prefetch=1)
    assert [u.name for u in gather.units] == ["m.h.0", "m.h.1", "m.h.2"]
    mesh.reset_traffic()
    loss = net()
    gc.collect()
    # each block's weights are gone once the next block runs: only this block's two are alive
    assert live == [2, 2, 2], live
    # one reduce_scatter in flight: a unit's full-size gradients are freed at the next's
    inflight, launch = [], gather._launch_scatter

    def counted(parts):
        launch(parts)
        inflight.append(len(gather._grads))
    gather._launch_scatter = counted
    loss.backward()
    assert inflight == [1] * 4 and not gather._grads, inflight     # 3 blocks and the root
    block_bytes = sum(p.numel() * 2 * 4 for p in z3.h.parameters())
    assert mesh.traffic[("reduce_scatter", "dp")] == before[("reduce_scatter", "dp")]
    assert mesh.traffic[("all_gather", "dp")] == before[("all_gather", "dp")] + block_bytes
    for (name, a), b in zip(plain.named_parameters(), z3.parameters()):
        assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-6, msg=name)
    del gather



def expert_parallel_checks(mesh, gen) -> None:
    """`rt.moe_experts` expert-parallel over each axis against the op on one device: the
    axis' ranks hold their own tokens and E/n experts each; outputs and every gradient
    match the single-device op on all the axis' tokens, and each all_to_all is recorded by
    the bytes `sharding.expert_collectives` predicts (own rows, whatever the routing)."""
    import torch
    from torch.testing import assert_close

    from autopar.backends import runtime as rt
    from autopar.compiler.moe import moe_reference
    from autopar.compiler.sharding import expert_collectives

    T, H, I, E, k = 6, 8, 4, 4, 2          # per rank: T tokens; E experts over the axis
    for axis in ("dp", "tp"):
        n, c, base = mesh.size(axis), mesh.coord(axis), mesh.axis_ranks(axis)[0]
        for routing in ("random", "skewed"):
            hidden = gen("moe_h", base, shape=(n * T, H))
            g = torch.Generator().manual_seed(base)
            if routing == "random":
                index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(n * T)])
            else:   # every token to experts 0 and 1: coordinate 0 gets all rows, 1 none
                index = torch.tensor([[0, 1]] * (n * T))
            weights = torch.softmax(gen("moe_w", base, shape=(n * T, k)), dim=-1)
            gate, up = gen("moe_g", base, shape=(E, I, H)), gen("moe_u", base, shape=(E, I, H))
            down = gen("moe_d", base, shape=(E, H, I))
            grad_out = gen("moe_y", base, shape=(n * T, H))

            full = [t.clone().requires_grad_() for t in (hidden, weights, gate, up, down)]
            ref = moe_reference(full[0], index, full[1], *full[2:])
            ref.backward(grad_out)

            mine = [t.chunk(n, 0)[c].clone().requires_grad_() for t in (hidden, weights, gate, up, down)]
            mesh.reset_traffic()
            before = len(mesh.events)
            out = rt.moe_experts(mine[0], index.chunk(n, 0)[c], mine[1], *mine[2:], mesh=mesh, axis=axis)
            assert_close(out, ref.detach().chunk(n, 0)[c], msg=f"{axis} {routing}")
            out.backward(grad_out.chunk(n, 0)[c])
            for name, a, b in zip(("hidden", "weights", "gate", "up", "down"), full, mine):
                assert_close(b.grad, a.grad.chunk(n, 0)[c], msg=f"{axis} {routing}: grad of {name}")
            got = [(e.kind, e.axis, e.bytes, e.phase) for e in mesh.events[before:]]
            want = [(col.kind, col.axis, col.bytes, col.phase)
                    for col in expert_collectives(axis, E, T * k, H * hidden.element_size())]
            assert got == want, f"{axis} {routing}: events {got} != predicted {want}"


# ==========================================================================
# pytest side
# ==========================================================================
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment in which ``import autopar.backends.runtime`` resolves to this repo."""
    e = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(var, None)
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONUNBUFFERED"] = "1"
    e["PYTHONWARNINGS"] = "ignore::FutureWarning"
    try:
        spec = importlib.util.find_spec("autopar.backends.runtime")
    except ImportError:
        spec = None
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != RUNTIME_DIR:
        shim = tmp_path_factory.mktemp("shim")
        (shim / "autopar").mkdir()
        (shim / "autopar" / "__init__.py").write_text("")
        (shim / "autopar" / "backends").symlink_to(REPO / "backends", target_is_directory=True)
        (shim / "autopar" / "compiler").symlink_to(REPO / "compiler", target_is_directory=True)
        e["PYTHONPATH"] = os.pathsep.join([str(shim)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    return e


def _descendants(pid):
    """All live descendants of ``pid`` (from /proc; torchrun puts its workers in
    their own sessions, so killing the launcher's process group is not enough)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_tree(proc):
    """Kill ``proc`` (still alive / unreaped, so its pid cannot have been reused),
    its process group and all its descendants."""
    victims = _descendants(proc.pid) if os.path.isdir("/proc") else []
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _launch(cmd, env, timeout=LAUNCH_TIMEOUT_S):
    """Run ``cmd`` in a new session; on timeout kill it and every descendant."""
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a pipe still held open somewhere
            out = ""
        pytest.fail(f"{' '.join(cmd[:4])} ... timed out after {timeout}s; output:\n{out[-6000:]}")
    return proc.returncode, out


def _assert_all_ok(rc, out):
    missing = [r for r in range(WORLD) if f"RANK {r} ok" not in out]
    assert rc == 0 and not missing, f"rc={rc}, ranks without ok: {missing}; output:\n{out[-8000:]}"
    assert out.count("rank-0-only log line") == 1


def test_import_is_light_and_single_process(env):
    code = (
        "import sys\n"
        "from autopar.backends import runtime as rt\n"
        # the runtime reads the core's collective table (standard library only) and nothing
        # else of the compiler
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('mpi4py', 'ortools', 'lark')"
        " or m.startswith('autopar.compiler') and m not in ('autopar.compiler',"
        " 'autopar.compiler.collectives', 'autopar.compiler.buckets', 'autopar.compiler.moe') or m.startswith(('autopar.passes', 'autopar.dsl'))]\n"
        "assert not heavy, heavy\n"
        "import torch\n"
        "m = rt.init_mesh({'dp': 1, 'tp': 1})\n"
        "assert (m.rank, m.world_size, m.coord('tp')) == (0, 1, 0)\n"
        "x = torch.ones(2, 4, requires_grad=True)\n"
        "y = rt.all_to_all(rt.all_gather(rt.copy_to(x, m, 'tp'), m, 'dp', dim=0), m, 'tp', 0, 1)\n"
        "y.sum().backward()\n"
        "assert torch.equal(x.grad, torch.ones(2, 4)) and m.traffic == {}\n"
        "assert m.all_reduce_scalar(3.0) == 3.0\n"
        "try:\n"
        "    rt.init_mesh({'dp': 2}, backend='torch')\n"
        "except ValueError as e:\n"
        "    assert 'world size' in str(e)\n"
        "else:\n"
        "    raise AssertionError('expected ValueError')\n"
        "m.shutdown()\n"
        "print('light ok')\n"
    )
    rc, out = _launch([sys.executable, "-c", code], env, timeout=60)
    assert rc == 0 and "light ok" in out, out[-4000:]


def test_torch_backend_4_ranks(env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(Path(__file__).resolve()), "torch"]
    _assert_all_ok(*_launch(cmd, env))


def test_mpi_backend_4_ranks(env):
    pytest.importorskip("mpi4py")
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip(f"no mpiexec next to {sys.executable}")
    cmd = [str(mpiexec), "-n", str(WORLD), sys.executable, str(Path(__file__).resolve()), "mpi"]
    _assert_all_ok(*_launch(cmd, env))


if __name__ == "__main__":
    _worker(sys.argv[1])


def test_memory_probe_counts_live_storages_once_and_the_step_peak(tmp_path):
    """backends/runtime/timeline.py's MemoryProbe: the storages alive at begin() (a view
    shares its base's storage, counted once), plus the most the profiled step held on top
    of them -- a temporary freed before the step ends still counts, a tensor freed that was
    allocated before the step lowers the running total."""

    import torch
    from torch.profiler import ProfilerActivity, profile

    from autopar.backends.runtime.timeline import MemoryProbe, live_tensor_bytes
    before = live_tensor_bytes(torch.device("cpu"))
    keep = torch.zeros(1 << 20)                       # 4 MiB
    view = keep[: 1 << 10]                            # same storage
    assert live_tensor_bytes(torch.device("cpu")) - before == 4 << 20
    probe = MemoryProbe(torch.device("cpu"))
    probe.begin()
    assert probe.held - before == 4 << 20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tmp = torch.ones(2 << 20)                     # 8 MiB, freed inside the step
        out = tmp * 2                                 # 8 MiB more at the peak
        del tmp
        total = out.sum()
        del out, keep, view                           # allocated before the step: -4 MiB
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    mem = probe.peak(str(path))
    assert (16 << 20) <= mem["step_extra"] < (16 << 20) + (1 << 16)
    assert mem["peak"] == mem["held_at_start"] + mem["step_extra"]
    assert total.item() == 2 * (2 << 20)

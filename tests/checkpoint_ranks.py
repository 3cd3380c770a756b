"""4 ranks: save training state on dp=2,tp=2 (ZeRO-1 optimizer chunks over dp), load it on
tp=4 and on dp=4 (ZeRO-1 over dp), check every element, take one more AdamW step.

    python -m torch.distributed.run --nproc-per-node 4 tests/checkpoint_ranks.py torch OUT
    mpiexec -n 4 python tests/checkpoint_ranks.py mpi OUT

Every rank builds the same global tensors from one seed, so each can compute what its
slice must hold. AdamW is elementwise, so a shard's state after a step on the shard of
the gradient equals that shard of the single-device state: the single-device optimizer
on the full tensors is the reference, compared with torch.equal. Rank 0 prints
`checkpoint ranks: ok` when every rank passed (the job fails otherwise).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from autopar.backends import runtime as rt
from autopar.backends.runtime.checkpoint import ShardSpec, zero_chunk

# name -> global shape; c_attn.weight.{0,1,2} are the q/k/v rows of one fused weight
SHAPES = {
    "wte.weight": (16, 8),
    "fc.weight": (12, 8),
    "fc.bias": (12,),
    "ln.weight": (7,),                # odd sizes: ZeRO padding, uneven torch.chunk
    "head.weight": (5, 8),
    "c_attn.weight.0": (8, 8), "c_attn.weight.1": (8, 8), "c_attn.weight.2": (8, 8),
}
SOURCE = {f"c_attn.weight.{i}": ("c_attn.weight", 0, 8 * i, 8 * (i + 1)) for i in range(3)}
# dp=2,tp=2 layouts (dp first): the params of the first plan
LAYOUT_A = {"wte.weight": ("R", "S(0)"), "fc.weight": ("R", "S(1)"), "fc.bias": ("R", "S(0)"),
            "ln.weight": ("R", "R"), "head.weight": ("R", "R"),
            "c_attn.weight.0": ("R", "S(0)"), "c_attn.weight.1": ("R", "S(0)"), "c_attn.weight.2": ("R", "S(0)")}
ZERO_A = {"ln.weight", "head.weight", "fc.weight"}       # optimizer state in 1/dp flat chunks
LAYOUT_B = {"wte.weight": ("S(1)",), "fc.weight": ("S(0)",), "fc.bias": ("R",), "ln.weight": ("S(0)",),
            "head.weight": ("S(0)",), "c_attn.weight.0": ("S(1)",), "c_attn.weight.1": ("S(1)",),
            "c_attn.weight.2": ("R",)}


def global_state(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    grads = [{k: torch.randn(s, generator=g) for k, s in SHAPES.items()} for _ in range(2)]
    return params, grads


def block(full: torch.Tensor, layout, mesh) -> torch.Tensor:
    for (axis, n), p in zip(mesh.axes.items(), layout):
        if p.startswith("S("):
            d = int(p[2:-1])
            parts = full.chunk(n, d)
            c = mesh.coord(axis)
            full = parts[c] if c < len(parts) else full.narrow(d, 0, 0)
    return full


def flat_chunk(full: torch.Tensor, n: int, i: int) -> torch.Tensor:
    off, size = zero_chunk(full.numel(), n, i)
    return F.pad(full.reshape(-1), (0, size * n - full.numel()))[off:off + size]


def local_of(full, name, layout, zero_axis, mesh):
    """The rank's parameter block, and the tensor its optimizer works on (a flat chunk
    over `zero_axis` for a ZeRO parameter)."""
    blk = block(full, layout, mesh)
    if zero_axis is None:
        return blk
    return flat_chunk(blk, mesh.size(zero_axis), mesh.coord(zero_axis))


def adamw(tensors, grads, steps, state=None):
    ps = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    opt = torch.optim.AdamW(list(ps.values()), lr=1e-2, weight_decay=0.1, foreach=False)
    if state is not None:
        rt.restore_optimizer(opt, ps, state)
    for gr in grads[:steps]:
        for k, p in ps.items():
            p.grad = gr[k].clone()
        opt.step()
    return ps, opt


def main() -> int:
    backend, out = sys.argv[1], Path(sys.argv[2])
    rt.one_thread()
    mesh = rt.init_mesh({"dp": 2, "tp": 2}, backend=backend)
    params, grads = global_state()
    problems = []

    # reference: single-device AdamW on the full tensors, one step and two steps
    ref1, ref_opt1 = adamw(params, grads, 1)
    ref2, _ = adamw(params, grads, 2)
    ref_state = {f"{k}.{key}": v for k, p in ref1.items() for key, v in ref_opt1.state[p].items()}

    # plan A: the first step on dp=2,tp=2; ZeRO params keep state in dp chunks
    opt_locals, specs_opt, specs_param = {}, {}, {}
    for k, full in params.items():
        specs_param[k] = ShardSpec(SHAPES[k], LAYOUT_A[k], source=SOURCE.get(k))
        if k in ZERO_A:
            specs_opt[k] = ShardSpec(SHAPES[k], ("F",) + LAYOUT_A[k][1:])
            opt_locals[k] = local_of(full, k, LAYOUT_A[k], "dp", mesh)
        else:
            specs_opt[k] = specs_param[k]
            opt_locals[k] = local_of(full, k, LAYOUT_A[k], None, mesh)
    local_grads = [{k: (local_of(gr[k], k, LAYOUT_A[k], "dp" if k in ZERO_A else None, mesh))
                    for k in SHAPES} for gr in grads]
    ps, opt = adamw(opt_locals, local_grads, 1)
    # after the step each rank's full parameter block is the reference block (a ZeRO
    # program all-gathers it; here every rank just takes it from the reference)
    model = {k: (block(ref1[k].detach(), LAYOUT_A[k], mesh).clone(), specs_param[k]) for k in SHAPES}
    opt_state = rt.optimizer_shards(opt, ps, specs_opt)
    rng = rt.capture_rng_state()
    plan = {"model": "toy", "mesh": dict(mesh.axes), "zero": 1, "dp_axis": "dp"}
    rt.save_checkpoint(out / "sync", mesh, 1, model, opt_state, rng, plan, keep=2,
                       aliases={"lm_head.weight": "wte.weight"})
    h = rt.save_checkpoint(out / "async", mesh, 1, model, opt_state, rng, plan, async_=True)
    for t, _ in model.values():              # training goes on: the snapshot must not see this
        t.add_(1000.0)
    h.wait()
    mesh.barrier()

    # reload on the same mesh: the RNG state comes back for the same world
    got = rt.load_checkpoint(out / "sync", mesh, specs_param,
                             optimizer=rt.optimizer_wanted(ps, specs_opt))
    if got.rng is None or not torch.equal(got.rng["torch"], rng["torch"]):
        problems.append("rng state not restored on the same mesh")
    if got.step != 1 or got.plan != plan:
        problems.append(f"step/plan: {got.step} {got.plan}")

    # plan B: tp=4, no ZeRO; plan C: dp=4, ZeRO-1 over dp
    for axes, layouts, zero in (({"tp": 4}, LAYOUT_B, set()), ({"dp": 4}, None, set(SHAPES))):
        m = rt.init_mesh(axes, backend=backend)
        n_axes = len(axes)
        lay = layouts or {k: ("R",) * n_axes for k in SHAPES}
        zero_axis = "dp" if zero else None
        want_p = {k: ShardSpec(SHAPES[k], lay[k]) for k in SHAPES}
        want_o = {k: ShardSpec(SHAPES[k], ("F",) if k in zero else lay[k]) for k in SHAPES}
        for which in ("sync", "async"):
            got = rt.load_checkpoint(out / which, m, want_p, optimizer=rt.optimizer_wanted(want_p, want_o))
            for k in SHAPES:
                want = block(ref1[k].detach(), lay[k], m)
                if not torch.equal(got.tensors[k], want):
                    problems.append(f"{which} {axes} param {k} differs on rank {m.rank}")
                for key in ("exp_avg", "exp_avg_sq"):
                    full = ref_state[f"{k}.{key}"]
                    want = local_of(full, k, lay[k], zero_axis if k in zero else None, m)
                    if not torch.equal(got.optimizer[f"{k}.{key}"], want):
                        problems.append(f"{which} {axes} {k}.{key} differs on rank {m.rank}")
                if float(got.optimizer[f"{k}.step"]) != 1.0:
                    problems.append(f"{which} {axes} {k}.step = {got.optimizer[f'{k}.step']}")
        # continue training under the new plan: one more step equals the reference's second
        olocal = {k: local_of(got.tensors[k], k, ("R",) * n_axes, zero_axis if k in zero else None, m)
                  for k in SHAPES}
        ogr = [{k: local_of(gr[k], k, lay[k], zero_axis if k in zero else None, m) for k in SHAPES}
               for gr in grads[1:]]
        ps2, _ = adamw(olocal, ogr, 1, state=got.optimizer)
        for k in SHAPES:
            want = local_of(ref2[k].detach(), k, lay[k], zero_axis if k in zero else None, m)
            if not torch.equal(ps2[k].detach(), want):
                err = (ps2[k].detach() - want).abs().max().item()
                problems.append(f"{axes} step 2 of {k} differs on rank {m.rank} (max {err:.3g})")
        m.barrier()

    (out / f"rank{mesh.rank}.json").write_text(json.dumps({"rank": mesh.rank, "problems": problems}))
    ok = mesh.all_reduce_scalar(float(len(problems))) == 0
    if problems:
        print(f"rank {mesh.rank}: " + "; ".join(problems[:5]), file=sys.stderr, flush=True)
    rt.log(mesh, "checkpoint ranks: ok" if ok else "checkpoint ranks: FAILED")
    mesh.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

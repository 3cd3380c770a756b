"""A user's own training loop around `autopar.compile()`, run in each rank of a launched job
(tests/test_codegen.py starts it on 4 ranks): fresh batches each step, AdamW on the rank's
shards, the global loss per step written by rank 0."""
import json
import os
import sys

import torch

import autopar


def batches(vocab, steps, batch=8, seq=32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, vocab, (batch, seq), generator=g),
             torch.randint(0, vocab, (batch, seq), generator=g)) for _ in range(steps)]


def main(out: str, steps: int = 3):
    import importlib.util
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    spec = importlib.util.spec_from_file_location("gpt_example", os.path.join(root, "examples", "gpt.py"))
    gpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpt)
    torch.set_num_threads(1)
    model, example = gpt.build()
    # a plan that shards (a replica does not fit 1.3 MB, even with the blocks recomputed) and
    # leaves the optimizer to the user
    plan = os.path.join(os.path.dirname(out), f"user_loop.rank{os.environ.get('RANK', '0')}.plan")
    with open(plan, "w") as f:
        f.write("mesh dp=2, tp=2\ndevice h100\nmemory 1.3MB\nzero 0 over dp\n")
    par = autopar.compile(model, example, mesh="dp=2,tp=2", plan=plan)
    opt = torch.optim.AdamW(par.parameters(), lr=1e-3)
    losses = []
    for idx, targets in batches(model.config.vocab_size, steps):    # batch 8: twice the example's
        loss = par(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "zero": par.plan.zero,
                       "sharded": sorted(k for k, lay in par.plan.layouts.items()
                                         if k in dict(model.named_parameters()) and lay != ["R", "R"]),
                       "local_numel": sum(p.numel() for p in par.parameters()),
                       "state_dict": sorted(par.state_dict())}, f)


if __name__ == "__main__":
    main(sys.argv[1])

"""bf16 training with fp32 master weights: the precision policy of `--precision bf16`.

The module's floating parameters and buffers are held in bfloat16, so forward, backward,
the activations' collectives and the gradient reductions all run (and are counted) in
bf16. The optimizer never sees them: it steps fp32 master copies of the trainable
parameters (its moments are fp32 too). After backward each bf16 gradient is widened onto
its master; after the step the bf16 weights are rounded from the masters again."""
from __future__ import annotations

import torch


class MasterWeights:
    """fp32 masters of `model`'s trainable parameters, taken before the model is cast.
    `skip`: parameter names that get none here (ZeRO-1/2's, whose fp32 chunks, cut before
    the cast, are their masters); they are cast to bf16 all the same.

        >>> masters = MasterWeights(model)                # doctest: +SKIP
        >>> opt = torch.optim.AdamW(masters.params())     # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, skip=()):
        self.model = model
        skip = set(skip)
        self.pairs = [(p, p.detach().float().clone().requires_grad_(True))
                      for name, p in model.named_parameters() if p.requires_grad and name not in skip]
        self.of = {id(p): m for p, m in self.pairs}
        model.to(torch.bfloat16)          # floating tensors only; integer buffers stay

    def params(self) -> list[torch.Tensor]:
        return [m for _, m in self.pairs]

    def grads_to_masters(self) -> None:
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        for p, m in self.pairs:
            p.copy_(m)

    def state_dict(self, exact=None) -> dict[str, torch.Tensor]:
        """The model's state with each trainable parameter's fp32 master in its place (what
        a rank saves); other floating entries widened back to fp32. `exact`: fp32 values by
        name for the skipped parameters (ZeRO's masters, gathered)."""
        out = {}
        params = dict(self.model.named_parameters())      # a tied name shares its tensor's
        given = {id(params[n]): v for n, v in (exact or {}).items()}
        for k, t in self.model.state_dict(keep_vars=True).items():
            m = given.get(id(t), self.of.get(id(t)))
            out[k] = (m if m is not None else t).detach().float() if t.is_floating_point() else t.detach()
        return out


def to_compute(t: torch.Tensor) -> torch.Tensor:
    """An input under the bf16 policy: floating -> bf16, integer untouched."""
    return t.to(torch.bfloat16) if t.is_floating_point() else t

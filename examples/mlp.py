"""
A plain multi-layer perceptron trained with an MSE loss.

This is the smallest example for autopar: a stack of Linear/GELU blocks
(d_in -> d_hidden -> ... -> d_hidden -> d_out) whose forward returns a scalar
loss. It has no data-dependent control flow, no size unpacking and no
buffers, so it can be captured by both `torch.export.export` and
`torch.fx.symbolic_trace`. The wide hidden layers are the classic target for
Megatron-style column/row tensor parallelism.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MLPConfig:
    d_in: int = 64
    d_hidden: int = 1024
    d_out: int = 64
    n_layers: int = 2  # number of hidden Linear+GELU blocks
    batch: int = 8


class MLP(nn.Module):

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        layers = []
        d = config.d_in
        for _ in range(config.n_layers):
            layers += [nn.Linear(d, config.d_hidden), nn.GELU()]
            d = config.d_hidden
        layers.append(nn.Linear(d, config.d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x, target):
        y = self.net(x)
        return F.mse_loss(y, target)


def build(config: MLPConfig = None):
    """Return (model, (x, target)) for a small deterministic MLP."""
    config = config or MLPConfig()
    torch.manual_seed(0)
    model = MLP(config)
    model.train()
    x = torch.randn(config.batch, config.d_in)
    target = torch.randn(config.batch, config.d_out)
    return model, (x, target)


if __name__ == "__main__":
    model, inputs = build()
    print(f"params: {sum(p.numel() for p in model.parameters()):,}")
    print(f"loss: {model(*inputs).item():.6f}")

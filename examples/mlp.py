"""
A multi-layer perceptron regressed onto random targets with a mean-squared-error loss.

The smallest model autopar handles, and the first to try a change on: Linear + GELU
layers d_in -> d_hidden -> ... -> d_hidden, then a Linear to d_out, and `forward(x,
target)` returns the loss. Nothing in it depends on data, unpacks sizes or holds buffers,
so both front ends (`torch.export.export` and `torch.fx.symbolic_trace`) capture it. Its
wide hidden layers are what Megatron-style tensor parallelism cuts: one Linear by output
columns, the next by input rows, with one all-reduce between them in the forward pass.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MLPConfig:
    """Layer widths, depth and the batch size of `build()`'s example inputs.

        >>> MLPConfig(n_layers=3).d_hidden
        1024
    """
    d_in: int = 64
    d_hidden: int = 1024
    d_out: int = 64
    n_layers: int = 2             # Linear + GELU pairs before the output Linear
    batch: int = 8


class MLP(nn.Module):
    """`n_layers` Linear + GELU pairs and an output Linear in one nn.Sequential `net`
    (parameters `net.0.weight`, `net.2.weight`, ...).

        >>> MLP(MLPConfig(n_layers=1)).net
        Sequential(
          (0): Linear(in_features=64, out_features=1024, bias=True)
          (1): GELU(approximate='none')
          (2): Linear(in_features=1024, out_features=64, bias=True)
        )
    """

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        widths = [config.d_in] + [config.d_hidden] * config.n_layers
        layers = []
        for d_from, d_to in zip(widths, widths[1:]):
            layers += [nn.Linear(d_from, d_to), nn.GELU()]
        layers.append(nn.Linear(widths[-1], config.d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x, target):
        return F.mse_loss(self.net(x), target)


def build(config: MLPConfig = None):
    """An MLP and a random (x, target) batch of `config.batch` rows, the same on every
    call (seed 0).

        >>> model, (x, target) = build()
        >>> x.shape, target.shape
        (torch.Size([8, 64]), torch.Size([8, 64]))
    """
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

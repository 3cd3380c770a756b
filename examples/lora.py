"""
Low-rank adaptation (LoRA) of a frozen GPT: the training graph where almost nothing trains.

The GPT of examples/gpt.py is built as usual, every one of its parameters is frozen, and
each attention projection (`attn.c_attn`, `attn.c_proj`) is replaced by a LoRALinear that
keeps the frozen layer as `base` and adds a trainable rank-r correction:

    y = base(x) + (x @ lora_A.T @ lora_B.T) * (alpha / r)

lora_A is (r, in) and lora_B is (out, r), so the adapters hold r * (in + out) numbers per
projection against in * out frozen ones. For autopar this means: frozen weights get no
gradient and no optimizer state, and the backward only runs where it leads to an adapter.

Unlike the LoRA paper, which starts lora_B at zero so that training begins from the base
model exactly, both factors start small and random here: with a zero lora_B the first
step's gradient of lora_A is zero too, and a parity test of that step would not see it.
"""

import importlib.util
import pathlib
import sys

import torch
import torch.nn as nn


def _import_gpt():
    """examples/gpt.py as a module, found next to this file: SPECs load this file by path,
    so neither the working directory nor sys.path can be relied on."""
    name = "autopar_examples_gpt"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).resolve().with_name("gpt.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


gpt = _import_gpt()
GPT, GPTConfig = gpt.GPT, gpt.GPTConfig


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update of rank `r`, scaled by alpha / r
    so that changing r does not change the update's size at init.

        >>> layer = LoRALinear(nn.Linear(64, 32), r=4)
        >>> [n for n, p in layer.named_parameters() if p.requires_grad]
        ['lora_A', 'lora_B']
    """

    def __init__(self, base: nn.Linear, r: int = 4, alpha: float = 8):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.r = r
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(0.02 * torch.randn(r, base.in_features))
        self.lora_B = nn.Parameter(0.02 * torch.randn(base.out_features, r))

    def forward(self, x):
        frozen = self.base(x)
        update = x @ self.lora_A.T @ self.lora_B.T        # (.., in) -> (.., r) -> (.., out)
        return frozen + update * self.scaling


def add_lora(model: nn.Module, r: int = 4, alpha: float = 8):
    """Freeze `model` (a GPT) and put a LoRALinear around each block's attn.c_attn and
    attn.c_proj, in place; returns the model.

        >>> model = add_lora(GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8)))
        >>> sum(p.requires_grad for p in model.parameters())
        4
    """
    model.requires_grad_(False)
    for block in model.transformer.h:
        attn = block.attn
        attn.c_attn = LoRALinear(attn.c_attn, r=r, alpha=alpha)
        attn.c_proj = LoRALinear(attn.c_proj, r=r, alpha=alpha)
    return model


def build(config: GPTConfig = None, batch: int = 4, seq: int = 32, r: int = 4, alpha: float = 8):
    """The small GPT of examples/gpt.py with rank-`r` adapters, and a random `batch` x `seq`
    batch, the same on every call (seed 0).

        >>> model, (idx, targets) = build()
        >>> sum(p.numel() for p in model.parameters() if p.requires_grad)
        3072
    """
    config = config or GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=4, n_embd=64)
    torch.manual_seed(0)
    model = add_lora(GPT(config), r=r, alpha=alpha)
    model.train()
    idx = torch.randint(0, config.vocab_size, (batch, seq))
    targets = torch.randint(0, config.vocab_size, (batch, seq))
    return model, (idx, targets)


if __name__ == "__main__":
    model, inputs = build()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"params: {total:,} ({trainable:,} trainable)")
    print(f"loss: {model(*inputs).item():.6f}")

"""
LoRA fine-tuning of a frozen GPT.

Takes the nanoGPT-style model from examples/gpt.py, freezes every parameter,
and wraps each attention projection (attn.c_attn and attn.c_proj) in a
LoRALinear:

    y = base(x) + (x @ A.T @ B.T) * (alpha / r)

where only the low-rank adapters A (r x in) and B (out x r) are trainable.
This shows a training graph in which most weights need no gradient, so only
the small adapters (and the activations leading to them) need a backward.
lora_B is initialised with small random values (rather than zeros as in the
paper) so that gradients reach both A and B from the first step.
"""

import importlib.util
import pathlib
import sys

import torch
import torch.nn as nn


def _load_gpt():
    """Import examples/gpt.py by path, whatever the cwd or sys.path."""
    name = "autopar_examples_gpt"
    if name not in sys.modules:
        path = pathlib.Path(__file__).resolve().parent / "gpt.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


gpt = _load_gpt()
GPT, GPTConfig = gpt.GPT, gpt.GPTConfig


class LoRALinear(nn.Module):

    def __init__(self, base: nn.Linear, r: int = 4, alpha: float = 8):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad = False
        self.r = r
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) * 0.02)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r) * 0.02)

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


def add_lora(model: nn.Module, r: int = 4, alpha: float = 8):
    """Freeze the model and wrap every attention c_attn / c_proj with LoRA."""
    for p in model.parameters():
        p.requires_grad = False
    for block in model.transformer.h:
        block.attn.c_attn = LoRALinear(block.attn.c_attn, r=r, alpha=alpha)
        block.attn.c_proj = LoRALinear(block.attn.c_proj, r=r, alpha=alpha)
    return model


def build(config: GPTConfig = None, batch: int = 4, seq: int = 32, r: int = 4, alpha: float = 8):
    """Return (model, (idx, targets)) for a tiny deterministic LoRA-wrapped GPT."""
    config = config or GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=4, n_embd=64)
    torch.manual_seed(0)
    model = add_lora(GPT(config), r=r, alpha=alpha)
    model.train()
    idx = torch.randint(0, config.vocab_size, (batch, seq))
    targets = torch.randint(0, config.vocab_size, (batch, seq))
    return model, (idx, targets)


if __name__ == "__main__":
    model, inputs = build()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    print(f"params: {n_total:,} ({n_train:,} trainable)")
    print(f"loss: {model(*inputs).item():.6f}")

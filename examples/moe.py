"""
A small mixture-of-experts language model: the GPT of examples/gpt.py with each block's
MLP replaced by a layer of gated experts and a top-k router (Mixtral's layer shape).

Per token x (one row of the flattened batch), a block's MoE layer computes

    p = softmax(router(x))                      # one probability per expert
    w, e = topk(p, k); w = w / sum(w)           # its k experts and their renormalised weights
    y = sum_j w[j] * down[e[j]] @ (silu(gate[e[j]] @ x) * up[e[j]] @ x)

The experts are one op, `moe_experts` (compiler/moe.py), called here directly: the search
can then split the layer by tokens (data parallel), by each expert's intermediate width
(tensor-parallel experts) or by experts with their tokens -- expert parallelism, each
rank holding E/n experts, tokens sent to their experts and back with all_to_all. A mesh
axis named `ep` is the expert axis:

    autopar run examples/moe.py:build --mesh dp=2,ep=2 --steps 3 --check

A router trained on the language loss alone tends to send most tokens to few experts, so
the loss adds the Switch Transformer's load-balancing term per layer, weighted by
`aux_weight`: E * sum_e f_e * P_e, where f_e is the share of (token, choice) pairs routed
to expert e and P_e its mean router probability; it is 1 when routing is uniform.
"""

import importlib.util
import pathlib
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from autopar.compiler.moe import moe_experts


def _import_gpt():
    """examples/gpt.py as a module, found next to this file (SPECs load this file by path)."""
    name = "autopar_examples_gpt"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).resolve().with_name("gpt.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


gpt = _import_gpt()


@dataclass
class MoEConfig:
    """Sizes of the model and its experts.

        >>> MoEConfig().n_experts, MoEConfig().top_k
        (4, 2)
    """
    block_size: int = 32
    vocab_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    n_experts: int = 4
    top_k: int = 2
    expert_hidden: int = 128      # each expert's intermediate width I
    aux_weight: float = 0.01      # weight of the load-balancing loss (0: none)
    bias: bool = False
    dropout: float = 0.0
    flash: bool = True


class Experts(nn.Module):
    """E gated MLPs as three stacked weights: gate and up [E, I, H], down [E, H, I]."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        E, I, H = config.n_experts, config.expert_hidden, config.n_embd
        self.gate = nn.Parameter(torch.randn(E, I, H) * 0.02)
        self.up = nn.Parameter(torch.randn(E, I, H) * 0.02)
        self.down = nn.Parameter(torch.randn(E, H, I) * 0.02)

    def forward(self, x, top_k_index, top_k_weights):
        return moe_experts(x, top_k_index, top_k_weights, self.gate, self.up, self.down)


class MoE(nn.Module):
    """Router and experts; returns the layer's output and its load-balancing loss."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_experts, config.top_k
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
        self.router = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.experts = Experts(config)

    def forward(self, x):
        B, T, C = x.shape
        tokens = x.reshape(B * T, C)
        probs = F.softmax(self.router(tokens), dim=-1)                  # (B*T, E)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)         # (B*T, k) each
        weights = weights / weights.sum(dim=-1, keepdim=True)
        y = self.experts(tokens, chosen, weights)
        # the share of (token, choice) pairs each expert got, and its mean probability
        routed = F.one_hot(chosen, self.n_experts).to(probs.dtype).mean(dim=(0, 1))
        balance = self.n_experts * (routed * probs.mean(dim=0)).sum()
        return y.view(B, T, C), balance


class Block(nn.Module):
    """Pre-LN attention, then the MoE layer in place of the MLP."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.ln_1 = gpt.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = gpt.CausalSelfAttention(config)
        self.ln_2 = gpt.LayerNorm(config.n_embd, bias=config.bias)
        self.moe = MoE(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        h, balance = self.moe(self.ln_2(x))
        return x + h, balance


class MoEGPT(nn.Module):
    """Embeddings, `n_layer` MoE blocks, final norm and an output head; `forward(idx,
    targets)` returns cross-entropy plus `aux_weight` times the layers' mean balance loss.

        >>> model, (idx, targets) = build()
        >>> model(idx, targets).shape
        torch.Size([])
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = gpt.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets):
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}")
        x = self.wte(idx) + self.wpe(torch.arange(0, T, dtype=torch.long, device=idx.device))
        balance = []
        for block in self.h:
            x, b = block(x)
            balance.append(b)
        logits = self.lm_head(self.ln_f(x))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        if self.config.aux_weight:
            loss = loss + self.config.aux_weight * torch.stack(balance).mean()
        return loss


def build(config: MoEConfig = None, batch: int = 4, seq: int = 32):
    """The small MoE model (2 layers, width 64, 4 experts, top-2) and a random batch of
    `batch` x `seq` tokens, the same on every call (seed 0).

        >>> model, (idx, targets) = build(batch=2)
        >>> idx.shape, len(model.h)
        (torch.Size([2, 32]), 2)
    """
    config = config or MoEConfig()
    torch.manual_seed(0)
    model = MoEGPT(config)
    model.train()
    idx = torch.randint(0, config.vocab_size, (batch, seq))
    targets = torch.randint(0, config.vocab_size, (batch, seq))
    return model, (idx, targets)


def build_meta(batch: int = 8, seq: int = 4096, **overrides):
    """Mixtral-8x7B-like sizes (32 layers of width 4096, 8 experts of width 14336, top-2,
    a 32000-token vocabulary) on the meta device, where nothing is allocated; GPT's
    attention and learned positions stand in for Mixtral's grouped-query attention and
    rotary embeddings. `overrides` replace config fields.

        >>> model, (idx, targets) = build_meta(batch=1, seq=64, n_layer=2)
        >>> idx.device.type, model.h[0].moe.experts.gate.shape
        ('meta', torch.Size([8, 14336, 4096]))
    """
    fields = dict(block_size=seq, vocab_size=32000, n_layer=32, n_head=32, n_embd=4096,
                  n_experts=8, top_k=2, expert_hidden=14336)
    config = MoEConfig(**{**fields, **overrides})
    with torch.device("meta"):
        model = MoEGPT(config)
        model.train()
        idx = torch.empty((batch, seq), dtype=torch.long)
        targets = torch.empty((batch, seq), dtype=torch.long)
    return model, (idx, targets)


def meta_8x7b(batch: int = 8):
    """`build_meta()` as a SPEC: `batch` sequences of 4096 tokens.

        $ autopar plan examples/moe.py:meta_8x7b --devices 64 --device h100 --mesh dp=8,ep=8
    """
    return build_meta(batch=batch)

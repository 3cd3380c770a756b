"""
A nanoGPT-style GPT (decoder-only transformer) whose forward returns the loss.

Module names follow nanoGPT exactly (transformer.wte / wpe / h.{i}.ln_1 /
attn.c_attn / attn.c_proj / ln_2 / mlp.c_fc / mlp.c_proj / ln_f, lm_head), and
the lm_head weight is tied to the token embedding. Attention is either
`F.scaled_dot_product_attention(is_causal=True)` (flash=True) or written out
explicitly with a registered causal `bias` buffer (flash=False).

- `build()` gives a tiny deterministic model + (idx, targets) for tests.
- `GPTConfig.from_preset(name)` gives GPT-2 small and Megatron-LM sized configs
  ("1.7b", "3.6b", "7.5b", "18.4b", "100b").
- `build_meta(preset)` constructs such a model on the meta device (no real
  weights are allocated), handy for planning parallelism of huge models.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms
    flash: bool = True  # use F.scaled_dot_product_attention

    @classmethod
    def from_preset(cls, name, **overrides):
        return replace(PRESETS[name], **overrides)


# GPT-2 small, plus the Megatron-LM weak-scaling configs (seq 2048, vocab 51200).
# "100b" is not a published Megatron config: h=12288, 55 layers gives ~100.3B params.
PRESETS = {
    "gpt2-small": GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768),
    "1.7b": GPTConfig(block_size=2048, vocab_size=51200, n_layer=24, n_head=24, n_embd=2304),
    "3.6b": GPTConfig(block_size=2048, vocab_size=51200, n_layer=30, n_head=32, n_embd=3072),
    "7.5b": GPTConfig(block_size=2048, vocab_size=51200, n_layer=36, n_head=32, n_embd=4096),
    "18.4b": GPTConfig(block_size=2048, vocab_size=51200, n_layer=40, n_head=48, n_embd=6144),
    "100b": GPTConfig(block_size=2048, vocab_size=51200, n_layer=55, n_head=96, n_embd=12288),
}


class LayerNorm(nn.Module):
    """LayerNorm but with an optional bias. PyTorch doesn't support simply bias=False"""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, but in a batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # regularization
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.flash = config.flash
        if not self.flash:
            # causal mask to ensure that attention is only applied to the left in the input sequence
            self.register_buffer("bias", torch.tril(torch.ones(config.block_size, config.block_size))
                                        .view(1, 1, config.block_size, config.block_size))

    def forward(self, x):
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)

        # calculate query, key, values for all heads in batch and move head forward to be the batch dim
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)

        # causal self-attention; Self-attend: (B, nh, T, hs) x (B, nh, hs, T) -> (B, nh, T, T)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None,
                                               dropout_p=self.dropout if self.training else 0,
                                               is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side

        # output projection
        y = self.resid_dropout(self.c_proj(y))
        return y


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)
        x = self.gelu(x)
        x = self.c_proj(x)
        x = self.dropout(x)
        return x


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config

        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the token embedding and the output head share one matrix
        self.transformer.wte.weight = self.lm_head.weight

        # init all weights (on the meta device these are no-ops)
        self.apply(self._init_weights)
        # apply special scaled init to the residual projections, per GPT-2 paper
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding=True):
        """Number of parameters (tied weights counted once). By default the
        position embeddings are subtracted, as in nanoGPT."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets):
        device = idx.device
        b, t = idx.size()
        assert t <= self.config.block_size, f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=device)  # shape (t)

        # forward the GPT model itself
        tok_emb = self.transformer.wte(idx)  # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)

        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return loss


def build(config: GPTConfig = None, batch: int = 4, seq: int = 32):
    """Return (model, (idx, targets)) for a tiny deterministic GPT."""
    config = config or GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=4, n_embd=64)
    torch.manual_seed(0)
    model = GPT(config)
    model.train()
    idx = torch.randint(0, config.vocab_size, (batch, seq))
    targets = torch.randint(0, config.vocab_size, (batch, seq))
    return model, (idx, targets)


def build_meta(preset: str, batch: int = 1, seq: int = None, **overrides):
    """Build a preset-sized GPT on the meta device (shapes only, no storage).
    Returns (model, (idx, targets)) with meta example inputs."""
    config = GPTConfig.from_preset(preset, **overrides)
    seq = seq or config.block_size
    with torch.device("meta"):
        model = GPT(config)
        model.train()
        idx = torch.empty((batch, seq), dtype=torch.long)
        targets = torch.empty((batch, seq), dtype=torch.long)
    return model, (idx, targets)


if __name__ == "__main__":
    model, inputs = build()
    print(f"params: {sum(p.numel() for p in model.parameters()):,}")
    print(f"loss: {model(*inputs).item():.6f}")

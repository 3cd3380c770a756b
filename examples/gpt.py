"""
GPT-2-shaped decoder-only transformer; `forward(idx, targets)` returns the training loss.

The model is the one autopar is measured on: learned token and position embeddings,
pre-LayerNorm blocks (attention, then a 4x GELU MLP, each added back to the residual
stream), a final LayerNorm and an output head that shares its matrix with the token
embedding. Two choices shape the code:

- Parameter names are the ones GPT-2 checkpoints in the nanoGPT layout use
  (`transformer.wte`, `transformer.h.3.attn.c_attn`, `lm_head`, ...), so such a state
  dict loads as is, and plan files (examples/plans/*.plan) can name them.
- q, k and v come out of one fused `c_attn` projection, as in those checkpoints;
  passes/unfuse.py cuts it into three pieces so the search can shard attention by heads.

Attention is `F.scaled_dot_product_attention(is_causal=True)` by default (`flash=True`),
or spelled out as matmul, causal mask and softmax (`flash=False`), which exercises more
of the lowering.

Builders:
- `build()`: a two-layer model that runs in well under a second, with a fixed batch;
- `build_meta(preset)`: a preset-sized model on the meta device (shapes, no storage);
- `meta_1_7b()`, `meta_3_6b()`, `meta_7_5b()`, `meta_18_4b()`, `meta_100b()`, `meta_39_1b()`,
  `meta_1t()`: the Megatron-LM sizes at their global batch as SPECs (they take `--batch`),
  e.g. `autopar plan examples/gpt.py:meta_7_5b --devices 128 --device a100-80g`.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    """Sizes of a GPT. `bias` adds biases to every Linear and LayerNorm; `flash` picks
    the fused attention kernel over the written-out one.

        >>> GPTConfig.from_preset("1.7b", n_layer=2).n_embd
        2304
    """
    block_size: int = 1024      # longest sequence (rows of the position embedding)
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    flash: bool = True

    @classmethod
    def from_preset(cls, name, **overrides):
        """A named configuration from PRESETS with some fields replaced."""
        return replace(PRESETS[name], **overrides)


# "gpt2-small" is the 124M-parameter GPT-2. The rest are the GPT sizes of Megatron-LM's
# weak-scaling study (SC21, Table 1: sequence 2048, vocabulary 51200). "100b" is not one of
# its rows: 55 layers of width 12288 come to about 100.3B parameters.
PRESETS = {
    "gpt2-small": GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768),
    "1.7b": GPTConfig(block_size=2048, vocab_size=51200, n_layer=24, n_head=24, n_embd=2304),
    "3.6b": GPTConfig(block_size=2048, vocab_size=51200, n_layer=30, n_head=32, n_embd=3072),
    "7.5b": GPTConfig(block_size=2048, vocab_size=51200, n_layer=36, n_head=32, n_embd=4096),
    "18.4b": GPTConfig(block_size=2048, vocab_size=51200, n_layer=40, n_head=48, n_embd=6144),
    "100b": GPTConfig(block_size=2048, vocab_size=51200, n_layer=55, n_head=96, n_embd=12288),
    # the table's pipelined rows (t = 8, p = 2 ... 64)
    "39.1b": GPTConfig(block_size=2048, vocab_size=51200, n_layer=48, n_head=64, n_embd=8192),
    "76.1b": GPTConfig(block_size=2048, vocab_size=51200, n_layer=60, n_head=80, n_embd=10240),
    "145.6b": GPTConfig(block_size=2048, vocab_size=51200, n_layer=80, n_head=96, n_embd=12288),
    "310.1b": GPTConfig(block_size=2048, vocab_size=51200, n_layer=96, n_head=128, n_embd=16384),
    "529.6b": GPTConfig(block_size=2048, vocab_size=51200, n_layer=105, n_head=128, n_embd=20480),
    "1t": GPTConfig(block_size=2048, vocab_size=51200, n_layer=128, n_head=160, n_embd=25600),
}

# Global batch (sequences per step) that the same table trains each size with; "100b"
# borrows the 18.4B row's. The meta_* SPECs use it unless --batch says otherwise.
MEGATRON_BATCH = {"1.7b": 512, "3.6b": 512, "7.5b": 512, "18.4b": 1024, "100b": 1024,
                  "39.1b": 1536, "76.1b": 1792, "145.6b": 2304, "310.1b": 2160, "529.6b": 2520, "1t": 3072}


class LayerNorm(nn.Module):
    """Layer normalisation whose bias can be switched off (`bias=False` leaves
    `self.bias` as None), with the GPT-2 epsilon of 1e-5."""

    eps = 1e-5

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class CausalSelfAttention(nn.Module):
    """Multi-head attention in which position t sees positions 0..t only.

    `c_attn` stacks the q, k and v projections (3 * n_embd outputs, in that order); `c_proj`
    maps the concatenated heads back to n_embd."""

    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd={config.n_embd} is not a multiple of n_head={config.n_head}")
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.flash = config.flash
        if not self.flash:
            # 1 where a query may look at a key (lower triangle). Named `bias` because
            # nanoGPT-layout checkpoints of the unfused variant carry it under that key.
            size = config.block_size
            causal = torch.tril(torch.ones(size, size)).view(1, 1, size, size)
            self.register_buffer("bias", causal)

    def forward(self, x):
        B, T, C = x.size()
        head_dim = C // self.n_head

        def by_head(t):                                   # (B, T, C) -> (B, nh, T, hd)
            return t.view(B, T, self.n_head, head_dim).transpose(1, 2)

        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # k is reshaped before q: the traced node numbering (and the golden IR) follows
        # this order
        k = by_head(k)
        q = by_head(q)
        v = by_head(v)

        if self.flash:
            p = self.dropout if self.training else 0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=p, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))   # (B, nh, T, T)
            scores = scores.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            weights = self.attn_dropout(F.softmax(scores, dim=-1))
            y = weights @ v                                                    # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)   # (B, T, nh * hd): heads concatenated
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The position-wise feed-forward layer: n_embd -> 4 * n_embd -> n_embd with GELU."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One transformer layer, normalising before each sublayer (pre-LN)."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def init_gpt2_(model, n_layer):
    """GPT-2's initialisation, in place: N(0, 0.02) for every Linear and Embedding weight,
    zero Linear biases, and the two projections that write into the residual stream
    (`attn.c_proj`, `mlp.c_proj`) scaled down by sqrt(2 * n_layer), since each layer adds
    two such terms to it. On the meta device every call is a no-op.

        >>> init_gpt2_(GPT(GPTConfig(n_layer=2, n_embd=64, n_head=4)), n_layer=2)  # doctest: +SKIP
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    residual_std = 0.02 / math.sqrt(2 * n_layer)
    for block in model.transformer.h:
        nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=residual_std)
        nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=residual_std)


class GPT(nn.Module):
    """The whole model: embeddings, `n_layer` blocks, final norm, tied output head.

        >>> model, (idx, targets) = build()
        >>> model(idx, targets).shape
        torch.Size([])
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # One matrix both embeds tokens and scores them: the IR records lm_head.weight as
        # an alias of transformer.wte.weight, and its gradient is the sum of both uses.
        self.transformer.wte.weight = self.lm_head.weight
        init_gpt2_(self, config.n_layer)

    def forward(self, idx, targets):
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}")
        positions = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)   # (B, T, C) + (T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))                     # (B, T, vocab)
        # targets of -1 mark positions that do not count towards the loss
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def build(config: GPTConfig = None, batch: int = 4, seq: int = 32):
    """A small GPT (2 layers, width 64, vocabulary 128 unless `config` says otherwise) and
    a random batch of `batch` x `seq` tokens, the same on every call (seed 0).

        >>> model, (idx, targets) = build(batch=2)
        >>> idx.shape
        torch.Size([2, 32])
    """
    config = config or GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=4, n_embd=64)
    torch.manual_seed(0)
    model = GPT(config)
    model.train()
    idx = torch.randint(0, config.vocab_size, (batch, seq))
    targets = torch.randint(0, config.vocab_size, (batch, seq))
    return model, (idx, targets)


def build_meta(preset: str = "1.7b", batch: int = 1, seq: int = None, **overrides):
    """A PRESETS-sized GPT and a `batch` x `seq` batch (seq defaults to block_size), all on
    the meta device: nothing is allocated, so a 100B model traces and plans on a laptop.
    `overrides` replace config fields (e.g. `n_layer=4`).

        >>> model, (idx, targets) = build_meta("7.5b", batch=8, n_layer=2)
        >>> idx.shape, idx.device.type
        (torch.Size([8, 2048]), 'meta')
    """
    config = GPTConfig.from_preset(preset, **overrides)
    seq = seq or config.block_size
    with torch.device("meta"):
        model = GPT(config)
        model.train()
        idx = torch.empty((batch, seq), dtype=torch.long)
        targets = torch.empty((batch, seq), dtype=torch.long)
    return model, (idx, targets)


# One SPEC per Megatron-LM size. A SPEC is called with no arguments or with batch=N only,
# so the preset has to be in the function's name. Without recompute (which only a plan
# file asks for), the three smaller sizes plan at their default batch on the device counts
# of the same table (A100 80GB); the two larger ones need a smaller --batch or a plan file
# with a mesh and `recompute "transformer.h.*"`.

def meta_1_7b(batch: int = MEGATRON_BATCH["1.7b"]):
    """GPT 1.7B on the meta device:
    `autopar plan examples/gpt.py:meta_1_7b --devices 32 --device a100-80g`."""
    return build_meta("1.7b", batch=batch)


def meta_3_6b(batch: int = MEGATRON_BATCH["3.6b"]):
    """GPT 3.6B on the meta device:
    `autopar plan examples/gpt.py:meta_3_6b --devices 64 --device a100-80g`."""
    return build_meta("3.6b", batch=batch)


def meta_7_5b(batch: int = MEGATRON_BATCH["7.5b"]):
    """GPT 7.5B on the meta device:
    `autopar plan examples/gpt.py:meta_7_5b --devices 128 --device a100-80g`."""
    return build_meta("7.5b", batch=batch)


def meta_18_4b(batch: int = MEGATRON_BATCH["18.4b"]):
    """GPT 18.4B on the meta device:
    `autopar plan examples/gpt.py:meta_18_4b --devices 256 --batch 256 --device a100-80g`."""
    return build_meta("18.4b", batch=batch)


def meta_100b(batch: int = MEGATRON_BATCH["100b"]):
    """GPT 100B on the meta device:
    `autopar plan examples/gpt.py:meta_100b --devices 1024 --batch 128 --device a100-80g`."""
    return build_meta("100b", batch=batch)


def meta_39_1b(batch: int = MEGATRON_BATCH["39.1b"]):
    """GPT 39.1B on the meta device; the mesh search includes pipelines:
    `autopar plan examples/gpt.py:meta_39_1b --devices 512 --device a100-80g`."""
    return build_meta("39.1b", batch=batch)


def meta_1t(batch: int = MEGATRON_BATCH["1t"]):
    """GPT 1T (128 layers of width 25600) on the meta device:
    `autopar plan examples/gpt.py:meta_1t --devices 3072 --device a100-80g`."""
    return build_meta("1t", batch=batch)


if __name__ == "__main__":
    model, inputs = build()
    print(f"params: {sum(p.numel() for p in model.parameters()):,}")
    print(f"loss: {model(*inputs).item():.6f}")

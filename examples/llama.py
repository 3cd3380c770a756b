"""
Llama-shaped decoder-only transformer; `forward(tokens, targets)` returns the training loss.

Next to examples/gpt.py this is the newer recipe, and each part of it is a different
problem for the sharding search:

- RMSNorm instead of LayerNorm: scale by 1/sqrt(mean(x^2) + eps), no mean subtracted, no
  bias. It is written out, so the IR holds its pow/mean/rsqrt/mul and not a fused op;
- rotary position embeddings: q and k are rotated by position-dependent angles taken from
  cos/sin tables built once (buffers `rope_cos`, `rope_sin`). The rotation is spelled with
  slices, a negation and a concatenation rather than complex numbers;
- grouped-query attention: `n_kv_heads` k/v heads, each shared by n_heads / n_kv_heads
  query heads. The k/v heads are widened with unsqueeze + expand + reshape before
  `F.scaled_dot_product_attention(is_causal=True)`, which cuts the k/v projections into
  fewer head groups than q when attention is sharded by heads;
- a gated (SwiGLU) feed-forward, w2(silu(w1(x)) * w3(x)), three matrices and no biases;
- an output projection with its own weights (not tied to the embedding).

Parameter names are those of Meta's reference checkpoints (`tok_embeddings`,
`layers.3.attention.wq`, `layers.3.feed_forward.w1`, `layers.3.attention_norm`, `norm`,
`output`), so such a state dict loads as is.

Builders: `build()` (tiny, fixed batch), `build_meta(preset)` and the SPEC `meta_8b()`
(Llama-3-8B sizes on the meta device, e.g. `autopar plan examples/llama.py:meta_8b`).
"""

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaConfig:
    """Sizes of a Llama. `ffn_hidden` is the width of the gated feed-forward.

        >>> LlamaConfig.from_preset("8b", n_layers=2).n_kv_heads
        8
    """
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    ffn_hidden: int = 14336
    max_seq_len: int = 2048
    rope_theta: float = 10000.0   # base of the rotary frequencies
    norm_eps: float = 1e-5

    @classmethod
    def from_preset(cls, name, **overrides):
        """A named configuration from PRESETS with some fields replaced."""
        return replace(PRESETS[name], **overrides)


# Llama 3 8B: 32 layers of width 4096, 8 k/v heads for 32 query heads, a 128256-token
# vocabulary, context 8192 and rotary base 500000.
PRESETS = {
    "8b": LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      ffn_hidden=14336, max_seq_len=8192, rope_theta=500000.0),
}


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, rms(x) = sqrt(mean(x^2) + eps)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        inv_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * inv_rms * self.weight


def rope_tables(head_dim, max_seq_len, theta):
    """cos and sin of the rotary angles, each (max_seq_len, head_dim): channel pair
    (i, i + head_dim/2) turns at rate theta^(-2i/head_dim) per position.

        >>> cos, sin = rope_tables(16, 32, 10000.0)
        >>> cos.shape
        torch.Size([32, 16])
    """
    rates = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), rates)         # (T, hd/2)
    # both halves of the head turn by the same angle, so the table is repeated
    angles = torch.cat((angles, angles), dim=-1)                                    # (T, hd)
    return angles.cos(), angles.sin()


def pair_partners(x):
    """For channel pairs (a, b) = (x[i], x[i + hd/2]) of the last dim, the tensor that
    holds -b where x holds a and a where x holds b."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    return torch.cat((-second, first), dim=-1)


def apply_rope(x, cos, sin):
    """Rotate each channel pair (a, b) of x (B, nh, T, hd) by its angle:
    (a, b) -> (a cos - b sin, b cos + a sin), with cos/sin (T, hd) from rope_tables."""
    return x * cos + pair_partners(x) * sin


def widen_kv(x, n_rep):
    """Repeat every k/v head n_rep times in place: (B, n_kv, T, hd) -> (B, n_kv * n_rep,
    T, hd), so that query head j reads k/v head j // n_rep."""
    if n_rep == 1:
        return x
    B, n_kv, T, hd = x.shape
    copies = x.unsqueeze(2).expand(B, n_kv, n_rep, T, hd)
    return copies.reshape(B, n_kv * n_rep, T, hd)


class Attention(nn.Module):
    """Causal grouped-query attention with rotary positions; no biases."""

    def __init__(self, config):
        super().__init__()
        if config.n_heads % config.n_kv_heads:
            raise ValueError(f"n_heads={config.n_heads} is not a multiple of n_kv_heads={config.n_kv_heads}")
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.n_rep = config.n_heads // config.n_kv_heads
        self.head_dim = config.dim // config.n_heads
        q_width, kv_width = config.n_heads * self.head_dim, config.n_kv_heads * self.head_dim
        self.wq = nn.Linear(config.dim, q_width, bias=False)
        self.wk = nn.Linear(config.dim, kv_width, bias=False)
        self.wv = nn.Linear(config.dim, kv_width, bias=False)
        self.wo = nn.Linear(q_width, config.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape

        def heads(t, n):                                  # (B, T, n*hd) -> (B, n, T, hd)
            return t.view(B, T, n, self.head_dim).transpose(1, 2)

        q = heads(self.wq(x), self.n_heads)
        k = heads(self.wk(x), self.n_kv_heads)
        v = heads(self.wv(x), self.n_kv_heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = widen_kv(k, self.n_rep), widen_kv(v, self.n_rep)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)                 # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_heads * self.head_dim)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w1 and w3 widen to ffn_hidden, silu(w1 x) gates w3 x, w2 narrows back."""

    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden, bias=False)

    def forward(self, x):
        gate = F.silu(self.w1(x))
        return self.w2(gate * self.w3(x))


class TransformerBlock(nn.Module):
    """One pre-norm layer: attention then feed-forward, each added to the residual."""

    def __init__(self, config):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """Embedding, `n_layers` blocks, final RMSNorm, untied output projection.

        >>> model, (tokens, targets) = build()
        >>> model(tokens, targets).shape
        torch.Size([])
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # The tables are a function of the config, not state: kept out of the state dict.
        cos, sin = rope_tables(config.dim // config.n_heads, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens, targets):
        T = tokens.shape[1]
        x = self.tok_embeddings(tokens)                   # (B, T, dim)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]   # (T, hd) each
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.output(self.norm(x))                # (B, T, vocab)
        # targets of -1 mark positions that do not count towards the loss
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def build(config: LlamaConfig = None, batch: int = 4, seq: int = 32):
    """A small Llama (2 layers, width 64, 4 query and 2 k/v heads unless `config` says
    otherwise) and a random `batch` x `seq` batch, the same on every call (seed 0).

        >>> model, (tokens, targets) = build(batch=2)
        >>> tokens.shape
        torch.Size([2, 32])
    """
    config = config or LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   ffn_hidden=192, max_seq_len=32)
    torch.manual_seed(0)
    model = Llama(config)
    model.train()
    tokens = torch.randint(0, config.vocab_size, (batch, seq))
    targets = torch.randint(0, config.vocab_size, (batch, seq))
    return model, (tokens, targets)


def build_meta(preset: str = "8b", batch: int = 1, seq: int = None, **overrides):
    """A PRESETS-sized Llama and a `batch` x `seq` batch (seq defaults to max_seq_len), all
    on the meta device, where nothing is allocated. `overrides` replace config fields.

        >>> model, (tokens, targets) = build_meta("8b", seq=2048, n_layers=2)
        >>> tokens.shape, tokens.device.type
        (torch.Size([1, 2048]), 'meta')
    """
    config = LlamaConfig.from_preset(preset, **overrides)
    seq = seq or config.max_seq_len
    with torch.device("meta"):
        model = Llama(config)
        model.train()
        tokens = torch.empty((batch, seq), dtype=torch.long)
        targets = torch.empty((batch, seq), dtype=torch.long)
    return model, (tokens, targets)


def meta_8b(batch: int = 16):
    """Llama 3 8B on the meta device as a SPEC (called with no arguments or batch=N):
    `batch` sequences of 8192 tokens. The default of 16 is ours: it fits 32 devices of
    80 GiB without recompute; larger batches want more devices or a plan file that
    recomputes blocks.

        $ autopar plan examples/llama.py:meta_8b --devices 32 --device h100
    """
    return build_meta("8b", batch=batch)


if __name__ == "__main__":
    model, inputs = build()
    print(f"params: {sum(p.numel() for p in model.parameters()):,}")
    print(f"loss: {model(*inputs).item():.6f}")

"""
A Llama-style decoder-only transformer whose forward returns the loss.

Compared with GPT (examples/gpt.py) it shows the modern building blocks:
- RMSNorm written out from x.pow(2).mean(-1), torch.rsqrt and a weight multiply;
- rotary position embeddings from precomputed cos/sin buffers, applied with a
  rotate_half made of slicing, negation and torch.cat (no complex numbers);
- grouped-query attention: n_kv_heads < n_heads, with k/v heads repeated via
  expand + reshape, then F.scaled_dot_product_attention(is_causal=True);
- a SwiGLU feed-forward (w2(silu(w1(x)) * w3(x))), no biases anywhere;
- an untied output head.

Module names follow Meta's llama reference (tok_embeddings,
layers.{i}.attention.wq/wk/wv/wo, layers.{i}.feed_forward.w1/w2/w3,
layers.{i}.attention_norm / ffn_norm, norm, output).

- `build()` gives a tiny deterministic model + (tokens, targets) for tests.
- `build_meta("8b")` constructs a Llama-3-8B-sized model on the meta device.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    ffn_hidden: int = 14336
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @classmethod
    def from_preset(cls, name, **overrides):
        return replace(PRESETS[name], **overrides)


PRESETS = {
    "8b": LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      ffn_hidden=14336, max_seq_len=8192, rope_theta=500000.0),
}


class RMSNorm(nn.Module):

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.weight


def precompute_rope(head_dim, max_seq_len, theta):
    """cos/sin tables of shape (max_seq_len, head_dim), frequencies duplicated
    across the two halves to match rotate_half."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def rotate_half(x):
    half = x.shape[-1] // 2
    x1 = x[..., :half]
    x2 = x[..., half:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hd); cos/sin: (T, hd)
    return x * cos + rotate_half(x) * sin


def repeat_kv(x, n_rep):
    """(B, n_kv, T, hd) -> (B, n_kv * n_rep, T, hd) via expand + reshape."""
    if n_rep == 1:
        return x
    B, n_kv, T, hd = x.shape
    return x[:, :, None, :, :].expand(B, n_kv, n_rep, T, hd).reshape(B, n_kv * n_rep, T, hd)


class Attention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_heads % config.n_kv_heads == 0
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.n_rep = config.n_heads // config.n_kv_heads
        self.head_dim = config.dim // config.n_heads
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)

        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        # grouped-query attention: share each k/v head among n_rep query heads
        k = repeat_kv(k, self.n_rep)
        v = repeat_kv(v, self.n_rep)

        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_heads * self.head_dim)
        return self.wo(y)


class FeedForward(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        out = h + self.feed_forward(self.ffn_norm(h))
        return out


class Llama(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList([TransformerBlock(config) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)  # untied

        cos, sin = precompute_rope(config.dim // config.n_heads, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens, targets):
        T = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        cos = self.rope_cos[:T]
        sin = self.rope_sin[:T]
        for layer in self.layers:
            h = layer(h, cos, sin)
        h = self.norm(h)
        logits = self.output(h)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return loss


def build(config: LlamaConfig = None, batch: int = 4, seq: int = 32):
    """Return (model, (tokens, targets)) for a tiny deterministic Llama."""
    config = config or LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   ffn_hidden=192, max_seq_len=32)
    torch.manual_seed(0)
    model = Llama(config)
    model.train()
    tokens = torch.randint(0, config.vocab_size, (batch, seq))
    targets = torch.randint(0, config.vocab_size, (batch, seq))
    return model, (tokens, targets)


def build_meta(preset: str, batch: int = 1, seq: int = None, **overrides):
    """Build a preset-sized Llama on the meta device (shapes only, no storage).
    Returns (model, (tokens, targets)) with meta example inputs."""
    config = LlamaConfig.from_preset(preset, **overrides)
    seq = seq or config.max_seq_len
    with torch.device("meta"):
        model = Llama(config)
        model.train()
        tokens = torch.empty((batch, seq), dtype=torch.long)
        targets = torch.empty((batch, seq), dtype=torch.long)
    return model, (tokens, targets)


if __name__ == "__main__":
    model, inputs = build()
    print(f"params: {sum(p.numel() for p in model.parameters()):,}")
    print(f"loss: {model(*inputs).item():.6f}")

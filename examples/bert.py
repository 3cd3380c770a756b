"""
A BERT-style bidirectional encoder trained with a masked-language-model loss.

Shows the encoder side of the transformer family:
- token + position + segment (token type) embeddings, then LayerNorm;
- post-LayerNorm encoder layers: x = LN(x + attn(x)); x = LN(x + ffn(x));
- bidirectional (non-causal) self-attention written out explicitly:
  q @ k^T * scale + additive padding mask, softmax, @ v. The additive mask is
  (1 - attention_mask) * -1e4, broadcast over heads and query positions;
- a GELU feed-forward, and an MLM head (dense, GELU, LayerNorm, decoder tied
  to the word embeddings). Labels of -100 are ignored by the loss.

`build()` gives a tiny deterministic model and (input_ids, attention_mask,
labels) where some sequences are padded and ~15% of positions are labelled.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class BertConfig:
    vocab_size: int = 30522
    max_position: int = 512
    type_vocab_size: int = 2
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    ffn_hidden: int = 3072
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12


class SelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.query = nn.Linear(config.n_embd, config.n_embd)
        self.key = nn.Linear(config.n_embd, config.n_embd)
        self.value = nn.Linear(config.n_embd, config.n_embd)
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask_bias):
        B, T, C = x.shape
        q = self.query(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.key(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.value(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)

        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, T, T)
        att = att + mask_bias  # (B, 1, 1, T): -1e4 on padded keys
        att = F.softmax(att, dim=-1)
        att = self.dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.dense(y)


class EncoderLayer(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.attention = SelfAttention(config)
        self.attn_norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.fc_in = nn.Linear(config.n_embd, config.ffn_hidden)
        self.fc_out = nn.Linear(config.ffn_hidden, config.n_embd)
        self.ffn_norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask_bias):
        x = self.attn_norm(x + self.dropout(self.attention(x, mask_bias)))
        x = self.ffn_norm(x + self.dropout(self.fc_out(F.gelu(self.fc_in(x)))))
        return x


class Bert(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embeddings = nn.Embedding(config.max_position, config.n_embd)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.n_embd)
        self.emb_norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([EncoderLayer(config) for _ in range(config.n_layer)])
        # MLM head: transform, then decode with the (tied) word embedding matrix
        self.mlm_dense = nn.Linear(config.n_embd, config.n_embd)
        self.mlm_norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.n_embd, config.vocab_size)
        self.decoder.weight = self.word_embeddings.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # BERT's init: N(0, 0.02) for linears and embeddings, zero biases
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids, attention_mask, labels):
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) \
            + self.token_type_embeddings(token_type_ids)
        x = self.emb_dropout(self.emb_norm(x))

        # attention_mask: 1 for real tokens, 0 for padding -> additive bias (B, 1, 1, T)
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
        for layer in self.layers:
            x = layer(x, mask_bias)

        h = self.mlm_norm(F.gelu(self.mlm_dense(x)))
        logits = self.decoder(h)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100)


def build(config: BertConfig = None, batch: int = 4, seq: int = 32):
    """Return (model, (input_ids, attention_mask, labels)) for a tiny deterministic BERT."""
    config = config or BertConfig(vocab_size=128, max_position=64, n_layer=2, n_head=4,
                                  n_embd=64, ffn_hidden=256)
    torch.manual_seed(0)
    model = Bert(config)
    model.train()
    input_ids = torch.randint(0, config.vocab_size, (batch, seq))
    # sequence i has its last 4*i positions padded
    lengths = torch.tensor([seq - 4 * i for i in range(batch)]).clamp(min=1)
    attention_mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    # label ~15% of the real (non-padded) positions, ignore the rest
    picked = (torch.rand(batch, seq) < 0.15) & attention_mask.bool()
    picked[:, 0] = True  # at least one label per sequence
    labels = torch.where(picked, torch.randint(0, config.vocab_size, (batch, seq)), torch.full_like(input_ids, -100))
    return model, (input_ids, attention_mask, labels)


if __name__ == "__main__":
    model, inputs = build()
    print(f"params: {sum(p.numel() for p in model.parameters()):,}")
    print(f"loss: {model(*inputs).item():.6f}")

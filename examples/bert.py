"""
BERT-shaped bidirectional encoder; `forward(input_ids, attention_mask, labels)` returns
the masked-language-model loss.

Where examples/gpt.py and examples/llama.py are decoders, this is the encoder half of the
family, and it differs from them in the places a sharding plan notices:

- three embeddings are summed (token, position, segment), then normalised;
- normalisation comes after each residual add (post-LN): x = LN(x + sublayer(x));
- attention is not causal but masked by padding: every query sees every real token of
  its sequence. It is written out as q @ k^T * scale + bias, softmax, @ v, where the
  bias is -1e4 on padded keys ((1 - attention_mask) * -1e4, shape (B, 1, 1, T), broadcast
  over heads and queries), so a data-dependent mask flows through the graph;
- the feed-forward is fc_in, GELU, fc_out, with biases everywhere;
- the MLM head (dense, GELU, LayerNorm) decodes with the word-embedding matrix, tied,
  plus a bias of its own; positions labelled -100 are left out of the loss.

`build()` returns a small model and a batch in which sequence i has its last 4 * i
positions padded and about 15% of the real positions carry a label.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class BertConfig:
    """Sizes of a BERT; the defaults are BERT-base (12 layers, width 768, 110M params).

        >>> BertConfig().ffn_hidden
        3072
    """
    vocab_size: int = 30522
    max_position: int = 512
    type_vocab_size: int = 2      # segments A and B
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    ffn_hidden: int = 3072
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12


class SelfAttention(nn.Module):
    """Multi-head attention over all positions, with an additive bias that hides padding."""

    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd={config.n_embd} is not a multiple of n_head={config.n_head}")
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.query = nn.Linear(config.n_embd, config.n_embd)
        self.key = nn.Linear(config.n_embd, config.n_embd)
        self.value = nn.Linear(config.n_embd, config.n_embd)
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask_bias):
        B, T, C = x.shape

        def heads(t):                                     # (B, T, C) -> (B, nh, T, hd)
            return t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))   # (B, nh, T, T)
        scores = scores + mask_bias                       # (B, 1, 1, T) over keys
        weights = self.dropout(F.softmax(scores, dim=-1))
        y = (weights @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.dense(y)


class EncoderLayer(nn.Module):
    """Attention and feed-forward, each followed by add-then-LayerNorm (post-LN)."""

    def __init__(self, config):
        super().__init__()
        self.attention = SelfAttention(config)
        self.attn_norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.fc_in = nn.Linear(config.n_embd, config.ffn_hidden)
        self.fc_out = nn.Linear(config.ffn_hidden, config.n_embd)
        self.ffn_norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask_bias):
        attended = self.dropout(self.attention(x, mask_bias))
        x = self.attn_norm(x + attended)
        fed = self.dropout(self.fc_out(F.gelu(self.fc_in(x))))
        return self.ffn_norm(x + fed)


def init_bert_(model):
    """BERT's initialisation, in place: N(0, 0.02) for Linear and Embedding weights, zero
    Linear biases (LayerNorms keep their ones and zeros).

        >>> init_bert_(Bert(BertConfig(n_layer=1, n_embd=64, n_head=4, ffn_hidden=128)))  # doctest: +SKIP
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class Bert(nn.Module):
    """Embeddings, `n_layer` encoder layers and the masked-LM head.

        >>> model, batch = build()
        >>> model(*batch).shape
        torch.Size([])
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embeddings = nn.Embedding(config.max_position, config.n_embd)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.n_embd)
        self.emb_norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_layer))
        self.mlm_dense = nn.Linear(config.n_embd, config.n_embd)
        self.mlm_norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.n_embd, config.vocab_size)
        # scores over the vocabulary reuse the input embedding; the bias stays separate
        self.decoder.weight = self.word_embeddings.weight
        init_bert_(self)

    def forward(self, input_ids, attention_mask, labels):
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        segments = torch.zeros_like(input_ids)            # one segment: every token is in A
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(segments))
        x = self.emb_dropout(self.emb_norm(x))

        # attention_mask is 1 on real tokens and 0 on padding; as an additive bias it is 0
        # or -1e4, which softmax turns into (almost exactly) zero weight
        keep = attention_mask[:, None, None, :].to(x.dtype)                   # (B, 1, 1, T)
        mask_bias = (1.0 - keep) * -1e4
        for layer in self.layers:
            x = layer(x, mask_bias)

        logits = self.decoder(self.mlm_norm(F.gelu(self.mlm_dense(x))))       # (B, T, vocab)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100)


def build(config: BertConfig = None, batch: int = 4, seq: int = 32):
    """A small BERT (2 layers, width 64, vocabulary 128 unless `config` says otherwise) and
    a padded, partly labelled `batch` x `seq` batch, the same on every call (seed 0).

        >>> model, (input_ids, attention_mask, labels) = build()
        >>> attention_mask.sum(dim=1).tolist()
        [32, 28, 24, 20]
    """
    config = config or BertConfig(vocab_size=128, max_position=64, n_layer=2, n_head=4,
                                  n_embd=64, ffn_hidden=256)
    torch.manual_seed(0)
    model = Bert(config)
    model.train()
    input_ids = torch.randint(0, config.vocab_size, (batch, seq))
    lengths = torch.tensor([seq - 4 * i for i in range(batch)]).clamp(min=1)
    attention_mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    # each real position is labelled with probability 0.15; position 0 always is, so that
    # no sequence is without a label
    labelled = (torch.rand(batch, seq) < 0.15) & attention_mask.bool()
    labelled[:, 0] = True
    random_labels = torch.randint(0, config.vocab_size, (batch, seq))
    labels = torch.where(labelled, random_labels, torch.full_like(input_ids, -100))
    return model, (input_ids, attention_mask, labels)


if __name__ == "__main__":
    model, inputs = build()
    print(f"params: {sum(p.numel() for p in model.parameters()):,}")
    print(f"loss: {model(*inputs).item():.6f}")

"""Hugging Face causal LMs as a user writes them: default config (use_cache=True), random
init, the forward returns the library's `ModelOutput` (loss, logits, past_key_values).

    autopar run tests/models/hf_causal_lm.py:llama --mesh dp=2,tp=2 --steps 3 --check
"""
import torch
import torch.nn as nn


class CausalLM(nn.Module):
    """(idx, targets) -> the model's own output object, loss computed by the library."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, idx, targets):
        return self.lm(input_ids=idx, labels=targets)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    idx = torch.randint(0, 64, (4, 16))
    return CausalLM(LlamaForCausalLM(cfg)), (idx, idx.clone())


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    # dropout off: a random mask cannot match between the ranks and the single-device run
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    idx = torch.randint(0, 64, (4, 16))
    return CausalLM(GPT2LMHeadModel(cfg)), (idx, idx.clone())

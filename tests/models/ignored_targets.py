"""Language models whose targets are partly ignored, unevenly across the batch (padding,
prompt tokens): a batch split over dp leaves the shards different numbers of kept targets,
so the mean of the loss must count them globally.

    autopar run tests/models/ignored_targets.py:hf_gpt2 --mesh dp=2,tp=2 --steps 2 --check
"""
import torch
import torch.nn as nn


def uneven_ignore(targets: torch.Tensor, ignore: int) -> torch.Tensor:
    """Row 0 keeps 3 targets, row 1 all but one, row 2 half, row 3 all."""
    t = targets.clone()
    t[0, 3:] = ignore
    t[1, :1] = ignore
    t[2, ::2] = ignore
    return t


class HFLoss(nn.Module):
    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, idx, labels):
        return self.lm(input_ids=idx, labels=labels).loss


def hf_gpt2():
    """HF GPT-2 (labels -100 where ignored; the library shifts them and pads with -100)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    idx = torch.randint(0, 64, (4, 16))
    return HFLoss(GPT2LMHeadModel(cfg)), (idx, uneven_ignore(idx, -100))


def gpt():
    """examples/gpt.py, whose loss ignores target -1."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "examples" / "gpt.py"
    spec = importlib.util.spec_from_file_location("gpt_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    model = mod.GPT(mod.GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32))
    idx = torch.randint(0, 64, (4, 16))
    return model, (idx, uneven_ignore(torch.roll(idx, -1, 1), -1))

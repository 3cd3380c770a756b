"""Small models written the way users write them, as SPECs for `autopar run --check`.

    autopar run tests/models/user_models.py:straight_through --mesh dp=2,tp=2 --steps 3 --check

- `straight_through`: a binarised hidden layer trained with a straight-through estimator
  (sign forward, identity backward, written with detach), whose first bias has a gradient
  that is zero in exact arithmetic (it sits before a normalisation over the batch), and a
  forward that returns a dict {"loss", "logits"}.
- `loss_and_logits`: a classifier whose forward returns `(loss, logits)`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class StraightThrough(nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = 32, classes: int = 8):
        super().__init__()
        self.up = nn.Linear(d_in, hidden)      # its bias: removed by the batch normalisation
        self.mid = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x, targets):
        h = self.up(x)
        h = (h - h.mean(0)) * torch.rsqrt(h.var(0, unbiased=False) + 1e-5)
        h = self.mid(h)
        h = h + (torch.sign(h) - h).detach()     # sign forward, identity backward
        logits = self.head(h)
        return {"loss": F.cross_entropy(logits, targets), "logits": logits}


class Classifier(nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = 32, classes: int = 8):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x, targets):
        logits = self.fc2(F.gelu(self.fc1(x)))
        return F.cross_entropy(logits, targets), logits


def straight_through():
    torch.manual_seed(0)
    return StraightThrough(), (torch.randn(8, 16), torch.randint(0, 8, (8,)))


def loss_and_logits():
    torch.manual_seed(0)
    return Classifier(), (torch.randn(8, 16), torch.randint(0, 8, (8,)))

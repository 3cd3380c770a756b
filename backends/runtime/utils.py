"""Small helpers for generated programs."""
from __future__ import annotations

import random
import sys

import numpy as np
import torch

__all__ = ["set_seed", "one_thread", "log"]


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def one_thread() -> None:
    """One intra-op thread per process (several ranks share this machine's cores)."""
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set / parallel work already started
        pass


def log(mesh, msg, *args, file=None) -> None:
    """Print on global rank 0 only (``mesh=None`` prints everywhere), flushed."""
    if mesh is None or mesh.rank == 0:
        print(msg, *args, file=file or sys.stdout, flush=True)

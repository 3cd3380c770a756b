"""The tiny random-init Hugging Face models of tests/test_hf_models.py as run specs
(no downloads): `(model, (ids, labels))`, the forward returning the library's own loss.

    autopar run tests/models/hf_zoo.py:mixtral --mesh dp=2,tp=2 --steps 2 --check
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_hf_models import build  # noqa: E402


def gpt2():
    return build("gpt2")


def llama():
    return build("llama")


def qwen2():
    return build("qwen2")


def bert():
    return build("bert")


def mixtral():
    return build("mixtral")

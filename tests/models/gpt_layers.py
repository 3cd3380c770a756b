"""SPECs of examples/gpt.py's GPT with more blocks than `build()` has, for pipeline tests:
`tests/models/gpt_layers.py:four` (4 blocks) and `:eight` (8 blocks), width 64, batch 4."""
import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "autopar_example_gpt_layers", pathlib.Path(__file__).resolve().parents[2] / "examples" / "gpt.py")
gpt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpt)


def _build(n_layer: int, batch: int = 4):
    return gpt.build(gpt.GPTConfig(block_size=32, vocab_size=128, n_layer=n_layer, n_head=4, n_embd=64),
                     batch=batch)


def four(batch: int = 4):
    return _build(4, batch)


def eight(batch: int = 8):
    return _build(8, batch)


def four_batch32():
    """4 blocks, a batch of 32: large enough that the search splits it over dp."""
    return _build(4, 32)

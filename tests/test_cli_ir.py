"""`autopar ir`: printing, --verify, and one-paragraph errors for bad SPECs."""
from __future__ import annotations

import textwrap

import pytest

from autopar.cli import main
from conftest import EXAMPLES


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", ["mlp", "gpt", "llama", "lora", "moe"])
def test_ir_verify_ok(capsys, name):
    code, out, err = run(capsys, "ir", str(EXAMPLES / f"{name}.py") + ":build", "--verify")
    assert code == 0, err
    assert out.splitlines()[-1].startswith("verify: ok max_abs_err=")
    assert f"graph {name}(" in out


def test_ir_fx_and_after_lower(capsys):
    code, out, _ = run(capsys, "ir", str(EXAMPLES / "mlp.py") + ":build", "--trace", "fx",
                       "--after", "lower", "--verify")
    assert code == 0 and "verify: ok" in out
    assert not any(line.startswith("# prune") for line in out.splitlines())


def write(tmp_path, body):
    p = tmp_path / "m.py"
    p.write_text(textwrap.dedent(body))
    return str(p)


@pytest.mark.parametrize("body,fn,needle", [
    (None, "build", "no file"),
    ("def build():\n    return 1\n", "nope", "has no function 'nope'"),
    ("def build():\n    return 1, 2\n", "build", "must return (model, example_inputs)"),
    ("import torch\ndef build():\n    raise RuntimeError('boom')\n", "build", "calling build() failed"),
    ("x = 1 / 0\n", "build", "importing"),
    ("""
     import torch
     class M(torch.nn.Module):
         def forward(self, x):
             if x.sum() > 0:
                 return x
             return -x
     def build():
         return M(), (torch.randn(3),)
     """, "build", "could not trace M"),
])
def test_bad_spec_is_one_paragraph(capsys, tmp_path, body, fn, needle):
    path = write(tmp_path, body) if body else str(tmp_path / "missing.py")
    code, out, err = run(capsys, "ir", f"{path}:{fn}")
    assert code == 2
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    if body and "boom" in body:
        assert "m.py:3" in err      # names the line in the user's file


def test_spec_without_colon(capsys):
    code, _, err = run(capsys, "ir", "examples/gpt.py")
    assert code == 2 and "path/to/file.py:function" in err

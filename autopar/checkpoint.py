"""`autopar checkpoint info|consolidate`: look into a training checkpoint, or turn it back
into one single-device state dict.

    autopar checkpoint info ckpt/                       # steps, mesh, plan, tensors, bytes
    autopar checkpoint info ckpt/step-300 --verify      # also check every piece's crc32
    autopar checkpoint consolidate ckpt/ -o model.safetensors [--optimizer]

The checkpoint format (sharded safetensors + `index.json`) is written and read by
`autopar.backends.runtime.checkpoint`; this module only drives it.
"""
from __future__ import annotations

import argparse
import math
import sys

from autopar.compiler.errors import UserError


class CheckpointInputError(UserError):
    """A checkpoint directory or file that cannot be read as asked."""


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    info = sub.add_parser("info", help="steps, mesh, plan, tensors and bytes of a checkpoint")
    info.add_argument("directory", metavar="DIR", help="checkpoint root (latest step) or a step-N directory")
    info.add_argument("--verify", action="store_true",
                      help="read every stored piece and compare its crc32 with the one saved")
    info.add_argument("--tensors", type=int, default=40, metavar="N",
                      help="list at most N tensors (default 40; 0 for all)")
    cons = sub.add_parser("consolidate", help="the single-device state dict as one safetensors file")
    cons.add_argument("directory", metavar="DIR", help="checkpoint root (latest step) or a step-N directory")
    cons.add_argument("-o", "--output", required=True, metavar="FILE", help="the .safetensors file to write")
    cons.add_argument("--optimizer", action="store_true",
                      help="also write the optimizer state (under optim/<param>.<key>)")


def checkpoint_main(args) -> int:
    from autopar.backends.runtime.checkpoint import CheckpointError
    try:
        if args.action == "info":
            sys.stdout.write(info_text(args.directory, verify=args.verify, limit=args.tensors))
            return 0
        written = consolidate(args.directory, args.output, optimizer=args.optimizer)
        print(f"wrote {args.output}: {len(written)} tensors, "
              f"{_fmt_bytes(sum(t.numel() * t.element_size() for t in written.values()))}")
        return 0
    except CheckpointError as e:
        raise CheckpointInputError(str(e)) from None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _tensor_bytes(rec: dict) -> int:
    import torch
    from autopar.backends.runtime.checkpoint import _dtype_of
    return math.prod(rec["shape"]) * torch.empty((), dtype=_dtype_of(rec["dtype"])).element_size()


def info_text(directory, verify: bool = False, limit: int = 40) -> str:
    """The text of `autopar checkpoint info DIR`.

        print(info_text("ckpt"))
    """
    from autopar.backends.runtime.checkpoint import (list_checkpoints, read_index, read_tensor)

    path, index = read_index(directory)
    root = path.parent if path.name.startswith("step-") else path
    steps = [s for s, _ in list_checkpoints(root)]
    mesh = ", ".join(f"{a}={n}" for a, n in index["mesh"].items()) or "single device"
    lines = [f"checkpoint {path}",
             f"  step {index['step']}; complete steps in {root}: {', '.join(map(str, steps)) or '-'}",
             f"  saved on mesh {mesh} ({index['world_size']} ranks)"]
    plan = index.get("plan")
    if isinstance(plan, dict):
        bits = [f"{k} {plan[k]}" for k in ("model", "zero", "dp_axis", "optimizer") if plan.get(k) is not None]
        if plan.get("recompute"):
            bits.append(f"recompute {', '.join(plan['recompute'])}")
        lines.append(f"  plan: {'; '.join(bits) or f'{len(plan)} fields'}")
    else:
        lines.append("  plan: none recorded")
    groups: dict[str, list[int]] = {}
    for rec in index["tensors"].values():
        g = groups.setdefault(rec["group"], [0, 0])
        g[0] += 1
        g[1] += _tensor_bytes(rec)
    for g, (n, b) in sorted(groups.items()):
        lines.append(f"  {g}: {n} tensors, {_fmt_bytes(b)}")
    total = sum(index["files"].values())
    lines.append(f"  files: {len(index['files'])} shard files, {_fmt_bytes(total)} on disk")
    names = sorted(index["tensors"])
    shown = names if limit <= 0 else names[:limit]
    width = max((len(n) for n in shown), default=4)
    lines.append(f"  {'tensor':<{width}}  {'shape':<16} {'dtype':<9} {'pieces':>6} {'bytes':>10}  source")
    for name in shown:
        rec = index["tensors"][name]
        src = rec.get("source")
        src_text = f"{src[0]} rows {src[2]}:{src[3]} of dim {src[1]}" if src else ""
        lines.append(f"  {name:<{width}}  {str(tuple(rec['shape'])):<16} {rec['dtype']:<9} "
                     f"{len(rec['pieces']):>6} {_fmt_bytes(_tensor_bytes(rec)):>10}  {src_text}".rstrip())
    if len(shown) < len(names):
        lines.append(f"  ... {len(names) - len(shown)} more (--tensors 0 lists all)")
    if verify:
        for name in names:
            read_tensor(path, name, verify=True)
        lines.append(f"  verify: ok ({len(names)} tensors, every piece's crc32 matches)")
    return "\n".join(lines) + "\n"


def consolidate(directory, output, optimizer: bool = False) -> dict:
    """Write the single-device state dict of a checkpoint to `output` (safetensors) under
    the model's original names: pieces of a fused tensor (`source` in the index) are put
    back into it, tied names (`aliases`) written as copies. Returns the tensors written.

        consolidate("ckpt", "model.safetensors")
    """
    import torch
    from autopar.backends.runtime.checkpoint import read_index, read_tensor, save_file

    path, index = read_index(directory)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[tuple[int, int, int, torch.Tensor]]] = {}
    for name in sorted(index["tensors"]):
        rec = index["tensors"][name]
        if rec["group"] != "model" and not optimizer:
            continue
        t = read_tensor(path, name)
        key = name if rec["group"] == "model" else f"optim/{name}"
        if rec.get("source") and rec["group"] == "model":
            src, dim, start, stop = rec["source"]
            if t.shape[dim] != stop - start:
                raise CheckpointInputError(
                    f"{path / 'index.json'}: tensor {name!r} is recorded as rows {start}:{stop} of "
                    f"{src!r} along dim {dim} but has {t.shape[dim]} rows")
            fused.setdefault(src, []).append((dim, start, stop, t))
        else:
            out[key] = t
    for src, parts in fused.items():
        parts.sort(key=lambda p: p[1])
        dims = {p[0] for p in parts}
        if len(dims) != 1:
            raise CheckpointInputError(f"{path / 'index.json'}: the pieces of {src!r} are cut along "
                                       f"different dims {sorted(dims)}")
        dim = dims.pop()
        at = 0
        for _, start, stop, _t in parts:
            if start != at:
                raise CheckpointInputError(
                    f"{path / 'index.json'}: the pieces of {src!r} leave rows {at}:{start} of dim "
                    f"{dim} uncovered (a piece is missing from the checkpoint)")
            at = stop
        if src in out:
            raise CheckpointInputError(f"{path / 'index.json'}: {src!r} is saved both whole and in pieces")
        out[src] = torch.cat([p[3] for p in parts], dim)
    for alias, target in sorted(index.get("aliases", {}).items()):
        if target in out and alias not in out:
            out[alias] = out[target].clone()
    save_file(output, out, {"format": "autopar-consolidated", "step": str(index["step"])})
    return out


__all__ = ["add_checkpoint_args", "checkpoint_main", "info_text", "consolidate", "CheckpointInputError"]

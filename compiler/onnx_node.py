"""One ONNX node the lowering has no op for, evaluated by ONNX's own reference
implementation (`onnx.reference`), as the generated program and the single-device
reference both run it (here, in the core, so that the front end and the programs read one
definition).

    >>> run("Round", [x], {}, optional=(True,), n_outputs=1, opset=20)     # doctest: +SKIP
    tensor([...])

Why the reference implementation and not a torch rewrite: it is the definition `ir
--verify` checks the lowering against, it covers every op of the standard, and the
single-device run that `run --check` compares with calls this same function, so the
parallel program computes exactly what the check expects. The price: the node runs on
the CPU in numpy (its inputs are copied off the device and its outputs back), on full
(replicated) inputs -- the plan replicates an op without a sharding rule -- and no
gradient flows through it (the front end refuses a graph that would need one).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def run(op_type: str, inputs: list[torch.Tensor], attrs: dict[str, Any], optional: tuple,
        n_outputs: int, opset: int | None = None, domain: str = ""):
    """Evaluate ONNX op `op_type` on `inputs` (ONNX attributes `attrs`). `optional` says
    which of the node's input slots are filled (an empty slot is an omitted optional input);
    returns one tensor, or a tuple for `n_outputs` > 1, on the first input's device."""
    import onnx
    from onnx.reference import ReferenceEvaluator
    h = onnx.helper
    # a tensor attribute reaches a generated program as its serialized bytes
    attrs = {k: onnx.TensorProto.FromString(v) if isinstance(v, bytes) else v for k, v in attrs.items()}
    it = iter(range(len(inputs)))
    names = [f"in{next(it)}" if present else "" for present in optional]
    outs = [f"out{i}" for i in range(n_outputs)]
    node = h.make_node(op_type, names, outs, domain=domain or None, **attrs)
    feeds = {f"in{i}": t.detach().cpu().numpy() for i, t in enumerate(inputs)}
    graph = h.make_graph([node], "opaque", [h.make_tensor_value_info(n, 0, None) for n in feeds],
                         [h.make_tensor_value_info(o, 0, None) for o in outs])
    imports = [h.make_opsetid(domain, opset)] if opset else []
    model = h.make_model(graph, opset_imports=imports) if imports else h.make_model(graph)
    results = ReferenceEvaluator(model).run(None, feeds)
    device = inputs[0].device if inputs else torch.device("cpu")
    got = tuple(torch.from_numpy(np.array(r)).to(device) for r in results)
    return got[0] if n_outputs == 1 else got


def call_source(op: str, operands: list[str], attrs) -> str:
    """The generated program's call of `run` for an IR node `onnx.<Op>` with attributes
    `attrs` (the lowering's: the ONNX attributes plus `optional`, `n_outputs`, `opset`)."""
    a = dict(attrs)
    optional, n_out = tuple(a.pop("optional")), a.pop("n_outputs")
    opset, domain = a.pop("opset", None), a.pop("domain", "")
    plain = {k: v.SerializeToString() if hasattr(v, "SerializeToString") else v for k, v in a.items()}
    extra = f", domain={domain!r}" if domain else ""
    return (f"onnx_node.run({op.split('.', 1)[1]!r}, [{', '.join(operands)}], {plain!r}, "
            f"optional={optional!r}, n_outputs={n_out}, opset={opset!r}{extra})")


__all__ = ["run", "call_source"]

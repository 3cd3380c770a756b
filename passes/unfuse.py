"""Unfusing fused projections: `linear` followed by a `split` of its output features (GPT-2's
`c_attn`, which computes q, k and v in one matmul) becomes one `linear` per piece over a
piece of the weight.

Sharding the fused output features in contiguous blocks would hand each rank a mix of q, k
and v columns; after the split, each piece shards on its own and the search can choose
Megatron's head-parallel attention. The pieces stay tied to the state-dict tensor they
were cut from (`Graph.pieces`), so loading and saving use the original names.

    >>> g = split_fused_projections(graph)   # doctest: +SKIP
    >>> g.pieces["transformer.h.0.attn.c_attn.weight.1"].start
    64
"""
from __future__ import annotations

from autopar.compiler.ir import Graph, Node, Piece, Value


def split_fused_projections(graph: Graph) -> Graph:
    users = graph.users()
    tied = set(graph.aliases.values())
    new_nodes: list[Node] = []
    params = list(graph.params)
    pieces = dict(graph.pieces)
    replaced: dict[Node, list[Node]] = {}
    unfused = []
    for node in graph.nodes:
        if node.op != "linear" or len(node.inputs) < 2:
            continue
        y = node.outputs[0]
        w = node.inputs[1]
        b = node.inputs[2] if len(node.inputs) > 2 else None
        consumers = users[y]
        if len(consumers) != 1 or consumers[0].op not in ("split", "split_with_sizes"):
            continue
        split = consumers[0]
        dim = split.attr.get("dim", 0) % len(y.shape)
        if dim != len(y.shape) - 1 or len(split.outputs) < 2:
            continue
        sources = [v for v in (w, b) if v is not None]
        if any(v.kind != "param" or v.name in tied or v.name in pieces or len(users[v]) != 1
               for v in sources):
            continue
        if any(graph.outputs.count(o) for o in split.outputs) or y in graph.outputs:
            continue
        lin_nodes, start = [], 0
        for i, out in enumerate(split.outputs):
            size = out.shape[-1]
            cut = []
            for v in sources:
                name = f"{v.name}.{i}"
                shape = (size,) + v.shape[1:]
                pv = Value(name, shape, v.dtype, v.kind, v.requires_grad)
                pieces[name] = Piece(v.name, 0, start, start + size, i, len(split.outputs))
                cut.append(pv)
            lin_nodes.append(Node("linear", (node.inputs[0], *cut), node.attrs, (out,), node.meta))
            start += size
        replaced[node] = lin_nodes
        replaced[split] = []
        for j, v in enumerate(sources):
            k = params.index(v)
            params[k:k + 1] = [n.inputs[1 + j] for n in lin_nodes]
        unfused.append(f"{node.meta.module or node.outputs[0].name} -> {len(lin_nodes)}")
    if not unfused:
        return graph
    for node in graph.nodes:
        if node in replaced:
            new_nodes.extend(replaced[node])
        else:
            new_nodes.append(node)
    g = graph.copy(nodes=new_nodes, params=params, pieces=pieces)
    g.notes.append(f"split_fused_projections: {len(unfused)} fused projections cut into pieces "
                   f"({'; '.join(unfused[:3])}{'; ...' if len(unfused) > 3 else ''})")
    return g


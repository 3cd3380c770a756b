"""Unfusing fused projections: a projection followed by a `split` of its output features
(GPT-2's `c_attn`, which computes q, k and v in one matmul) becomes one projection per piece
over a piece of the weight.

Sharding the fused output features in contiguous blocks would hand each rank a mix of q, k
and v columns; after the split, each piece shards on its own and the search can choose
Megatron's head-parallel attention. The pieces stay tied to the state-dict tensor they
were cut from (`Graph.pieces`, which records the dim of the cut), so loading and saving use
the original names. Two forms are cut:
- `linear(x, W, b)` -> `split` (nn.Linear: W is [out, in], the pieces are row blocks of W);
- `addmm(b, x, W)` or `mm(x, W)` -> `view` -> `split` (Hugging Face's Conv1D: W is
  [in, out], the pieces are column blocks of W). Views that keep the feature dim last are
  cut along with the matmul.

`split_fused_projections` (the pass `prepare` runs) first applies two rewrites of the same
kind, each a fused op written as the pieces that shard on their own:
- `fold_bias_adds`: lowering writes Conv1D's `addmm` as `mm` + `add`; an `add` of a bias
  parameter is folded back into its matmul, so the bias is fused as in `linear` (one
  kernel, and 1/n of it per rank when the contraction is split) instead of an elementwise
  op of its own between the partial sum and its reduction.
- `mean_over_kept_targets`: cross-entropy's mean over class indices becomes its sum, the
  count of targets kept (not `ignore_index`) and their quotient. A shard of the batch
  cannot divide by the kept targets of the whole batch; written out, the sum and the count
  are partial sums over a split batch, reduced before the division, and the cost model
  prices those two one-number all_reduces like any other collective.

    >>> g = split_fused_projections(graph)   # doctest: +SKIP
    >>> g.pieces["transformer.h.0.attn.c_attn.weight.1"].start
    64
"""
from __future__ import annotations

import torch

from autopar.compiler.ir import Graph, Node, Piece, Value, namer

# views between the projection and the split: they must keep the feature dim last
VIEWS = ("view", "reshape", "_unsafe_view")


def _size_attr(node: Node) -> str | None:
    return next((k for k in ("size", "shape") if k in node.attr), None)


def fold_bias_adds(graph: Graph) -> Graph:
    """`add(mm(x, W), b)` -> `addmm(b, x, W)` where W and b are parameters, b a row over
    W's output features and the matmul's result feeds nothing else."""
    users = graph.users()
    folded: dict[Node, Node | None] = {}
    for node in graph.nodes:
        if node.op != "mm" or node.inputs[1].kind != "param" or node.outputs[0] in graph.outputs:
            continue
        y = node.outputs[0]
        if len(users[y]) != 1 or users[y][0].op != "add" or users[y][0].attr.get("alpha", 1) != 1:
            continue
        add = users[y][0]
        if len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
            continue
        bias = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
        if bias.kind != "param" or bias.shape != (y.shape[-1],) or add.outputs[0].shape != y.shape \
                or bias.dtype != y.dtype:
            continue
        folded[node] = None
        folded[add] = Node("addmm", (bias, *node.inputs), (), add.outputs, add.meta)
    if not folded:
        return graph
    nodes = [folded.get(n, n) for n in graph.nodes if folded.get(n, n) is not None]
    g = graph.copy(nodes=nodes)
    g.notes.append(f"fold_bias_adds: {len(folded) // 2} bias adds folded into addmm")
    return g


def _fused_chain(graph: Graph, users, node: Node) -> tuple[list[Node], Value, list[tuple[Value, int]]] | None:
    """The nodes from a fused projection to its split (projection, then views),
    the split node and the parameters to cut with the dim each is cut on; None where
    `node` does not start such a chain."""
    if node.op == "linear" and len(node.inputs) >= 2:
        sources = [(node.inputs[1], 0)] + ([(node.inputs[2], 0)] if len(node.inputs) > 2 else [])
    elif node.op == "mm" and node.inputs[1].kind == "param" and len(node.inputs[1].shape) == 2:
        sources = [(node.inputs[1], 1)]
    elif node.op == "addmm" and not node.attrs and len(node.inputs[0].shape) == 1:
        sources = [(node.inputs[2], 1), (node.inputs[0], 0)]
    else:
        return None
    chain = [node]
    y = node.outputs[0]
    width = y.shape[-1]
    while True:
        consumers = users[y]
        if len(consumers) != 1 or y in graph.outputs:
            return None
        nxt = consumers[0]
        if nxt.op in ("split", "split_with_sizes"):
            break
        if not (nxt.op in VIEWS and _size_attr(nxt) and nxt.outputs[0].shape[-1] == width):
            return None
        chain.append(nxt)
        y = nxt.outputs[0]
    split = nxt
    dim = split.attr.get("dim", 0) % len(y.shape)
    if dim != len(y.shape) - 1 or len(split.outputs) < 2:
        return None
    return chain, split, sources


def split_fused_projections(graph: Graph) -> Graph:
    graph = mean_over_kept_targets(fold_bias_adds(graph))
    users = graph.users()
    tied = set(graph.aliases.values())
    taken = {v.name for v in graph.values()}
    new_nodes: list[Node] = []
    params = list(graph.params)
    pieces = dict(graph.pieces)
    replaced: dict[Node, list[Node]] = {}
    unfused = []
    for node in graph.nodes:
        found = _fused_chain(graph, users, node)
        if found is None:
            continue
        chain, split, sources = found
        if any(v.kind != "param" or v.name in tied or v.name in pieces or len(users[v]) != 1
               for v, _ in sources):
            continue
        if any(graph.outputs.count(o) for o in split.outputs):
            continue
        count = len(split.outputs)
        cut_params: list[list[Value]] = [[] for _ in sources]
        piece_nodes, start = [], 0
        for i, out in enumerate(split.outputs):
            size = out.shape[-1]
            cut: dict[Value, Value] = {}
            for j, (v, d) in enumerate(sources):
                name = f"{v.name}.{i}"
                shape = v.shape[:d] + (size,) + v.shape[d + 1:]
                pv = Value(name, shape, v.dtype, v.kind, v.requires_grad)
                pieces[name] = Piece(v.name, d, start, start + size, i, count)
                cut[v] = pv
                cut_params[j].append(pv)
            remap: dict[Value, Value] = dict(cut)
            for k, n in enumerate(chain):
                o = n.outputs[0]
                if k == len(chain) - 1:
                    new_out = out
                else:
                    name, n_try = f"{o.name}_{i}", 0
                    while name in taken:                 # addmm_1 exists: addmm_1_p1
                        n_try += 1
                        name = f"{o.name}_p{i}" if n_try == 1 else f"{o.name}_p{i}_{n_try}"
                    taken.add(name)
                    new_out = Value(name, o.shape[:-1] + (size,), o.dtype, o.kind, o.requires_grad)
                attrs = n.attrs
                key = _size_attr(n) if n.op in VIEWS else None
                if key is not None:              # the view's feature dim becomes the piece's
                    sizes = list(n.attr[key])
                    sizes[-1] = size
                    attrs = tuple((a, sizes if a == key else val) for a, val in n.attrs)
                ins = tuple(remap.get(v, v) for v in n.inputs)
                piece_nodes.append(Node(n.op, ins, attrs, (new_out,), n.meta))
                remap[o] = new_out
            start += size
        replaced[chain[0]] = piece_nodes
        for n in chain[1:]:
            replaced[n] = []
        replaced[split] = []
        for (v, _), cuts in zip(sources, cut_params):
            k = params.index(v)
            params[k:k + 1] = cuts
        unfused.append(f"{node.meta.module or node.outputs[0].name} -> {count}")
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


def mean_over_kept_targets(graph: Graph) -> Graph:
    """`cross_entropy_loss(x, t)` (mean over class indices) ->
    `cross_entropy_loss(x, t, reduction=sum) / sum(t != ignore_index)`: exact on one device,
    and the mean stays global when the batch is split. A class-weighted mean (divided by
    the kept targets' weights) is left whole; its rule keeps the batch unsplit."""
    taken = {v.name for v in graph.values()}

    fresh = namer(taken)

    nodes, cut = [], 0
    for node in graph.nodes:
        attr = node.attr
        logits, target = (node.inputs + (None, None))[:2]
        if (node.op != "cross_entropy_loss" or attr.get("reduction", 1) != 1 or len(node.inputs) != 2
                or target.dtype.is_floating_point or len(logits.shape) <= len(target.shape)):
            nodes.append(node)
            continue
        y = node.outputs[0]
        attrs = tuple((k, 2 if k == "reduction" else a) for k, a in node.attrs)
        if "reduction" not in attr:
            attrs += (("reduction", 2),)
        total = Value(fresh(f"{y.name}_sum"), y.shape, y.dtype)
        kept = Value(fresh(f"{y.name}_kept"), target.shape, torch.bool)
        count = Value(fresh(f"{y.name}_count"), (), torch.int64)
        nodes += [node.replace(attrs=attrs, outputs=(total,)),
                  Node("ne.Scalar", (target,), (("other", attr.get("ignore_index", -100)),), (kept,), node.meta),
                  Node("sum", (kept,), (), (count,), node.meta),
                  Node("div", (total, count), (), (y,), node.meta)]
        cut += 1
    if not cut:
        return graph
    g = graph.copy(nodes=nodes)
    g.notes.append(f"mean_over_kept_targets: {cut} cross-entropy means written as sum / kept targets")
    return g

"""The traced-graph cache: tracing a large model with torch.export takes seconds (the
LLaMA-3-8B shape ~5-10 s here), and planning the same model again (another mesh, another
memory limit, the next `autopar run`) traces it again. A lowered graph is stored under
`$AUTOPAR_CACHE/traces/` (default `~/.cache/autopar/traces/`) as JSON (plus a safetensors
file for lifted tensor constants, if any) and read back when the key matches.

The key is everything the trace depends on:
- the model: its module tree (`repr`), every module's class, attributes (tensors by value,
  Hugging Face configs by content, the rest by `repr`) and training flag, every
  parameter's and buffer's name, shape, dtype, device and requires_grad, the bytecode
  and closed-over values of its classes' methods, and the source of the files that define
  them (whole files, so helper functions beside a class count too);
- the user's own code: every imported module outside the standard library and
  site-packages, by path, size and modification time;
- the libraries the model's classes come from (their versions), torch and Python;
- the example inputs (shapes, dtypes, devices; values of non-tensor inputs);
- the trace mode, name and `symbolic`, and autopar's own front end and IR source.

Parameter values are not part of a graph (a plan depends on shapes, not weights), so a
model with new weights reuses its entry. Warnings the trace issued (ops without a
sharding rule) are recorded and issued again on a hit. A graph the codec cannot write
(an attribute of an unknown type, a tensor constant on `meta`) is simply not cached.
`AUTOPAR_TRACE_CACHE=0` turns the cache off.

The folder is bounded: after each store, the least recently used entries (a hit counts as
a use) go until at most MAX_ENTRIES remain, holding at most MAX_BYTES together
(`AUTOPAR_TRACE_CACHE_MB` sets the latter), and temporary files a crashed writer left
behind are removed after an hour. One process traces a key at a time (a lock file per key):
the ranks of a job that each compile the same model wait for the first one's graph.

No pickle: the JSON holds only plain values with tagged dtypes, devices, layouts, memory
formats and symbolic sizes, decoded by a fixed table.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from autopar.compiler.ir import Graph, Node, NodeMeta, SymInt, Value

FORMAT = 1
MAX_ENTRIES = 64                  # graphs kept (the least recently used go first)
MAX_BYTES = 1 << 30               # and their bytes together; AUTOPAR_TRACE_CACHE_MB overrides
STALE_TMP_S = 3600                # a writer's temporary file older than this was abandoned
STALE_LOCK_S = 86400              # a tracing lock (empty) unused this long is removed
_ROOT = Path(__file__).resolve().parent.parent          # autopar's source tree
_OWN_SOURCES = ("frontends", "compiler")                 # what a traced graph depends on
_PLAIN = (int, float, bool, str, type(None))


def enabled() -> bool:
    return os.environ.get("AUTOPAR_TRACE_CACHE", "1") not in ("0", "off", "no", "false")


def cache_root() -> Path:
    from autopar.compiler.cluster import cache_dir
    return cache_dir() / "traces"


# ---- the key --------------------------------------------------------------------------

def _file_digest(path: str, memo: dict) -> str:
    if path not in memo:
        try:
            memo[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError:
            memo[path] = "unreadable"
    return memo[path]


def _own_source_digest() -> str:
    h = hashlib.sha256()
    for folder in _OWN_SOURCES:
        for p in sorted((_ROOT / folder).glob("*.py")):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _library_paths() -> tuple[str, ...]:
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return tuple(sorted(str(Path(p).resolve()) for p in paths))


def _user_modules() -> list[tuple[str, int, int]]:
    """Imported modules that are neither the standard library nor installed packages nor
    autopar itself: the user's code, by path, size and mtime (cheap, and any edit shows)."""
    libs = _library_paths()
    own = str(_ROOT)
    out = []
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if not f or not f.endswith(".py"):
            continue
        f = str(Path(f).resolve())
        if f.startswith(libs) or f.startswith(own):
            continue
        try:
            st = os.stat(f)
        except OSError:
            continue
        out.append((f, st.st_size, st.st_mtime_ns))
    return sorted(set(out))


def _tensor_key(t: torch.Tensor) -> list:
    out = [list(t.shape), str(t.dtype), str(t.device)]
    if t.device.type == "cpu":                  # a tensor attribute is baked in as a constant
        out.append(hashlib.sha256(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                   if t.numel() else "")
    return out


def _attr_key(v):
    if isinstance(v, torch.Tensor):
        return ["T", _tensor_key(v)]
    if hasattr(v, "to_json_string"):            # a Hugging Face config
        try:
            return ["config", v.to_json_string(use_diff=False)]
        except Exception:
            pass
    return _stable(v)


def _stable(v, depth: int = 5):
    """A value as the key sees it, the same in every process: functions by their code
    and closure, sets sorted, objects without a repr of their own by type and attributes;
    past `depth`, or where nothing stable is left, the repr (an address: a miss, never a
    false hit)."""
    if isinstance(v, _PLAIN):
        return repr(v)
    if isinstance(v, (set, frozenset)):
        return sorted(repr(x) for x in v)
    if isinstance(v, (torch.dtype, torch.device)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return [_stable(x, depth) for x in v]
    if isinstance(v, dict):
        return [[repr(k), _stable(x, depth)] for k, x in v.items()]
    f = getattr(v, "__func__", v)
    code = getattr(f, "__code__", None)
    if code is not None and depth <= 0:         # deep in a decorator chain: the code alone
        return ["fn", getattr(f, "__qualname__", ""), _code_digest(code)]
    if depth <= 0:
        return repr(v)
    if code is not None:
        return ["fn", getattr(f, "__qualname__", ""), _code_digest(code),
                [_stable(c.cell_contents, depth - 1) for c in (f.__closure__ or ()) if _cell_filled(c)],
                _stable(getattr(f, "__defaults__", None), depth - 1),
                _stable(getattr(v, "__self__", None), depth - 1) if f is not v else None]
    if inspect.isgenerator(v):                 # a generator's state cannot change a trace's code
        return ["generator", v.__qualname__, _code_digest(v.gi_code)]
    r = repr(v)
    if " at 0x" in r and hasattr(v, "__dict__"):
        return ["obj", type(v).__qualname__, [[k, _stable(x, depth - 1)] for k, x in sorted(vars(v).items())]]
    return r


def _module_attrs(m: nn.Module) -> list:
    skip = ("_parameters", "_buffers", "_modules")
    return [(k, _attr_key(v)) for k, v in sorted(vars(m).items()) if k not in skip]


def _class_code(cls, memo: dict) -> list:
    """The functions a class defines: their bytecode, constants, names and closed-over
    values (a class made in a factory differs by what it closes over)."""
    if cls in memo:
        return memo[cls]
    out = []
    for k, f in sorted(vars(cls).items()):
        f = getattr(f, "__func__", f)
        code = getattr(f, "__code__", None)
        if code is None:
            continue
        out.append((k, _stable(f)))
    memo[cls] = out
    return out


def _code_digest(code) -> str:
    """Bytecode, names and constants; nested code objects (comprehensions, inner
    functions) by their own digest, not by their repr (which holds an address)."""
    def const(c):
        if hasattr(c, "co_code"):
            return _code_digest(c)
        if isinstance(c, (frozenset, set)):        # `x in {"a", "b"}`: order varies by hash seed
            return sorted(repr(x) for x in c)
        if isinstance(c, tuple):
            return [const(x) for x in c]
        return repr(c)
    consts = [const(c) for c in code.co_consts]
    return hashlib.sha256(code.co_code + repr((consts, code.co_names)).encode()).hexdigest()


def _cell_filled(c) -> bool:
    try:
        c.cell_contents
        return True
    except ValueError:
        return False


def _input_key(x):
    if isinstance(x, torch.Tensor):
        return ["T", list(x.shape), str(x.dtype), str(x.device), bool(x.requires_grad)]
    if isinstance(x, (list, tuple)):
        return [type(x).__name__, [_input_key(y) for y in x]]
    if isinstance(x, dict):
        return ["dict", [[str(k), _input_key(v)] for k, v in x.items()]]
    return ["V", type(x).__name__, repr(x)]


def key_of(model: nn.Module, inputs: tuple, mode: str, name: str, symbolic: bool) -> str:
    memo: dict = {}
    code_memo: dict = {}
    files, libs = set(), {}
    modules = []
    for path, m in model.named_modules():
        cls = type(m)
        modules.append([path, f"{cls.__module__}.{cls.__qualname__}", bool(m.training), _module_attrs(m)])
        for c in cls.__mro__:
            mod = sys.modules.get(c.__module__)
            if mod is None or c.__module__.startswith("torch"):
                continue
            modules.append([c.__qualname__, _class_code(c, code_memo)])
            top = c.__module__.split(".")[0]
            libs[top] = str(getattr(sys.modules.get(top), "__version__", ""))
            f = getattr(mod, "__file__", None)
            if f:
                files.add(f)
    tensors = [[n, list(t.shape), str(t.dtype), str(t.device), bool(t.requires_grad)]
               for n, t in list(model.named_parameters(remove_duplicate=False))
               + list(model.named_buffers(remove_duplicate=False))]
    payload = {
        "format": FORMAT, "mode": mode, "name": name, "symbolic": bool(symbolic),
        "torch": torch.__version__, "python": sys.version, "autopar": _own_source_digest(),
        "libraries": sorted(libs.items()), "repr": repr(model), "modules": modules,
        "tensors": tensors, "inputs": _input_key(inputs),
        "class_files": sorted((f, _file_digest(f, memo)) for f in files),
        "user_modules": _user_modules(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=repr).encode()).hexdigest()


# ---- the codec --------------------------------------------------------------------------

class Unencodable(Exception):
    pass


_DTYPES = {str(d): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_LAYOUTS = {str(x): x for x in vars(torch).values() if isinstance(x, torch.layout)}
_FORMATS = {str(x): x for x in vars(torch).values() if isinstance(x, torch.memory_format)}


def _enc(v):
    if isinstance(v, SymInt):
        return {"sym": [int(v), v.expr]}
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return {"float": repr(v)}                  # keeps inf, nan and -0.0 exact
    if isinstance(v, torch.dtype):
        return {"dtype": str(v)}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.layout):
        return {"layout": str(v)}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v)}
    if isinstance(v, tuple):
        return {"tuple": [_enc(x) for x in v]}
    if isinstance(v, list):
        return [_enc(x) for x in v]
    raise Unencodable(type(v).__name__)


def _dec(v):
    if isinstance(v, list):
        return [_dec(x) for x in v]
    if not isinstance(v, dict):
        return v
    (tag, x), = v.items()
    if tag == "sym":
        return SymInt(x[0], x[1])
    if tag == "float":
        return float(x)
    if tag == "dtype":
        return _DTYPES[x]
    if tag == "device":
        return torch.device(x)
    if tag == "layout":
        return _LAYOUTS[x]
    if tag == "memory_format":
        return _FORMATS[x]
    if tag == "tuple":
        return tuple(_dec(y) for y in x)
    raise ValueError(f"unknown tag {tag!r}")


def encode(graph: Graph) -> dict:
    ids: dict[int, int] = {}
    values = []

    def vid(v: Value) -> int:
        k = ids.get(id(v))
        if k is None:
            k = ids[id(v)] = len(values)
            values.append([v.name, [_enc(s) for s in v.shape], str(v.dtype), v.kind, v.requires_grad])
        return k

    inputs = [vid(v) for v in graph.inputs]
    params = [vid(v) for v in graph.params]
    nodes = []
    for n in graph.nodes:
        nodes.append([n.op, [vid(v) for v in n.inputs], [[k, _enc(a)] for k, a in n.attrs],
                      [vid(v) for v in n.outputs], [n.meta.module, n.meta.source, n.meta.line]])
    outputs = [vid(v) for v in graph.outputs]
    if graph.pieces:
        raise Unencodable("pieces")               # traced graphs have none (prepare adds them)
    from autopar.compiler.ops import REGISTRY
    ops = {}
    for n in graph.nodes:
        t = REGISTRY[n.op].target
        if hasattr(t, "_schema") and n.op not in ops:      # an ATen overload (maybe opaque)
            ops[n.op] = [t._schema.name, t._overloadname]
    return {"format": FORMAT, "name": graph.name, "values": values, "inputs": inputs, "ops": ops,
            "params": params, "nodes": nodes, "outputs": outputs, "aliases": graph.aliases,
            "notes": graph.notes, "constants": sorted(graph.constants),
            "input_sizes": {k: [_enc(s) for s in v] for k, v in graph.input_sizes.items()}}


def _register_ops(ops: dict) -> None:
    """Ops a trace registered on the fly (no rule: opaque) are registered again from their
    ATen names, so a graph read from the cache runs like a traced one."""
    from autopar.compiler.ops import REGISTRY, ir_name, opdef_for_target
    for name, (schema, overload) in ops.items():
        if name in REGISTRY:
            continue
        ns, packet = schema.split("::")
        target = getattr(getattr(getattr(torch.ops, ns), packet), overload or "default")
        if ir_name(target) != name:
            raise ValueError(f"op {name} resolves to {ir_name(target)}")
        opdef_for_target(target)


def decode(data: dict, constants: dict) -> Graph:
    _register_ops(data["ops"])
    values = [Value(n, tuple(_dec(s) for s in shape), _DTYPES[dt], kind, rg)
              for n, shape, dt, kind, rg in data["values"]]
    nodes = [Node(op, tuple(values[i] for i in ins), tuple((k, _dec(a)) for k, a in attrs),
                  tuple(values[i] for i in outs), NodeMeta(*meta))
             for op, ins, attrs, outs, meta in data["nodes"]]
    return Graph(data["name"], [values[i] for i in data["inputs"]], [values[i] for i in data["params"]],
                 nodes, [values[i] for i in data["outputs"]], dict(data["aliases"]), list(data["notes"]),
                 {}, constants, {k: tuple(_dec(s) for s in v) for k, v in data["input_sizes"].items()})


# ---- lookup and store ---------------------------------------------------------------------

def load(key: str) -> tuple[Graph, list] | None:
    """The cached graph and the warnings its trace issued, or None."""
    path = cache_root() / f"{key}.json"
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            return None
        constants = {}
        if data["graph"]["constants"]:
            from safetensors.torch import load_file
            constants = load_file(str(path.with_suffix(".safetensors")))
            if sorted(constants) != data["graph"]["constants"]:
                return None
        graph = decode(data["graph"], constants), data["warnings"]
        try:
            os.utime(path)                        # used now: the last to be evicted
        except OSError:
            pass
        return graph
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError):
        return None                               # missing, partial or stale: trace again


def store(key: str, graph: Graph, warned: list) -> bool:
    try:
        body = {"format": FORMAT, "graph": encode(graph), "warnings": warned}
        for c in graph.constants.values():
            if not isinstance(c, torch.Tensor) or c.device.type != "cpu":
                raise Unencodable("constant")
        text = json.dumps(body)
    except Unencodable:
        return False
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if graph.constants:
            from safetensors.torch import save_file
            fd, tmp = tempfile.mkstemp(dir=root, suffix=".tmp")
            os.close(fd)
            save_file({k: v.contiguous() for k, v in graph.constants.items()}, tmp)
            os.replace(tmp, root / f"{key}.safetensors")
        fd, tmp = tempfile.mkstemp(dir=root, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, root / f"{key}.json")     # the JSON last: a reader trusts only it
    except OSError:
        return False                              # a read-only home: tracing still works
    evict(root, keep=key)
    return True


def tracing(key: str):
    """A lock held while `key` is traced and stored (yields whether another process held it
    first: then its graph is likely stored)."""
    from autopar.compiler.cluster import file_lock
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass                                      # no folder: file_lock locks nothing
    return file_lock(root / f"{key}.lock")


def max_bytes() -> int:
    mb = os.environ.get("AUTOPAR_TRACE_CACHE_MB")
    try:
        return int(float(mb) * (1 << 20)) if mb else MAX_BYTES
    except ValueError:
        from autopar.compiler.errors import InputError
        raise InputError(f"AUTOPAR_TRACE_CACHE_MB={mb!r}: give the traced-graph cache's size in MiB, "
                         "a number such as 512") from None


def evict(root: Path, keep: str | None = None) -> None:
    """Remove the least recently used entries of `root` beyond MAX_ENTRIES or max_bytes()
    (never `keep`, the entry just stored) and abandoned temporary and lock files. Races
    with another process are harmless: a file already gone is skipped."""
    entries = []
    now = time.time()
    for p in root.iterdir() if root.is_dir() else ():
        try:
            st = p.stat()
        except OSError:
            continue
        if p.suffix in (".tmp", ".lock"):
            if now - st.st_mtime > (STALE_TMP_S if p.suffix == ".tmp" else STALE_LOCK_S):
                p.unlink(missing_ok=True)
            continue
        if p.suffix == ".json":
            side = p.with_suffix(".safetensors")
            size = st.st_size + (side.stat().st_size if side.exists() else 0)
            entries.append((st.st_mtime, p.stem, size))
    entries.sort(reverse=True)                    # the most recently used first
    limit, total = max_bytes(), 0
    for k, (_, stem, size) in enumerate(entries):
        total += size
        if stem != keep and (k >= MAX_ENTRIES or total > limit):
            for suffix in (".json", ".safetensors"):
                (root / f"{stem}{suffix}").unlink(missing_ok=True)
            total -= size


def replay(warned: list) -> None:
    """Issue again the warnings the cached trace issued (ops without a sharding rule)."""
    from autopar.compiler.ops import REGISTRY, warn_opaque
    for op, where in warned:
        d = REGISTRY.get(op)
        if d is not None:
            warn_opaque(d, where)
        else:
            warnings.warn(f"autopar: op '{op}' ({where}) has no sharding rule; it will be "
                          "replicated on every rank.", stacklevel=3)


__all__ = ["key_of", "load", "store", "replay", "encode", "decode", "enabled", "cache_root", "evict", "tracing"]

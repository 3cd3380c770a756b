"""Device profiles and clusters: what the cost model knows about the hardware.

A `DeviceProfile` holds one device's published figures (peak FLOP/s, the fraction of it a
training step achieves, HBM bandwidth and capacity) and its two links: `intra` (inside a
node) and `inter` (the network, per NIC). A `Cluster` is a mesh of named axes on such
devices; each axis gets a link: axes whose size product, counted from the innermost (last)
axis outward, fits in one node use the intra-node link, the others the network.

    >>> cluster = Cluster(parse_mesh("dp=16,tp=8"), load_profile("a100-80g"))
    >>> cluster.link("tp").bandwidth, cluster.link("dp").bandwidth      # doctest: +SKIP
    (230000000000.0, 24000000000.0)

Built-in profiles live in `compiler/devices/*.json`. `cpu` is measured on this machine
(torch matmul, memory copy, gloo all_reduce between 2 local processes; ~10 s) and cached
in `$AUTOPAR_CACHE` (default `~/.cache/autopar`)/cpu.json, measured again only when that
file is missing. A user profile is a `.json` or `.toml` file with the same fields.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autopar.compiler.errors import InputError, UserError
from autopar.compiler.sharding import parse_mesh

DEVICES_DIR = Path(__file__).resolve().parent / "devices"


class ProfileError(UserError):
    """A device profile that cannot be used: names the file and the missing/bad field."""




@dataclass(frozen=True)
class Link:
    """A collective link: per-step latency `alpha` (s) and bus bandwidth (bytes/s)."""
    alpha: float
    bandwidth: float


@dataclass(frozen=True)
class DeviceProfile:
    """One accelerator. `precision` is the training recipe the memory and byte counts
    assume: "mixed" (bf16 compute and communication, fp32 master weights and Adam:
    2+2+12 bytes per parameter) or "fp32" (4+4+8)."""
    name: str
    peak_flops: float          # dense FLOP/s in the training dtype
    efficiency: float          # achievable fraction of peak on large matmuls
    hbm_bandwidth: float       # bytes/s
    memory: float              # bytes per device
    node_size: int             # devices per node
    intra: Link
    inter: Link
    precision: str = "mixed"
    # host time per op outside the math (dispatch, autograd bookkeeping, kernel launch),
    # paid once in forward and once in backward; 0 where it hides behind the device
    op_overhead: float = 0.0
    # the fraction by which compute slows while a collective runs beside it (communication
    # kernels take SMs and memory bandwidth from the math): each second of hidden
    # communication costs this many seconds of compute
    overlap_slowdown: float = 0.0
    description: str = ""
    sources: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


REQUIRED = ("peak_flops", "hbm_bandwidth", "memory", "node_size", "intra", "inter")


def profile_from_dict(data: dict, origin: str) -> DeviceProfile:
    """Check and convert a parsed profile; `origin` names the file in errors."""
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ProfileError(f"device profile {origin}: missing field(s) {', '.join(missing)}. "
                           f"A profile needs {', '.join(REQUIRED)} (intra/inter as "
                           "{alpha = seconds, bandwidth = bytes/s}); see compiler/devices/h100.json.")

    def number(key, value, where=None):
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ProfileError(f"device profile {origin}: field {where or key} must be a number, "
                               f"got {value!r}") from None
        if x <= 0:
            raise ProfileError(f"device profile {origin}: field {where or key} must be positive, got {value!r}")
        return x

    def link(key):
        v = data[key]
        if not isinstance(v, dict) or "alpha" not in v or "bandwidth" not in v:
            raise ProfileError(f"device profile {origin}: field {key} needs alpha (s) and "
                               f"bandwidth (bytes/s), e.g. {key} = {{alpha = 1e-5, bandwidth = 2e11}}")
        return Link(number(key, v["alpha"], f"{key}.alpha"), number(key, v["bandwidth"], f"{key}.bandwidth"))
    precision = data.get("precision", "mixed")
    if precision not in ("mixed", "fp32"):
        raise ProfileError(f"device profile {origin}: precision must be 'mixed' or 'fp32', got {precision!r}")
    eff = number("efficiency", data.get("efficiency", 0.5))
    overhead = data.get("op_overhead", 0.0)
    if overhead != 0.0:
        overhead = number("op_overhead", overhead)
    slowdown = data.get("overlap_slowdown", 0.0)
    if slowdown != 0.0:
        slowdown = number("overlap_slowdown", slowdown)
        if slowdown >= 1:
            raise ProfileError(f"device profile {origin}: overlap_slowdown is a fraction [0, 1), got {slowdown}")
    if eff > 1:
        raise ProfileError(f"device profile {origin}: efficiency is a fraction of peak (0..1], got {eff}")
    return DeviceProfile(
        name=str(data.get("name", Path(origin).stem)),
        peak_flops=number("peak_flops", data["peak_flops"]), efficiency=eff,
        hbm_bandwidth=number("hbm_bandwidth", data["hbm_bandwidth"]),
        memory=number("memory", data["memory"]),
        node_size=int(number("node_size", data["node_size"])),
        intra=link("intra"), inter=link("inter"), precision=precision, op_overhead=float(overhead),
        overlap_slowdown=float(slowdown),
        description=str(data.get("description", "")), sources=str(data.get("sources", "")))


def builtin_profiles() -> list[str]:
    return sorted(["cpu"] + [p.stem for p in DEVICES_DIR.glob("*.json")])


def read_profile_file(path: str | os.PathLike) -> DeviceProfile:
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"device profile {path}: no such file")
    text = path.read_text()
    if path.suffix == ".toml":
        if sys.version_info < (3, 11):
            raise ProfileError(f"device profile {path}: TOML needs Python 3.11 (tomllib); "
                               "write the profile as JSON with the same fields instead")
        import tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ProfileError(f"device profile {path}: not valid TOML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"device profile {path}: not valid JSON: line {e.lineno} "
                               f"column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"device profile {path}: expected a table of fields, got {type(data).__name__}")
    return profile_from_dict(data, str(path))


def load_profile(name: str) -> DeviceProfile:
    """A built-in name (`a100-80g`, `h100`, `h200`, `mi250x`, `cpu`) or a profile file path.

        >>> load_profile("h100").peak_flops
        989000000000000.0
    """
    if name == "cpu":
        return cpu_profile()
    builtin = DEVICES_DIR / f"{name}.json"
    if builtin.is_file():
        return read_profile_file(builtin)
    if name.endswith((".json", ".toml")) or os.sep in name:
        return read_profile_file(name)
    raise ProfileError(f"unknown device '{name}': use one of {', '.join(builtin_profiles())} "
                       "or the path of a .json/.toml profile file")


# ---- the cluster ------------------------------------------------------------------------

@dataclass
class Cluster:
    """A mesh on devices of one profile. `links[axis]` is that axis's `Link`."""
    mesh: dict[str, int]
    profile: DeviceProfile
    links: dict[str, Link] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.mesh, str):
            self.mesh = parse_mesh(self.mesh)
        if not self.links:
            inner = 1
            for axis in reversed(list(self.mesh)):
                inner *= self.mesh[axis]
                self.links[axis] = self.profile.intra if inner <= self.profile.node_size else self.profile.inter

    @property
    def devices(self) -> int:
        n = 1
        for s in self.mesh.values():
            n *= s
        return n

    def link(self, axis: str) -> Link:
        return self.links[axis]

    def link_kind(self, axis: str) -> str:
        return "intra-node" if self.links[axis] == self.profile.intra else "network"


# ---- units -----------------------------------------------------------------------------

UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | float | int) -> float:
    """`"80GB"` -> 80e9 (SI), `"80GiB"` -> 80·2^30, `"1.5e9"` -> 1.5e9."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise InputError(f"memory size '{text}': write a number with a unit, e.g. 80GB, 24GiB or 512MB")
    try:
        return float(m.group(1)) * UNITS[m.group(2).lower()]
    except ValueError:
        raise InputError(f"memory size '{text}': write a number with a unit, e.g. 80GB") from None


def format_bytes(n: float) -> str:
    n = float(n)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_time(t: float) -> str:
    if t >= 1:
        return f"{t:.3f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3f} ms"
    return f"{t * 1e6:.1f} us"


# ---- the measured cpu profile -------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("AUTOPAR_CACHE") or Path.home() / ".cache" / "autopar")


# what `measure_cpu` measures: a cache written by an older version is measured again
# (2: per-op overhead)
CPU_PROFILE_VERSION = 2


def cpu_profile(remeasure: bool = False) -> DeviceProfile:
    """This machine as a device, measured once and cached (see `measure_cpu`). One process
    measures at a time (a lock file beside the cache): the ranks of a launched job that
    each plan on a fresh machine wait for the first one's numbers instead of measuring
    apart -- on cores they share, into different profiles and so different plans."""
    path = cache_dir() / "cpu.json"
    if not remeasure and (cached := _cached_cpu(path)) is not None:
        return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_suffix(".lock")) as waited:
        # another process measured while this one waited: its numbers, even for `remeasure`
        if (not remeasure or waited) and (cached := _cached_cpu(path)) is not None:
            return cached
        data = {**measure_cpu(), "version": CPU_PROFILE_VERSION}
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    return profile_from_dict(data, str(path))


def _cached_cpu(path: Path) -> DeviceProfile | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        # stale: measured by an older measure_cpu (a profile written by hand, e.g. a
        # test's fixed one, has no version and is used as it is)
        version = data.get("version", 1 if "measured" in str(data.get("sources", "")) else None)
        if version in (None, CPU_PROFILE_VERSION):
            return read_profile_file(path)
    except (ProfileError, ValueError, OSError):
        pass                      # a stale or broken cache is measured again
    return None


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock on `path` between processes (flock); yields whether another
    process held it first. Where the file cannot be made (a read-only cache), no lock."""
    import fcntl
    try:
        f = open(path, "a")
    except OSError:
        yield False
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            fcntl.flock(f, fcntl.LOCK_EX)
            waited = True
        try:
            yield waited
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def measure_cpu() -> dict:
    """Measure matmul FLOP/s, memory bandwidth and gloo all_reduce alpha/bandwidth between
    two local processes. Takes ~5-15 s on a 2-core machine."""
    import torch
    t_start = time.perf_counter()

    def best_of(fn, reps):
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    flops = 2 * n**3 / best_of(lambda: a @ b, 5)
    src = torch.empty(32 * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    hbm = 2 * src.numel() * 4 / best_of(lambda: dst.copy_(src), 5)
    overhead = measure_op_overhead()
    alpha, bw = measure_gloo()
    mem = 8e9
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    link = {"alpha": alpha, "bandwidth": bw}
    return {
        "name": "cpu", "description": f"this machine ({os.cpu_count()} cores), measured",
        "peak_flops": flops, "efficiency": 1.0, "hbm_bandwidth": hbm, "memory": float(mem),
        "node_size": max(os.cpu_count() or 1, 1), "intra": link, "inter": link,
        "precision": "fp32", "op_overhead": overhead,
        "sources": f"measured in {time.perf_counter() - t_start:.1f} s: torch {n}^3 fp32 matmul, "
                   "32 MiB copy, a chain of tiny autograd ops (per-op overhead), "
                   "gloo all_reduce of 4 B and 8 MiB between 2 processes",
    }


def measure_op_overhead(ops: int = 200) -> float:
    """Seconds per op of a chain of tiny autograd ops (forward and backward, halved): what
    each op costs beyond its arithmetic on this host."""
    import torch
    x = torch.ones(8, requires_grad=True)

    def step():
        y = x
        for _ in range(ops):
            y = y * 1.0001
        y.sum().backward()
    step()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return max(best / (2 * ops), 1e-9)


def _gloo_worker(rank: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    small, big = torch.zeros(1), torch.zeros(2 * 2**20)     # 4 B and 8 MiB

    def timed(t, reps):
        for _ in range(2):
            dist.all_reduce(t)
        dist.barrier()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            dist.all_reduce(t)
            best = min(best, time.perf_counter() - t0)
        return best
    t_small, t_big = timed(small, 50), timed(big, 5)
    if rank == 0:
        queue.put((t_small, t_big))
    dist.destroy_process_group()


def measure_gloo() -> tuple[float, float]:
    """all_reduce over n=2 takes 2α + S/B: α from a 4-byte tensor, B from 8 MiB."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gloo_worker, args=(r, port, queue), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        t_small, t_big = queue.get(timeout=60)
    finally:
        for p in procs:
            p.join(timeout=10)
    alpha = max(t_small / 2, 1e-7)
    size = 2 * 2**20 * 4
    bw = size / max(t_big - 2 * alpha, 1e-9)
    return alpha, bw


__all__ = ["Link", "DeviceProfile", "Cluster", "ProfileError", "load_profile", "read_profile_file",
           "profile_from_dict", "builtin_profiles", "cpu_profile", "measure_cpu", "parse_bytes",
           "format_bytes", "format_time", "cache_dir", "measure_op_overhead", "CPU_PROFILE_VERSION"]

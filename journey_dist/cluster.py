"""What a cluster can do, for `journey plan`'s time model: GPUs, links, and achievable fractions.

    cluster = get_cluster("h100", gpus_per_node=8)           # a preset, fields overridden
    cluster = load_cluster("my_cluster.toml")                 # a file: a preset plus overrides
    cluster.link_for(ranks_per_node=8, nodes=1)               # NVLink inside a node

A GPU preset is its spec sheet (dense 16-bit peak FLOP/s, HBM capacity and bandwidth); a cluster
adds GPUs per node, the intra-node link (NVLink/NVSwitch) and the inter-node link (one
InfiniBand/RoCE NIC per GPU), each as bandwidth per GPU per direction and a latency per ring step,
and two achievable fractions: of peak FLOP/s for a whole training step's FLOPs, and of link
bandwidth for a collective. They are the model's only efficiency constants, one set per GPU type,
stated here and in notes/step_time.md (vendor spec sheets cited in notes/interconnects.md).

`cpu-gloo` is this machine measured by `journey calibrate` (benchmarks/results/calibration_cpu.json):
a single-thread matmul rate, a memory bandwidth, gloo's all-reduce latency and bandwidth, and the
fraction of the matmul rate a one-process GPT-mini step reaches, each as on an idle machine (the
time spent waiting for a CPU behind other jobs taken out). Its ranks run one thread each
(runtime.spawn's rule for 2+ ranks on 2 cores) and share `shared_cores` cores, so a rank slows
down when more ranks than cores run.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from journey_dist.config import ConfigError

try:  # Python 3.11+; on 3.10 cluster files are refused with a message (load_cluster)
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - the venv runs 3.11
    tomllib = None


@dataclass(frozen=True)
class Link:
    """One kind of link: bandwidth per GPU per direction (bytes/s) and latency per ring step (s)."""

    name: str
    bandwidth: float
    latency: float


@dataclass(frozen=True)
class Cluster:
    """A homogeneous cluster: nodes of `gpus_per_node` GPUs, NVLink inside a node, a network between."""

    name: str
    gpu: str
    peak_flops: float  # dense bf16/fp16 tensor-core FLOP/s per GPU (CPU: one thread's fp32 matmul)
    memory: float  # bytes of HBM per GPU (the spec sheet's GB, 10^9 bytes)
    memory_bandwidth: float  # bytes/s
    gpus_per_node: int
    intra: Link
    inter: Link
    compute_efficiency: float  # achievable fraction of peak_flops over a training step's FLOPs
    comm_efficiency: float  # achievable fraction of a link's bandwidth in a collective
    shared_cores: float | None = None  # CPU: the cores the node's ranks share; GPUs: None (one each)

    def __post_init__(self) -> None:
        for name in ("peak_flops", "memory", "memory_bandwidth"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"cluster {self.name!r}: {name}={getattr(self, name)!r} must be > 0")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise ConfigError(f"gpus_per_node={self.gpus_per_node!r} must be a positive integer (8 on a "
                              "DGX/HGX node)")
        for name in ("compute_efficiency", "comm_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a fraction in (0, 1] (e.g. 0.5)")
        for link in (self.intra, self.inter):
            if not link.bandwidth > 0 or link.latency < 0:
                raise ConfigError(f"link {link.name!r}: bandwidth must be > 0 and latency >= 0 "
                                  f"(got {link.bandwidth!r} B/s, {link.latency!r} s)")

    def rank_flops(self, ranks_on_node: int) -> float:
        """Achievable FLOP/s of one rank while `ranks_on_node` ranks run on its node.

        A GPU is its own: peak x compute_efficiency. CPU ranks (one thread each) share the cores
        the node gives this job: more ranks than `shared_cores` slow each one down."""
        rate = self.peak_flops * self.compute_efficiency
        if self.shared_cores is None:
            return rate
        return rate * min(1.0, self.shared_cores / ranks_on_node)

    def link_for(self, ranks_per_node: int, nodes: int) -> Link:
        """The link a group crosses and its bandwidth per rank: NVLink if the group sits in one
        node; otherwise the network, where `ranks_per_node` ranks of the group on each node drive
        that many NICs at once (NCCL's rings use one NIC per GPU), capped by NVLink."""
        if nodes <= 1:
            return self.intra
        bandwidth = min(self.intra.bandwidth, ranks_per_node * self.inter.bandwidth)
        return Link(self.inter.name if ranks_per_node == 1 else f"{self.inter.name} x{ranks_per_node}",
                    bandwidth, self.inter.latency)

    def to_dict(self) -> dict:
        return asdict(self)


GB, TB, US = 1e9, 1e12, 1e-6
# Spec sheets (notes/interconnects.md has the citations): dense (not 2:4 sparse) bf16 tensor-core
# peak; NVLink bandwidth per GPU per direction = half the quoted bidirectional total; one
# InfiniBand NIC per GPU (DGX A100: HDR 200 Gb/s; DGX H100/H200: NDR 400 Gb/s = 50 GB/s).
# Latencies are order-of-magnitude NCCL per-step costs (they matter only for small messages).
# The efficiency constants, one set per GPU type, chosen once before any comparison and not fitted
# to it: large GEMMs reach ~80% of peak on A100 and ~70% on H100 (power-limited), attention,
# norms and activations less, so a whole step's FLOPs run at about 0.60 (A100) and 0.55 (H100,
# H200: the same compute die); NCCL collectives reach about 80% of the link's bandwidth.
_NVLINK3 = Link("NVLink3", 300 * GB, 1 * US)
_NVLINK4 = Link("NVLink4", 450 * GB, 1 * US)
_HDR = Link("IB HDR 200G", 25 * GB, 5 * US)
_NDR = Link("IB NDR 400G", 50 * GB, 5 * US)

CLUSTERS: dict[str, Cluster] = {
    "a100": Cluster("a100", "A100 SXM4 80GB", 312 * TB, 80 * GB, 2.039 * TB, 8, _NVLINK3, _HDR, 0.60, 0.80),
    "h100": Cluster("h100", "H100 SXM5 80GB", 989 * TB, 80 * GB, 3.35 * TB, 8, _NVLINK4, _NDR, 0.55, 0.80),
    "h200": Cluster("h200", "H200 SXM 141GB", 989 * TB, 141 * GB, 4.8 * TB, 8, _NVLINK4, _NDR, 0.55, 0.80),
    # this machine, from `journey calibrate` (benchmarks/results/calibration_cpu.json; a test keeps
    # them equal): every rank on the one machine, gloo over loopback for every group
    "cpu-gloo": Cluster("cpu-gloo", "CPU, 1 thread fp32 (calibrated)", 71.11e9, 8 * GB, 33.39e9, 64,
                        Link("gloo loopback", 1.900e9, 380.0 * US),
                        Link("gloo loopback", 1.900e9, 380.0 * US),
                        0.5476, 1.0, shared_cores=2),
}
ALIASES = {"a100-80gb": "a100", "a100-sxm": "a100", "h100-sxm": "h100", "h100-sxm5": "h100",
           "h200-sxm": "h200", "cpu": "cpu-gloo"}

# what a TOML file or a flag may set: key -> (Cluster field or link attribute, unit in bytes/s or s)
OVERRIDES = {
    "gpus_per_node": ("gpus_per_node", 1), "peak_tflops": ("peak_flops", 1e12),
    "memory_gb": ("memory", GB), "memory_bandwidth_tb_s": ("memory_bandwidth", TB),
    "intra_gb_s": ("intra.bandwidth", GB), "intra_latency_us": ("intra.latency", US),
    "inter_gb_s": ("inter.bandwidth", GB), "inter_latency_us": ("inter.latency", US),
    "compute_efficiency": ("compute_efficiency", 1), "comm_efficiency": ("comm_efficiency", 1),
    "shared_cores": ("shared_cores", 1),
}


def get_cluster(name: str, **overrides: float) -> Cluster:
    """A preset by GPU name (a100, h100, h200, cpu-gloo), with OVERRIDES keys applied."""
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in CLUSTERS:
        raise ConfigError(f"unknown GPU {name!r}; use one of {', '.join(CLUSTERS)} (or a cluster file: "
                          "--cluster FILE.toml with base = one of them and your numbers)")
    return override(CLUSTERS[key], **overrides)


def override(cluster: Cluster, **values: float) -> Cluster:
    """`cluster` with some numbers replaced, in OVERRIDES' units (e.g. inter_gb_s=25)."""
    changes: dict = {}
    links = {"intra": asdict(cluster.intra), "inter": asdict(cluster.inter)}
    for key, value in values.items():
        if value is None:
            continue
        if key not in OVERRIDES:
            raise ConfigError(f"unknown cluster setting {key!r}; use {', '.join(OVERRIDES)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"cluster setting {key} = {value!r} must be a number")
        target, unit = OVERRIDES[key]
        scaled = value * unit
        if "." in target:
            link, attr = target.split(".")
            links[link][attr] = scaled
        else:
            changes[target] = int(value) if key == "gpus_per_node" else scaled
    return replace(cluster, intra=Link(**links["intra"]), inter=Link(**links["inter"]), **changes)


def load_cluster(path: str | Path) -> Cluster:
    """A TOML file: `base = "h100"` (a preset) and any OVERRIDES keys, e.g.

        base = "h100"
        name = "my-roce"
        inter_gb_s = 25          # 200 Gb/s NICs
        compute_efficiency = 0.5
    """
    if tomllib is None:
        raise ConfigError("cluster files need Python 3.11+ (tomllib); pass the numbers as flags instead")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cluster file {str(path)!r} does not exist; write one (base = \"h100\" plus "
                          f"any of {', '.join(OVERRIDES)}) or use --gpu")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"cluster file {str(path)!r} is not valid TOML ({e})") from e
    if "base" not in data:
        raise ConfigError(f"cluster file {str(path)!r} has no `base`; start it with base = one of "
                          f"{', '.join(CLUSTERS)}")
    base, name = data.pop("base"), data.pop("name", None)
    cluster = get_cluster(base, **data)
    return replace(cluster, name=str(name)) if name else cluster


def cluster_toml(cluster: Cluster, base: str) -> str:
    """`cluster` as a file load_cluster reads back (every OVERRIDES key written out)."""
    lines = [f'base = "{base}"', f'name = "{cluster.name}"']
    for key, (target, unit) in OVERRIDES.items():
        obj, attr = (getattr(cluster, target.split(".")[0]), target.split(".")[1]) if "." in target \
            else (cluster, target)
        if getattr(obj, attr) is not None:  # a GPU cluster has no shared_cores
            lines.append(f"{key} = {getattr(obj, attr) / unit:.6g}")
    return "\n".join(lines) + "\n"


_COUNT = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30}


def parse_count(text: str | int | float, what: str = "tokens") -> float:
    """'4M' -> 4e6, '4Mi' -> 4 * 2**20, '15T' -> 15e12, '1.5e9' -> 1.5e9 (a positive count)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if m is None or m.group(2).upper() not in _COUNT:
        raise ConfigError(f"{what} {text!r}: write a number with an optional suffix K, M, G (or B), T "
                          "(powers of 1000) or Ki, Mi, Gi (powers of 1024), e.g. 4M or 15T")
    value = float(m.group(1)) * _COUNT[m.group(2).upper()]
    if not value > 0:
        raise ConfigError(f"{what} {text!r} must be > 0")
    return value


"""The YAML configuration: one schema of frozen dataclasses, every key with a default.

    cfg = load_config("edgemoe.yaml", {"ssd.queue_depth": 8, "cache.tiers[0].capacity": 2048})

Every problem in the file (unknown keys, wrong types, impossible values) is collected with its key path
and raised at once as one `ConfigError`. Every check `run` and `serve` make of the settings at start-up is
made here too (the kernel variants with kernels=True, as `config check` and `config_from_args` ask), so
`edgemoe config check` passing means they start; the model file and the socket's directory are looked at
only then. The file is read by `config_yaml` (no aliases, no duplicate keys, bounded size).
`configs/default.yaml` writes out every key with its default. Capacities are in MB = 2**20 bytes.
"""

from __future__ import annotations

import copy
import ipaddress
import os
from dataclasses import dataclass, make_dataclass
from typing import Any

from .config_checks import cross_check
from .config_schema import (
    Problems,
    Rule,
    boolean,
    build,
    choice,
    clip,
    entries,
    file_path,
    integer,
    is_int,
    is_number,
    key_path,
    number,
    optional,
    parse_key,
    required,
    section,
    setting,
    show,
    text,
    to_plain,
)
from .config_yaml import Unreadable, load_file, load_text
from .errors import EdgeMoEError
from .qtensor import SUPPORTED_TYPES

MB = 2**20
QUANT_TYPES = tuple(t.name for t in SUPPORTED_TYPES)  # the weight types, as qtensor.FORMATS lists them
QUANT_ALIASES = {"Q4K": "Q4_K", "Q5K": "Q5_K", "Q6K": "Q6_K"}  # the seed article's spelling
KERNEL_VARIANTS = ("generic", "avx2", "vnni")  # = edgemoe.kernels.dispatch.VARIANTS (a test keeps them equal)
CACHE_POLICIES = ("temporal_lru", "lru", "lfu")
SUN_PATH_MAX = 107  # bytes of a UNIX socket path: sockaddr_un.sun_path holds 108 with the terminating NUL
MAX_SHOWN_PROBLEMS = 50  # a file of 10,000 bad keys gets 50 lines and a count, not 10,000 lines


class ConfigError(EdgeMoEError):
    """The configuration has problems; `problems` lists each as `key.path: what is wrong`."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        if len(problems) == 1:
            msg = f"{source}: {problems[0]}"
        else:
            shown = problems[:MAX_SHOWN_PROBLEMS]
            more = len(problems) - len(shown)
            msg = f"{source}: {len(problems)} problems:\n" + "\n".join(f"  {p}" for p in shown)
            msg += f"\n  … and {more} more" if more else ""
        super().__init__(msg)


# ------------------------------------------------------------------------------------------ rules

def split_tcp(v: Any) -> tuple[str, int] | None:
    """"127.0.0.1:8080", "0.0.0.0:8080", "localhost:8080", "[::1]:8080" or "::1:8080" → (host, port); None for
    anything else. The host is an IP address or localhost: a host name would need a DNS lookup at start."""
    if not isinstance(v, str):
        return None
    host, _, port = v.rpartition(":")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return None
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether `host` (from split_tcp) is reachable from this machine only."""
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def _mode_ok(v: Any) -> bool:
    if isinstance(v, str):
        if not (len(v) in (3, 4) and all(c in "01234567" for c in v)):
            return False
        v = int(v, 8)
    # YAML 1.1 reads an unquoted 0660 as octal already. Anyone who may connect can run the model: owner
    # read/write is needed to use it, and no bits for others (nor setuid/sticky bits, which mean nothing here).
    return is_int(v) and 0 <= v <= 0o777 and v & 0o600 == 0o600 and v & 0o007 == 0


def _mode_shown(v: Any) -> str:
    return f"{v} (octal {v:04o})" if is_int(v) and v >= 0 else show(v)


def _socket_ok(v: Any) -> bool:
    return (isinstance(v, str) and v.strip() != "" and "\0" not in v and not v.endswith("/")
            and len(os.fsencode(v)) <= SUN_PATH_MAX)


def _host_port_ok(v: str) -> bool:
    host, _, port = v.rpartition(":")
    return bool(host) and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535 and not any(
        c.isspace() or c in "/@" for c in host)


def _weights_ok(v: Any) -> bool:
    return (isinstance(v, dict) and len(v) > 0
            and all(isinstance(k, str) and k and is_int(w) and w >= 1 for k, w in v.items()))


POSITIVE = integer("a positive integer", lo=1)
QUANT = choice("auto", *QUANT_TYPES, aliases=QUANT_ALIASES)
VARIANT = choice("auto", *KERNEL_VARIANTS)
LAYERS = Rule("a list of layer indices (integers >= 0)",
              lambda v: isinstance(v, list) and all(is_int(i) and i >= 0 for i in v), tuple)
TCP = Rule('HOST:PORT with an IP address or localhost, such as "127.0.0.1:8080" or "[::1]:8080" (an address '
           'other than loopback needs server.api_key_file)', lambda v: split_tcp(v) is not None)
MODE = Rule('an octal file mode such as "0660" (quoted) with read/write for the owner and nothing for others (who '
            'may connect may use the model)', _mode_ok, lambda v: int(v, 8) if isinstance(v, str) else v, _mode_shown)
SOCKET = Rule(f"a UNIX socket file path of at most {SUN_PATH_MAX} bytes (not a directory)", _socket_ok)
WEIGHTS = Rule("a mapping of request class to a positive integer weight, e.g. {interactive: 3, batch: 1}",
               _weights_ok, lambda v: tuple(sorted(v.items())))  # order-free: a mapping
FRACTION = number("a number in (0, 1]", lambda v: 0 < v <= 1)
RAY_ADDRESS = Rule('a Ray address: "auto" (the Ray instance this machine joined) or HOST:PORT of the head node, '
                   'e.g. 10.0.0.5:6379', lambda v: isinstance(v, str) and (v == "auto" or _host_port_ok(v)))
RESOURCES = Rule('a mapping of Ray resource name to a positive amount, e.g. {edge_box: 1}',
                 lambda v: isinstance(v, dict) and all(isinstance(k, str) and k and k != "CPU" and is_number(n)
                                                        and n > 0 for k, n in v.items()),
                 lambda v: tuple(sorted((k, float(n)) for k, n in v.items())))


# ----------------------------------------------------------------------------------------- schema

@dataclass(frozen=True)
class InferenceConfig:
    model: str | None = setting(None, optional(file_path("a model path"), "null"),
                                "GGUF file, expert pack or HF checkpoint directory (null: -m, else the embedded model)")
    quantization: str = setting("auto", QUANT, "expert quantization `edgemoe partition` writes; auto = keep the source's")
    kv_cache_type: str = setting("f16", choice("f16", "f32", "q8_0"), "element type of the KV cache (--cache-type)")


@dataclass(frozen=True)
class RoutingConfig:
    active_experts: int | None = setting(None, optional(POSITIVE), "experts per token (auto: the model's)")
    total_experts: int | None = setting(None, optional(POSITIVE), "experts per layer, checked against the model")
    pin_layers: tuple[int, ...] = setting((), LAYERS, "layers whose experts are never evicted")
    prefetch_depth: int = setting(1, integer("an integer from 0 to 8 (layers ahead)", 0, 8),
                                  "when streaming: layers ahead whose experts are predicted and prefetched (0: none)")


@dataclass(frozen=True)
class TierConfig:
    name: str = required(text("a tier name"))
    capacity: int = required(integer("MB as a positive integer", lo=1), "byte budget of the tier, in MB")
    policy: str = setting("temporal_lru", choice(*CACHE_POLICIES), "eviction policy")
    pin_threshold: float = setting(0.8, number("a number >= 0", lambda v: v >= 0),
                                   "decayed access frequency that promotes an entry into this tier")

    @property
    def capacity_bytes(self) -> int:
        return self.capacity * MB


@dataclass(frozen=True)
class CacheConfig:
    tiers: tuple[TierConfig, ...] = entries(TierConfig, (
        TierConfig("hot", 1024, "temporal_lru", 0.8),
        TierConfig("warm", 3072, "lru", 0.8),
    ), "RAM tiers, hottest first")

    @property
    def total_bytes(self) -> int:
        return sum(t.capacity_bytes for t in self.tiers)


@dataclass(frozen=True)
class SsdConfig:
    direct_io: bool = setting(True, boolean(), "O_DIRECT reads (bypass the page cache)")
    queue_depth: int = setting(4, integer("a positive integer up to 1024 (reads in flight)", 1, 1024))
    fixed_buffers: int = setting(8, POSITIVE, "page-aligned read buffers allocated at start")
    max_buffers: int = setting(32, POSITIVE, "the pool grows to this many, then degrades to buffered reads")
    buffer_size: int | None = setting(None, optional(Rule("a positive multiple of 4096 (bytes)",
                                                          lambda v: is_int(v) and v > 0 and v % 4096 == 0)),
                                      "bytes per buffer (auto: the largest expert)")
    verify_checksums: bool = setting(True, boolean(), "check each expert's CRC32 (pack manifest) after reading")


# Kernel variant per weight type: auto (the best this CPU runs), or one of KERNEL_VARIANTS; a key per type.
DispatchConfig = make_dataclass("DispatchConfig", [(t, str, setting("auto", VARIANT)) for t in QUANT_TYPES], frozen=True)
DispatchConfig.__module__ = __name__
DispatchConfig.__doc__ = "Kernel variant per weight type: auto (the best this CPU runs), or one of KERNEL_VARIANTS."


@dataclass(frozen=True)
class ComputeConfig:
    dispatch: DispatchConfig = section(DispatchConfig)
    repack: bool = setting(True, boolean(), "weights of the types with one in the 8-row interleaved layouts (memory-mapped "
                           "experts only when they fit in half of the machine's memory)")
    fused_compile: str = setting("background", choice("background", "foreground"),
                                 "fused decode kernels missing from Numba's cache: compiled by a background process "
                                 "while steps run kernel by kernel, or before the first step (bench always waits)")


@dataclass(frozen=True)
class BatchingConfig:
    strategy: str = setting("continuous", choice("continuous"))
    admission: tuple[tuple[str, int], ...] = setting((("default", 1),), WEIGHTS,
                                                     "weighted round-robin weight per request class",
                                                     dump=dict)
    max_batch: int = setting(8, POSITIVE, "sequences decoded together")
    max_queue: int = setting(64, POSITIVE, "requests waiting beyond the batch; more are refused (HTTP 429)")
    prefill_chunk: int = setting(256, POSITIVE, "prompt tokens one step takes (all new requests together)")


@dataclass(frozen=True)
class SpeculativeConfig:
    proposer: str = setting("off", choice("off", "auto", "draft", "self", "lookup"),
                            "off | auto (the proposers that pay) | draft (a small model) | self (the model on the "
                            "experts in RAM) | lookup (n-grams of prompt and output)")
    draft_model: str | None = setting(None, optional(file_path('"default" or a model path'), "null"),
                                      "draft model for `draft` and `auto`: a GGUF/HF path with the target's "
                                      "tokenizer, or default (the embedded model's draft)")
    max_tokens: int = setting(4, integer("an integer from 1 to 16", 1, 16), "most draft tokens per step")
    rejection_threshold: float = setting(0.15, FRACTION, "a draft stops once its divergence exceeds this")


@dataclass(frozen=True)
class IoPacingConfig:
    enabled: bool = setting(True, boolean(), "throttle reads when the SSD is too hot")
    throttle_interval: float = setting(100.0, number("milliseconds > 0", lambda v: v > 0),
                                       "largest pause between reads when throttled (ms)")
    min_queue_depth: int = setting(1, POSITIVE, "queue depth never goes below this")


@dataclass(frozen=True)
class MonitoringConfig:
    nvme_thermal_limit: float = setting(70.0, number("°C between 30 and 120", lambda v: 30 <= v <= 120))
    hysteresis: float = setting(5.0, number("°C > 0", lambda v: v > 0), "restore below limit - hysteresis")
    poll_interval: float = setting(5.0, number("seconds > 0", lambda v: v > 0))
    io_pacing: IoPacingConfig = section(IoPacingConfig)


@dataclass(frozen=True)
class ServerConfig:
    socket: str | None = setting(None, optional(SOCKET), "HTTP over this UNIX socket (auto: $RUNTIME_DIRECTORY/"
                                 "edgemoe.sock under systemd, else $XDG_RUNTIME_DIR/edgemoe.sock, else "
                                 "~/.cache/edgemoe/edgemoe.sock; no socket when only tcp is set)")
    tcp: str | None = setting(None, optional(TCP, "null"), "listen on TCP, e.g. 127.0.0.1:8080")
    api_key_file: str | None = setting(None, optional(file_path("a path to a file holding the API key"), "null"),
                                       "clients must send Authorization: Bearer <the file's key>; needed for a tcp "
                                       "address other than loopback")
    socket_mode: int = setting(0o660, MODE, dump=lambda m: f"{m:04o}")
    prompt_cache_mb: int = setting(256, integer("MB as an integer >= 0 (0 = off)", lo=0),
                                   "KV rows of recent sequences kept so a new prompt reuses its longest shared prefix")

    @property
    def prompt_cache_bytes(self) -> int:
        return self.prompt_cache_mb * MB


@dataclass(frozen=True)
class ClusterConfig:
    """`edgemoe cluster up` (edgemoe/cluster/): models served by Ray Serve replicas behind one front door."""

    address: str | None = setting(None, optional(RAY_ADDRESS, "null"),
                                  "the Ray cluster to join (null: start a local Ray instance on this machine)")
    replicas: int | None = setting(None, optional(POSITIVE),
                                   "replicas per model (auto: one per node marked with the model's resource; "
                                   "1 on a local instance)")
    max_replicas: int | None = setting(None, optional(POSITIVE, "null"),
                                       "with a number: Ray Serve scales each model between `replicas` and this "
                                       "on queue length")
    cpus_per_replica: int | None = setting(None, optional(POSITIVE),
                                           "CPUs each replica asks Ray for; its compute threads (auto: the cores "
                                           "shared out among a local instance's replicas, else the node's CPUs)")
    resources: tuple = setting((), RESOURCES, "Ray resources each replica asks for besides its model's own",
                               dump=lambda r: dict(r))


@dataclass(frozen=True)
class SamplingConfig:
    """Request defaults; names and meaning as in `edgemoe.sampling.SamplingParams`."""

    temperature: float = setting(0.8, number("a number >= 0 (0 = greedy)", lambda v: v >= 0))
    top_k: int = setting(40, integer("an integer >= 0 (0 = off)", lo=0))
    top_p: float = setting(0.95, FRACTION)
    min_p: float = setting(0.05, number("a number in [0, 1)", lambda v: 0 <= v < 1))
    repeat_penalty: float = setting(1.0, number("a number > 0 (1 = off)", lambda v: v > 0))
    repeat_last_n: int = setting(64, integer("an integer >= -1 (0 = off, -1 = all)", lo=-1))
    seed: int | None = setting(None, optional(integer("an integer >= 0", lo=0), "null"))

    def params(self):
        """These defaults as `SamplingParams`."""
        from .sampling import SamplingParams

        return SamplingParams(**to_plain(self))


@dataclass(frozen=True)
class Config:
    inference: InferenceConfig = section(InferenceConfig)
    routing: RoutingConfig = section(RoutingConfig)
    cache: CacheConfig = section(CacheConfig)
    ssd: SsdConfig = section(SsdConfig)
    compute: ComputeConfig = section(ComputeConfig)
    batching: BatchingConfig = section(BatchingConfig)
    speculative: SpeculativeConfig = section(SpeculativeConfig)
    monitoring: MonitoringConfig = section(MonitoringConfig)
    server: ServerConfig = section(ServerConfig)
    cluster: ClusterConfig = section(ClusterConfig)
    threads: int | None = setting(None, optional(POSITIVE), "compute threads (auto: all cores)")
    context_length: int | None = setting(None, optional(integer("an integer >= 2", lo=2)),
                                         "tokens (auto: min(model's, 4096))")
    sampling: SamplingConfig = section(SamplingConfig)

    def to_dict(self) -> dict:
        """Plain dicts, lists and scalars; `load_config` reads this back to an equal Config."""
        return to_plain(self)


# ------------------------------------------------------------------------------------------ loading

def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None, *,
                ram_bytes: int | None = None, origins: dict[str, str] | None = None, kernels: bool = False) -> Config:
    """The configuration in `path` (None: the defaults) with `overrides` ({"dotted.key[0].path": value}).

    `ram_bytes` is the RAM the cache must fit in (default: this machine's, from psutil). `origins` names the
    flag an override came from (default --set), for the messages. `kernels`: also refuse kernel variants
    (compute.dispatch) this CPU cannot run, as `run` and `serve` do; off by default because it imports the
    kernels when a variant is pinned, and `edgemoe doctor` reports it on its own row. Raises ConfigError
    listing every problem.
    """
    source = os.fspath(path) if path is not None else "configuration"
    raw = _read(source) if path is not None else {}
    problems = Problems()
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"expected a mapping of settings at the top level, got {show(raw)}"])
    overridden: dict[str, str] = {}
    for key, value in (overrides or {}).items():
        overridden[_apply(raw, key, value, problems)] = (origins or {}).get(key, "--set")
    cfg = build(Config, raw, "", problems)
    cross_check(cfg, problems, ram_bytes, kernels)
    if problems:
        lines = []
        for line in problems.lines:
            origin = overridden.get(line.split(":", 1)[0])
            lines.append(line + (f" (from {origin})" if origin else ""))
        raise ConfigError(source, lines)
    return cfg


def _read(path: str) -> Any:
    try:
        raw = load_file(path)
    except FileNotFoundError:
        raise ConfigError(path, ["no such file; pass an existing YAML file (see configs/default.yaml)"]) from None
    except OSError as e:
        raise ConfigError(path, [f"cannot read it ({e.strerror or e}); pass a readable YAML file"]) from None
    except Unreadable as e:
        raise ConfigError(path, [str(e)]) from None
    return {} if raw is None else raw


def _apply(raw: dict, key: str, value: Any, problems: Problems) -> str:
    """Set `raw[...key...] = value`, creating missing mappings (and default lists) on the way; return the path."""
    try:
        segs = parse_key(key)
    except ValueError as e:
        problems.add(key, f"{e}; write keys like ssd.queue_depth or cache.tiers[0].capacity")
        return key
    defaults = Config().to_dict()
    node: Any = raw
    for i, seg in enumerate(segs):
        path = key_path(segs[: i + 1])
        last = i == len(segs) - 1
        if isinstance(seg, int):
            if not isinstance(node, list) or seg >= len(node):
                n = len(node) if isinstance(node, list) else 0
                problems.add(path, f"no such entry ({key_path(segs[:i])} has {n}); override existing entries only")
                return path
        elif not isinstance(node, dict):
            problems.add(path, f"cannot set a key inside {show(node)}")
            return path
        if last:
            node[seg] = value
            return path
        child = node[seg] if isinstance(seg, int) else node.get(seg)
        if child is None:
            child = copy.deepcopy(_lookup(defaults, segs[: i + 1]))
            if not isinstance(child, (dict, list)):
                child = {}
            node[seg] = child
        node = child
    return key_path(segs)


def _lookup(tree: Any, segs: list) -> Any:
    for s in segs:
        try:
            tree = tree[s]
        except (KeyError, IndexError, TypeError):
            return None
    return tree


# -------------------------------------------------------------------------------------- CLI helpers

def add_config_arguments(p) -> None:
    """`--config FILE` and repeatable `--set KEY=VALUE` on an argparse parser."""
    p.add_argument("--config", metavar="FILE", help="YAML configuration (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set ssd.queue_depth=8 --set cache.tiers[0].capacity=2048")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["ssd.queue_depth=8", "routing.pin_layers=[0, 1]"] → {"ssd.queue_depth": 8, ...} (values read as YAML)."""
    out: dict[str, Any] = {}
    bad = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            bad.append(f"--set {clip(item)}: expected KEY=VALUE, e.g. --set ssd.queue_depth=8")
            continue
        try:
            out[key.strip()] = load_text(value) if value.strip() else None
        except Unreadable:
            out[key.strip()] = value  # not YAML: keep the text; the schema says whether a string is right
    if bad:
        raise ConfigError("command line", bad)
    return out


# Flags of run/serve that stand for a config key: folded in before validation, so a flag can complete the
# file (proposer: draft in the file, --draft-model on the command line) and the checks see what will run.
FLAG_KEYS = {"spec": ("speculative.proposer", "--spec"), "draft_model": ("speculative.draft_model", "--draft-model"),
             "api_key_file": ("server.api_key_file", "--api-key-file")}


def config_from_args(args, extra: dict[str, Any] | None = None) -> Config:
    """The Config of `--config` and `--set` (see add_config_arguments), plus `extra` overrides from other flags."""
    overrides = parse_overrides(getattr(args, "overrides", None) or [])
    origins = {}
    for attr, (key, flag) in FLAG_KEYS.items():
        if getattr(args, attr, None) is not None:
            overrides[key], origins[key] = getattr(args, attr), flag
    overrides.update({k: v for k, v in (extra or {}).items() if v is not None})
    return load_config(getattr(args, "config", None), overrides, origins=origins, kernels=True)


def check_model(cfg: Config, model_args, model: str, source: str | None = None) -> None:
    """routing.total_experts / routing.active_experts, when set, against the loaded model (`model_args`: its
    ModelArgs): they name the routing of the model the config was written for (experts per layer and per token
    are fixed by its weights), so a config given another model fails at start instead of running with cache
    budgets sized for the wrong experts. Raises ConfigError naming the key."""
    r, name = cfg.routing, os.path.basename(model.rstrip("/"))
    problems = []
    for key, want, has, what in (("total_experts", r.total_experts, model_args.num_local_experts, "per layer"),
                                 ("active_experts", r.active_experts, model_args.num_experts_per_tok, "per token")):
        if want is not None and want != has:
            problems.append(f"routing.{key}: {want}, but {name} has {has} experts {what}; write {has} or auto, or "
                            "use the model this configuration was written for")
    if problems:
        raise ConfigError(source or "configuration", problems)

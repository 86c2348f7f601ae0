"""Constraints between keys, and against this machine: every check `run` and `serve` make of the settings
at start-up (ExpertCache, ExpertReader, ThermalGovernor, SpecOptions, set_threads, force_variant), so that
`edgemoe config check` refuses what they would refuse. What needs the model or the file system (the model
file, the socket's directory) is checked when they start.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .config_schema import Problems, show

if TYPE_CHECKING:
    from .config import CacheConfig, Config, DispatchConfig

MB = 2**20  # = edgemoe.config.MB


def cross_check(cfg: Config, problems: Problems, ram_bytes: int | None, kernels: bool = False) -> None:
    """Constraints between keys; skipped where one of the keys was already reported. `kernels`: also check
    the variants compute.dispatch pins against this CPU."""
    r = cfg.routing
    both = r.active_experts is not None and r.total_experts is not None
    if both and not problems.near("routing") and r.active_experts > r.total_experts:
        problems.add("routing.active_experts", f"{r.active_experts} active experts exceed total_experts {r.total_experts}")
    if not problems.near("cache"):
        _check_tiers(cfg.cache, problems, ram_bytes)
    s = cfg.ssd
    if not problems.near("ssd.max_buffers", "ssd.fixed_buffers") and s.max_buffers < s.fixed_buffers:
        problems.add("ssd.max_buffers", f"{s.max_buffers} is below fixed_buffers {s.fixed_buffers}; raise it")
    m = cfg.monitoring
    if not problems.near("monitoring.hysteresis", "monitoring.nvme_thermal_limit") \
            and m.hysteresis >= m.nvme_thermal_limit:
        problems.add("monitoring.hysteresis", f"{m.hysteresis:g} °C must be below nvme_thermal_limit "
                     f"{m.nvme_thermal_limit:g} °C")
    if not problems.near("monitoring.io_pacing.min_queue_depth", "ssd.queue_depth") \
            and m.io_pacing.min_queue_depth > s.queue_depth:
        problems.add("monitoring.io_pacing.min_queue_depth",
                     f"{m.io_pacing.min_queue_depth} exceeds ssd.queue_depth {s.queue_depth}")
    sp = cfg.speculative
    if sp.proposer == "draft" and sp.draft_model is None and not problems.near("speculative"):
        problems.add("speculative.draft_model", 'missing: proposer draft needs a draft model; set a GGUF/HF path '
                     'with the target\'s tokenizer or "default" (the embedded model\'s draft), or pass --draft-model')
    if cfg.threads is not None and not problems.near("threads") and cfg.threads > cpu_threads():
        problems.add("threads", f"{cfg.threads} exceeds the {cpu_threads()} CPUs this process may use; "
                     "lower it or write auto")
    if kernels and not problems.near("compute.dispatch"):
        _check_variants(cfg.compute.dispatch, problems)
    sv = cfg.server
    if sv.tcp is not None and sv.api_key_file is None and not problems.near("server.tcp", "server.api_key_file"):
        from .config import is_loopback, split_tcp  # config imports this module

        if not is_loopback(split_tcp(sv.tcp)[0]):
            problems.add("server.tcp", f"{sv.tcp} is not a loopback address: anyone who reaches it could use the "
                         "model; set server.api_key_file to a file holding an API key (not readable by others), "
                         "or listen on 127.0.0.1")


def _check_tiers(cache: CacheConfig, problems: Problems, ram_bytes: int | None) -> None:
    if not cache.tiers:
        problems.add("cache.tiers", "empty; the expert cache needs at least one tier, e.g. "
                     "[{name: hot, capacity: 1024}] (capacity in MB)")
        return
    names = [t.name for t in cache.tiers]
    for i, name in enumerate(names):
        if name in names[:i]:
            problems.add(f"cache.tiers[{i}].name", f"duplicate tier name {show(name)}; names must be unique")
    if ram_bytes is None:
        import psutil

        ram_bytes = psutil.virtual_memory().total
    if cache.total_bytes > ram_bytes:
        problems.add("cache.tiers", f"capacities add up to {cache.total_bytes // MB} MB, more than this machine's "
                     f"RAM ({ram_bytes // MB} MB); lower them (leave room for the dense weights and the KV cache)")


def _check_variants(dispatch: DispatchConfig, problems: Problems) -> None:
    named = {q: v for q, v in vars(dispatch).items() if v not in ("auto", "generic")}
    if not named:
        return  # the kernels (and Numba) are imported only when a config pins a SIMD variant
    from .kernels.dispatch import supported_variants

    ok = supported_variants()
    for qtype, variant in named.items():
        if variant not in ok:
            problems.add(f"compute.dispatch.{qtype}", f"{variant} kernels do not run on this CPU; use auto or one "
                         f"of {', '.join(ok)}")


def cpu_threads() -> int:
    """The most kernel threads, as numba.config.NUMBA_NUM_THREADS has it (a test keeps them equal), without
    importing Numba: $NUMBA_NUM_THREADS, else the CPUs this process may run on."""
    env = os.environ.get("NUMBA_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)

"""`edgemoe-doctor`: what this machine is, which kernels the engine will use on it, what fails, and how fast it will go.

Each check is a row: name, ok (True / False / None = informational), value, and the fix when it fails.
A failed hard requirement makes the exit code 1. With a model, the disk under it is measured (about a
second of O_DIRECT reads) and a cache budget and decode speed are estimated from the measured bandwidths.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass

import numpy as np
import psutil

# (shown as, LLVM feature name, /proc/cpuinfo flag)
ISA = (("AVX2", "avx2", "avx2"), ("FMA", "fma", "fma"), ("F16C", "f16c", "f16c"),
       ("AVX-512 F", "avx512f", "avx512f"), ("AVX-512 BW", "avx512bw", "avx512bw"),
       ("AVX-512 VL", "avx512vl", "avx512vl"), ("AVX-512 VNNI", "avx512vnni", "avx512_vnni"),
       ("AVX-VNNI", "avxvnni", "avx_vnni"), ("AVX-512 BF16", "avx512bf16", "avx512_bf16"),
       ("AMX tile", "amx-tile", "amx_tile"), ("AMX int8", "amx-int8", "amx_int8"))
CACHE_SHARE = 0.6  # of available RAM, for dense weights + expert cache; the rest for KV, buffers, the OS


@dataclass
class Check:
    name: str
    ok: bool | None
    value: str
    fix: str = ""
    hard: bool = False


def cpu_flags() -> set[str]:
    """CPU features as LLVM (hence Numba) sees them."""
    from llvmlite import binding

    return {name for name, on in binding.get_host_cpu_features().items() if on}


def cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    """The kernel's `flags` line of the first CPU, or None where there is no /proc/cpuinfo."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_checks(cfg) -> list[Check]:
    from .kernels import dispatch

    out = [Check("CPU", None, cpu_model()),
           Check("cores", None, f"{psutil.cpu_count(logical=False) or '?'} physical, {os.cpu_count()} logical")]
    llvm, kernel = cpu_flags(), cpuinfo_flags()
    for shown, llvm_name, proc_name in ISA:
        have = llvm_name in llvm
        value = "yes" if have else "no"
        ok, fix = (True if have else False) if llvm_name == "avx2" else None, ""
        if not have and llvm_name == "avx2":
            fix = "no AVX2: the portable kernels run several times slower; use an x86-64-v3 CPU"
        if kernel is not None and (proc_name in kernel) != have:
            ok, value = False, f"{value} (but /proc/cpuinfo says {'yes' if proc_name in kernel else 'no'})"
            fix = "LLVM and the kernel disagree; pin a kernel variant with compute.dispatch if the detected one fails"
        out.append(Check(f"ISA {shown}", ok, value, fix))
    supported = dispatch.supported_variants()
    out.append(Check("kernel variant", None, f"{dispatch.current_variant()} (this CPU runs: {', '.join(supported)})"))
    for qtype, name in dispatch.kernel_names().items():
        wanted = getattr(cfg.compute.dispatch, qtype, "auto")
        if wanted == "auto":
            out.append(Check(f"kernel {qtype}", None, name))
        elif wanted in supported:
            out.append(Check(f"kernel {qtype}", True, f"{wanted} (compute.dispatch)"))
        else:
            out.append(Check(f"kernel {qtype}", False, f"compute.dispatch asks for {wanted}, which this CPU lacks",
                             f"set compute.dispatch.{qtype}: auto (or one of {', '.join(supported)})", True))
    return out


def numba_checks() -> list[Check]:
    import numba

    try:
        from .kernels import ops
    except RuntimeError as e:  # numba found no writable cache location for a cache=True kernel
        return [Check("numba compile cache", False, str(e), "set NUMBA_CACHE_DIR to a writable directory", True)]
    layer = _threading_layer()
    out = [Check("numba", True, f"{numba.__version__}, threading layer {layer}, {numba.config.NUMBA_NUM_THREADS} threads")]
    # Where Numba will write our kernels' machine code: its own choice, read off a cache=True kernel
    # (private attributes; the documented fallback is NUMBA_CACHE_DIR or __pycache__ beside the source).
    cache = next((v._cache for v in vars(ops).values() if hasattr(getattr(v, "_cache", None), "_cache_path")), None)
    if cache is not None:
        path = cache._cache_path
        where = type(getattr(cache._impl, "locator", None)).__name__.replace("CacheLocator", "").strip("_")
    else:
        path = numba.config.CACHE_DIR or os.path.join(os.path.dirname(ops.__file__), "__pycache__")
        where = "NUMBA_CACHE_DIR" if numba.config.CACHE_DIR else "in-tree"
    probe = path if os.path.isdir(path) else os.path.dirname(path)
    writable = os.access(probe, os.W_OK)
    out.append(Check("numba compile cache", writable, f"{path} ({where})",
                     "" if writable else "set NUMBA_CACHE_DIR to a writable directory, or every start recompiles"))
    return out


@functools.cache
def _threading_layer() -> str:
    """Compile and run a tiny parallel function (about a second) so Numba picks its threading layer."""
    import numba

    @numba.njit(parallel=True)
    def total(x):
        s = 0.0
        for i in numba.prange(x.shape[0]):
            s += x[i]
        return s

    try:
        total(np.ones(64))
        return numba.threading_layer()
    except Exception as e:  # no usable layer (e.g. TBB/OpenMP missing and workqueue refused)
        return f"unavailable ({e})"


def memory_bandwidth(mb: int = 256) -> float:
    """Bytes per second of a parallel streaming read (the way the kernels read weights)."""
    from .membw import memory_read_gbs

    return memory_read_gbs(mb, repeat=5) * 1e9


def model_sizes(loaded) -> dict:
    """Bytes of the dense weights (all, and touched per token) and of the routed experts."""
    w, a = loaded.model.weights, loaded.args
    step = loaded.model.dense_nbytes()  # every layer's attention/router/norms, the output head
    dense = step + (0 if w.lm_head is w.embed_tokens else w.embed_tokens.nbytes)
    touched = step + w.embed_tokens.nbytes // w.embed_tokens.rows  # per token: plus one embedding row
    experts = getattr(loaded.model.experts, "nbytes", None)
    if experts is None:  # a store that does not know: the rest of the file
        experts = max(0, os.path.getsize(loaded.path) - dense) if os.path.isfile(loaded.path) else 0
    n = a.num_hidden_layers * a.num_local_experts
    return {"dense_bytes": dense, "dense_bytes_per_token": touched, "expert_bytes": experts,
            "expert_bytes_per_token": a.num_hidden_layers * a.num_experts_per_tok * experts // max(n, 1)}


def estimate(sizes: dict, available: int, mem_bw: float, disk_bw: float | None) -> dict:
    """Recommended cache budget and expected decode tokens/s (hit rate assumed = cache fraction: no locality)."""
    budget = int(max(0, min(sizes["expert_bytes"], CACHE_SHARE * available - sizes["dense_bytes"])))
    hit = budget / sizes["expert_bytes"] if sizes["expert_bytes"] else 1.0
    active = sizes["expert_bytes_per_token"]
    t_ram = (sizes["dense_bytes_per_token"] + hit * active) / mem_bw
    t_disk = (1 - hit) * active / disk_bw if disk_bw else 0.0
    return {"recommended_cache_bytes": budget, "assumed_hit_rate": hit,
            "decode_tok_s": 1.0 / (t_ram + t_disk) if t_ram + t_disk > 0 else float("inf"),
            "decode_tok_s_in_ram": mem_bw / (sizes["dense_bytes_per_token"] + active)}


def layout_check(model, cfg) -> Check:
    """Which weight layout the kernels run, and why (the same rule `run` and `serve` apply)."""
    from .loader import repack_resident
    from .memory import machine_memory

    if not cfg.compute.repack:
        why = "compute.repack is false"
    else:
        experts = getattr(model.experts, "nbytes", 0)
        why = (f"memory-mapped experts ({experts / 2**20:.0f} MB) {'fit' if repack_resident(experts) else 'exceed'}"
               f" half of this machine's {machine_memory() / 2**30:.1f} GB; streamed experts are always repacked")
    return Check("weight layout", None, f"{model.layout} ({why}; decided from the model, config and machine, "
                 "never the free memory)")


def model_checks(path: str, cfg, seconds: float) -> tuple[list[Check], dict]:
    from . import doctor_disk
    from .errors import EdgeMoEError
    from .loader import load_model

    exists = os.path.exists(path)
    out = [Check("model path", exists, path, "" if exists else "pass an existing .gguf file or HF directory", True)]
    if not exists:
        return out, {}
    rows, figures = doctor_disk.disk_checks(path, require_direct=cfg.ssd.direct_io, queue_depth=cfg.ssd.queue_depth,
                                            seconds=seconds)
    out += [Check(*r) for r in rows]
    try:
        loaded = load_model(path, repack=cfg.compute.repack)
    except EdgeMoEError as e:
        out.append(Check("model loads", False, str(e), "see the message", True))
        return out, figures
    a = loaded.args
    sizes = model_sizes(loaded)
    out.append(Check("model loads", True, f"{loaded.model.spec.title} ({loaded.format}), {a.num_hidden_layers} layers, "
                     f"{a.num_local_experts} "
                     f"experts (top-{a.num_experts_per_tok}), dense {sizes['dense_bytes'] / 2**20:.0f} MB, "
                     f"experts {sizes['expert_bytes'] / 2**20:.0f} MB"))
    out.append(layout_check(loaded.model, cfg))
    mem_bw = memory_bandwidth()
    available = psutil.virtual_memory().available
    est = estimate(sizes, available, mem_bw, figures.get("disk_read_bytes_per_s"))
    figures.update(sizes, memory_read_bytes_per_s=mem_bw, **est)
    out.append(Check("memory bandwidth", None, f"{mem_bw / 1e9:.1f} GB/s (numpy sum, {os.cpu_count()} threads)"))
    cache = cfg.cache.total_bytes
    fits = cache + sizes["dense_bytes"] <= available
    out.append(Check("recommended cache", fits if cache else None,
                     f"{est['recommended_cache_bytes'] // 2**20} MB (min(experts, {CACHE_SHARE:.0%} of available RAM "
                     f"- dense)); configured {cache // 2**20} MB",
                     "" if fits else f"the configured cache and the dense weights exceed available RAM; set "
                     f"cache.tiers capacities to about {est['recommended_cache_bytes'] // 2**20} MB in total"))
    out.append(Check("expected decode", None,
                     f"≈ {est['decode_tok_s']:.2f} tok/s with the recommended cache (assumed hit rate "
                     f"{est['assumed_hit_rate']:.0%} = cache fraction, no locality; "
                     f"{(sizes['dense_bytes_per_token'] + sizes['expert_bytes_per_token']) / 2**20:.0f} MB per token); "
                     f"≤ {est['decode_tok_s_in_ram']:.2f} tok/s from RAM (memory bound)"))
    return out, figures


def checks(model: str | None, config: str | None = None, seconds: float = 1.0) -> tuple[list[Check], dict]:
    """Every row, and the measured/estimated figures (for --json)."""
    from .config import Config, ConfigError, load_config

    out: list[Check] = []
    try:
        cfg = load_config(config)
        if config:
            out.append(Check("config", True, config))
    except ConfigError as e:
        cfg = Config()
        out.append(Check("config", False, str(e), "fix the listed keys (edgemoe config check FILE); defaults used below",
                         True))
    out += cpu_checks(cfg)
    vm = psutil.virtual_memory()
    out.append(Check("RAM", None, f"{vm.total / 2**30:.1f} GiB total, {vm.available / 2**30:.1f} GiB available"))
    out += numba_checks()
    figures: dict = {}
    model = model or cfg.inference.model
    if model is not None:
        rows, figures = model_checks(model, cfg, seconds)
        out += rows
    return out, figures


def render(rows: list[Check]) -> str:
    width = max(len(r.name) for r in rows)
    lines = []
    for r in rows:
        mark = {True: "✔", False: "✖", None: "·"}[r.ok]
        value = r.value.replace("\n", "\n" + " " * (width + 4))
        line = f"{mark} {r.name:<{width}}  {value}"
        if r.ok is False and r.fix:
            line += f"\n  {'':<{width}}  fix: {r.fix}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgemoe-doctor", description="Check this machine for edgemoe")
    p.add_argument("--model", help="also check this model file or directory (default: the config's inference.model)")
    p.add_argument("--config", metavar="FILE", help="check against this configuration (default: built-in defaults)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--seconds", type=float, default=1.0, help="how long to measure disk bandwidth (default 1)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = p.parse_args(argv)
    try:
        rows, figures = checks(args.model, args.config, args.seconds)
    except Exception as e:  # noqa: BLE001 - one line; the traceback only with --debug
        if args.debug:
            raise
        from .errors import EdgeMoEError

        known = isinstance(e, EdgeMoEError)
        detail = str(e) if known else f"internal error ({type(e).__name__}: {str(e)[:160]}); run with --debug"
        print(f"edgemoe-doctor: error: {detail}", file=sys.stderr)
        return e.exit_code if known else 1
    failed = any(r.ok is False and r.hard for r in rows)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(r) for r in rows], "figures": figures}, indent=1))
    else:
        print(render(rows))
        print("\nresult:", "hard requirement failed" if failed else "ready")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

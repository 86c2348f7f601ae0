"""`edgemoe-doctor`: what this machine is, which kernels the engine will use on it, and what fails.

Each check is a row: name, ok (True / False / None = informational), value, and the fix when it fails.
A failed hard requirement makes the exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass

import psutil

ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vnni", "avx512bf16", "amx-tile")


@dataclass
class Check:
    name: str
    ok: bool | None
    value: str
    fix: str = ""
    hard: bool = False


def cpu_flags() -> set[str]:
    from llvmlite import binding

    feats = binding.get_host_cpu_features()
    return {name for name, on in feats.items() if on}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def checks(model: str | None) -> list[Check]:
    import numba

    from . import kernels

    out = [Check("CPU", None, cpu_model()),
           Check("cores", None, f"{psutil.cpu_count(logical=False) or '?'} physical, {os.cpu_count()} logical")]
    flags = cpu_flags()
    for f in ISA_FLAGS:
        out.append(Check(f"ISA {f}", f in flags, "yes" if f in flags else "no",
                         "" if f in flags else "not fatal: a portable kernel is used instead"))
    for qtype, kernel in kernels.kernel_names().items():
        out.append(Check(f"kernel {qtype}", None, kernel))
    vm = psutil.virtual_memory()
    out.append(Check("RAM", None, f"{vm.total / 2**30:.1f} GiB total, {vm.available / 2**30:.1f} GiB available"))
    out.append(Check("numba", True, f"{numba.__version__}, threading layer {numba.config.THREADING_LAYER}, "
                     f"{numba.config.NUMBA_NUM_THREADS} threads"))
    cache = numba.config.CACHE_DIR or os.path.dirname(kernels.__file__)
    writable = os.access(cache, os.W_OK)
    out.append(Check("numba compile cache", writable, cache,
                     "" if writable else "set NUMBA_CACHE_DIR to a writable directory, or every start recompiles"))
    if model is not None:
        out.extend(model_checks(model))
    return out


def model_checks(path: str) -> list[Check]:
    from .errors import EdgeMoEError
    from .loader import load_model

    exists = os.path.exists(path)
    out = [Check("model path", exists, path, "" if exists else "pass an existing .gguf file or HF directory", True)]
    if not exists:
        return out
    target = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    out.append(Check("model filesystem", None, _filesystem(target)))
    out.append(Check("O_DIRECT reads", *_o_direct(path if os.path.isfile(path) else None)))
    try:
        loaded = load_model(path)
        a = loaded.args
        out.append(Check("model loads", True, f"{loaded.format}, {a.num_hidden_layers} layers, "
                         f"{a.num_local_experts} experts (top-{a.num_experts_per_tok}), hidden {a.hidden_size}"))
    except EdgeMoEError as e:
        out.append(Check("model loads", False, str(e), "see the message", True))
    return out


def _filesystem(path: str) -> str:
    best = None
    for part in psutil.disk_partitions(all=True):
        if path.startswith(part.mountpoint) and (best is None or len(part.mountpoint) > len(best.mountpoint)):
            best = part
    return f"{best.fstype} on {best.device} ({best.mountpoint})" if best else "unknown"


def _o_direct(path: str | None) -> tuple[bool | None, str, str]:
    if path is None:
        return None, "not checked (directory)", ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        return False, f"refused ({e.strerror})", "reads fall back to the page cache; put the model on ext4/xfs"
    try:
        import mmap

        buf = mmap.mmap(-1, 4096)
        n = os.preadv(fd, [buf], 0)
        return True, f"works ({n} bytes read)", ""
    except OSError as e:
        return False, f"read failed ({e.strerror})", "reads fall back to the page cache"
    finally:
        os.close(fd)


def render(rows: list[Check]) -> str:
    width = max(len(r.name) for r in rows)
    lines = []
    for r in rows:
        mark = {True: "✔", False: "✖", None: "·"}[r.ok]
        line = f"{mark} {r.name:<{width}}  {r.value}"
        if r.ok is False and r.fix:
            line += f"\n  {'':<{width}}  fix: {r.fix}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgemoe-doctor", description="Check this machine for edgemoe")
    p.add_argument("--model", help="also check this model file or directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    rows = checks(args.model)
    failed = any(r.ok is False and r.hard for r in rows)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(r) for r in rows]}, indent=1))
    else:
        print(render(rows))
        print("\nresult:", "hard requirement failed" if failed else "ready")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

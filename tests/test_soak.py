"""tools/soak.py for 15 s against the embedded model: no good request lost, the server up to the end and
stopped cleanly by SIGTERM; again with transient read faults (tests/faultshim.c) when a C compiler builds it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO


def soak(tmp_path, *extra: str) -> dict:
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "soak.py"), "--minutes", "0.15", "--clients", "8",
                        "--json", str(out), *extra], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode in (0, 1) and out.exists(), r.stdout + r.stderr
    report = json.loads(out.read_text())
    g, srv = report["good"], report["server"]
    assert g["sent"] > 0 and g["lost"] == 0 and g["greedy_mismatch"] == 0, r.stdout
    assert report["bad"]["sent"] > 0 and report["bad"]["not_4xx"] == 0, r.stdout
    assert srv["alive_at_end"] and srv["clean_exit"], r.stdout
    return report


def test_soak_plain(tmp_path):
    soak(tmp_path)


def test_soak_with_faults(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None or not sys.platform.startswith("linux"):
        pytest.skip("no C compiler (cc) on this Linux machine to build the LD_PRELOAD fault shim tests/faultshim.c")
    built = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(tmp_path / "shim.so"),
                            str(REPO / "tests" / "faultshim.c"), "-ldl"], capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"{cc} could not build tests/faultshim.c: {built.stderr.strip()[-300:]}")
    report = soak(tmp_path, "--faults")
    assert report["faults"]["windows"] >= 1 and report["config"]["stream_cache_mb"] is not None

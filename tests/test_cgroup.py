"""A model twice the size of a memory cgroup's limit generates correctly inside it, streaming its experts.

Needs root and cgroup v1's memory controller (`/sys/fs/cgroup/memory`); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

CGROUP_ROOT = pathlib.Path("/sys/fs/cgroup/memory")
REPO = pathlib.Path(__file__).resolve().parent.parent
LIMIT = 400 * 2**20


def _cgroup_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a memory cgroup"
    if not (CGROUP_ROOT / "cgroup.procs").exists() or not os.access(CGROUP_ROOT, os.W_OK):
        return "cgroup v1 memory controller not writable at /sys/fs/cgroup/memory"
    return None


pytestmark = pytest.mark.skipif(_cgroup_available() is not None, reason=str(_cgroup_available()))


@pytest.fixture
def cgroup():
    path = CGROUP_ROOT / f"edgemoe-test-{os.getpid()}"
    path.mkdir()
    try:
        (path / "memory.limit_in_bytes").write_text(str(LIMIT))
        memsw = path / "memory.memsw.limit_in_bytes"  # present when swap accounting is on
        if memsw.exists():
            memsw.write_text(str(LIMIT))
        yield path
    finally:
        for _ in range(50):  # the group can be removed once its last process has exited
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def run_json(args, cgroup=None):
    cmd = [sys.executable, "-m", "edgemoe", "run", *args, "--json"]

    def enter():
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                       preexec_fn=enter if cgroup is not None else None)
    assert r.returncode == 0, f"exit {r.returncode} (-9 = OOM-killed): {r.stderr[-2000:]}"
    return json.loads(r.stdout)


def test_model_twice_the_limit_streams_inside_it(tmp_path, cgroup):
    model = tmp_path / "big.gguf"
    subprocess.run([sys.executable, str(REPO / "tools" / "synth_model.py"), "mixtral-8x7b", "-o", str(model),
                    "--scale", "0.25", "--layers", "16", "--packed", "-q"], check=True, timeout=600)
    assert model.stat().st_size >= 2 * LIMIT
    args = ["-m", str(model), "--prompt-ids", "1,20,300,400", "-n", "12", "--temp", "0"]
    reference = run_json(args)  # memory-mapped, outside the cgroup
    streamed = run_json(args + ["--cache-mb", "48"], cgroup)
    assert streamed["token_ids"] == reference["token_ids"]
    assert streamed["cache"]["bytes_read"] > 0
    peak = int((cgroup / "memory.max_usage_in_bytes").read_text())
    assert peak <= LIMIT

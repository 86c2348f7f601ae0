"""Fused kernels missing from Numba's cache compile in a background process (kernels/compile_ahead.py).

The first start after an install runs its steps kernel by kernel while a low-priority worker compiles the
fused blocks into the cache; the output is the same either way, and the next start (or the same process,
once the worker reports) runs them fused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from mixtral_factory import mixtral_gguf

from edgemoe.kernels import compile_ahead, fused
from edgemoe.loader import load_model
from tools.bench_startup import wait_for_exit


def _run(env, *extra):
    cmd = [sys.executable, "-m", "edgemoe", "run", "-p", "The king said", "-n", "24", "--temp", "0", "--json",
           *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def test_first_start_compiles_fused_kernels_in_the_background(tmp_path):
    """An empty Numba cache (a fresh install): `run` answers with the kernel-by-kernel steps and says that a
    worker compiles the fused ones; the worker stores them and exits; the next start runs them fused (nothing
    left to compile) and writes the same tokens."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    first, err = _run(env)
    assert "compiling in a background process (pid " in err, err
    pid = int(err.split("(pid ")[1].split(",")[0])
    assert wait_for_exit(pid, timeout=600), f"the compile worker {pid} still runs after 600 s"
    stored = {name.split("__")[0] for _, _, files in os.walk(tmp_path / "numba") for name in files
              if name.startswith(("fused.", "fused_seqs.", "fused_rows.")) and name.endswith(".nbi")}
    assert stored == {"fused._moe_template", "fused._attention_template", "fused_rows._moe_rows_template",
                      "fused_seqs._attention_seqs_template"}, stored
    second, err = _run(env)
    assert "background" not in err, err
    assert second["text"] == first["text"]
    assert second["token_ids"] == first["token_ids"]


def test_config_key_decides_and_bench_always_waits():
    """compute.fused_compile sets whether a session's models wait for their fused kernels; bench's session
    always does (it measures the steady state)."""
    from edgemoe.config import ConfigError, load_config
    from edgemoe.engine.session import Session

    assert load_config(None).compute.fused_compile == "background"
    with pytest.raises(ConfigError, match="compute.fused_compile"):
        load_config(None, {"compute.fused_compile": "later"})
    args = argparse.Namespace()
    for value, wait in (("background", False), ("foreground", True)):
        s = Session(args, load_config(None, {"compute.fused_compile": value}), progress=False)
        try:
            assert s.model.compile_wait is wait
        finally:
            s.close()
    s = Session(args, load_config(None, {"compute.fused_compile": "background"}), progress=False, compile_wait=True)
    try:
        assert s.model.compile_wait is True
    finally:
        s.close()
    import inspect

    from edgemoe.commands import bench

    assert "compile_wait=True" in inspect.getsource(bench.main)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = mixtral_gguf(tmp_path_factory.mktemp("ahead") / "m.gguf", hidden=256, intermediate=512, heads=4,
                        kv_heads=2, experts=6, top_k=2, vocab=96, seed=5, head_dim=64)
    return load_model(path).model


def _decode(m) -> np.ndarray:
    cache = m.new_cache(32)
    logits = [m.forward(np.asarray([3, 17, 4, 88, 9]), cache)[-1]]
    for _ in range(6):
        logits.append(m.forward(np.asarray([int(logits[-1].argmax())]), cache)[-1])
    return np.stack(logits)


def test_a_block_still_compiling_runs_kernel_by_kernel_with_the_same_bits(model, monkeypatch):
    """While a fused kernel is not ready every block it would run (one-token and several-token attention and
    experts) falls back to the separate kernels, leaving the KV cache as they would: the same logits."""
    fused_logits = _decode(model)
    asked = []

    def not_yet(kernel, key, args, state):
        asked.append(key[0])
        return False

    monkeypatch.setattr(compile_ahead, "ready", not_yet)
    model.compile_wait = False
    try:
        waiting = _decode(model)
    finally:
        model.compile_wait = True
    assert set(asked) == {"moe", "attention", "moe_rows", "attention_seqs"}
    np.testing.assert_array_equal(waiting, fused_logits)


def test_worker_reports_a_failure_and_exits_when_the_parent_closes(tmp_path, monkeypatch):
    """A kernel the worker cannot build is reported as failed (the parent keeps the block unfused), and the
    worker exits once the parent's end of the pipe is closed."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    w = compile_ahead._Worker()
    job = (("no_such_block", "Q8_0", "Q8_0"), "")
    w.ask(job)
    end = time.monotonic() + 120
    while job not in w.failed and time.monotonic() < end:
        w.poll()
        time.sleep(0.1)
    assert "KeyError" in w.failed[job]
    w.proc.stdin.close()
    assert w.proc.wait(timeout=60) == 0


def test_kernel_for_builds_each_block_from_the_kind_table():
    """The worker rebuilds a kernel from its key alone: the same dispatcher the parent runs."""
    from edgemoe.kernels.kinds import KINDS

    q8 = next(k for k in KINDS.values() if k.name == "Q8_0")
    for block in compile_ahead.PRIORITY:
        assert fused.kernel_for(block, q8, q8) is fused.kernel_for(block, q8, q8)
        assert fused.kernel_for(block, q8, q8).py_func.__name__.endswith("__Q8_0_Q8_0")


def test_warmup_command_compiles_in_the_foreground(capsys):
    """`edgemoe warmup` (for images and appliances) leaves every kernel of the model in the cache: it waits for
    the fused ones instead of handing them to a worker."""
    from edgemoe.cli import main

    before = compile_ahead.pending()
    assert main(["warmup"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("edgemoe: the kernels of default-moe.gguf are in Numba's cache"), out
    assert compile_ahead.pending() == before

"""routing.total_experts and routing.active_experts: when set, the loaded model must have that many experts per
layer and per token (a configuration written for one model refuses another at start)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import REPO

from edgemoe.config import ConfigError, check_model, load_config

MIXTRAL = SimpleNamespace(num_local_experts=8, num_experts_per_tok=2)


def test_auto_and_matching_values_pass():
    check_model(load_config(None), MIXTRAL, "m.gguf")
    check_model(load_config(REPO / "configs" / "mixtral-8x7b-16gb.yaml", ram_bytes=64 * 2**30), MIXTRAL, "m.gguf")


def test_a_config_for_another_model_is_refused():
    qwen = load_config(REPO / "configs" / "qwen3-30b-a3b-8gb.yaml", ram_bytes=64 * 2**30)
    with pytest.raises(ConfigError) as e:
        check_model(qwen, MIXTRAL, "/srv/edgemoe/mixtral.gguf", "qwen.yaml")
    assert e.value.problems == [
        "routing.total_experts: 128, but mixtral.gguf has 8 experts per layer; write 8 or auto, or use the model "
        "this configuration was written for",
        "routing.active_experts: 8, but mixtral.gguf has 2 experts per token; write 2 or auto, or use the model "
        "this configuration was written for"]
    assert e.value.exit_code == 2


def test_run_refuses_a_mismatch_in_one_line():
    """The embedded model has 8 experts per layer, 2 per token."""
    r = subprocess.run([sys.executable, "-m", "edgemoe", "run", "-p", "The king", "-n", "1",
                        "--set", "routing.total_experts=4"], capture_output=True, text=True, timeout=300, cwd=REPO)
    (err,) = [line for line in r.stderr.splitlines() if "error" in line]  # beside the loading progress line
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert err.startswith("edgemoe: error: configuration: routing.total_experts: 4, but default-moe.gguf has 8 "
                          "experts per layer")

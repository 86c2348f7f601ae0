"""systemd units: `systemd-analyze verify` accepts them, the security exposure is low, and they agree with the
default configuration (socket path and mode, memory limit above the cache budget)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

from edgemoe.commands.serve import default_socket
from edgemoe.config import load_config

UNITS = REPO / "systemd"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)")


def directives(path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; keys may repeat (Environment=, SystemCallFilter=)."""
    out, section = [], None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key, value))
    return out


def value(path, key: str) -> str:
    (v,) = [v for _, k, v in directives(path) if k == key]
    return v


def installed_copy(tmp_path):
    """The units with ExecStart pointing at an `edgemoe` that exists here (verify checks the binary)."""
    exe = shutil.which("edgemoe")
    cmd = exe if exe else f"{sys.executable} -m edgemoe"
    for name in ("edgemoe.service", "edgemoe.socket", "edgemoe-cluster.service"):
        text = (UNITS / name).read_text().replace("ExecStart=/usr/local/bin/edgemoe", f"ExecStart={cmd}")
        (tmp_path / name).write_text(text)
    return tmp_path / "edgemoe.service", tmp_path / "edgemoe.socket"


@needs_analyze
def test_verify(tmp_path):
    service, socket = installed_copy(tmp_path)
    r = subprocess.run([ANALYZE, "verify", "--man=no", str(service), str(socket), str(tmp_path / "edgemoe-cluster.service")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.strip() == "", r.stderr  # no warnings either


@needs_analyze
def test_security_exposure(tmp_path):
    service, _ = installed_copy(tmp_path)
    r = subprocess.run([ANALYZE, "security", "--offline=yes", str(service)], capture_output=True, text=True, timeout=60)
    print(r.stdout)
    m = re.search(r"Overall exposure level for edgemoe\.service: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout  # "OK" is < 4.0; we hold the unit to a stricter bar


def test_units_agree_with_the_default_config():
    cfg = load_config(REPO / "configs" / "default.yaml")
    service, socket = UNITS / "edgemoe.service", UNITS / "edgemoe.socket"
    # server.socket auto: under the unit, serve's own socket (without socket activation) is the socket unit's path
    runtime = "/run/" + value(service, "RuntimeDirectory")
    assert cfg.server.socket is None and default_socket({"RUNTIME_DIRECTORY": runtime}) == value(socket, "ListenStream")
    assert int(value(socket, "SocketMode"), 8) == cfg.server.socket_mode
    assert value(service, "Group") == value(socket, "SocketGroup")
    assert value(service, "ExecStart") == "/usr/local/bin/edgemoe serve --config /etc/edgemoe/edgemoe.yaml"
    m = re.fullmatch(r"(\d+)G", value(service, "MemoryMax"))
    assert m and int(m.group(1)) * 2**30 >= cfg.cache.total_bytes + 4 * 2**30  # + dense, KV, buffers, runtime
    env = [v for _, k, v in directives(service) if k == "Environment"]
    assert "NUMBA_CACHE_DIR=%C/edgemoe/numba" in env and value(service, "CacheDirectory") == "edgemoe"
    for key, want in {"Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30", "Restart": "on-failure",
                      "DynamicUser": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "NoNewPrivileges": "yes",
                      "PrivateTmp": "yes"}.items():
        assert value(service, key) == want, key
    assert "MemoryDenyWriteExecute" not in {k for _, k, _ in directives(service)}  # Numba JIT needs W^X off


def test_cluster_unit_agrees_with_the_front_door(monkeypatch):
    """edgemoe-cluster.service: `cluster up` from the configuration, its socket and state file in the unit's
    RuntimeDirectory (where `cluster status`/`down` look for them), READY from the main process, and never beside
    edgemoe.service on one box."""
    from edgemoe.commands.cluster import state_path

    unit = UNITS / "edgemoe-cluster.service"
    assert value(unit, "ExecStart") == "/usr/local/bin/edgemoe cluster up --config /etc/edgemoe/edgemoe.yaml"
    runtime = "/run/" + value(unit, "RuntimeDirectory")
    env = {"RUNTIME_DIRECTORY": runtime}
    assert os.path.dirname(default_socket(env)) == runtime
    monkeypatch.setenv("RUNTIME_DIRECTORY", runtime)
    assert state_path() == runtime + "/edgemoe-cluster.json"
    for key, want in {"Type": "notify", "NotifyAccess": "main", "KillMode": "mixed", "DynamicUser": "yes",
                      "Conflicts": "edgemoe.service edgemoe.socket", "PrivateTmp": "yes"}.items():
        assert value(unit, key) == want, key

"""`edgemoe service install`: units that `systemd-analyze verify` accepts, ExecStart naming the interpreter that
runs edgemoe (a venv's own bin/python), the packaged default configuration, --dry-run writing nothing, and
edited files left alone without --force."""

from __future__ import annotations

import configparser
import fnmatch
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

from edgemoe.cli import main
from edgemoe.commands.service import service_python, stamped

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)")


def install(tmp_path, *extra: str) -> int:
    return main(["service", "install", "--prefix", sys.prefix, "--unit-dir", str(tmp_path / "units"),
                 "--config", str(tmp_path / "etc" / "edgemoe.yaml"), *extra])


def exec_start(unit) -> list[str]:
    (line,) = [x for x in unit.read_text().splitlines() if x.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=").split()


def error_lines(err: str) -> list[str]:
    """stderr without the warnings about where the test's interpreter and files live (/root, /tmp)."""
    return [line for line in err.splitlines() if not line.startswith("edgemoe: warning: ")]


def verify(units) -> None:
    r = subprocess.run([ANALYZE, "verify", "--man=no", "edgemoe.service", "edgemoe.socket"], cwd=units,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stdout + r.stderr


@needs_analyze
def test_install_writes_units_that_verify(tmp_path, capsys):
    assert install(tmp_path) == 0
    out = capsys.readouterr().out
    units, config = tmp_path / "units", tmp_path / "etc" / "edgemoe.yaml"
    verify(units)
    python, *rest = exec_start(units / "edgemoe.service")
    assert python == service_python() and os.path.samefile(python, sys.executable)
    assert rest == ["-m", "edgemoe", "serve", "--config", str(config)]
    assert config.read_text() == (REPO / "configs" / "default.yaml").read_text()
    for path in (units / "edgemoe.service", units / "edgemoe.socket", config):
        assert f"wrote {path}" in out and oct(path.stat().st_mode & 0o777) == "0o644"
    assert "systemctl daemon-reload\n" in out and "systemctl enable --now edgemoe.socket\n" in out
    assert "User=edgemoe\n" in (units / "edgemoe.service").read_text()
    assert "SocketGroup=edgemoe\n" in (units / "edgemoe.socket").read_text()


def test_dry_run_writes_nothing(tmp_path, capsys):
    assert install(tmp_path, "--dry-run", "--user", "llm") == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "units").exists() and not (tmp_path / "etc").exists()
    assert f"would write {tmp_path / 'units' / 'edgemoe.service'}" in out
    assert "\nUser=llm\n" in out and "\nSocketGroup=llm\n" in out  # the units it would write are shown


def test_edited_units_are_replaced_only_with_force(tmp_path, capsys):
    assert install(tmp_path) == 0
    service, config = tmp_path / "units" / "edgemoe.service", tmp_path / "etc" / "edgemoe.yaml"
    written = service.read_text()
    assert install(tmp_path) == 0 and f"unchanged: {service}" in capsys.readouterr().out
    # An earlier install's unit, not edited since: updated without asking.
    service.write_text(stamped("[Unit]\nDescription=an older edgemoe\n"))
    assert install(tmp_path) == 0 and f"updated {service}" in capsys.readouterr().out
    assert service.read_text() == written
    # Edited by hand: refused in one line, nothing written; replaced with --force. The configuration is kept.
    service.write_text(written + "Nice=5\n")
    config.write_text("threads: 1\n")
    assert install(tmp_path) == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert err.startswith(f"edgemoe: error: {service} was edited") and "--force" in err
    assert service.read_text().endswith("Nice=5\n")
    assert install(tmp_path, "--force") == 0
    out = capsys.readouterr().out
    assert service.read_text() == written and f"replaced (it was edited) {service}" in out
    assert config.read_text() == "threads: 1\n" and f"kept (it exists): {config}" in out


def test_another_prefix_is_refused(tmp_path, capsys):
    assert main(["service", "install", "--prefix", str(tmp_path), "--unit-dir", str(tmp_path / "u"), "--dry-run"]) == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert f"not from --prefix {tmp_path}" in err
    assert main(["service", "install", "--prefix", sys.prefix, "--user", "Bad User", "--dry-run"]) == 2
    assert "is not a system user name" in capsys.readouterr().err


@needs_analyze
def test_a_venv_keeps_its_own_interpreter(tmp_path):
    """A venv's bin/python is a symlink to the base interpreter; ExecStart names the link, which runs the venv."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "edgemoe", "service", "install", "--prefix", str(venv),
                        "--unit-dir", str(tmp_path / "units"), "--config", str(tmp_path / "edgemoe.yaml")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    python = exec_start(tmp_path / "units" / "edgemoe.service")[0]
    assert python == str(venv / "bin" / "python") and os.path.realpath(python) != python
    verify(tmp_path / "units")


def test_package_data_ships_the_units_and_configs():
    """setup.cfg's package_data covers every file under edgemoe/data/configs and edgemoe/data/systemd, which the
    repository's configs/ and systemd/ are (links to)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    globs = [g.strip() for g in cfg["options.package_data"]["edgemoe"].split(",")]
    data = REPO / "edgemoe" / "data"
    for sub in ("configs", "systemd"):
        assert (REPO / sub).resolve() == (data / sub).resolve()
        files = [f"data/{sub}/{f.name}" for f in (data / sub).iterdir()]
        assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), (files, globs)


@needs_analyze
def test_cluster_install_writes_the_front_door_unit(tmp_path, capsys):
    assert install(tmp_path, "--cluster") == 0
    out = capsys.readouterr().out
    units, config = tmp_path / "units", tmp_path / "etc" / "edgemoe.yaml"
    assert sorted(p.name for p in units.iterdir()) == ["edgemoe-cluster.service"]
    r = subprocess.run([ANALYZE, "verify", "--man=no", "edgemoe-cluster.service"], cwd=units, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stdout + r.stderr
    python, *rest = exec_start(units / "edgemoe-cluster.service")
    assert python == service_python() and rest == ["-m", "edgemoe", "cluster", "up", "--config", str(config)]
    assert "systemctl enable --now edgemoe-cluster.service\n" in out and "edgemoe.socket" not in out

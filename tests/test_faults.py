"""Disk faults and model files changing under a running engine.

The server runs in a subprocess with an LD_PRELOAD shim (tests/faultshim.c, built here with the system `cc`)
that makes reads of the model file fail with EIO, come back short or slow, by byte range, under the control
of a file the test rewrites while the server runs. Oracles: the same server's replies without faults, and
which expert ranges the shim saw each request read.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from edgemoe.engine.filewatch import ModelFileChanged, ModelFiles
from edgemoe.errors import ModelFormatError
from edgemoe.experts.io import ATTEMPTS, ExpertReader
from edgemoe.experts.read_jobs import ExpertIOError
from edgemoe.experts.setup import StreamOptions
from edgemoe.loader import load_model
from edgemoe.pack.manifest import manifest_path, read_manifest
from tools.serve_process import start

HERE = Path(__file__).parent
T = 60  # seconds: the longest any wait may take


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> str:
    """tests/faultshim.c built into a shared object; the shim tests skip without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None or not sys.platform.startswith("linux"):
        pytest.skip("no C compiler (cc) on this Linux machine to build the LD_PRELOAD fault shim tests/faultshim.c")
    out = tmp_path_factory.mktemp("shim") / "faultshim.so"
    r = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(HERE / "faultshim.c"), "-ldl"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"{cc} could not build tests/faultshim.c: {r.stderr.strip()[-300:]}")
    return str(out)


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> str:
    """A small synthetic pack (2 layers, 8 experts of 108 kB, top-2) with its manifest."""
    spec = importlib.util.spec_from_file_location("synth_model", HERE.parent / "tools" / "synth_model.py")
    synth = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = synth  # dataclasses look their module up there
    spec.loader.exec_module(synth)
    path = str(tmp_path_factory.mktemp("pack") / "tiny.pack.gguf")
    synth.synthesize(path, synth.scaled(synth.PRESETS["tiny"], 0.5), name="tiny", packed=True, progress=False)
    return path


class Faults:
    """The shim's control file and log for one server: `set(rule, ...)` takes effect at the next read."""

    def __init__(self, shim: str, target: str, d: Path):
        self.ctl, self.log = d / "faults.ctl", d / "faults.log"
        self.ctl.write_text("")
        self.env = {"LD_PRELOAD": shim, "EDGEMOE_FAULT_FILE": target, "EDGEMOE_FAULT_CTL": str(self.ctl),
                    "EDGEMOE_FAULT_LOG": str(self.log)}

    def set(self, *rules: str) -> None:
        tmp = self.ctl.with_suffix(".tmp")
        tmp.write_text("".join(r + "\n" for r in rules))
        os.replace(tmp, self.ctl)  # the shim never sees half a file

    def events(self) -> list[tuple[str, int, int]]:
        if not self.log.exists():
            return []
        return [(k, int(o), int(n)) for k, o, n in (line.split() for line in self.log.read_text().splitlines())]

    def clear(self) -> None:
        self.log.unlink(missing_ok=True)


def serve(model: str, d: Path, *extra: str, env: dict | None = None):
    """`edgemoe serve` in a subprocess on a UNIX socket in `d`; returns (process, socket path)."""
    sock = str(d / "s.sock")
    proc = start(["-m", model, "--socket", sock, *extra], sock, d / "server.log", env=env, cwd=HERE.parent,
                 poll_s=0.05)
    return proc, sock


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=T)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def client(sock: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://edgemoe", timeout=T)


def complete(sock: str, prompt: list[int], n: int) -> httpx.Response:
    with client(sock) as c:
        return c.post("/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0})


def all_at_once(sock: str, prompts: list[list[int]], n: int) -> list[httpx.Response]:
    out: list = [None] * len(prompts)

    def ask(i: int) -> None:
        out[i] = complete(sock, prompts[i], n)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def error_text(r: httpx.Response, d: Path) -> str:
    """A failed request's message: the reply's own, or (a 500 that names only an error id) the server log's line."""
    assert r.status_code == 500, r.text
    msg = r.json()["error"]["message"]
    m = re.search(r"\(id (err-[0-9a-f]+)\)", msg)
    if m is None:
        return msg
    lines = [line for line in (d / "server.log").read_text().splitlines() if m.group(1) in line]
    assert lines, f"{m.group(1)} is not in the server log"
    return lines[0]


def tokens(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def expert_ranges(pack: str) -> dict[tuple[int, int], tuple[int, int]]:
    """(layer, expert) → [start, end) of its bytes in the pack."""
    return {(x["layer"], x["expert"]): (x["byte_offset"], x["byte_offset"] + x["byte_length"])
            for x in read_manifest(pack)["experts"]}


# ------------------------------------------------------------------------ reads retried, failures forgotten

@pytest.mark.parametrize("direct_io", [True, False], ids=["direct", "buffered"])
def test_reader_retries_transient_errors_and_short_reads(pack, monkeypatch, direct_io):
    real = os.preadv
    faults = iter([OSError(errno.EIO, "Input/output error"), "short", OSError(errno.EIO, "Input/output error")])

    def flaky(fd, buffers, offset, *args):
        fault = next(faults, None)
        if isinstance(fault, OSError):
            raise fault
        n = real(fd, buffers, offset, *args)
        return n // 2 + 1 if fault == "short" else n  # unaligned: an O_DIRECT read takes it for the end of file

    monkeypatch.setattr(os, "preadv", flaky)
    x = read_manifest(pack)["experts"][3]
    with ExpertReader(pack, buffer_bytes=1 << 20, verify=True, direct_io=direct_io) as reader:
        buf = reader.read("e", [(x["byte_offset"], x["byte_length"])], checksum=x["checksum"]).result(timeout=T)
        buf.release()
        st = reader.stats
        retries = 3 if st.direct_io else 2  # a buffered read simply carries on after a short read
        assert (st.retries, st.recovered_reads, st.errors, st.last_error) == (retries, 1, 0, "")
        assert {"retries", "recovered_reads", "errors", "last_error"} <= st.as_dict().keys()


def test_a_failed_read_fails_its_pass_and_is_forgotten(pack, monkeypatch):
    ranges = expert_ranges(pack)
    bad = ranges[(1, 2)]
    broken = {"on": True}
    real = os.preadv

    def preadv(fd, buffers, offset, *args):
        if broken["on"] and bad[0] <= offset < bad[1]:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "preadv", preadv)
    store = load_model(pack, StreamOptions.from_budget(0), prepare=False).model.experts
    try:
        store.request(1, [0, 2, 5])
        store.get(1, 0)
        with pytest.raises(ExpertIOError, match=f"after {ATTEMPTS} attempts: reading expert \\(1, 2\\)"):
            store.get(1, 2)
        assert not store._demanded and not any(h.failed() for h in store._pending.values())  # nothing kept
        assert store.stats()["io"]["errors"] == 1 and store.stats()["io"]["retries"] == ATTEMPTS - 1
        broken["on"] = False
        store.request(1, [2, 5])
        assert store.get(1, 2).gate.rows > 0 and store.get(1, 5).gate.rows > 0  # read afresh
    finally:
        store.close()


# ------------------------------------------------------------------------------- the server under faults

def test_transient_faults_cost_no_request(shim, pack, tmp_path):
    """10 ms in which every expert read fails with EIO, two short reads and six slow ones, while 6 streamed
    requests run at once: all succeed, with the tokens they get without faults (retries 5, 10 ms apart
    outlast the window)."""
    faults = Faults(shim, pack, tmp_path)
    proc, sock = serve(pack, tmp_path, "--cache-mb", "0", env=faults.env)  # no cache: every use is a read
    try:
        prompts = [[3 + i, 40 + 7 * i, 9] for i in range(6)]
        want = [tokens(complete(sock, p, 6)) for p in prompts]
        m = read_manifest(pack)
        lo, hi = m["experts_offset"], m["pack_bytes"]
        faults.set(f"eio {lo} {hi} -1 10000", f"short {lo} {hi} 2", f"delay {lo} {hi} 6 20000")
        got = [tokens(r) for r in all_at_once(sock, prompts, 6)]
        assert got == want
        kinds = [k for k, _, _ in faults.events()]
        assert kinds.count("eio") >= 1 and kinds.count("short") == 2 and kinds.count("delay") == 6
        with client(sock) as c:
            health = c.get("/health")
        assert health.status_code == 200 and health.json()["requests"]["error"] == 0
    finally:
        stop(proc)


def test_a_persistent_fault_fails_only_the_requests_that_need_that_expert(shim, pack, tmp_path):
    faults = Faults(shim, pack, tmp_path)
    env = {**faults.env, "EDGEMOE_FAULT_TRACE": "1"}  # the shim logs every read: which experts a request used
    proc, sock = serve(pack, tmp_path, "--cache-mb", "0", "--no-prefetch", env=env)
    try:
        ranges = expert_ranges(pack)
        at = {start: key for key, (start, _) in ranges.items()}
        prompts = [[t] for t in range(3, 15)]  # one token, one pass: top-2 of 8 experts per layer
        want, used = [], []
        for p in prompts:
            faults.clear()
            want.append(tokens(complete(sock, p, 1)))
            used.append({at[o] for k, o, _ in faults.events() if k == "read" and o in at})
        assert all(len(u) == 4 for u in used), used  # 2 layers x top-2, each read once
        # The expert that splits the prompts most evenly into those that need it and those that do not.
        target = min(ranges, key=lambda key: abs(sum(key in u for u in used) - len(prompts) / 2))
        needs = [target in u for u in used]
        assert any(needs) and not all(needs)

        lo, hi = ranges[target]
        faults.set(f"eio {lo} {hi} -1")
        replies = all_at_once(sock, prompts, 1)
        for r, need, w in zip(replies, needs, want):
            if need:
                msg = error_text(r, tmp_path)
                assert f"expert {target}" in msg and "Input/output error" in msg and f"{ATTEMPTS} attempts" in msg
            else:
                assert tokens(r) == w

        faults.set()  # the disk recovers: nothing of the failure was kept
        assert [tokens(complete(sock, p, 1)) for p, need in zip(prompts, needs) if need] == \
            [w for w, need in zip(want, needs) if need]
        with client(sock) as c:
            assert c.get("/health").status_code == 200
    finally:
        stop(proc)


# --------------------------------------------------------------------------- a mapped file changing on disk

def test_watch_sees_a_mapped_file_shrink_or_be_replaced(pack, tmp_path):
    for change in ("truncate", "replace"):
        path = str(tmp_path / f"{change}.gguf")
        shutil.copy(pack, path)
        shutil.copy(manifest_path(pack), manifest_path(path))
        files = ModelFiles.of(load_model(path).model)
        assert [f.path for f in files.files] == [path] and files.check() is None
        size = os.path.getsize(path)
        if change == "truncate":
            os.truncate(path, 4096)
            want = f"model file {path} changed on disk (size {size} → 4096); restart the service"
        else:
            shutil.copy(pack, path + ".new")
            os.replace(path + ".new", path)
            want = f"model file {path} changed on disk (replaced by another file); restart the service"
        err = files.check()
        assert isinstance(err, ModelFileChanged) and str(err) == want
        os.remove(path)
        assert files.check() is err  # the first change stays the answer


def test_truncated_mapped_model_fails_requests_and_the_server_stays_up(pack, tmp_path):
    path = str(tmp_path / "mapped.gguf")
    shutil.copy(pack, path)
    shutil.copy(manifest_path(pack), manifest_path(path))
    proc, sock = serve(path, tmp_path)  # no --cache-mb/--set: every weight memory-mapped
    try:
        assert len(tokens(complete(sock, [5, 6, 7], 4))) == 4
        size = os.path.getsize(path)
        os.truncate(path, 4096)  # a kernel touching the mapping past this would die with SIGBUS
        want = f"model file {path} changed on disk (size {size} → 4096); restart the service"
        for _ in range(2):  # and every request after it, the same way
            assert error_text(complete(sock, [5, 6, 7], 4), tmp_path).endswith(want)
        with client(sock) as c:
            assert c.get("/health").status_code == 503
        assert proc.poll() is None
        assert want in (tmp_path / "server.log").read_text()
    finally:
        stop(proc)


# ------------------------------------------------------------------------------------- pack integrity

def run_cli(model: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgemoe", "run", "-m", model, "--prompt-ids", "5,6,7", "-n", "2",
                           *extra], capture_output=True, text=True, cwd=HERE.parent, timeout=120)


def corrupt_copy(pack: str, d: Path, layer: int) -> str:
    """A copy of `pack` with one byte flipped in every expert of `layer` (every request reads one of them)."""
    path = str(d / "corrupt.gguf")
    shutil.copy(pack, path)
    shutil.copy(manifest_path(pack), manifest_path(path))
    with open(path, "r+b") as f:
        for x in read_manifest(pack)["experts"]:
            if x["layer"] == layer:
                f.seek(x["byte_offset"] + 100)
                b = f.read(1)
                f.seek(x["byte_offset"] + 100)
                f.write(bytes([b[0] ^ 0x40]))
    return path


def test_mapped_run_verifies_pack_checksums(pack, tmp_path):
    r = run_cli(corrupt_copy(pack, tmp_path, layer=1))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "(layer 1, expert 0) has checksum" in r.stderr and "corrupt" in r.stderr


def test_streamed_run_verifies_pack_checksums(pack, tmp_path):
    r = run_cli(corrupt_copy(pack, tmp_path, layer=0), "--cache-mb", "1", "--set", "ssd.verify_checksums=true")
    assert r.returncode == 2, r.stderr
    assert "checksum mismatch for expert (0, " in r.stderr and f"after {ATTEMPTS} attempts" in r.stderr


@pytest.mark.parametrize("streamed", [False, True], ids=["mapped", "streamed"])
def test_a_pack_without_its_manifest_runs_with_one_warning(pack, tmp_path, streamed):
    path = str(tmp_path / "bare.gguf")
    shutil.copy(pack, path)
    r = run_cli(path, *(["--cache-mb", "1", "--set", "ssd.verify_checksums=true"] if streamed else []))
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "without its manifest" in line]
    assert len(warnings) == 1 and manifest_path(path) in warnings[0]


def _manifest(pack: str) -> dict:
    return json.loads(Path(manifest_path(pack)).read_text())


@pytest.mark.parametrize("case, where, what", [
    ("not_json", "", "unreadable manifest"),
    ("not_utf8", "", "unreadable manifest"),
    ("string_layer", "experts[2]", "'layer' must be an integer >= 0, got '0'"),
    ("negative_offset", "experts[2] (layer 0, expert 2)", "'byte_offset' must be an integer >= 0"),
    ("past_the_file", "experts[2] (layer 0, expert 2)", "end past the pack's"),
    ("missing_checksum", "experts[2] (layer 0, expert 2)", "'checksum' must be 8 hex digits"),
    ("missing_part", "experts[2] (layer 0, expert 2)", "'parts.up' is missing"),
    ("part_past_entry", "experts[2] (layer 0, expert 2)", "parts.down ends at"),
    ("duplicate", "experts[3] (layer 0, expert 2)", "a second entry for this expert"),
    ("not_an_object", "experts[2]", "an entry must be an object, got list"),
    ("no_pack_bytes", "", "'pack_bytes' is missing"),
])
def test_malformed_manifest_is_one_typed_error_naming_the_entry(pack, tmp_path, case, where, what):
    path = str(tmp_path / "p.gguf")
    shutil.copy(pack, path)
    m = _manifest(pack)
    x = m["experts"][2]
    if case == "string_layer":
        x["layer"] = "0"
    elif case == "negative_offset":
        x["byte_offset"] = -4096
    elif case == "past_the_file":
        x["byte_offset"] = m["pack_bytes"] - 4096
    elif case == "missing_checksum":
        del x["checksum"]
    elif case == "missing_part":
        del x["parts"]["up"]
    elif case == "part_past_entry":
        x["parts"]["down"]["length"] += 1
    elif case == "duplicate":
        m["experts"][3] = dict(x)
    elif case == "not_an_object":
        m["experts"][2] = [1, 2]
    elif case == "no_pack_bytes":
        del m["pack_bytes"]
    text = json.dumps(m)
    if case == "not_json":
        text = text[:-20]
    Path(manifest_path(path)).write_bytes(b"\xff\xfe" + text.encode() if case == "not_utf8" else text.encode())
    with pytest.raises(ModelFormatError) as e:
        read_manifest(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{manifest_path(path)}: {where}") and what in msg, msg
    assert "edgemoe partition" in msg
    with pytest.raises(ModelFormatError):  # what the engine runs before streaming a pack
        load_model(path, StreamOptions.from_budget(1), prepare=False)
    if case == "negative_offset":  # and through the command line: one line, exit code 2
        r = run_cli(path)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and where in r.stderr, r.stderr

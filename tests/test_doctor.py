"""edgemoe-doctor: ISA flags vs /proc/cpuinfo, kernels, O_DIRECT vs the OS, model sizes vs the GGUF index,
hard requirements and exit codes."""

from __future__ import annotations

import errno
import json
import mmap
import os

import pytest
from gguf import GGUFReader

from edgemoe import doctor, doctor_disk
from edgemoe.config import load_config
from edgemoe.default_model import random_tensors
from edgemoe.formats.gguf_export import export_mixtral_gguf
from edgemoe.kernels import dispatch, kernel_names

TINY = {"model_type": "mixtral", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False,
        "vocab_size": 256, "bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("doctor") / "tiny.gguf"
    export_mixtral_gguf(path, TINY, random_tensors(TINY, 256), qtype="Q8_0", expert_qtype="Q4_0")
    return str(path)


@pytest.fixture(scope="module")
def report(model):
    """One full doctor run (JSON) on the tiny model, shared by the tests below."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = doctor.main(["--model", model, "--json", "--seconds", "0.2"])
    r = json.loads(out.getvalue())
    r["code"] = code
    r["rows"] = {c["name"]: c for c in r["checks"]}
    return r


def os_allows_o_direct(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        os.preadv(fd, [mmap.mmap(-1, 4096)], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def test_isa_rows_agree_with_proc_cpuinfo(report):
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    for shown, _, proc_name in doctor.ISA:
        row = report["rows"][f"ISA {shown}"]
        said_yes = row["value"].startswith("yes")
        if (proc_name in flags) != said_yes:  # LLVM disagrees with the kernel: must be flagged
            assert row["ok"] is False and "/proc/cpuinfo says" in row["value"]
    assert report["rows"]["ISA AVX2"]["ok"] == ("avx2" in flags)


def test_kernel_rows_are_the_dispatch_table(report):
    for qtype, name in kernel_names().items():
        assert report["rows"][f"kernel {qtype}"]["value"] == name
    assert report["rows"]["kernel variant"]["value"].startswith(dispatch.current_variant())


def test_o_direct_row_and_exit_code_follow_the_os(report, model):
    works = os_allows_o_direct(model)
    row = report["rows"]["O_DIRECT reads"]
    assert row["ok"] == works and row["hard"] == (not works)  # the default config asks for direct_io
    assert report["code"] == (0 if works else 1) and report["ok"] == works
    assert report["figures"]["disk_read_bytes_per_s"] > 0
    assert set(report["figures"]["disk_latency_s"]) <= {"4096", "65536", "1048576", "4194304"}


def test_sizes_and_estimates_match_the_gguf_index(report, model):
    tensors = GGUFReader(model).tensors
    experts = sum(int(t.n_bytes) for t in tensors if "_exps" in t.name)
    dense = sum(int(t.n_bytes) for t in tensors if "_exps" not in t.name)
    f = report["figures"]
    assert f["expert_bytes"] == experts and f["dense_bytes"] == dense
    assert f["expert_bytes_per_token"] == experts * TINY["num_experts_per_tok"] // TINY["num_local_experts"]
    assert 0 < f["recommended_cache_bytes"] <= experts
    assert f["decode_tok_s"] > 0 and f["memory_read_bytes_per_s"] > 0
    assert report["rows"]["model loads"]["ok"] is True


def test_numba_rows(report):
    assert report["rows"]["numba"]["value"].split("threading layer ")[1].split(",")[0] in ("omp", "tbb", "workqueue")
    assert report["rows"]["numba compile cache"]["ok"] is True


def test_estimate_formula():
    sizes = {"dense_bytes": 100, "dense_bytes_per_token": 50, "expert_bytes": 1000, "expert_bytes_per_token": 200}
    est = doctor.estimate(sizes, available=1000, mem_bw=1000.0, disk_bw=100.0)
    assert est["recommended_cache_bytes"] == 500 and est["assumed_hit_rate"] == 0.5  # min(1000, 600 - 100)
    # 50 + 0.5 * 200 bytes from RAM at 1000 B/s, 0.5 * 200 from disk at 100 B/s
    assert est["decode_tok_s"] == pytest.approx(1 / (150 / 1000 + 100 / 100))
    assert doctor.estimate(sizes, 100, 1000.0, 100.0)["recommended_cache_bytes"] == 0


def test_dispatch_variant_the_cpu_lacks_is_a_hard_failure(monkeypatch):
    monkeypatch.setitem(dispatch._state, "supported", ("generic",))
    rows = {r.name: r for r in doctor.cpu_checks(load_config(None, {"compute.dispatch.Q4_K": "avx2"}))}
    r = rows["kernel Q4_K"]
    assert r.ok is False and r.hard and "avx2, which this CPU lacks" in r.value
    assert r.fix == "set compute.dispatch.Q4_K: auto (or one of generic)"
    assert rows["kernel Q8_0"].ok is None


def test_o_direct_refused(monkeypatch, model):
    def refuse(path):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(doctor_disk, "open_direct", refuse)
    for required in (True, False):
        rows, figures = doctor_disk.disk_checks(model, require_direct=required, queue_depth=2, seconds=0.05)
        rows = {r[0]: r for r in rows}
        _, ok, value, fix, hard = rows["O_DIRECT reads"]
        assert ok is False and hard == required and "refused" in value
        assert ("ssd.direct_io: false" in fix) == required
        assert "buffered" in rows["disk read bandwidth"][2] and figures["disk_read_bytes_per_s"] > 0


def test_bad_config_and_missing_model_fail(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ssd: {queue_depth: 0}\n")
    code = doctor.main(["--config", str(bad), "--model", str(tmp_path / "nope.gguf"), "--seconds", "0.05"])
    out = capsys.readouterr().out
    assert code == 1
    assert "✖ config" in out and "ssd.queue_depth" in out and "fix: fix the listed keys" in out
    assert "✖ model path" in out and "result: hard requirement failed" in out


def test_human_table(model, capsys):
    rows, _ = doctor.model_checks(model, load_config(None, {"ssd.direct_io": False}), seconds=0.05)
    text = doctor.render(rows)
    assert "model filesystem" in text and "expected decode" in text and "tok/s" in text
    assert not any(r.hard and r.ok is False for r in rows)

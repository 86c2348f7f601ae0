"""Hostile configuration files: each is refused fast, on one line naming the file, the place and the fix.

And `edgemoe config check` refuses everything `run` and `serve` would refuse at start-up.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import pytest
from conftest import REPO

from edgemoe import config_yaml
from edgemoe.cli import main
from edgemoe.config import CACHE_POLICIES, Config, ConfigError, config_from_args, load_config, parse_overrides
from edgemoe.config_checks import cpu_threads
from edgemoe.config_schema import clip, show
from edgemoe.errors import UsageError

LOADERS = [config_yaml.PyConfigLoader] + ([config_yaml.CConfigLoader] if hasattr(config_yaml, "CConfigLoader") else [])


def billion_laughs() -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


# name → (file bytes, text the one error line must contain)
HOSTILE = {
    "alias bomb": (billion_laughs().encode(), "line 1, column 4: YAML anchors are not allowed (&a)"),
    "alias alone": (b"ssd: *q\n", "YAML aliases are not allowed (*q)"),
    "merge key": (b"ssd:\n  <<: {queue_depth: 8}\n", "line 2, column 3: YAML merge keys (<<) are not allowed"),
    "deep list": (b"[" * 10_000 + b"]" * 10_000, "nested more than 32 levels deep"),
    "deep map": (b"{a: " * 10_000 + b"1" + b"}" * 10_000, "nested more than 32 levels deep"),
    "deep block": (b"".join(b"  " * i + b"a:\n" for i in range(200)), "nested more than 32 levels deep"),
    "too many values": (b"routing:\n  pin_layers: [" + b", ".join([b"1"] * 20_000) + b"]\n",
                        "line 2, column 30001: more than 10000 values"),
    "latin-1": ("inference:\n  model: café\n".encode("latin-1"), "line 2: not UTF-8 text (byte 0xe9"),
    "utf-16": ("ssd: {}\n".encode("utf-16"), "line 1: not UTF-8 text (byte 0xff"),
    "control char": (b"ssd:\n  queue_depth: 4\x07\n", "line 2: not valid YAML (character #x0007"),
    "duplicate key": (b"ssd:\n  queue_depth: 4\nserver: {}\nssd:\n  direct_io: false\n",
                      "line 4, column 1: duplicate key 'ssd' (first at line 1)"),
    "nested duplicate": (b"ssd:\n  queue_depth: 4\n  queue_depth: 8\n", "line 3, column 3: duplicate key 'queue_depth'"),
    "top-level list": (b"- a\n- b\n", 'expected a mapping of settings at the top level, got ["a", "b"]'),
    "top-level scalar": (b"hello\n", 'expected a mapping of settings at the top level, got "hello"'),
    "too big": (b"# padding\n" * 120_000, "larger than 1024 KB"),
    "two documents": (b"ssd: {}\n---\nserver: {}\n", "line 2, column 1: not valid YAML"),
    "huge integer": (b"threads: " + b"9" * 5000 + b"\n", "line 1, column 10: cannot read this value"),
    "bad date": (b"inference:\n  model: 2024-13-45\n", "line 2, column 10: cannot read this value as !!timestamp (month"),
    "bad explicit tag": (b"ssd:\n  direct_io: !!bool maybe\n", "line 2, column 14: cannot read this value as !!bool"),
    "python tag": (b"ssd: !!python/object/apply:os.system [id]\n", "could not determine a constructor"),
    "unknown key": (b"ssd:\n  queu_depth: 4\n", "ssd.queu_depth: unknown key (did you mean queue_depth?)"),
    "wrong type": (b"ssd: [1, 2]\n", "ssd: expected a mapping of settings, got [1, 2]"),
    "empty tiers": (b"cache:\n  tiers: []\n", "cache.tiers: empty; the expert cache needs at least one tier"),
    "null tiers": (b"cache:\n  tiers:\n", "cache.tiers: empty"),
    "world mode": (b"server:\n  socket_mode: '0777'\n", 'server.socket_mode: expected an octal file mode'),
    "unquoted mode": (b"server:\n  socket_mode: 0666\n", "got 438 (octal 0666)"),
    "long socket": (b"server:\n  socket: /run/" + b"s" * 200 + b".sock\n", "server.socket: expected a UNIX socket"),
    "draft without model": (b"speculative:\n  proposer: draft\n", "speculative.draft_model: missing"),
    "context 1": (b"context_length: 1\n", "context_length: expected an integer >= 2"),
    "long value": (b"ssd:\n  queue_depth: " + b"x" * 100_000 + b"\n", 'got "xxxxxxxx'),
    "long key": (b"server:\n  " + b"k" * 1000 + b": 1\n", "server.kkkkkkkk"),
}


def write(tmp_path, data: bytes | str, name: str = "hostile.yaml"):
    p = tmp_path / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def one_line_error(capsys, path) -> str:
    t = time.perf_counter()
    code = main(["config", "check", str(path)])
    took = time.perf_counter() - t
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (code, out)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edgemoe: error: {path}: "), err[:500]
    assert "Traceback" not in err and len(lines[0]) < 400, lines[0][:500]
    assert took < 10, took  # the first call imports every subcommand; the checks themselves take milliseconds
    return lines[0]


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_file_one_line_exit_2(capsys, tmp_path, name):
    data, needle = HOSTILE[name]
    line = one_line_error(capsys, write(tmp_path, data))
    assert needle in line, line


def test_alias_bomb_refused_in_milliseconds(tmp_path):
    p = write(tmp_path, billion_laughs())
    t = time.perf_counter()
    with pytest.raises(ConfigError, match="YAML anchors are not allowed"):
        load_config(p)
    assert time.perf_counter() - t < 0.25


@pytest.mark.parametrize("loader", LOADERS, ids=lambda c: c.__name__)
def test_both_loaders_refuse_the_same(loader):
    for text, needle in [(billion_laughs(), "anchors are not allowed"), ("[" * 10_000, "nested more than 32"),
                         ("{a: " * 10_000, "nested more than 32"), ("a: 1\na: 2\n", "duplicate key 'a'"),
                         ("a: x\x00\n", "not valid YAML (character #x0000"), ("a: *x\n", "aliases are not allowed")]:
        with pytest.raises(config_yaml.Unreadable, match=needle.replace("(", r"\(")):
            config_yaml.load_text(text, loader)
    assert config_yaml.load_text("a: {b: [1, {c: 2}]}\n? d\n", loader) == {"a": {"b": [1, {"c": 2}]}, "d": None}
    assert config_yaml.load_text("\ufeffa: 1\n", loader) == {"a": 1}  # a UTF-8 byte order mark is fine


def test_through_the_real_console_script(tmp_path):
    """Three hostile files in a fresh interpreter: exit 2, one stderr line, no traceback, in bounded time."""
    for name in ("alias bomb", "deep list", "latin-1"):
        p = write(tmp_path, HOSTILE[name][0], f"{name.replace(' ', '-')}.yaml")
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "edgemoe", "config", "check", str(p)], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        took = time.perf_counter() - t
        lines = r.stderr.splitlines()
        assert r.returncode == 2 and r.stdout == "", (name, r.returncode, r.stdout)
        assert len(lines) == 1 and lines[0].startswith("edgemoe: error:") and "Traceback" not in r.stderr, r.stderr
        assert HOSTILE[name][1] in lines[0]
        assert took < 20, (name, took)  # interpreter start-up; the bomb itself is refused in milliseconds


# ----------------------------------------------------------------------------------- echoed values

def test_echoed_values_are_clipped():
    assert clip("x" * 1000) == "x" * 79 + "…" and len(clip("x" * 1000)) == 80
    assert clip("short") == "short" and clip("x" * 80) == "x" * 80
    assert clip("a\nb\tc") == "a\\nb\\tc"  # one line whatever the value holds
    assert show("y" * 10**6).endswith("…") and len(show("y" * 10**6)) == 80
    assert show(list(range(10**5))).startswith("[0, 1, 2") and len(show(list(range(10**5)))) == 80
    assert show(float("nan")) == "NaN" and show(10**5000) == "a int too large to show"
    assert show([10**5000]) == "a list too large to show"


def test_many_problems_are_capped(tmp_path):
    p = write(tmp_path, "".join(f"bogus{i}: 1\n" for i in range(500)))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert len(e.value.problems) == 500  # all kept for callers
    msg = str(e.value)
    assert msg.startswith(f"{p}: 500 problems:") and msg.endswith("… and 450 more") and len(msg.splitlines()) == 52


def test_set_values_use_the_same_loader():
    assert parse_overrides(["ssd.queue_depth=&a 8"]) == {"ssd.queue_depth": "&a 8"}  # kept as text: the schema refuses it
    assert parse_overrides(["threads=" + "9" * 5000])["threads"] == "9" * 5000
    got = [p for p in problems(None, parse_overrides(["threads=" + "9" * 5000]))]
    assert len(got) == 1 and got[0].startswith("threads: expected a positive integer") and got[0].endswith("(from --set)")
    assert len(got[0]) < 300


def problems(path, overrides=None, **kw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides or {}, **kw)
    return e.value.problems


# --------------------------------------------------------------------- what run and serve check too

@pytest.mark.parametrize("mode, ok", [("0600", True), ("0660", True), ("0640", True), ("0700", True), ("0770", True),
                                      ("660", True), ("0777", False), ("0666", False), ("0604", False),
                                      ("0601", False), ("0460", False), ("0200", False), ("0000", False),
                                      ("4660", False), ("1660", False), (0o660, True), (0o777, False), (660, False)])
def test_socket_mode_owner_and_group_only(mode, ok):
    if ok:
        m = load_config(None, {"server.socket_mode": mode}).server.socket_mode
        assert m & 0o600 == 0o600 and m & 0o007 == 0 and m <= 0o777
    else:
        assert problems(None, {"server.socket_mode": mode})[0].startswith("server.socket_mode: expected an octal")


def test_socket_path():
    assert load_config(None, {"server.socket": "edgemoe.sock"}).server.socket == "edgemoe.sock"  # relative: allowed
    assert load_config(None, {"server.socket": "/r/" + "s" * 104}).server.socket  # 107 bytes: fits sun_path
    for bad in ["/r/" + "s" * 105, "/run/edgemoe/", "/run/a\0b.sock", "", "  ", "/run/" + "é" * 60]:
        assert problems(None, {"server.socket": bad})[0].startswith("server.socket: expected a UNIX socket"), bad


def test_tcp_address():
    for ok in ["127.0.0.1:8080", "localhost:1", "[::1]:65535", "::1:8080"]:
        assert load_config(None, {"server.tcp": ok}).server.tcp == ok
    for bad in ["127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:000080", "127.0.0.1:８０", "127.0.0.1:",
                "127.0.0.1:8080 ", 8080, "example.com:80"]:
        assert problems(None, {"server.tcp": bad})[0].startswith("server.tcp: expected HOST:PORT"), bad
    # Another address than loopback: only with a key file.
    assert problems(None, {"server.tcp": "0.0.0.0:8080"})[0].startswith("server.tcp: 0.0.0.0:8080 is not a loopback")
    assert load_config(None, {"server.tcp": "[::]:8080", "server.api_key_file": "/etc/edgemoe/key"}).server.tcp


def test_paths_with_nul_are_refused():
    assert problems(None, {"inference.model": "a\0b"})[0].startswith("inference.model: expected a model path")
    assert problems(None, {"speculative.draft_model": "a\0b"})[0].startswith("speculative.draft_model: expected")


def test_empty_tiers_are_refused_as_the_expert_cache_does():
    from edgemoe.experts.cache import ExpertCache

    with pytest.raises(UsageError, match="at least one tier"):
        ExpertCache([])  # what `run` hit after `config check` said ok
    assert problems(None, {"cache.tiers": []}) == [
        "cache.tiers: empty; the expert cache needs at least one tier, e.g. [{name: hot, capacity: 1024}] "
        "(capacity in MB) (from --set)"]


def test_a_config_that_passes_builds_the_start_up_objects():
    """What `config check` accepts, the start-up code accepts: the expert cache, reader settings, scheduler,
    thermal schedule and sampling defaults of a config at the edges of every range."""
    from edgemoe.experts.cache import ExpertCache
    from edgemoe.experts.setup import StreamOptions
    from edgemoe.server.scheduler import Scheduler
    from edgemoe.thermal import ThermalGovernor

    cfg = load_config(None, {"cache.tiers": [{"name": "only", "capacity": 1}], "ssd.queue_depth": 1,
                             "ssd.fixed_buffers": 1, "ssd.max_buffers": 1, "batching.max_batch": 1,
                             "batching.max_queue": 1, "batching.admission": {"a": 1}, "context_length": 2,
                             "speculative.proposer": "draft", "speculative.draft_model": "default",
                             "sampling.temperature": 0, "sampling.top_p": 1, "sampling.min_p": 0,
                             "sampling.repeat_last_n": -1, "sampling.seed": 0, "server.socket_mode": "0600"})
    opt = StreamOptions.from_config(cfg)
    ExpertCache(list(opt.tiers), pin_layers=opt.pin_layers)
    Scheduler(dict(cfg.batching.admission), cfg.batching.max_batch, cfg.batching.max_queue)
    ThermalGovernor(None, None, queue_depth=cfg.ssd.queue_depth,
                    min_queue_depth=cfg.monitoring.io_pacing.min_queue_depth)
    cfg.sampling.params().validate()


@pytest.mark.parametrize("key, value", [("temperature", -0.1), ("temperature", float("inf")), ("top_k", -1),
                                        ("top_p", 0), ("top_p", 1.01), ("min_p", 1), ("min_p", -0.1),
                                        ("repeat_penalty", 0), ("repeat_last_n", -2), ("seed", -1),
                                        ("temperature", 0), ("top_p", 1), ("repeat_last_n", -1), ("seed", 0)])
def test_sampling_rules_match_sampling_params(key, value):
    import dataclasses

    try:
        dataclasses.replace(Config().sampling.params(), **{key: value}).validate()
        valid = True
    except UsageError:
        valid = False
    try:
        load_config(None, {f"sampling.{key}": value})
        accepted = True
    except ConfigError:
        accepted = False
    assert accepted == valid, (key, value)


def test_draft_proposer_needs_a_draft_model_from_file_or_flag(tmp_path):
    p = write(tmp_path, "speculative:\n  proposer: draft\n")
    assert problems(p)[0].startswith("speculative.draft_model: missing: proposer draft needs a draft model")

    def args(**kw):
        return argparse.Namespace(config=str(p), overrides=[], **kw)

    cfg = config_from_args(args(spec=None, draft_model="default"))  # the flag completes the file
    assert (cfg.speculative.proposer, cfg.speculative.draft_model) == ("draft", "default")
    assert config_from_args(args(spec="off", draft_model=None)).speculative.proposer == "off"
    with pytest.raises(ConfigError, match="speculative.draft_model: missing"):
        config_from_args(args(spec=None, draft_model=None))
    with pytest.raises(ConfigError, match=r"proposer: expected one of .* \(from --spec\)"):
        config_from_args(args(spec="bogus", draft_model=None))


def test_threads_beyond_the_cpus_are_refused(monkeypatch):
    import numba

    assert cpu_threads() == numba.config.NUMBA_NUM_THREADS
    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")
    assert load_config(None, {"threads": 2}).threads == 2
    assert problems(None, {"threads": 3}) == [
        "threads: 3 exceeds the 2 CPUs this process may use; lower it or write auto (from --set)"]


def test_kernel_variants_this_cpu_cannot_run_are_refused(monkeypatch, capsys, tmp_path):
    from edgemoe.kernels import dispatch

    monkeypatch.setattr(dispatch, "supported_variants", lambda: ("generic",))
    assert load_config(None, {"compute.dispatch.Q4_K": "generic"}, kernels=True).compute.dispatch.Q4_K == "generic"
    assert load_config(None, {"compute.dispatch.Q4_K": "avx2"}).compute.dispatch.Q4_K == "avx2"  # doctor reports it
    assert problems(None, {"compute.dispatch.Q4_K": "avx2"}, kernels=True) == [
        "compute.dispatch.Q4_K: avx2 kernels do not run on this CPU; use auto or one of generic (from --set)"]
    line = one_line_error(capsys, write(tmp_path, "compute:\n  dispatch: {Q8_0: vnni}\n"))  # `config check` too
    assert line.endswith("compute.dispatch.Q8_0: vnni kernels do not run on this CPU; use auto or one of generic")


def test_policy_names_match_the_cache():
    from edgemoe.experts.policies import POLICIES

    assert tuple(CACHE_POLICIES) == tuple(POLICIES)



def test_mangled_default_config_never_escapes_as_another_error(tmp_path):
    """Byte flips, truncations and spliced YAML syntax in configs/default.yaml: always a Config or one ConfigError."""
    import random

    base = (REPO / "configs" / "default.yaml").read_bytes()
    junk = [b"&", b"*", b"!!", b"<<: ", b"[", b"{", b"- ", b":", b"\t", b"\xff", b"\x00", b"'", b'"', b"? ", b"---\n",
            b"%YAML 1.1\n", b"!!python/name:os.system ", b"!!int ", b"!!bool ", b"!!timestamp ", b"!!set ", b"  "]
    rng = random.Random(20261201)
    p = tmp_path / "mangled.yaml"
    for _ in range(300):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            op = rng.random()
            if op < 0.3:
                data[at:at] = rng.choice(junk)
            elif op < 0.5:
                data[at] = rng.randrange(256)
            elif op < 0.7:
                del data[at: at + rng.randint(1, 40)]
            else:
                data = data[:at]
        p.write_bytes(bytes(data))
        try:
            load_config(p, ram_bytes=2**40)
        except ConfigError as e:
            assert "Traceback" not in str(e) and all(len(line) < 400 for line in str(e).splitlines()), str(e)[:500]
            if len(e.problems) == 1:
                assert "\n" not in str(e), str(e)

"""The YAML configuration: defaults, every problem reported at once with its path, overrides, `edgemoe config`."""

from __future__ import annotations

import dataclasses

import psutil
import pytest
import yaml
from conftest import REPO

from edgemoe.cli import main
from edgemoe.config import MB, Config, ConfigError, load_config, parse_overrides
from edgemoe.errors import EdgeMoEError

CONFIGS = REPO / "configs"


def write(tmp_path, text: str):
    p = tmp_path / "edgemoe.yaml"
    p.write_text(text)
    return p


def problems_of(path=None, overrides=None, **kw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides or {}, **kw)
    return e.value.problems


def test_default_yaml_writes_every_key_with_its_default():
    written = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert written == Config().to_dict()
    assert load_config(CONFIGS / "default.yaml") == Config()
    assert load_config(None) == Config()


@pytest.mark.parametrize("name, cache_mb, active, total", [("mixtral-8x7b-16gb", 8192, 2, 8),
                                                          ("qwen3-30b-a3b-8gb", 4096, 8, 128)])
def test_example_configs(name, cache_mb, active, total):
    cfg = load_config(CONFIGS / f"{name}.yaml", ram_bytes=64 * 2**30)
    assert cfg.cache.total_bytes == cache_mb * MB
    assert (cfg.routing.active_experts, cfg.routing.total_experts) == (active, total)
    assert cfg.context_length == 4096


def test_to_dict_round_trips(tmp_path):
    cfg = load_config(None, {"cache.tiers": [{"name": "only", "capacity": 512, "policy": "lfu"}],
                             "batching.admission": {"interactive": 3, "batch": 1}, "server.tcp": "127.0.0.1:8080",
                             "sampling.seed": 7, "threads": 1, "ssd.buffer_size": 8192})
    p = write(tmp_path, yaml.safe_dump(cfg.to_dict()))
    assert load_config(p) == cfg
    assert dict(cfg.batching.admission) == {"interactive": 3, "batch": 1}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.threads = 3


def test_every_problem_at_once_with_its_path(tmp_path):
    p = write(tmp_path, """
cache:
  tiers:
    - {name: hot, capacity: 100}
    - {name: warm, capacity: lots, policy: fifo}
ssd:
  queue_depth: 0
  queu_depth: 3
  direct_io: "yes"
compute:
  dispatch: {Q4K: avx2, Q8_0: amx}
batching:
  admission: weighted_round_robin
server:
  socket_mode: 660
  tcp: 0.0.0.0:80
bogus: 1
""")
    got = problems_of(p)
    want = [
        'bogus: unknown key',
        'cache.tiers[1].capacity: expected MB as a positive integer, got "lots"',
        'cache.tiers[1].policy: expected one of temporal_lru, lru, lfu, got "fifo"',
        'ssd.queu_depth: unknown key (did you mean queue_depth?)',
        'ssd.direct_io: expected true or false, got "yes"',
        'ssd.queue_depth: expected a positive integer',
        'compute.dispatch.Q4K: unknown key (did you mean Q4_K?)',
        'compute.dispatch.Q8_0: expected one of auto, generic, avx2, vnni, got "amx"',
        'batching.admission: expected a mapping of request class',
        'server.socket_mode: expected an octal file mode',
        'server.tcp: 0.0.0.0:80 is not a loopback address',  # without server.api_key_file
    ]
    assert len(got) == len(want), got
    for w in want:
        assert any(line.startswith(w) for line in got), (w, got)
    with pytest.raises(EdgeMoEError) as e:
        load_config(p)
    assert e.value.exit_code == 2
    assert str(e.value).startswith(f"{p}: {len(want)} problems:\n")


def test_cross_checks(tmp_path):
    ram = psutil.virtual_memory().total
    too_big = ram // MB + 1
    got = problems_of(None, {"cache.tiers": [{"name": "a", "capacity": too_big}, {"name": "a", "capacity": 1}],
                             "ssd.fixed_buffers": 16, "ssd.max_buffers": 8, "routing.active_experts": 9,
                             "routing.total_experts": 8, "monitoring.hysteresis": 80,
                             "monitoring.io_pacing.min_queue_depth": 5})
    text = "\n".join(got)
    assert f"capacities add up to {too_big + 1} MB, more than this machine's RAM ({ram // MB} MB)" in text
    assert "cache.tiers[1].name: duplicate tier name" in text
    assert "ssd.max_buffers: 8 is below fixed_buffers 16" in text
    assert "routing.active_experts: 9 active experts exceed total_experts 8" in text
    assert "monitoring.hysteresis: 80 °C must be below nvme_thermal_limit 70 °C" in text
    assert "monitoring.io_pacing.min_queue_depth: 5 exceeds ssd.queue_depth 4" in text
    # The RAM bound is the machine's (psutil) unless given.
    assert problems_of(None, {"cache.tiers[1].capacity": 8192}, ram_bytes=8 * 2**30)
    assert load_config(None, {"cache.tiers[1].capacity": 8192}, ram_bytes=16 * 2**30)


def test_cross_checks_stay_quiet_about_keys_already_wrong():
    got = problems_of(None, {"ssd.max_buffers": "many", "ssd.fixed_buffers": 64})
    assert got == ['ssd.max_buffers: expected a positive integer, got "many" (from --set)']


def test_yaml_values():
    assert load_config(None, {"server.socket_mode": "0600"}).server.socket_mode == 0o600
    assert load_config(None, parse_overrides(["server.socket_mode=0640"])).server.socket_mode == 0o640  # YAML octal
    cfg = load_config(None, {"inference.quantization": "Q4K", "threads": "auto", "routing.pin_layers": [0, 31]})
    assert cfg.inference.quantization == "Q4_K" and cfg.threads is None and cfg.routing.pin_layers == (0, 31)
    assert problems_of(None, {"threads": True}) == ["threads: expected a positive integer, or auto, got true (from --set)"]
    assert problems_of(None, {"ssd.buffer_size": 5000})[0].startswith("ssd.buffer_size: expected a positive multiple")
    assert problems_of(None, {"sampling.top_p": float("nan")})[0].startswith("sampling.top_p: expected a number in (0, 1]")


def test_overrides():
    cfg = load_config(None, {"ssd.queue_depth": 8, "cache.tiers[1].capacity": 512, "cache.tiers.0.policy": "lfu",
                             "monitoring.io_pacing.enabled": False})
    assert cfg.ssd.queue_depth == 8 and cfg.monitoring.io_pacing.enabled is False
    assert [(t.name, t.capacity, t.policy) for t in cfg.cache.tiers] == [("hot", 1024, "lfu"), ("warm", 512, "lru")]
    assert problems_of(None, {"cache.tiers[2].capacity": 1}) == [
        "cache.tiers[2]: no such entry (cache.tiers has 2); override existing entries only (from --set)"]
    assert problems_of(None, {"ssd.queue_depth.x": 1})[0].startswith("ssd.queue_depth.x: cannot set a key inside 4")
    assert parse_overrides(["a.b=8", "c=[0, 1]", "d=true", "e=text", "f="]) == {
        "a.b": 8, "c": [0, 1], "d": True, "e": "text", "f": None}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["novalue"])


def test_file_errors(tmp_path):
    assert "no such file" in problems_of(tmp_path / "missing.yaml")[0]
    assert problems_of(write(tmp_path, "ssd:\n  queue_depth: [1\n"))[0].startswith("line 3, column 1: not valid YAML")
    assert problems_of(write(tmp_path, "- a\n- b\n"))[0].startswith("expected a mapping of settings at the top level")
    assert load_config(write(tmp_path, "# nothing\n")) == Config()
    assert load_config(write(tmp_path, "ssd:\n")) == Config()


def test_names_match_the_engine():
    from edgemoe.config import KERNEL_VARIANTS, QUANT_TYPES
    from edgemoe.kernels import dispatch, kernel_names
    from edgemoe.qtensor import SUPPORTED_TYPES

    assert KERNEL_VARIANTS == dispatch.VARIANTS
    assert list(QUANT_TYPES) == [t.name for t in SUPPORTED_TYPES]
    assert sorted(kernel_names()) == sorted(QUANT_TYPES)
    assert Config().sampling.params() == Config().sampling.params().validate()
    from edgemoe.sampling import SamplingParams

    assert Config().sampling.params() == SamplingParams()


def test_cli_check_and_show(tmp_path, capsys):
    assert main(["config", "check", str(CONFIGS / "default.yaml")]) == 0
    assert capsys.readouterr().out == "ok\n"
    bad = write(tmp_path, "cache:\n  tiers:\n    - {name: a, capacity: lots}\nssd: {queue_depth: 0}\n")
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert 'cache.tiers[0].capacity: expected MB as a positive integer, got "lots"' in err
    assert "ssd.queue_depth:" in err
    assert main(["config", "show", "--config", str(CONFIGS / "qwen3-30b-a3b-8gb.yaml"), "--set", "ssd.queue_depth=2",
                 "--set", "cache.tiers[0].capacity=64"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    cfg = load_config(write(tmp_path, yaml.safe_dump(shown)))
    assert cfg.ssd.queue_depth == 2 and cfg.cache.tiers[0].capacity == 64 and cfg.routing.total_experts == 128

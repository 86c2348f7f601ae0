"""`edgemoe bench` runs end to end and reports its figures next to the bandwidth bound."""

from __future__ import annotations

import json

from edgemoe.cli import main


def test_bench_json_in_ram_and_streaming(capsys, model_gguf):
    assert main(["bench", "-m", model_gguf, "-p", "4", "-n", "3", "--repeat", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["decode_bound_tok_s"] > r["decode_tok_s"]
    assert "cache" not in r
    assert main(["bench", "-m", model_gguf, "-p", "4", "-n", "3", "--repeat", "1", "--cache-mb", "0.1",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["cache"]["bytes_read"] > 0 and r["disk_read_gb_s"] > 0 and 0 < r["of_bound"]

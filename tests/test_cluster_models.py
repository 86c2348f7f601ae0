"""`edgemoe cluster` with two models (one replica each, routed by the request's 'model'), and models that cannot
load: one line, exit 2. Each test starts its own cluster (test_cluster.py's has stopped by then)."""

from __future__ import annotations

import asyncio
import os

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'edgemoe[cluster]')")

from test_cluster import DRAFT, PROMPTS, Cluster, _completion, edgemoe, oracle, run_ids  # noqa: E402, F401, F811


def test_two_models_route_by_model(tmp_path, oracle):  # noqa: F811
    c = Cluster(tmp_path, "-m", os.path.join(os.path.dirname(DRAFT), "default-moe.gguf"), "-m", DRAFT)
    try:
        with c.client() as client:
            ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
            assert ids == ["default-moe.gguf", "draft-moe.gguf"]
            r = client.post("/v1/completions", json={"prompt": "x"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "model"
            r = client.post("/v1/completions", json={"prompt": "x", "model": "nope"})
            assert r.status_code == 404 and "draft-moe.gguf" in r.json()["error"]["message"]

        async def go():
            async with c.aclient() as client:
                return await asyncio.gather(*[
                    _completion(client, p, stream=False, model=m) for p in PROMPTS[:2]
                    for m in ("draft-moe.gguf", "default-moe.gguf")])

        replies = asyncio.run(go())
        draft = {p: run_ids(p, DRAFT) for p in PROMPTS[:2]}
        for (p, m), r in zip([(p, m) for p in PROMPTS[:2] for m in ("draft", "default")], replies):
            assert r["status"] == 200, r
            assert r["ids"] == (draft[p] if m == "draft" else oracle[p]), (p, m)
        assert draft[PROMPTS[0]] != oracle[PROMPTS[0]]  # the two models answer differently: routing is seen
    finally:
        out = c.down()
    assert out.returncode == 0 and "stopped" in out.stdout, out.stderr
    assert not os.path.exists(c.sock) and not os.path.exists(tmp_path / "edgemoe-cluster.json")
    with pytest.raises(ProcessLookupError):
        os.kill(c.pid, 0)


def test_a_model_that_cannot_load_is_one_line(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path), "RAY_AUTH_MODE": "disabled"}
    out = edgemoe("cluster", "up", "-m", str(bad), env=env, timeout=300)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("edgemoe: error: the replicas of 'broken.gguf' could not start: "), out.stderr
    assert "Traceback" not in out.stderr
    out = edgemoe("cluster", "up", "-m", str(tmp_path / "missing.gguf"), env=env, timeout=60)
    assert out.returncode == 2 and "no such file" in out.stderr and "Traceback" not in out.stderr
    out = edgemoe("cluster", "status", env=env, timeout=60)
    assert out.returncode == 2 and "no cluster front door is running" in out.stderr

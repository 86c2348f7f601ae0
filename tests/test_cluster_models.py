"""`edgemoe cluster` with two models (one replica each, routed by the request's 'model'), and models that cannot
load: one line, exit 2. Each test starts its own cluster (test_cluster.py's has stopped by then)."""

from __future__ import annotations

import asyncio
import os
import time

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


def test_max_replicas_scales_on_queue_length(tmp_path):
    """cluster.max_replicas (--max-replicas): 16 streams on one replica make Ray Serve start a second."""
    import threading
    import time

    c = Cluster(tmp_path, "--replicas", "1", "--set", "cluster.max_replicas=2")
    stop = time.monotonic() + 90
    try:
        def load(i: int) -> None:
            with c.client() as client:
                while time.monotonic() < stop:
                    with client.stream("POST", "/v1/completions", json={
                            "prompt": f"The king {i}", "max_tokens": 200, "temperature": 0, "stream": True}) as r:
                        for _ in r.iter_lines():
                            pass

        threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(16)]
        for t in threads:
            t.start()
        states = {}
        with c.client() as client:
            while time.monotonic() < stop:
                states = client.get("/cluster/status").json()["models"]["default-moe.gguf"]["replica_states"]
                if states.get("RUNNING", 0) == 2:
                    break
                time.sleep(1)
        assert states.get("RUNNING", 0) == 2, states
    finally:
        stop = 0
        c.down()


def test_joins_a_running_ray_cluster_and_leaves_it_running(tmp_path):
    """--address: a Ray head started as on a real head node, marked as holding the model; one replica per
    marked node with the node's CPUs; `cluster down` deletes only its own application."""
    import shutil
    import socket
    import subprocess

    ray_cli = shutil.which("ray")
    if ray_cli is None:
        pytest.skip("the ray command is not on PATH")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    start = subprocess.run([ray_cli, "start", "--head", "--port", str(port), "--num-cpus", "2",
                            "--include-dashboard", "false", "--disable-usage-stats",
                            "--resources", '{"edgemoe-model-default-moe.gguf": 1, "edge_box": 1}'],
                           env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr
    try:
        out = edgemoe("cluster", "up", "-m", os.path.join(os.path.dirname(DRAFT), "draft-moe.gguf"), "--address",
                      f"127.0.0.1:{port}", env={**env, "XDG_RUNTIME_DIR": str(tmp_path)}, timeout=120)
        assert out.returncode == 2 and "no node of the Ray cluster is marked as holding model 'draft-moe.gguf'" \
            in out.stderr.strip().splitlines()[-1], out.stderr
        c = Cluster(tmp_path, "--address", f"127.0.0.1:{port}", "--set", "cluster.resources={edge_box: 1}")
        try:
            with c.client() as client:
                r = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0})
                st = client.get("/cluster/status").json()
                for _ in range(60):  # a replica that has just answered may not have reported to the status yet
                    if st["replicas"]:
                        break
                    time.sleep(0.5)
                    st = client.get("/cluster/status").json()
            assert r.status_code == 200
            assert [rep["engine"]["threads"] for rep in st["replicas"]] == [2]  # the node's 2 CPUs
        finally:
            c.down()
        status = subprocess.run([ray_cli, "status", "--address", f"127.0.0.1:{port}"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0, status.stderr  # the cluster it joined still runs
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)

"""`edgemoe cluster`: Ray Serve replicas behind the front door, started as a user starts them (`cluster up
--detach` in a subprocess, a local Ray instance), driven over its UNIX socket. Oracle: `edgemoe run --temp 0`.

On this 2-core machine: two replicas of the embedded model with one CPU each, then one replica per model for
the two-model case.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'edgemoe[cluster]')")

DRAFT = os.path.join(os.path.dirname(__file__), "..", "edgemoe", "data", "draft-moe.gguf")
PROMPTS = ["The king said", "Once upon a time", "My lord, the queen", "What is the"]
N = 24


def edgemoe(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgemoe", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_ids(prompt: str, model: str | None = None, n: int = N) -> list[int]:
    """The oracle: `edgemoe run --temp 0`'s tokens."""
    args = ["run", "-p", prompt, "-n", str(n), "--temp", "0", "--json"] + (["-m", model] if model else [])
    out = edgemoe(*args, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["token_ids"]


class Cluster:
    def __init__(self, root, *up_args: str):
        self.env = {**os.environ, "XDG_RUNTIME_DIR": str(root), "RAY_AUTH_MODE": "disabled"}
        self.sock = os.path.join(root, "edgemoe-cluster.sock")
        out = edgemoe("cluster", "up", "--detach", *up_args, env=self.env, timeout=900)
        assert out.returncode == 0, (out.stdout, out.stderr, _log(root))
        assert "up (pid" in out.stdout
        self.pid = json.load(open(os.path.join(root, "edgemoe-cluster.json")))["pid"]

    def client(self, timeout: float = 300) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=self.sock), base_url="http://edgemoe", timeout=timeout)

    def aclient(self, timeout: float = 300) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=self.sock), base_url="http://edgemoe",
                                 timeout=timeout)

    def down(self) -> subprocess.CompletedProcess:
        return edgemoe("cluster", "down", env=self.env, timeout=120)


def _log(root) -> str:
    try:
        return open(os.path.join(root, "edgemoe-cluster.log")).read()[-3000:]
    except OSError:
        return ""


@pytest.fixture(scope="module")
def oracle():
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(PROMPTS, pool.map(run_ids, PROMPTS)))


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"), "--replicas", "2")
    yield c
    c.down()


async def _completion(client: httpx.AsyncClient, prompt: str, stream: bool, **extra) -> dict:
    """{"status", "ids", "error"} of one completion, streamed or not."""
    body = {"prompt": prompt, "max_tokens": extra.pop("max_tokens", N), "temperature": 0, "stream": stream, **extra}
    if not stream:
        r = await client.post("/v1/completions", json=body)
        d = r.json()
        if r.status_code != 200:
            return {"status": r.status_code, "ids": None, "error": d["error"]["message"]}
        return {"status": 200, "ids": d["choices"][0]["token_ids"], "error": None, "model": d["model"]}
    ids, error, done = [], None, False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                d = json.loads(line[6:])
                if "error" in d:
                    error = d["error"]["message"]
                else:
                    ids += d["choices"][0]["token_ids"]
    assert done, "a stream must end with [DONE]"
    return {"status": r.status_code, "ids": ids, "error": error}


def test_32_concurrent_requests_equal_run(two_replicas, oracle):
    async def go():
        async with two_replicas.aclient() as client:
            jobs = [_completion(client, PROMPTS[i % 4], stream=i % 2 == 1) for i in range(32)]
            return await asyncio.gather(*jobs)

    replies = asyncio.run(go())
    for i, r in enumerate(replies):
        assert r["status"] == 200 and r["error"] is None, r
        assert r["ids"] == oracle[PROMPTS[i % 4]], f"request {i} ({PROMPTS[i % 4]!r}) differs from edgemoe run"
    with two_replicas.client() as client:
        st = client.get("/cluster/status").json()
    # both replicas took part (Ray sends each request to the replica with the shorter queue)
    assert len(st["replicas"]) == 2
    time.sleep(1.5)  # one report interval
    with two_replicas.client() as client:
        st = client.get("/cluster/status").json()
    assert all(r["tokens_generated"] > 0 for r in st["replicas"]), st["replicas"]


def test_status_health_models_and_metrics(two_replicas):
    import prometheus_client.parser as prom  # Ray Serve's dependency: the exposition format's own parser

    with two_replicas.client() as client:
        health = client.get("/health")
        models = client.get("/v1/models").json()
        metrics = client.get("/metrics").text
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["models"]["default-moe.gguf"]["replicas_running"] == 2
    assert [m["id"] for m in models["data"]] == ["default-moe.gguf"]
    families = {f.name: f for f in prom.text_string_to_metric_families(metrics)}
    replicas = {s.labels["replica"] for s in families["edgemoe_tokens_generated"].samples}
    assert len(replicas) == 2
    assert {s.labels["state"] for s in families["edgemoe_cluster_replicas"].samples} == {"RUNNING"}
    out = edgemoe("cluster", "status", env=two_replicas.env)
    assert out.returncode == 0, out.stderr
    assert "model default-moe.gguf: 2 running" in out.stdout
    assert sum(line.split()[4] == "up" for line in out.stdout.splitlines()[2:]) == 2, out.stdout
    out = edgemoe("cluster", "status", "--json", env=two_replicas.env)
    assert json.loads(out.stdout)["models"]["default-moe.gguf"]["replicas_running"] == 2


def test_bad_requests_get_the_servers_answers(two_replicas):
    with two_replicas.client() as client:
        r = client.post("/v1/completions", content=b"{not json")
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = client.get("/v1/models/nope")
        assert r.status_code == 404
        r = client.post("/tokenize", json={"content": "The king said"})
        assert r.status_code == 200 and r.json()["tokens"] == [346, 713, 1168]


def test_a_replica_killed_mid_load(two_replicas, oracle):
    """Kill one replica's process while 16 requests run: each completes, or (streamed, on the killed replica) ends
    with an error event; none hangs. Ray brings the replica back, and then every request succeeds."""
    with two_replicas.client() as client:
        victim = client.get("/cluster/status").json()["replicas"][0]["pid"]

    async def go():
        async with two_replicas.aclient(timeout=120) as client:
            jobs = [asyncio.create_task(_completion(client, PROMPTS[i % 4], stream=i % 2 == 0, max_tokens=200))
                    for i in range(16)]
            await asyncio.sleep(1.0)
            os.kill(victim, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*jobs), 180)

    replies = asyncio.run(go())
    broken = 0
    for r in replies:
        assert r["status"] == 200, r
        if r["error"] is not None:
            assert "lost mid-reply" in r["error"], r
            broken += 1
        else:
            assert len(r["ids"]) == 200
    assert broken < 16
    deadline = time.monotonic() + 120
    with two_replicas.client() as client:
        while time.monotonic() < deadline:
            h = client.get("/health")
            up = {r["pid"] for r in h.json()["replicas"] if r["up"]}
            if h.status_code == 200 and h.json()["models"]["default-moe.gguf"]["replicas_running"] == 2 and len(
                    up) == 2 and victim not in up:  # the new replica reports; the killed one is shown down
                break
            time.sleep(1)
        else:
            pytest.fail(f"the killed replica did not come back: {h.json()}")

    async def after():
        async with two_replicas.aclient() as client:
            return await asyncio.gather(*[_completion(client, PROMPTS[i % 4], stream=i % 2 == 0) for i in range(8)])

    for i, r in enumerate(asyncio.run(after())):
        assert r["status"] == 200 and r["ids"] == oracle[PROMPTS[i % 4]], r


def test_a_shared_prompt_start_goes_back_to_its_replica(two_replicas):
    """router.py: prompts that share their first 256 bytes go to the replica that served the first (its prompt
    cache holds those rows) while the queues are even; Ray's power of two choices alone spreads idle-time
    requests at random (all ten on one replica: p = 0.2 %)."""
    long = "The king said to the queen, " * 12  # 336 bytes
    with two_replicas.client() as client:
        served = []
        for i in range(10):
            r = client.post("/v1/completions", json={"prompt": f"{long}and {i}", "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200
            served.append(r.headers["x-edgemoe-replica"])
        assert len(set(served)) == 1, served
        time.sleep(1.5)  # the replicas report once a second
        metrics = client.get("/metrics").text
    line = next(ln for ln in metrics.splitlines() if ln.startswith("edgemoe_prompt_tokens_reused_total")
                and f'replica="{served[0]}"' in ln)
    assert float(line.rsplit(" ", 1)[1]) >= 9 * 60  # each later prompt reused the ~80 tokens of the shared start


def test_started_as_the_cluster_unit_starts_it(tmp_path, oracle):
    """edgemoe-cluster.service as `edgemoe service install --cluster` writes it, started as systemd starts it: its
    ExecStart in the unit's environment (RuntimeDirectory=, NOTIFY_SOCKET, HOME=, the Environment= lines; the test's
    Numba cache instead of the unit's): READY=1 once the replicas answer, greedy output equal to `edgemoe run`,
    and on SIGTERM (systemctl stop) exit 0 with its socket and state file gone."""
    import socket

    from edgemoe.cli import main

    units, config, run_dir = tmp_path / "units", tmp_path / "etc" / "edgemoe.yaml", tmp_path / "run"
    assert main(["service", "install", "--cluster", "--prefix", sys.prefix, "--unit-dir", str(units),
                 "--config", str(config)]) == 0
    lines = (units / "edgemoe-cluster.service").read_text().splitlines()
    (exec_start,) = [x.removeprefix("ExecStart=").split() for x in lines if x.startswith("ExecStart=")]
    assert exec_start[1:] == ["-m", "edgemoe", "cluster", "up", "--config", str(config)]
    unit_env = dict(x.removeprefix("Environment=").split("=", 1) for x in lines if x.startswith("Environment="))
    unit_env.pop("NUMBA_CACHE_DIR")
    unit_env["HOME"] = unit_env["HOME"].replace("%S", str(tmp_path / "state"))
    run_dir.mkdir()
    (tmp_path / "state" / "edgemoe").mkdir(parents=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(1.0)
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env.update(unit_env, RUNTIME_DIRECTORY=str(run_dir), NOTIFY_SOCKET=str(tmp_path / "notify"),
               RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen(exec_start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        said, deadline = [], time.monotonic() + 600
        while "READY=1" not in said and proc.poll() is None and time.monotonic() < deadline:
            try:
                said += notify.recv(4096).decode().split("\n")
            except TimeoutError:
                pass
        assert "READY=1" in said, (said, proc.poll())
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(run_dir / "edgemoe-cluster.sock")),
                          base_url="http://edgemoe", timeout=300) as client:
            assert client.get("/health").status_code == 200
            r = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": N, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == oracle[PROMPTS[0]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert not (run_dir / "edgemoe-cluster.sock").exists() and not (run_dir / "edgemoe-cluster.json").exists()

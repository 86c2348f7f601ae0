"""`edgemoe cluster up | status | down`: models served by Ray Serve replicas behind one front door (edgemoe/cluster/).

`up` joins the Ray cluster at --address (cluster.address), or starts a local instance, deploys each model's
replicas, and serves the front door on a UNIX socket and/or TCP until SIGTERM (then takes its replicas down);
with --detach it starts itself in the background and returns once the front door answers. `status` and `down`
find a running front door through the state file `up` writes (`state_path`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

from ..config import add_config_arguments, config_from_args
from ..errors import EdgeMoEError, UsageError

log = logging.getLogger("edgemoe.cluster")
READY_WAIT_S = 900.0  # --detach: how long `up` waits for the front door (loading and compiling included)


class ClusterError(EdgeMoEError):
    """The cluster did not start or stop as asked (exit 1: not a usage mistake)."""

    exit_code = 1


def setup_arg_parser(p) -> None:
    sub = p.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="deploy the models on Ray Serve and serve the front door",
                        description="Deploy each model's replicas on Ray Serve (a local Ray instance unless "
                                    "--address) and serve one OpenAI-compatible endpoint in front of them")
    up.add_argument("-m", "--model", action="append", metavar="MODEL",
                    help="a model to serve (GGUF, HF directory or pack), repeatable; requests choose by their "
                         "'model' field, the file's name (default: the config's inference.model, else the "
                         "embedded model)")
    up.add_argument("--replicas", type=int, metavar="N",
                    help="replicas per model (default: cluster.replicas, else one per node marked with the "
                         "model's resource; 1 on a local instance)")
    up.add_argument("--max-replicas", type=int, metavar="N",
                    help="scale each model between --replicas and N on queue length (cluster.max_replicas)")
    up.add_argument("--cpus-per-replica", type=int, metavar="N",
                    help="CPUs each replica asks for, and its compute threads (cluster.cpus_per_replica; default: "
                         "the cores shared out on a local instance, else the node's CPUs)")
    up.add_argument("--address", metavar="HOST:PORT",
                    help="join this Ray cluster ('auto': the one this machine joined) instead of starting a local "
                         "instance (cluster.address)")
    up.add_argument("--socket", metavar="PATH",
                    help="the front door's UNIX socket (default: server.socket, else edgemoe-cluster.sock where "
                         "`edgemoe serve` would put its socket; none when only --tcp is given)")
    up.add_argument("--tcp", metavar="HOST:PORT",
                    help="listen on TCP too (an address other than loopback needs --api-key-file or --api-key)")
    up.add_argument("--api-key-file", metavar="FILE", help="as for `edgemoe serve`")
    up.add_argument("--api-key", metavar="KEY", help="as for `edgemoe serve`")
    up.add_argument("--grace", type=float, default=10.0,
                    help="on SIGTERM, seconds running requests may finish (default 10)")
    up.add_argument("--detach", action="store_true",
                    help="run in the background (logs next to the state file); return once the front door answers")
    add_config_arguments(up)
    status = sub.add_parser("status", help="replicas, nodes, queues, tok/s and cache hit rates",
                            description="Show every model's replicas: node, state, queue, tok/s and hit rate")
    status.add_argument("--json", action="store_true", help="print the front door's /cluster/status as JSON")
    _where(status)
    down = sub.add_parser("down", help="stop the front door and take its replicas down",
                          description="Stop the running `edgemoe cluster up` (SIGTERM) and wait for it to end")
    down.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it to end (default 60)")


def _where(p) -> None:
    p.add_argument("--socket", metavar="PATH", help="the front door's socket (default: from the state file)")
    p.add_argument("--tcp", metavar="HOST:PORT", help="the front door's TCP address (default: from the state file)")


def state_path() -> str:
    """Where `up` records its pid and addresses: next to the socket `edgemoe serve` would use by default."""
    from .serve import default_socket

    return os.path.join(os.path.dirname(default_socket()), "edgemoe-cluster.json")


def _load_state() -> dict | None:
    """The state file's content, whether or not its process still runs."""
    try:
        with open(state_path()) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("pid"), int) else None


def read_state() -> dict | None:
    """The running front door's state, or None (no file, or its process is gone)."""
    state = _load_state()
    try:
        if state is not None:
            os.kill(state["pid"], 0)
    except OSError:
        return None
    return state


def main(args) -> int:
    return {"up": up, "status": status, "down": down}[args.cluster_command](args)


# ------------------------------------------------------------------------------------------------------- up

def up(args) -> int:
    if args.detach:
        return _detach(args)
    import asyncio

    import uvicorn

    from ..cluster import deploy
    from ..cluster.front import FrontDoor, build_front
    from ..cluster.registry import start_registry
    from ..server import sdnotify
    from ..server.limits import HttpLimits, fit_to_nofile
    from ..server.noise import Throttle
    from .serve import api_key, bind_tcp, bind_unix, default_socket, parse_tcp

    logging.basicConfig(level=logging.INFO, format="edgemoe: %(message)s", stream=sys.stderr)
    cfg = config_from_args(args)
    c = cfg.cluster
    plans = _plans(args, cfg)
    address = args.address or c.address
    if args.address is not None:
        from ..config import RAY_ADDRESS

        if not RAY_ADDRESS.check(args.address)[0]:
            raise UsageError(f"--address {args.address[:80]!r}: expected {RAY_ADDRESS.what}")
    tcp = args.tcp or cfg.server.tcp
    if tcp:
        parse_tcp(tcp)
    key = api_key(args, cfg, tcp)
    limits = fit_to_nofile(HttpLimits())
    deploy.import_ray()
    running = read_state()
    if running is not None:
        raise UsageError(f"a cluster front door is running already (pid {running['pid']}); stop it with "
                         "`edgemoe cluster down`")
    path = args.socket or cfg.server.socket or (None if tcp else os.path.join(
        os.path.dirname(default_socket()), "edgemoe-cluster.sock"))
    sockets, unix_path, started, handles = [], None, False, {}
    try:
        if path is not None:
            sockets.append(bind_unix(path, cfg.server.socket_mode, limits.backlog))
            unix_path = path
        if tcp:
            sockets.append(bind_tcp(tcp, limits.backlog))
        where = " and ".join(([unix_path] if unix_path else []) + ([f"http://{tcp}"] if tcp else []))
        sdnotify.notify("STATUS=starting Ray")
        if address:
            log.info("joining the Ray cluster at %s", address)
            deploy.join(address)
            for p in plans:
                deploy.fit_to_nodes(p, cpus_set=bool(args.cpus_per_replica or c.cpus_per_replica),
                                    replicas_set=bool(args.replicas or c.replicas))
        else:
            log.info("starting a local Ray instance")
            deploy.start_local(plans)
        started = True
        registry = start_registry()
        sdnotify.notify("STATUS=deploying replicas")
        handles = deploy.deploy(plans, dict(c.resources), args.grace)
        front = FrontDoor(handles, registry, limits, Throttle(log), listening=where)
        config = uvicorn.Config(build_front(front, key), lifespan="off", log_level="warning", access_log=False,
                                timeout_graceful_shutdown=args.grace + 5, backlog=limits.backlog,
                                timeout_keep_alive=limits.keep_alive_s)
        server = _make_server(config, {"pid": os.getpid(), "socket": unix_path, "tcp": tcp,
                                  "models": [p.name for p in plans], "address": address or "local"})
        log.info("serving %s on %s", ", ".join(f"{p.name} ({p.replicas} replica(s))" for p in plans), where)
        # uvicorn re-raises the SIGTERM that stopped it once it has: with Ray's handler in place that would end
        # the process with status 15 (systemd: "failed") after the replicas are down; a stop is a clean exit
        signal.signal(signal.SIGTERM, lambda *_: None)
        asyncio.run(server.serve(sockets=sockets))
    finally:
        for s in sockets:
            s.close()
        if unix_path is not None:
            _remove(unix_path)
        if started:
            log.info("taking the replicas down")
            deploy.undeploy(list(handles))
    log.info("stopped")
    return 0


def _plans(args, cfg) -> list:
    from ..cluster.deploy import Plan, model_name, model_resource

    c = cfg.cluster
    models = args.model or [cfg.inference.model]
    for flag, v in (("--replicas", args.replicas), ("--max-replicas", args.max_replicas),
                    ("--cpus-per-replica", args.cpus_per_replica)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be at least 1, got {v}")
    replicas = args.replicas or c.replicas or 1
    max_replicas = args.max_replicas or c.max_replicas
    if max_replicas is not None and max_replicas < replicas:
        raise UsageError(f"--max-replicas (cluster.max_replicas) {max_replicas} is below --replicas {replicas}")
    total = (max_replicas or replicas) * len(models)
    cpus = args.cpus_per_replica or c.cpus_per_replica or max(1, (os.cpu_count() or 1) // total)
    plans, seen = [], {}
    for m in models:
        if m is not None and not os.path.exists(m) and not (args.address or c.address):
            raise UsageError(f"model {m}: no such file or directory")
        name = model_name(m)
        if name in seen:
            raise UsageError(f"models {seen[name]} and {m} share the name '{name}' that requests choose them by; "
                             "rename one")
        seen[name] = m
        argv = (["-m", os.path.abspath(m)] if m is not None else []) + _config_argv(args)
        plans.append(Plan(name, argv, replicas, max_replicas, cpus, model_resource(name),
                          cfg.batching.max_batch, cfg.batching.max_queue))
    return plans


def _config_argv(args) -> list[str]:
    out = ["--config", os.path.abspath(args.config)] if args.config else []
    for item in args.overrides:
        out += ["--set", item]
    return out


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _make_server(config, state: dict):
    """A uvicorn.Server that writes the state file (and tells systemd) once it listens, and removes the file when
    it stops."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                from ..server import sdnotify

                _write_state(state)
                sdnotify.notify("READY=1")
                sdnotify.notify("STATUS=ready")

        async def shutdown(self, sockets=None) -> None:
            _remove(state_path())
            await super().shutdown(sockets=sockets)

    return Server(config)


def _write_state(state: dict) -> None:
    path = state_path()
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({**state, "started": time.time()}, f)
    os.replace(tmp, path)


def _detach(args) -> int:
    argv = [a for a in sys.argv[1:] if a != "--detach"]
    log_path = os.path.join(os.path.dirname(state_path()), "edgemoe-cluster.log")
    with open(log_path, "ab") as out:
        child = subprocess.Popen([sys.executable, "-m", "edgemoe", *argv], stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=out, start_new_session=True)
    deadline = time.monotonic() + READY_WAIT_S
    while time.monotonic() < deadline:
        state = read_state()
        if state is not None and state["pid"] == child.pid:
            where = " and ".join(([state["socket"]] if state["socket"] else []) +
                                 ([f"http://{state['tcp']}"] if state["tcp"] else []))
            print(f"edgemoe cluster: up (pid {child.pid}), serving {', '.join(state['models'])} on {where}; "
                  f"logs: {log_path}")
            return 0
        if child.poll() is not None:
            tail = _tail(log_path)
            raise ClusterError(f"the cluster did not start (exit {child.returncode}): {tail}")
        time.sleep(0.5)
    raise ClusterError(f"the cluster did not answer within {READY_WAIT_S:g} s; see {log_path} (pid {child.pid})",
                       exit_code=1)


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read().splitlines()[-20:] if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if "error" in ln]
    return (errors or lines or ["no log"])[-1][:300]


# --------------------------------------------------------------------------------------------- status, down

def _client(args):
    from ..client import Client

    socket_path, tcp = args.socket, args.tcp
    if socket_path is None and tcp is None:
        state = read_state()
        if state is None:
            raise UsageError("no cluster front door is running (no state file at "
                             f"{state_path()}); start one with `edgemoe cluster up`, or pass --socket/--tcp")
        socket_path, tcp = state["socket"], state["tcp"]
    if socket_path is not None:
        return Client(socket=socket_path, timeout=30.0)
    return Client(base_url=f"http://{tcp}", timeout=30.0)


def status(args) -> int:
    with _client(args) as client:
        r = client._send("GET", "/cluster/status")
    if r.status_code != 200:
        raise ClusterError(f"the front door answered {r.status_code}: {r.text[:200]}")
    c = r.json()
    if args.json:
        print(json.dumps(c, indent=2))
        return 0
    print(f"front door pid {c['front_door']['pid']} on {c['front_door']['listening']}, up "
          f"{c['front_door']['uptime_seconds']:.0f} s; requests: "
          + (", ".join(f"{k} {v}" for k, v in sorted(c["front_door"]["requests"].items())) or "none"))
    for name, m in c["models"].items():
        states = ", ".join(f"{v} {k.lower()}" for k, v in sorted(m["replica_states"].items())) or "no replicas"
        print(f"model {name}: {states}")
    rows = [("REPLICA", "MODEL", "NODE", "PID", "STATE", "QUEUE", "RUNNING", "TOK/S", "HIT RATE", "THREADS")]
    for r in c["replicas"]:
        hit = "-" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f}%"
        state = "up" if r["up"] else f"silent {r['silent_s']:.0f}s"
        rows.append((r["replica"], r["model"], r["node"], str(r["pid"]), state, str(r["queue"]), str(r["running"]),
                     f"{r['tokens_per_second']:.1f}", hit, str(r["engine"].get("threads", "-"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


def down(args) -> int:
    state = read_state()
    if state is None:
        left = _load_state()
        print("edgemoe cluster: no front door is running" + (
            f" (pid {left['pid']} in {state_path()} has exited without cleaning up; `ray stop` ends the Ray "
            "processes it may have left)" if left else ""))
        if left:
            _remove(state_path())
        return 0
    pid = state["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"edgemoe cluster: stopped (pid {pid})")
            return 0
        time.sleep(0.2)
    raise ClusterError(f"the front door (pid {pid}) did not stop within {args.timeout:g} s; `kill -9 {pid}` and "
                       "`ray stop` end it")

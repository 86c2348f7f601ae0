"""A Ray Serve replica: `edgemoe serve`'s service for one model — the same session, engine and routes — answering
the requests the front door forwards (bridge.py), and reporting its figures to the registry (registry.py)."""

from __future__ import annotations

import argparse
import logging
import os
import threading

from ..errors import EdgeMoEError
from .bridge import call_app
from .registry import REPORT_S, find_registry

log = logging.getLogger("edgemoe.cluster")
SHUTDOWN_GRACE_S = 10.0


def replica_arguments(argv: list[str]) -> argparse.Namespace:
    """`argv` read as `edgemoe serve` reads its command line (-m, --config, --threads and the rest)."""
    from ..commands import serve

    p = argparse.ArgumentParser(prog="edgemoe cluster replica", add_help=False)
    serve.setup_arg_parser(p)
    return p.parse_args(argv)


class Replica:
    """One model's engine inside a Ray Serve replica; `argv` is its `edgemoe serve` command line."""

    def __init__(self, argv: list[str], model_name: str):
        from ..commands.serve import build_service
        from ..config import config_from_args
        from ..server.app import build_app
        from ..server.limits import HttpLimits
        from ..server.noise import Throttle

        logging.basicConfig(level=logging.INFO, format="edgemoe: %(message)s")
        self.nice = _unlower_priority()
        try:
            args = replica_arguments(argv)
            cfg = config_from_args(args)
            self.session, self.engine, self.service = build_service(args, cfg, HttpLimits(), Throttle(log))
        except EdgeMoEError as e:  # the front door prints this line (deploy.deploy_error)
            raise RuntimeError(f"edgemoe: error: {e}") from None
        self.engine.start()
        self.app = build_app(self.service)
        self.model_name = model_name
        self.id = _replica_id()
        self._headers = [(b"x-edgemoe-replica", self.id.encode())]
        self._stop = threading.Event()
        self._reporter = threading.Thread(target=self._report_loop, name="edgemoe-report", daemon=True)
        self._reporter.start()

    async def http(self, item: dict):
        """The response to one forwarded request, as bridge.call_app yields it."""
        async for part in call_app(self.app, item, self._headers):
            yield part

    async def whole(self, item: dict) -> dict:
        """The response to one forwarded request in one piece (a reply that is not streamed)."""
        parts = [part async for part in call_app(self.app, item, self._headers)]
        return {**parts[0], "body": parts[0]["body"] + b"".join(parts[1:]), "more": False}

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine thread stopped is replaced."""
        if not self.engine.is_alive():
            raise RuntimeError("the engine thread stopped")

    def figures(self) -> dict:
        """What `edgemoe cluster status` shows of this replica, and its Prometheus text."""
        from ..server.app import _cache_figures
        from ..server.metrics import prometheus

        snap = self.engine.metrics.snapshot()
        cache = _cache_figures(self.engine.core.model)
        import ray

        return {"model": self.model_name, "node": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "engine_alive": self.engine.is_alive(), "nice": self.nice, "queue": snap["queue_length"],
                "running": snap["running"],
                "tokens_per_second": snap["tokens_per_second"], "tokens_generated": snap["tokens_generated"],
                "requests": snap["requests"], "hit_rate": None if cache is None else cache["hit_rate"],
                "engine": self.service.info(), "prometheus": prometheus(snap, cache)}

    def _report_loop(self) -> None:
        registry = None
        while not self._stop.wait(REPORT_S):
            try:
                registry = registry or find_registry()
                if registry is not None:
                    registry.report.remote(self.id, self.figures())
            except Exception as e:  # noqa: BLE001 - figures are best effort; the next round tries again
                log.debug("report failed: %s", e)
                registry = None

    def __del__(self):  # Ray Serve's graceful shutdown of the replica
        stop = getattr(self, "_stop", None)
        if stop is None:
            return
        stop.set()
        try:
            registry = find_registry()
            if registry is not None:
                registry.leave.remote(self.id)
        except Exception:  # noqa: BLE001 - the cluster may be going down with us
            pass
        self.engine.shutdown(SHUTDOWN_GRACE_S)
        self.engine.join(SHUTDOWN_GRACE_S + 5)
        self.session.close()


def _unlower_priority() -> int:
    """Ray starts its workers at nice 15, below every other process of the box; the model's threads (created
    from this one from here on: Linux priorities are per thread and inherited) go back to the priority `edgemoe
    serve` would run at when this user may raise it. Returns the niceness they run at."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:  # an unprivileged user may not lower a niceness
        pass
    return os.getpriority(os.PRIO_PROCESS, 0)


def _replica_id() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().replica_tag
    except Exception:  # noqa: BLE001 - outside a replica (tests build one directly)
        return f"pid-{os.getpid()}"

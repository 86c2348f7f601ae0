"""Where replicas report their figures, so `edgemoe cluster status`, /health and /metrics see every replica.

A Ray actor named REGISTRY in NAMESPACE, owned by the front door's process (it ends with it). Each replica sends
its figures every REPORT_S (replica.py); a replica silent for STALE_S is shown down, and forgotten after
FORGET_S (Ray Serve has replaced it by then).
"""

from __future__ import annotations

import time

NAMESPACE = "edgemoe"
REGISTRY = "edgemoe-cluster-registry"
REPORT_S = 1.0
STALE_S = 3.0
FORGET_S = 120.0


class Registry:
    """The latest figures of each replica, keyed by Ray Serve's replica id."""

    def __init__(self):
        self._reports: dict[str, dict] = {}

    def report(self, replica: str, figures: dict) -> None:
        self._reports[replica] = {**figures, "seen": time.time()}

    def leave(self, replica: str) -> None:
        """A replica shutting down cleanly."""
        self._reports.pop(replica, None)

    def reports(self) -> dict[str, dict]:
        """Every replica heard from in the last FORGET_S, each with "up" (heard from in the last STALE_S) and
        "silent_s"."""
        now = time.time()
        for replica in [r for r, f in self._reports.items() if now - f["seen"] > FORGET_S]:
            del self._reports[replica]
        return {r: {**f, "silent_s": round(now - f["seen"], 1), "up": now - f["seen"] <= STALE_S}
                for r, f in self._reports.items()}


def start_registry():
    """The registry actor for this front door (a stale one left by a killed front door is replaced)."""
    import ray

    try:
        ray.kill(ray.get_actor(REGISTRY, namespace=NAMESPACE))
    except ValueError:
        pass
    return ray.remote(num_cpus=0)(Registry).options(name=REGISTRY, namespace=NAMESPACE).remote()


def find_registry():
    """The running registry actor, or None."""
    import ray

    try:
        return ray.get_actor(REGISTRY, namespace=NAMESPACE)
    except ValueError:
        return None

"""Which replica takes a request: Ray Serve's power of two choices (the shorter queue of two replicas), except
that a prompt starting like one a replica served recently goes back to that replica — its prompt cache holds
the KV rows of the shared start (edgemoe/engine/prefix_cache.py) — while its queue is at most SLACK requests
longer than the shortest.

The front door puts the key in each forwarded request (`affinity_key`): a hash of the prompt's (or the chat
messages') first PREFIX_BYTES bytes, for prompts at least that long; shorter prompts have little to reuse.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

PREFIX_BYTES = 256
SLACK = 2  # requests: how much longer the owner's queue may be than the shortest before the prefix is ignored
REMEMBERED = 4096  # prefixes remembered (least recently routed forgotten first)


def affinity_key(body: object) -> str | None:
    """The key of a parsed request body, or None (no prompt, or a short one)."""
    if not isinstance(body, dict):
        return None
    prompt = body.get("messages", body.get("prompt"))
    if prompt is None:
        return None
    raw = prompt.encode("utf-8", "replace") if isinstance(prompt, str) else json.dumps(
        prompt, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")
    if len(raw) < PREFIX_BYTES:
        return None
    return hashlib.blake2b(raw[:PREFIX_BYTES], digest_size=12).hexdigest()


class PrefixAffinityRouter(PowerOfTwoChoicesRequestRouter):
    """Power of two choices with prefix affinity (the module docstring)."""

    def initialize_state(self, slack: int = SLACK, remembered: int = REMEMBERED, **kwargs) -> None:
        super().initialize_state(**kwargs)
        self._slack = slack
        self._remembered = remembered
        self._owners: OrderedDict[str, object] = OrderedDict()  # key → the ReplicaID that served it last

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        fallback = await super().choose_replicas(candidate_replicas, pending_request)
        key = _key(pending_request)
        owner_id = None if key is None else getattr(self, "_owners", {}).get(key)
        owner = next((r for r in candidate_replicas if r.replica_id == owner_id), None)
        if owner is None or not self._balanced(owner, candidate_replicas):
            return fallback
        return [[owner], *fallback]  # the owner, unless its queue is full; then the usual two

    def _balanced(self, owner, candidates) -> bool:
        cache = getattr(self, "_replica_queue_len_cache", None)
        if cache is None:
            return True
        lens = {r.replica_id: cache.get(r.replica_id) for r in candidates}
        known = [n for n in lens.values() if n is not None]
        mine = lens.get(owner.replica_id)
        return mine is None or not known or mine - min(known) <= self._slack

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        key = _key(pending_request)
        owners = getattr(self, "_owners", None)
        if key is None or owners is None:
            return
        owners[key] = replica_id
        owners.move_to_end(key)
        while len(owners) > self._remembered:
            owners.popitem(last=False)

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        owners = getattr(self, "_owners", {})
        for key in [k for k, r in owners.items() if r == replica_id]:
            del owners[key]


def _key(pending_request) -> str | None:
    args = getattr(pending_request, "args", None)
    if not args or not isinstance(args[0], dict):
        return None
    return args[0].get("affinity")

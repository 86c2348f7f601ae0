"""Build a StreamingExperts store for a GGUF file (packed or not) from the run's settings.

A pack's experts are checked against its manifest as they are read (`verify_checksums`, on unless the
config turns it off); a pack whose manifest is missing streams unverified, after a one-line warning.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelFormatError, UsageError
from .buffers import ALIGN
from .cache import ExpertCache, TierSpec
from .extents import gguf_extents
from .io import ExpertReader
from .streaming import StreamingExperts

MB = 1 << 20


@dataclass(frozen=True)
class StreamOptions:
    """How experts are streamed: cache tiers (hottest first), reader settings, prefetch."""

    tiers: tuple[TierSpec, ...]
    pin_layers: tuple[int, ...] = ()
    direct_io: bool = True
    queue_depth: int = 4
    fixed_buffers: int = 8
    max_buffers: int = 32
    buffer_bytes: int | None = None  # None: the largest expert
    verify_checksums: bool = True  # a pack's experts against its manifest's CRC-32s (other files have none)
    prefetch: bool = True
    prefetch_depth: int = 1  # layers ahead whose experts are predicted and prefetched (with prefetch)

    @classmethod
    def from_budget(cls, cache_mb: float, **kw) -> StreamOptions:
        """One budget split as the default config does: a quarter hot, the rest warm."""
        if cache_mb < 0:
            raise UsageError(f"--cache-mb must be >= 0, got {cache_mb}")
        total = int(cache_mb * MB)
        hot = total // 4
        # Promotion into hot: reused within about one half-life of the temporal score.
        tiers = (TierSpec("hot", hot, "temporal_lru", 1.5), TierSpec("warm", total - hot, "temporal_lru", None))
        return cls(tiers=tiers, **kw)

    @classmethod
    def from_config(cls, cfg, cache_mb: float | None = None, prefetch_depth: int | None = None) -> StreamOptions:
        """prefetch_depth: layers ahead to prefetch (0: none; None: the config's routing.prefetch_depth)."""
        ssd = cfg.ssd
        depth = cfg.routing.prefetch_depth if prefetch_depth is None else prefetch_depth
        kw = dict(pin_layers=tuple(cfg.routing.pin_layers), direct_io=ssd.direct_io, queue_depth=ssd.queue_depth,
                  fixed_buffers=ssd.fixed_buffers, max_buffers=ssd.max_buffers, buffer_bytes=ssd.buffer_size,
                  verify_checksums=ssd.verify_checksums, prefetch=depth > 0, prefetch_depth=max(depth, 1))
        if cache_mb is not None:
            return cls.from_budget(cache_mb, **kw)
        tiers = cfg.cache.tiers  # hottest first; a tier's pin_threshold promotes into it, so the coldest has none
        specs = tuple(TierSpec(t.name, t.capacity_bytes, t.policy, t.pin_threshold if n < len(tiers) - 1 else None)
                      for n, t in enumerate(tiers))
        return cls(tiers=specs, **kw)


def manifest_checksums(path: str, extents: list[list]) -> tuple[str, dict]:
    """(the CRC algorithm, (layer, expert) → CRC hex) from the manifest beside a pack, checked against the
    pack's size and the byte ranges the GGUF index gives (`extents`); no entries when there is no manifest (a
    pack without one gets a warning)."""
    from ..pack.manifest import CHECKSUM, check_pack, checksum_algorithm

    m = check_pack(path, checksums=False)
    if m is None:
        return CHECKSUM, {}
    n_layers, n_experts = len(extents), max((len(x) for x in extents), default=0)
    out = {}
    for x in m["experts"]:
        key = (x["layer"], x["expert"])
        if key[0] >= n_layers or key[1] >= len(extents[key[0]]):
            raise ModelFormatError(f"{path}: its manifest lists expert {key[1]} of layer {key[0]}, but the model has "
                                   f"{n_experts} experts in {n_layers} layers: the manifest belongs to another "
                                   "pack; run 'edgemoe partition' again")
        ranges = extents[key[0]][key[1]].ranges
        if ranges != ((x["byte_offset"], x["byte_length"]),):
            raise ModelFormatError(f"{path}: its manifest puts expert {key[1]} of layer {key[0]} at bytes "
                                   f"{x['byte_offset']}+{x['byte_length']}, the file's tensors at {list(ranges)}: "
                                   "the manifest belongs to another pack; run 'edgemoe partition' again")
        out[key] = x["checksum"]
    total = sum(len(x) for x in extents)
    if len(out) != total:
        missing = next((i, e) for i in range(n_layers) for e in range(len(extents[i])) if (i, e) not in out)
        raise ModelFormatError(f"{path}: its manifest has no entry for expert {missing[1]} of layer {missing[0]} "
                               f"({len(out)} of {total} experts): the manifest belongs to another "
                               "pack; run 'edgemoe partition' again")
    return checksum_algorithm(m), out


def streaming_store(path: str, tensors: dict, args, opt: StreamOptions) -> StreamingExperts:
    """The experts of the GGUF file at `path` (tensor index `tensors`, a model of ModelArgs `args`) read on demand."""
    extents = gguf_extents(tensors, args.num_hidden_layers, args.num_local_experts, args.dense_layers)
    algorithm, checksums = manifest_checksums(path, extents) if opt.verify_checksums else ("crc32c", None)
    largest = max(ext.nbytes + 2 * ALIGN * len(ext.ranges) for layer in extents for ext in layer)
    reader = ExpertReader(path, direct_io=opt.direct_io, queue_depth=opt.queue_depth,
                          fixed_buffers=opt.fixed_buffers, max_buffers=max(opt.max_buffers, opt.fixed_buffers),
                          buffer_bytes=opt.buffer_bytes or largest, verify=opt.verify_checksums,
                          checksum_algorithm=algorithm)
    blob = next(ext.nbytes for layer in extents for ext in layer)  # a dense first layer has no experts
    same = all(ext.nbytes == blob for layer in extents for ext in layer)
    cache = ExpertCache(list(opt.tiers), pin_layers=opt.pin_layers, slot_bytes=blob if same else None)
    return StreamingExperts(extents, reader, cache, prefetch=opt.prefetch, depth=opt.prefetch_depth,
                            checksums=checksums)

"""One session for every command: the model and how it runs, built once from the config and the flags.

`run`, `bench`, `serve` and the REPL's local chat all open a Session, so they agree on: which model
(flag → config's inference.model → the embedded default), whether experts stream (--cache-mb, --stream, or a
config file/--set: its cache tiers), the kernel layout (decided from the model and the config, never the
free memory), the kernel variants (compute.dispatch), the thread count (set on the thread that runs the
model: Numba's count is per thread), the context length (--ctx → context_length → min(model's, 4096)),
the SSD thermal governor, speculative decoding, and the warm-up that compiles the kernels.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..config import check_model
from ..errors import UsageError
from ..sampling import SamplingParams
from .core import EngineCore
from .gate import Gate
from .prefix_cache import PrefixCache
from .request import Request
from .threads import ThreadGovernor

SPEC_CHOICES = ("off", "auto", "draft", "self", "lookup")
# Self-drafting: top-1 routing among the experts in RAM over every layer (measured on the default model:
# cheaper than the target and still close to it).
SELF_EXPERTS_PER_TOK = 1


def add_session_arguments(p) -> None:
    """The flags every model-running command shares."""
    p.add_argument("-m", "--model", help="GGUF file or HF checkpoint directory (default: the config's "
                                         "inference.model, else the embedded model)")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="compute threads (default: the config's, else auto: each pass on 1, half or all cores, "
                        "whichever its measured times favour)")
    p.add_argument("-c", "--ctx", type=int, default=None,
                   help="context length (default: config's context_length, else min(model's, 4096))")
    p.add_argument("--cache-mb", type=float, default=None,
                   help="stream experts from the file into a RAM cache of this many MB (default: memory-map "
                        "all, or the config's cache tiers when --config/--set is given)")
    p.add_argument("--stream", action="store_true", help="stream experts with the config's cache tiers")
    p.add_argument("--no-prefetch", action="store_true", help="with streaming: do not prefetch predicted experts")
    p.add_argument("--prefetch-depth", type=int, default=None, metavar="N",
                   help="with streaming: predict and prefetch the experts of the next N layers, 0-8 (default: the "
                        "config's routing.prefetch_depth, 1)")
    p.add_argument("--spec", choices=SPEC_CHOICES, default=None,
                   help="speculative decoding proposer (default: the config's speculative.proposer, off)")
    p.add_argument("--draft-model", metavar="PATH",
                   help="draft model for --spec draft/auto: a GGUF/HF path with the same tokenizer, or "
                        "'default' (the embedded model's draft)")
    p.add_argument("--draft-max", type=int, default=None, metavar="K",
                   help="most draft tokens per step, 1-16 (default: the config's speculative.max_tokens, 4)")
    p.add_argument("--cache-type", choices=("f16", "q8_0", "f32"), default=None,
                   help="KV cache element type (default: the config's inference.kv_cache_type, f16)")
    p.add_argument("--chat-template", metavar="FILE",
                   help="Jinja chat template for chat requests, instead of the model's own (default: the GGUF's "
                        "tokenizer.chat_template or the HF directory's, else a plain 'role: content' format)")


@dataclass
class SpecOptions:
    proposer: str = "off"
    draft_model: str | None = None
    k_max: int = 4
    threshold: float = 0.15

    @classmethod
    def from_args(cls, args, cfg) -> SpecOptions:
        s = cfg.speculative
        proposer = getattr(args, "spec", None) or s.proposer
        k = getattr(args, "draft_max", None) or s.max_tokens
        if not 1 <= k <= 16:
            raise UsageError(f"--draft-max must be from 1 to 16, got {k}")
        draft = getattr(args, "draft_model", None) or s.draft_model
        if proposer == "draft" and draft is None:
            raise UsageError("--spec draft needs a draft model: --draft-model PATH (or 'default' for the "
                             "embedded model's draft), or speculative.draft_model in the config")
        return cls(proposer, draft, k, s.rejection_threshold)


class Session:
    """A loaded model with everything that decides how it runs; `core()` makes the engine that steps it."""

    def __init__(self, args, cfg, *, progress: bool = True, compile_wait: bool | None = None):
        """progress: show slow loading and warm-up phases on stderr (edgemoe.progress); False for a caller that
        reports them itself (serve's log, bench's bar). compile_wait: fused kernels missing from Numba's cache
        are compiled before the first step (True) or in the background (False); None: `compute.fused_compile`."""
        from ..loader import load_model
        from ..progress import Phases

        self.cfg = cfg
        self.progress = progress
        apply_dispatch(cfg)
        self.threads = getattr(args, "threads", None) or cfg.threads
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}")
        self.bind_thread()
        self.model_path = getattr(args, "model", None) or cfg.inference.model
        if self.model_path is None:
            from ..default_model import default_model_path

            self.model_path = default_model_path()
        self.stream = None
        wants_stream = getattr(args, "cache_mb", None) is not None or getattr(args, "stream", False) or \
            getattr(args, "config", None) or getattr(args, "overrides", None)
        if wants_stream:
            from ..experts.setup import StreamOptions

            depth = 0 if getattr(args, "no_prefetch", False) else getattr(args, "prefetch_depth", None)
            if depth is not None and not 0 <= depth <= 8:
                raise UsageError(f"--prefetch-depth must be from 0 to 8 (layers ahead; 0: no prefetch), got {depth}")
            self.stream = StreamOptions.from_config(cfg, getattr(args, "cache_mb", None), prefetch_depth=depth)
        self.spec = SpecOptions.from_args(args, cfg)
        chat_file = getattr(args, "chat_template", None)
        if chat_file is not None:  # a broken --chat-template fails before the model loads
            from ..chat import check_template_file

            check_template_file(chat_file)
        with Phases(f"loading {os.path.basename(self.model_path.rstrip('/'))}", enabled=progress) as phase:
            self.loaded = load_model(self.model_path, self.stream, repack=cfg.compute.repack, progress=phase)
        check_model(cfg, self.loaded.args, self.model_path, getattr(args, "config", None))
        self.model = self.loaded.model
        self.cache_type = getattr(args, "cache_type", None) or cfg.inference.kv_cache_type
        self.model.cache_type = self.cache_type  # every cache the engine makes (requests, drafts, warm-up)
        self.compile_wait = cfg.compute.fused_compile == "foreground" if compile_wait is None else compile_wait
        self.model.compile_wait = self.compile_wait
        self.tokenizer = self.loaded.tokenizer
        from ..chat import load_chat_template

        # run, serve and chat share it: render(messages) → prompt text, encode(messages) → ids, stop_ids
        self.chat_template = load_chat_template(self.model_path, self.tokenizer, override=chat_file,
                                                metadata=self.loaded.metadata)
        self.n_ctx = getattr(args, "ctx", None) or cfg.context_length or \
            min(self.loaded.args.max_position_embeddings, 4096)
        if self.n_ctx < 2:
            raise UsageError(f"--ctx must be at least 2, got {self.n_ctx}")
        self.draft = None
        self.proposers = self._proposers()
        self.governor = None
        if self.stream is not None:
            from ..thermal import HWMON_ROOT, ThermalGovernor

            self.governor = ThermalGovernor.from_config(self.model.experts.reader, cfg, self.model_path,
                                                        hwmon_root=os.environ.get("EDGEMOE_HWMON_ROOT", HWMON_ROOT))
            if self.governor.sensor is not None:  # no sensor (VMs, most SD cards): nothing to govern
                self.governor.start()

    # ------------------------------------------------------------------ set-up

    def bind_thread(self) -> None:
        """Apply the thread count on the calling thread (Numba's count is per thread): call it on the
        thread that runs the model."""
        if self.threads is not None:
            from .. import kernels

            kernels.set_threads(self.threads)

    def _proposers(self) -> list:
        from ..models.moe import DraftRouting
        from .proposers import DraftModelProposer, LookupProposer, SelfProposer

        name, out = self.spec.proposer, []
        if name == "off":
            return out
        if name in ("draft", "auto") and self.spec.draft_model is not None:
            self.draft = self._load_draft(self.spec.draft_model)
            out.append(DraftModelProposer(self.draft.model, self.spec.threshold))
        if name in ("self", "auto"):
            out.append(SelfProposer(self.model, self.spec.threshold, DraftRouting(SELF_EXPERTS_PER_TOK)))
        if name in ("lookup", "auto"):
            out.append(LookupProposer())
        return out

    def _load_draft(self, path: str):
        from ..loader import load_model
        from .tokenizers import first_difference

        if path == "default":
            from ..default_model import draft_model_path

            path = draft_model_path()
        draft = load_model(path, None, repack=self.cfg.compute.repack)
        draft.model.cache_type = self.cache_type
        draft.model.compile_wait = self.compile_wait
        diff = first_difference(self.tokenizer, draft.tokenizer)
        if diff is not None:
            raise UsageError(f"the draft model {path} does not share the target's tokenizer: {diff}; use a draft "
                             "from the same model family (the same tokenizer file)")
        if draft.args.vocab_size != self.loaded.args.vocab_size:
            raise UsageError(f"the draft model {path} has {draft.args.vocab_size} logits, the target "
                             f"{self.loaded.args.vocab_size}; use a draft with the target's vocabulary")
        return draft

    def core(self, metrics=None, on_end=lambda req: None, prompt_cache: bool = True) -> EngineCore:
        """The engine for this session; with `prompt_cache` (and server.prompt_cache_mb > 0) it keeps the KV rows of
        ended requests for prompts that share their prefix (`bench` turns it off: it measures prefill)."""
        gate = Gate(self.proposers, self.spec.k_max) if self.proposers else None
        budget = self.cfg.server.prompt_cache_bytes if prompt_cache else 0
        threads = ThreadGovernor(max_threads()) if self.threads is None else None
        core = EngineCore(self.model, self.tokenizer, prefill_chunk=self.cfg.batching.prefill_chunk, gate=gate,
                          metrics=metrics, on_end=on_end, verify_packs=self.cfg.ssd.verify_checksums, threads=threads)
        self._seed_costs(core)
        if budget > 0:  # after the scratch requests that time the proposers
            core.prefix_cache = PrefixCache(budget)
        return core

    def warm_up(self, separate: bool = False) -> None:
        """Compile (or load from Numba's cache) the kernels a request will use, before the first one (a
        self-draft's kernels compile when `core()` times a drafting round). Without `compile_wait`, fused
        kernels missing from the cache go to a background process (`kernels.compile_ahead`), said on stderr.
        separate: also the kernels of batched steps of several sequences, and of the unfused path (their steps
        run it while a fused block compiles, and when they exceed FUSED_ROWS)."""
        from ..kernels import compile_ahead
        from ..progress import Phases
        from .filewatch import verify_mapped_packs

        if self.cfg.ssd.verify_checksums:  # a corrupt pack fails here, before seconds of compiling
            verify_mapped_packs([self.model] + ([self.draft.model] if self.draft is not None else []))
        models = [("", self.model)] + ([("the draft's ", self.draft.model)] if self.draft is not None else [])
        first = "~10 s" if not self.compile_wait else "~40 s"
        with Phases("warming up", enabled=self.progress) as phase:
            for whose, model in models:
                cache = model.new_cache(3)
                phase(f"{whose}prompt kernels (compiled on the first run after an install, {first})")
                model.forward(np.zeros(2, dtype=np.int64), cache)  # matrix kernels (prompts, batched steps)
                phase(f"{whose}one-token kernels")
                model.forward(np.zeros(1, dtype=np.int64), cache)  # vector kernels (one token)
                if separate:
                    phase(f"{whose}several sequences' kernels")
                    model.forward_batch([(np.zeros(1, dtype=np.int64), model.new_cache(3)) for _ in range(2)])
                    phase(f"{whose}separate kernels")
                    model.fused = False
                    try:
                        cache = model.new_cache(3)
                        model.forward(np.zeros(2, dtype=np.int64), cache)
                        model.forward(np.zeros(1, dtype=np.int64), cache)
                        model.forward_batch([(np.zeros(1, dtype=np.int64), model.new_cache(3)) for _ in range(2)])
                    finally:
                        model.fused = True
        pid, left = compile_ahead.pending()
        if left and self.progress:
            print(f"edgemoe: the fused decode kernels are compiling in a background process (pid {pid}, ~30-40 s, "
                  "once: Numba's cache keeps them); until then each step runs kernel by kernel (the same output, "
                  "slower)", file=sys.stderr, flush=True)

    def _seed_costs(self, core: EngineCore) -> None:
        """Time passes of 1..k+1 rows on a scratch cache, so the gate starts from this machine's costs
        (it keeps measuring the real passes as it runs)."""
        if core.gate is None:
            return
        k = self.spec.k_max
        cache = self.model.new_cache(4 * (k + 1) + 8)
        self.model.forward(np.zeros(4, dtype=np.int64), cache)
        base = cache.length
        for rows in sorted({r for r in (1, 2, 3, 5, 9, 17) if r <= k + 1} | {k + 1}):
            times = []
            for _ in range(3):
                cache.length = base
                t0 = time.perf_counter()
                self.model.forward_batch([(np.zeros(rows, dtype=np.int64), cache)], rows=[rows])
                times.append(time.perf_counter() - t0)
            core.gate.costs.record(rows, sorted(times)[1])
        for p in self.proposers:  # one drafting round each, on a scratch request
            if p.name == "lookup":
                continue
            req = Request([1, 2, 3, 4], 8, SamplingParams(temperature=0.0))
            core.admit(req)
            prompt = np.asarray(req.prompt_ids)
            self.model.forward(prompt, req.cache)
            if p.name == "draft":
                p.model.forward(prompt, req.spec.draft_cache)
            req.history.append(5)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                p.propose([req], [1])
                times.append(time.perf_counter() - t0)
                req.cache.truncate(4)
                if p.name == "draft":
                    req.spec.draft_cache.truncate(4)
            core.gate.record_draft(p.name, 1, sorted(times)[1])
            core.release(req)

    # ------------------------------------------------------------------ reporting and teardown

    def thread_figures(self, core: EngineCore | None = None) -> int | dict:
        """The thread count given (--threads, `threads:`), or the governor's figures when it is auto."""
        if self.threads is not None:
            return self.threads
        return core.threads.status() if core is not None and core.threads is not None else {"mode": "auto"}

    def layout(self) -> str:
        """Which layout the weights took, as words (doctor, run --json)."""
        return getattr(self.model, "layout", "plain")

    def stream_figures(self) -> dict:
        figures = stream_figures(self.model.experts)
        if self.governor is not None:
            figures["thermal"] = self.governor.status() | {"running": self.governor.sensor is not None}
        return figures

    def close(self) -> None:
        if self.governor is not None:
            self.governor.stop()
        self.model.experts.close()
        if self.draft is not None:
            self.draft.model.experts.close()


def stream_figures(experts) -> dict:
    """The `cache`, `io` and `prefetch` figures of a streaming store ({} for memory-mapped experts)."""
    if not hasattr(experts, "stats"):
        return {}
    st = experts.stats()
    c, io = st["cache"], st["io"]
    return {
        "cache": {"hit_rate": round(c["hit_rate"], 4), "hits": c["hits"], "misses": c["misses"],
                  "evictions": c["evictions"], "bytes_read": io["bytes_read"], "direct_io": io["direct_io"],
                  "resident_bytes": experts.cache.resident_bytes},
        "io": {"read_gb_s": round(io["gbps"], 3), "latency_ms_p50": round(io["p50_ms"], 3),
               "latency_ms_p99": round(io["p99_ms"], 3), "reads": io["reads"], "merged_reads": io["merged_reads"],
               "degraded_reads": io["degraded_reads"], "retries": io["retries"],
               "recovered_reads": io["recovered_reads"], "failed_reads": io["errors"]},
        "prefetch": st["prefetch"],
    }


def max_threads() -> int:
    """Threads the kernels may use: Numba's pool, within the CPUs this process may run on (taskset, cpusets)."""
    import numba

    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    return max(1, min(numba.config.NUMBA_NUM_THREADS, allowed))


def apply_dispatch(cfg) -> None:
    """Force the kernel variants that `compute.dispatch` names (auto leaves the CPU's best)."""
    from ..kernels import dispatch

    for qtype, variant in vars(cfg.compute.dispatch).items():
        if variant not in (None, "auto"):
            dispatch.force_variant(variant, qtype)

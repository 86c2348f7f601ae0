"""JSON-constrained decoding benchmark: per-token decode time with and without a `response_format` grammar.

On the default model (or -m), greedy, the same prompt (the plain chat format of a "reply in JSON" conversation),
through EngineCore as `serve` runs it. Unconstrained and constrained (json_object: {"type": "object"}; after
`{"` the default model writes one long string, so both run the full --tokens) take turns, --runs measured runs
each after one unmeasured one; medians of decode ms/token (the steps after the first token). Also the grammar's
own work per token, timed inside the run: the mask (llguidance's bitmask + unpacking + -inf) and the consume.

    python tools/bench_constrained.py --tokens 128 --runs 5 [-m MODEL] [--json]

--library outlines-core|xgrammar|all (or --schema) compares grammar libraries instead, on the same vocabulary,
prompt and schemas: one-time costs (the library's vocabulary object; compiling each schema; a matcher per request),
medians over --runs; and per token, inside a greedy constrained decode of the model through EngineCore with that
library's matcher as the mask: the library's bitmask, applying it to the (V,) float32 logits (the same unpacking
+ -inf for every library, as Matcher does) and advancing by the chosen token, as a share of a free decode token
measured in the same run. The adapters live here (a benchmark, not a runtime dependency): llguidance through
engine/grammar.py's own Grammar and Matcher (its calls, the two halves timed apart); outlines-core (Vocabulary
from the token bytes, the schema's regex with no free whitespace, Index, Guide); xgrammar (TokenizerInfo of the
raw token bytes, compact separators).
Control tokens write no bytes and are never allowed as text by any of them. With "all", each library's masks are
also compared with llguidance's along llguidance's tokens.

    python tools/bench_constrained.py --library all --tokens 128 --runs 9 [--schema '{"type": "object", ...}']
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edgemoe.chat import ChatTemplate  # noqa: E402
from edgemoe.default_model import default_model_path  # noqa: E402
from edgemoe.engine import grammar as _grammar  # noqa: E402
from edgemoe.engine.core import EngineCore, run_to_end  # noqa: E402
from edgemoe.engine.grammar import Grammar, GrammarError, Matcher  # noqa: E402
from edgemoe.engine.request import Request  # noqa: E402
from edgemoe.loader import load_model  # noqa: E402
from edgemoe.sampling import SamplingParams  # noqa: E402

MESSAGES = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Who art thou?"}]


class _Timed:
    """Wraps Matcher's two per-token calls to add up their time."""

    def __init__(self):
        self.mask_s = self.consume_s = 0.0
        self.calls = 0

    def install(self):
        mask, consume = Matcher.__call__, Matcher.consume
        timed = self

        def timed_mask(m, w):
            t = time.perf_counter()
            mask(m, w)
            timed.mask_s += time.perf_counter() - t
            timed.calls += 1

        def timed_consume(m, tok):
            t = time.perf_counter()
            consume(m, tok)
            timed.consume_s += time.perf_counter() - t

        Matcher.__call__, Matcher.consume = timed_mask, timed_consume


# ---------------------------------------------------------------------------------------- the library comparison

LIBRARIES = ("llguidance", "outlines-core", "xgrammar")
JSON_OBJECT = {"type": "object"}  # response_format json_object, the schema the default run uses


class _Clock:
    """One constrained request's grammar time: the library's bitmask, applying it, advancing."""

    def __init__(self):
        self.fill_s = self.apply_s = self.advance_s = 0.0
        self.masks = self.advances = 0

    def per_token_us(self) -> dict[str, float]:
        fill, apply = self.fill_s / self.masks * 1e6, self.apply_s / self.masks * 1e6
        advance = self.advance_s / max(1, self.advances) * 1e6
        return {"fill_us": fill, "apply_us": apply, "advance_us": advance, "grammar_us": fill + apply + advance}


def _apply_bitmask(bits: np.ndarray, blocked: np.ndarray, n: int, w: np.ndarray) -> None:
    """Matcher.__call__'s unpacking, shared by every library: bit t of bits (1, W) int32 = token t allowed;
    the others' logits in w (V,) float32 become -inf; rows from n (the tokenizer's size) on are never allowed."""
    V = w.shape[0]
    allowed = np.unpackbits(bits.view(np.uint8), bitorder="little", count=V)  # (V,) uint8
    np.logical_not(allowed, out=blocked)
    if n < V:
        blocked[n:] = True
    np.copyto(w, -np.inf, where=blocked)


class _LLGuidanceMatcher(Matcher):
    """engine/grammar.py's Matcher, its two halves timed apart."""

    def __init__(self, grammar: Grammar, clock: _Clock):
        super().__init__(grammar)
        self._clock = clock

    def __call__(self, w: np.ndarray) -> None:
        t0 = time.perf_counter()
        _grammar._llnp.fill_next_token_bitmask(self._m, self._bits)
        if self._m.is_error():
            raise GrammarError(f"the grammar failed: {self._m.get_error()}")
        t1 = time.perf_counter()
        _apply_bitmask(self._bits, self._blocked, self._n, w)
        self._clock.fill_s += t1 - t0
        self._clock.apply_s += time.perf_counter() - t1
        self._clock.masks += 1

    def consume(self, token: int) -> None:
        t = time.perf_counter()
        super().consume(token)
        self._clock.advance_s += time.perf_counter() - t
        self._clock.advances += 1


class _LLGuidance:
    dist = "llguidance"

    def __init__(self):
        if _grammar.llguidance is None:
            raise ImportError("No module named 'llguidance'")

    def vocab(self, tok, V):
        _grammar._TOKENIZERS.pop(id(tok), None)  # built afresh: what a process pays once
        return _grammar.lltokenizer(tok)

    def compile(self, vocab, schema: dict, tok, V):
        return Grammar.json_schema(schema, tok, V)  # reads the LLTokenizer `vocab` from the cache

    def matcher(self, compiled, clock: _Clock):
        return _LLGuidanceMatcher(compiled, clock)


class _OutlinesMatcher:
    """An outlines_core.Guide as the engine's mask: __call__(w), consume(token), stopped."""

    def __init__(self, compiled, clock: _Clock):
        import outlines_core

        index, self._eos, self._n, V = compiled
        self._guide = outlines_core.Guide(index)
        self._bits = np.zeros((1, (max(V, self._n) + 31) // 32), dtype=np.int32)  # (1, W)
        self._ptr = self._bits.ctypes.data
        self._blocked = np.empty(V, dtype=np.bool_)  # (V,)
        self._clock = clock

    def __call__(self, w: np.ndarray) -> None:
        t0 = time.perf_counter()
        self._guide.write_mask_into(self._ptr, self._bits.size, 4)
        t1 = time.perf_counter()
        _apply_bitmask(self._bits, self._blocked, self._n, w)
        self._clock.fill_s += t1 - t0
        self._clock.apply_s += time.perf_counter() - t1
        self._clock.masks += 1

    def consume(self, token: int) -> None:
        t = time.perf_counter()
        try:
            self._guide.advance(int(token), return_tokens=False)
        except ValueError as e:
            raise GrammarError(f"token {token} does not follow the grammar: {e}") from None
        self._clock.advance_s += time.perf_counter() - t
        self._clock.advances += 1

    @property
    def stopped(self) -> bool:
        """A final state from which nothing but end-of-sequence may follow."""
        return self._guide.is_finished() and set(self._guide.get_tokens()) <= {self._eos}


class _OutlinesCore:
    """outlines-core: the schema becomes a regex, the regex a token-level automaton over the vocabulary (Index)."""

    dist = "outlines-core"

    def __init__(self):
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        self._oc, self._regex = outlines_core, build_regex_from_schema

    def vocab(self, tok, V):
        eos = min(tok.eos_ids) if tok.eos_ids else tok.eos_id  # outlines-core knows one end-of-sequence token
        if eos is None:
            raise GrammarError("outlines-core needs an end-of-sequence token")
        by_bytes: dict[bytes, list[int]] = {}
        for i in range(tok.vocab_size):
            b = tok.token_bytes(i)  # control tokens write nothing: left out, so never allowed
            if b and i != eos:
                by_bytes.setdefault(b, []).append(i)
        return self._oc.Vocabulary(eos, by_bytes), eos, tok.vocab_size

    def compile(self, vocab, schema: dict, tok, V):
        vocabulary, eos, n = vocab
        regex = self._regex(json.dumps(schema), "")  # "" = no free whitespace, as Grammar.json_schema
        return self._oc.Index(regex, vocabulary), eos, n, V

    def matcher(self, compiled, clock: _Clock):
        return _OutlinesMatcher(compiled, clock)


class _XGrammarMatcher:
    """An xgrammar.GrammarMatcher as the engine's mask (numpy bitmask through DLPack; no torch tensor per step)."""

    def __init__(self, compiled, clock: _Clock):
        import xgrammar

        cg, self._stops, self._n, V = compiled
        self._m = xgrammar.GrammarMatcher(cg)
        self._bits = np.full((1, (max(V, self._n) + 31) // 32), -1, dtype=np.int32)  # (1, W)
        self._blocked = np.empty(V, dtype=np.bool_)  # (V,)
        self._clock = clock

    def __call__(self, w: np.ndarray) -> None:
        t0 = time.perf_counter()
        self._m.fill_next_token_bitmask(self._bits)
        t1 = time.perf_counter()
        _apply_bitmask(self._bits, self._blocked, self._n, w)
        self._clock.fill_s += t1 - t0
        self._clock.apply_s += time.perf_counter() - t1
        self._clock.masks += 1

    def consume(self, token: int) -> None:
        t = time.perf_counter()
        ok = self._m.accept_token(int(token))
        self._clock.advance_s += time.perf_counter() - t
        self._clock.advances += 1
        if not ok:
            raise GrammarError(f"token {token} does not follow the grammar")

    @property
    def stopped(self) -> bool:
        """The JSON is complete and nothing but a stop token may follow."""
        if not self._m.is_completed():
            return False
        bits = np.zeros_like(self._bits)
        self._m.fill_next_token_bitmask(bits)
        allowed = np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little"))
        return set(allowed.tolist()) <= self._stops


class _XGrammar:
    """xgrammar: the schema becomes a grammar compiled against the vocabulary (GrammarCompiler), a pushdown matcher."""

    dist = "xgrammar"

    def __init__(self):
        import xgrammar

        self._xgr = xgrammar

    def vocab(self, tok, V):
        raw = [tok.token_bytes(i) for i in range(tok.vocab_size)]  # control tokens: b"", special, never allowed
        stops = sorted(tok.eos_ids) or ([tok.eos_id] if tok.eos_id is not None else None)
        info = self._xgr.TokenizerInfo(raw, self._xgr.VocabType.RAW, vocab_size=V, stop_token_ids=stops)
        return self._xgr.GrammarCompiler(info, cache_enabled=False), frozenset(stops or ()), tok.vocab_size

    def compile(self, vocab, schema: dict, tok, V):
        compiler, stops, n = vocab
        # compact, as Grammar.json_schema; strict_mode=False: properties a schema does not name are allowed, as
        # JSON Schema (and llguidance) read it
        cg = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"),
                                          strict_mode=False)
        return cg, stops, n, V

    def matcher(self, compiled, clock: _Clock):
        return _XGrammarMatcher(compiled, clock)


_ADAPTERS = {"llguidance": _LLGuidance, "outlines-core": _OutlinesCore, "xgrammar": _XGrammar}


class _Bound:
    """A compiled schema as EngineCore takes a grammar: matcher() starts a request's state, timed into `clock`."""

    def __init__(self, lib, compiled, clock: _Clock):
        self._lib, self._compiled, self.clock = lib, compiled, clock

    def matcher(self):
        return self._lib.matcher(self._compiled, self.clock)


def _allowed(matcher, V: int) -> np.ndarray:
    """The tokens `matcher` allows next, (k,) ids."""
    w = np.zeros(V, dtype=np.float32)
    matcher(w)
    return np.flatnonzero(np.isfinite(w))


def _compare(args, argv, tok, model, ids) -> int:
    V = model.args.vocab_size
    schemas = {"json_object": JSON_OBJECT}
    for text in args.schema:
        schemas[json.dumps(json.loads(text), separators=(",", ":"))] = json.loads(text)
    names = LIBRARIES if args.library == "all" else (args.library,)
    libs, versions, skipped = {}, {}, {}
    for name in names:
        try:
            libs[name] = _ADAPTERS[name]()
            versions[name] = importlib.metadata.version(_ADAPTERS[name].dist)
        except ImportError as e:
            skipped[name] = f"not measured: {e}"

    # one-time costs, each --runs times afresh: the vocabulary object, each schema's compile, a matcher
    once: dict[tuple[str, str], dict[str, list[float]]] = {}
    vocab_ms: dict[str, list[float]] = {name: [] for name in libs}
    compiled: dict[tuple[str, str], object] = {}
    failed: dict[tuple[str, str], str] = {}
    for name, lib in libs.items():
        for _ in range(max(1, args.runs)):
            t = time.perf_counter()
            vocab = lib.vocab(tok, V)
            vocab_ms[name].append((time.perf_counter() - t) * 1e3)
            for label, schema in schemas.items():
                key = (name, label)
                if key in failed:
                    continue
                fig = once.setdefault(key, {"compile_ms": [], "start_ms": []})
                t = time.perf_counter()
                try:
                    c = lib.compile(vocab, schema, tok, V)
                    t1 = time.perf_counter()
                    lib.matcher(c, _Clock())
                except Exception as e:  # noqa: BLE001 - a schema a library cannot compile is a figure too
                    failed[key] = f"{type(e).__name__}: {e}"
                    continue
                fig["compile_ms"].append((t1 - t) * 1e3)
                fig["start_ms"].append((time.perf_counter() - t1) * 1e3)
                compiled.setdefault(key, c)

    # per token, inside greedy decodes through EngineCore: free text, then each library and schema, in turns
    greedy = SamplingParams(temperature=0.0)
    free: list[float] = []
    per: dict[tuple[str, str], dict[str, list[float]]] = {key: {} for key in compiled}
    tokens: dict[tuple[str, str], list[int]] = {}
    for run in range(args.runs + 1):
        req = Request(ids, args.tokens, greedy)
        run_to_end(EngineCore(model, tok), req)
        if len(req.tokens) != args.tokens:
            raise SystemExit(f"free: {len(req.tokens)} tokens ({req.finish_reason}), not {args.tokens}")
        if run:
            free.append(req.decode_s / (len(req.tokens) - 1) * 1e3)
        for key, c in compiled.items():
            if key in failed:
                continue
            clock = _Clock()
            req = Request(ids, args.tokens, greedy, grammar=_Bound(libs[key[0]], c, clock))
            run_to_end(EngineCore(model, tok), req)
            if req.finish_reason not in ("length", "stop") or len(req.tokens) < 2:
                failed[key] = f"the decode ended with {req.finish_reason} after {len(req.tokens)} tokens: {req.error}"
                continue
            tokens[key] = list(req.tokens)
            if run == 0:
                continue  # warm-up
            fig = per[key]
            fig.setdefault("decode_ms", []).append(req.decode_s / (len(req.tokens) - 1) * 1e3)
            for k, v in clock.per_token_us().items():
                fig.setdefault(k, []).append(v)
    free_ms = statistics.median(free)

    # the masks along llguidance's tokens: does each library allow exactly what llguidance allows?
    agree: dict[tuple[str, str], str] = {}
    for key in compiled:
        ref = ("llguidance", key[1])
        if key[0] == "llguidance" or ref not in tokens or key in failed:
            continue
        mine = libs[key[0]].matcher(compiled[key], _Clock())
        theirs = libs["llguidance"].matcher(compiled[ref], _Clock())
        same, steps = 0, 0
        first_diff = None
        for tok_id in tokens[ref]:
            a, b = _allowed(mine, V), _allowed(theirs, V)
            steps += 1
            if np.array_equal(a, b):
                same += 1
            elif first_diff is None:
                first_diff = f"step {steps - 1}: {len(a)} allowed vs {len(b)}"
            if tok_id not in a:  # this library forbids llguidance's token: its path ends here
                first_diff = (first_diff + "; " if first_diff else "") + f"forbids llguidance's token at step {steps - 1}"
                break
            mine.consume(tok_id)
            theirs.consume(tok_id)
        agree[key] = f"{same}/{steps} masks equal" + (f" (first difference {first_diff})" if first_diff else "")

    rows = []
    for name in names:
        if name in skipped:
            rows.append({"library": name, "error": skipped[name]})
            continue
        for label in schemas:
            key = (name, label)
            row = {"library": name, "version": versions[name], "schema": label,
                   "vocab_ms": round(statistics.median(vocab_ms[name]), 3)}
            if key in once and once[key]["compile_ms"]:
                row["compile_ms"] = round(statistics.median(once[key]["compile_ms"]), 3)
                row["start_ms"] = round(statistics.median(once[key]["start_ms"]), 3)
            if key in failed:
                row["error"] = failed[key]
            if per.get(key):
                fig = {k: statistics.median(v) for k, v in per[key].items()}
                row.update({k: round(v, 2) for k, v in fig.items() if k.endswith("_us")})
                row["share_of_free_token"] = round(fig["grammar_us"] / 1e3 / free_ms, 4)
                row["decode_ms_per_token"] = round(fig["decode_ms"], 3)
                row["decode_ratio"] = round(fig["decode_ms"] / free_ms, 4)
                row["tokens"] = len(tokens[key])
                ref = tokens.get(("llguidance", label))
                if name != "llguidance" and ref is not None:
                    row["same_tokens_as_llguidance"] = tokens[key] == ref
                if key in agree:
                    row["masks_vs_llguidance"] = agree[key]
            rows.append(row)
    out = {"model": args.model or "default", "vocab_size": V, "tokens": args.tokens, "runs": args.runs,
           "free_ms_per_token": round(free_ms, 3), "free_runs_ms": [round(x, 3) for x in free], "rows": rows,
           "command": "python tools/bench_constrained.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"free decode {free_ms:.3f} ms/token (median of {args.runs}; V = {V}, greedy, {args.tokens} tokens); "
          f"medians over {args.runs} runs")
    head = (f"{'library':14}{'version':10}{'schema':14}{'vocab ms':>10}{'compile ms':>12}{'start ms':>10}"
            f"{'mask µs':>9}{'apply µs':>10}{'advance µs':>12}{'total µs':>10}{'% token':>9}{'decode ratio':>14}")
    print(head)
    for row in rows:
        if "error" in row and "grammar_us" not in row:
            print(f"{row['library']:14}{row.get('version', ''):10}{row.get('schema', ''):14}  {row['error']}")
            continue
        print(f"{row['library']:14}{row['version']:10}{row['schema'][:13]:14}{row['vocab_ms']:10.2f}"
              f"{row['compile_ms']:12.2f}{row['start_ms']:10.3f}{row['fill_us']:9.1f}{row['apply_us']:10.1f}"
              f"{row['advance_us']:12.1f}{row['grammar_us']:10.1f}{100 * row['share_of_free_token']:9.2f}"
              f"{row['decode_ratio']:14.3f}")
    for row in rows:
        notes = [f"{k}: {row[k]}" for k in ("tokens", "same_tokens_as_llguidance", "masks_vs_llguidance", "error")
                 if k in row and "grammar_us" in row]
        if notes:
            print(f"  {row['library']} / {row['schema']}: " + "; ".join(notes))
    print("mask = the library's bitmask; apply = unpacking it to -inf in the (V,) logits (same code for all); "
          "advance = the chosen token; % token = (mask + apply + advance) / a free decode token; "
          "decode ratio = constrained / free decode ms per token")
    print("command:", out["command"])
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="GGUF or HF directory (default: the embedded model)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--library", choices=(*LIBRARIES, "all"), default="llguidance",
                    help="grammar library to measure (default llguidance: the engine's own figures, as before); "
                         "another or all: the library comparison")
    ap.add_argument("--schema", action="append", default=[], metavar="JSON",
                    help="another JSON schema for the library comparison (repeatable; json_object always runs)")
    args = ap.parse_args(argv)

    loaded = load_model(args.model or default_model_path())
    tok, model = loaded.tokenizer, loaded.model
    ids = ChatTemplate.plain(tok).encode(MESSAGES)
    if args.library != "llguidance" or args.schema:
        return _compare(args, argv, tok, model, ids)
    t = time.perf_counter()
    grammar = Grammar.json_schema({"type": "object"}, tok, model.args.vocab_size)
    compile_ms = (time.perf_counter() - t) * 1e3
    timed = _Timed()
    timed.install()
    per_token: dict[str, list[float]] = {"free": [], "json": []}
    grammar_ms: list[float] = []
    for run in range(args.runs + 1):
        for name in ("free", "json"):
            req = Request(ids, args.tokens, SamplingParams(temperature=0.0), grammar=grammar if name == "json" else None)
            before = (timed.mask_s + timed.consume_s, timed.calls)
            run_to_end(EngineCore(model, tok), req)
            if len(req.tokens) != args.tokens:
                raise SystemExit(f"{name}: {len(req.tokens)} tokens ({req.finish_reason}), not {args.tokens}")
            if run == 0:
                continue  # warm-up: Numba compilation, caches
            per_token[name].append(req.decode_s / (len(req.tokens) - 1) * 1e3)
            if name == "json":
                spent, calls = timed.mask_s + timed.consume_s - before[0], timed.calls - before[1]
                grammar_ms.append(spent / calls * 1e3)
    free, constrained = statistics.median(per_token["free"]), statistics.median(per_token["json"])
    out = {"model": args.model or "default", "tokens": args.tokens, "runs": args.runs,
           "free_ms_per_token": round(free, 3), "json_ms_per_token": round(constrained, 3),
           "ratio": round(constrained / free, 4), "grammar_ms_per_token": round(statistics.median(grammar_ms), 4),
           "grammar_share": round(statistics.median(grammar_ms) / free, 4), "compile_ms": round(compile_ms, 2),
           "runs_ms": {k: [round(x, 2) for x in v] for k, v in per_token.items()},
           "command": "python tools/bench_constrained.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{'':24}{'ms/token (median)':>18}")
    print(f"{'free text':24}{free:18.3f}")
    print(f"{'json_object grammar':24}{constrained:18.3f}")
    print(f"ratio {out['ratio']:.3f}; the grammar's own work (mask + consume) {out['grammar_ms_per_token']:.3f} ms/token "
          f"= {100 * out['grammar_share']:.1f} % of a free token; schema compile {compile_ms:.2f} ms")
    print("runs (ms/token):", out["runs_ms"])
    print("command:", out["command"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

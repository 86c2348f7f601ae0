"""Constrained decoding: a grammar (JSON, a JSON schema) decides which tokens may come next.

llguidance (Microsoft's Rust grammar engine behind Guidance, also used by vLLM, SGLang and llama.cpp) compiles
the grammar and, per step, fills a bitmask of the allowed tokens of our vocabulary. The Sampler applies it after
the logit bias and the penalties and before top-k/top-p/temperature (Sampler(mask=...), in `sample` and
`distribution` alike); EngineCore feeds every committed token to the matcher and ends the request with "stop"
when the grammar is complete (nothing but end-of-sequence may follow).

Costs on the default model (V = 2048, quiet machine; tools/bench_constrained.py): the LLTokenizer for a vocabulary
~5 ms, once per process (cached here); compiling a schema ~1-6 ms; per token, llguidance's bitmask 8-40 µs
(json_object-schema), unpacking it to -inf ~8 µs, the consume 2-6 µs: ~6 % of a 0.6 ms token (8 % end to end).
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import EdgeMoEError

try:
    import llguidance
    import llguidance.numpy as _llnp
except ImportError:  # a missing dependency is reported when a request asks for a grammar
    llguidance = None

_TOKENIZERS: dict[int, tuple[object, object]] = {}  # id(Tokenizer) → (Tokenizer, LLTokenizer)


class GrammarError(EdgeMoEError):
    """A grammar or schema that cannot be compiled; the message says why."""


class _Vocab:
    """What llguidance.LLTokenizer reads from a TokenizerWrapper: each token's bytes, and an encoder."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        hidden = [not tokenizer.token_bytes(i) and tokenizer.token_bytes(i, special=True)
                  for i in range(tokenizer.vocab_size)]
        # control tokens (<s>, </s>, <|im_end|>) write nothing: llguidance spells them 0xFF + name, never text
        self.tokens = [b"\xff" + tokenizer.token_bytes(i, special=True) if hidden[i] else tokenizer.token_bytes(i)
                       for i in range(tokenizer.vocab_size)]
        self.special_token_ids = [i for i, h in enumerate(hidden) if h]
        self.eos_token_id = min(tokenizer.eos_ids) if tokenizer.eos_ids else tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.is_tokenizer_wrapper = True

    def __call__(self, s: str | bytes) -> list[int]:
        text = s.decode("utf-8", "replace") if isinstance(s, bytes) else s
        return self._tok.encode(text, add_bos=False, special=False)


def lltokenizer(tokenizer):
    """The llguidance view of `tokenizer`, built once per tokenizer (it walks the whole vocabulary)."""
    if llguidance is None:
        raise GrammarError("constrained decoding needs the 'llguidance' package: pip install llguidance")
    hit = _TOKENIZERS.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        eos = sorted(tokenizer.eos_ids) or None
        hit = (tokenizer, llguidance.LLTokenizer(_Vocab(tokenizer), eos_token=eos))
        _TOKENIZERS[id(tokenizer)] = hit
    return hit[1]


class Grammar:
    """A compiled grammar for one vocabulary; `matcher()` starts one sequence's state (each choice its own)."""

    def __init__(self, grammar: str, tokenizer, vocab_size: int):
        self.lltok = lltokenizer(tokenizer)
        error = llguidance.LLMatcher.validate_grammar(grammar, self.lltok)
        if error and not error.startswith("WARNING"):
            raise GrammarError(error)
        self.grammar = grammar
        self.vocab_size = vocab_size  # the model's rows: may exceed the tokenizer's (padding rows are never allowed)

    @classmethod
    def json_schema(cls, schema: dict, tokenizer, vocab_size: int) -> Grammar:
        """JSON text valid against `schema` (a dict); {"type": "object"} is OpenAI's json_object mode."""
        try:
            # compact separators, no free whitespace: an unconstrained model could otherwise pad forever
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False})
        except ValueError as e:
            raise GrammarError(str(e)) from None
        return cls(grammar, tokenizer, vocab_size)

    @classmethod
    def lark(cls, lark: str, tokenizer, vocab_size: int) -> Grammar:
        """Text following a Lark grammar in llguidance's dialect (`%json {...}` embeds a JSON schema, `<[id]>` is
        one token): the tool-call formats of edgemoe.chat.tool_formats."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        except ValueError as e:
            raise GrammarError(str(e)) from None
        return cls(grammar, tokenizer, vocab_size)

    def matcher(self) -> Matcher:
        return Matcher(self)


class Matcher:
    """One sequence's position in a grammar: masks logits, consumes committed tokens.

    A step allocates one (V,) uint8 array (the unpacked bits); the rest is preallocated."""

    def __init__(self, grammar: Grammar):
        self._m = llguidance.LLMatcher(grammar.lltok, grammar.grammar, log_level=0)
        if self._m.is_error():
            raise GrammarError(self._m.get_error())
        V = grammar.vocab_size
        n = grammar.lltok.vocab_size
        self._bits = _llnp.allocate_token_bitmask(1, max(V, n))  # (1, W) int32, bit t of word t // 32 = allowed
        self._blocked = np.empty(V, dtype=np.bool_)  # (V,)
        self._V, self._n = V, n

    def __call__(self, w: np.ndarray) -> None:
        """Set the logits of the tokens the grammar forbids next to -inf, in place (w (V,) float32)."""
        _llnp.fill_next_token_bitmask(self._m, self._bits)
        if self._m.is_error():
            raise GrammarError(f"the grammar failed: {self._m.get_error()}")
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little", count=self._V)  # (V,) uint8
        np.logical_not(bits[:self._V], out=self._blocked)
        if self._n < self._V:
            self._blocked[self._n:] = True
        np.copyto(w, -np.inf, where=self._blocked)

    def consume(self, token: int) -> None:
        if not self._m.consume_token(int(token)):
            raise GrammarError(f"token {token} does not follow the grammar: {self._m.get_error()}")

    @property
    def stopped(self) -> bool:
        """The text is complete: nothing but end-of-sequence may follow."""
        return self._m.is_stopped()

    @property
    def accepting(self) -> bool:
        return self._m.is_accepting()

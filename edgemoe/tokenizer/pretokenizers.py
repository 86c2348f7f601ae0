"""How a byte-level BPE vocabulary splits text before merging, keyed by GGUF `tokenizer.ggml.pre`.

Each entry lists the regexes llama.cpp's `llm_tokenizer_bpe` applies in sequence (each one splits the
pieces the previous one produced, keeping matches and the text between them: HF's `Split(...,
"isolated")`), and the per-vocabulary switches llama.cpp sets next to them in `llama-vocab.cpp`.
Where llama.cpp rewrote a Hugging Face regex for std::regex (`(?i:...)`, `\\p{Lu}`), the original is
used: the `tokenizers` library runs Oniguruma, which understands it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Regex, pre_tokenizers

from ..errors import UnsupportedError

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BAILING = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*"
            r"|\s*[\r\n]|\s+(?!\S)|\s+")
# Han and Hangul runs as DeepSeek's tokenizer.json has them (U+0800-U+4E00 too, odd as that is).
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LLM = (
    "[\r\n]",
    ("\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
     "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
     "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
     "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
     "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
     "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
     "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134"
     "\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee"
     "\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
     "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
     "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
     "\U0001e900-\U0001e943]+"),
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    _CJK,
    "\\p{N}+",
)
_DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
     r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")
_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]")
_STARCODER = (r"\p{N}", _GPT2)


@dataclass(frozen=True)
class PreTokenizer:
    """One `tokenizer.ggml.pre` value: its split regexes and llama.cpp's switches for it."""

    regexes: tuple[str, ...]  # applied in order, each splitting the pieces of the one before
    clean_spaces: bool  # detokenize removes " " before ?!., and in " 's" etc. (llama.cpp clean_spaces)
    ignore_merges: bool = False  # a pre-token that is itself in the vocabulary is emitted whole
    add_bos: bool = False  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


def _table() -> dict[str, PreTokenizer]:
    t: dict[str, PreTokenizer] = {}

    def add(names: str, *args, **kw) -> None:
        for name in names.split():
            t[name] = PreTokenizer(*args, **kw)

    add("default", _DEFAULT, True)
    add("gpt-2 phi-2 mpt olmo", (_GPT2,), True)
    add("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral", (_LLAMA3,), True, ignore_merges=True, add_bos=True)
    add("glm4", (_LLAMA3,), True, ignore_merges=True)
    add("dbrx smaug-bpe", (_LLAMA3,), True)
    add("qwen2 deepseek-r1-qwen hunyuan grok-2", (_QWEN2,), False)
    add("stablelm2", (_QWEN2,), True)
    add("qwen35", (_QWEN35,), False)
    add("deepseek-llm", _DEEPSEEK_LLM, False)
    add("deepseek-coder", _DEEPSEEK_CODER, False)
    add("deepseek-v3", _DEEPSEEK_V3, False)
    add("falcon", _FALCON, True)
    add("starcoder refact codeshell", _STARCODER, True)
    add("command-r smollm", _STARCODER, False)
    add("gpt-4o llama4", (_GPT4O,), False)
    add("tekken", (_TEKKEN,), False, ignore_merges=True, add_bos=True)
    add("bailingmoe bailingmoe2", (_BAILING,), False)
    return t


PRE_TOKENIZERS = _table()


def pre_tokenizer_spec(name: str) -> PreTokenizer:
    """The spec for `tokenizer.ggml.pre` = name; UnsupportedError naming the supported values."""
    spec = PRE_TOKENIZERS.get(name)
    if spec is None:
        raise UnsupportedError(
            f"pre-tokenizer {name!r} (tokenizer.ggml.pre) is not supported; supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    return spec


def build_pre_tokenizer(spec: PreTokenizer) -> pre_tokenizers.PreTokenizer:
    """The `tokenizers` pre-tokenizer: the regex splits, then GPT-2's byte-to-unicode mapping."""
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.regexes]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

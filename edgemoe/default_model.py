"""The model `edgemoe run` uses when no -m is given.

The package ships `edgemoe/data/default-moe.gguf`: a 14 M-parameter Mixtral (4 layers, 8 experts, top-2,
Q8_0) trained on Shakespeare's plays by `tools/train_default_model.py` (see `edgemoe/data/MODEL.md`).
Only when that file is missing (a source tree without it) is a small random-weight Mixtral synthesised,
once, into the user's cache directory, with a word-level SentencePiece-style vocabulary; its text is a
random walk over English words. The synthesis helpers below are also used by tests to build tiny models.
"""

from __future__ import annotations

import os
import shutil
from importlib import resources

import numpy as np
from gguf import TokenType

CONFIG = {
    "model_type": "mixtral",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SHIPPED = "default-moe.gguf"  # in edgemoe/data/
DRAFT = "draft-moe.gguf"  # its speculative-decoding draft, same tokenizer
VERSION = 2  # bump when CONFIG or the vocabulary changes, so old cached files are not reused

WORDS = """the of and to in a is that for it as was with be by on not he this are or his from at which but have an
they you were her she there been one all we their has would when if so no will more can who out up about said them
into some time could than then its only other new like these two may first any my now such people over man very even
most after made also did many before must through back years where much your way well down should because each just
those how too little good world make between own under last life never day same another know while year great old
off come since against go came right used take three place house little light small found still night upon long
sea king land water river city tree stone fire wind rain snow sun moon star morning evening road door window garden
field forest mountain ship bird horse voice heart hand eye face word song story book letter name friend mother
father child brother sister""".split()


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "edgemoe")


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores, token types: <unk> <s> </s>, 256 byte pieces, punctuation, then '▁word' pieces."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    singles = ["▁"] + [c for c in ".,;:!?'\"-()0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    # Every prefix of every word is a piece, so pairwise merges can grow a word piece by piece.
    words = WORDS + [w.capitalize() for w in WORDS[:40]]
    prefixes = list(dict.fromkeys("▁" + w[:k] for w in words for k in range(1, len(w) + 1)))
    prefixes = [p for p in prefixes if p not in singles]
    pieces += singles + prefixes
    types += [TokenType.NORMAL] * (len(singles) + len(prefixes))
    # SentencePiece merges the highest-scoring pair first: longer pieces outrank shorter ones.
    scores = [0.0] * 259 + [-1000.0] * len(singles) + [len(p) - 100.0 for p in prefixes]
    return pieces, scores, [int(t) for t in types]


def write_vocab(path: str) -> None:
    from .formats.gguf_vocab import write_llama_vocab

    pieces, scores, types = vocabulary()
    write_llama_vocab(path, pieces, scores, types, bos=1, eos=2, unk=0)


def random_tensors(cfg: dict, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 weights drawn like transformers' initialiser (normal, std 0.02; norms 1)."""
    rng = np.random.default_rng(seed)
    D, I, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    d = D // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    t = {"model.embed_tokens.weight": normal(vocab, D), "model.norm.weight": np.ones(D, np.float32),
         "lm_head.weight": normal(vocab, D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": np.ones(D, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(D, np.float32),
                  p + "self_attn.q_proj.weight": normal(D, D), p + "self_attn.k_proj.weight": normal(kv, D),
                  p + "self_attn.v_proj.weight": normal(kv, D), p + "self_attn.o_proj.weight": normal(D, D),
                  p + "block_sparse_moe.gate.weight": normal(E, D)})
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            t.update({q + "w1.weight": normal(I, D), q + "w3.weight": normal(I, D), q + "w2.weight": normal(D, I)})
    return t


def _packaged(name: str) -> str | None:
    """Path of edgemoe/data/`name` as a file (copied out of a zipped install once), None when absent."""
    res = resources.files("edgemoe").joinpath("data", name)
    if not res.is_file():
        return None
    if isinstance(res, os.PathLike):
        return os.fspath(res)
    # A zipped install: the engine memory-maps the file, so copy it out once.
    path = os.path.join(cache_dir(), name)
    if not os.path.exists(path):
        os.makedirs(cache_dir(), exist_ok=True)
        with res.open("rb") as src, open(f"{path}.{os.getpid()}.tmp", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(f"{path}.{os.getpid()}.tmp", path)
    return path


def shipped_model_path() -> str | None:
    """Path of the trained model shipped in the package, or None when the package lacks it."""
    return _packaged(SHIPPED)


def draft_model_path() -> str:
    """Path of the shipped draft model of the default model (speculative decoding, `--draft-model default`)."""
    path = _packaged(DRAFT)
    if path is None:
        from .errors import UsageError

        raise UsageError("this installation carries no draft model (edgemoe/data/draft-moe.gguf); reinstall "
                         "edgemoe or pass --draft-model PATH")
    return path


def default_model_path() -> str:
    """Path of the default model: the shipped trained GGUF, else a random one synthesised on first use."""
    shipped = shipped_model_path()
    return shipped if shipped is not None else synthesised_model_path()


def synthesised_model_path() -> str:
    """Path of the random-weight fallback model, synthesising it on first use (a few seconds)."""
    from .formats.gguf_export import export_mixtral_gguf

    out_dir = cache_dir()
    path = os.path.join(out_dir, f"default-random-moe-v{VERSION}.gguf")
    if os.path.exists(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    vocab_path = f"{path}.{os.getpid()}.vocab.gguf"
    write_vocab(vocab_path)
    n_vocab = len(vocabulary()[0])
    cfg = dict(CONFIG, vocab_size=n_vocab)
    try:
        export_mixtral_gguf(path, cfg, random_tensors(cfg, n_vocab), qtype="Q8_0", expert_qtype="Q4_0",
                            tokenizer_from=vocab_path)
    finally:
        os.unlink(vocab_path)
    return path

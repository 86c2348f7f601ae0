"""Tokenizers from Hugging Face directories and from a GGUF built from a SentencePiece model.

Oracles: sentencepiece itself (a tiny BPE model trained here, byte fallback on), transformers'
LlamaTokenizer / PreTrainedTokenizerFast, and the tokenizers library's own encode/decode.
"""

from __future__ import annotations

import io
import json
import random

import gguf
import pytest
import sentencepiece
import tokenizers

from edgemoe.errors import UsageError
from edgemoe.tokenizer import StreamDecoder, Tokenizer, load_tokenizer

WORDS = ["hello", "world", "the", "quick", "brown", "fox", "jumps", "über", "naïve", "日本語", "テスト", "🙂",
         "emoji", "café", "tokenizer", "streaming", "a", "x", "1999", "it's", "don't", "ok.", "why?"]


def sample_texts(seed: int, n: int) -> list[str]:
    """Sentences of WORDS and pseudo-words (their many overlapping merges make merge order matter), with
    odd spacing, newlines, and characters the models never saw (byte fallback)."""
    rng = random.Random(seed)

    def word() -> str:
        return rng.choice(WORDS) if rng.random() < 0.5 else "".join(rng.choices("abcdeé日", k=rng.randint(1, 8)))

    out = []
    for _ in range(n):
        sep = rng.choice([" ", "  ", " \n ", "\n", " "])
        words = [word() for _ in range(rng.randint(0, 12))]
        out.append(rng.choice(["", " ", "  ", "\n"]) + sep.join(words) + rng.choice(["", "!", "ç", "\U0001d518", "😶‍🌫️"]))
    return out


def streamed(tok: Tokenizer, ids: list[int]) -> str:
    sd = StreamDecoder(tok)
    return "".join(sd.push(i) for i in ids) + sd.flush()


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    lines = sample_texts(0, 400)
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=400, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        character_coverage=1.0, minloglevel=2)
    return buf.getvalue()


def write_sp_gguf(path, sp: sentencepiece.SentencePieceProcessor) -> None:
    """The SentencePiece vocabulary as llama.cpp's converter writes it (tokens, scores, token types)."""
    n = sp.get_piece_size()
    types = [gguf.TokenType.CONTROL if sp.is_control(i) else gguf.TokenType.UNKNOWN if sp.is_unknown(i)
             else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL for i in range(n)]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([int(t) for t in types])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_llama_vocab_matches_sentencepiece(tmp_path, sp_model):
    """A GGUF "llama" vocabulary (llama.cpp's SPM merge by scores) tokenizes as sentencepiece does."""
    sp = sentencepiece.SentencePieceProcessor(model_proto=sp_model)
    write_sp_gguf(tmp_path / "sp.gguf", sp)
    fast = load_tokenizer(tmp_path / "sp.gguf")
    via_reader = Tokenizer.from_gguf_reader(gguf.GGUFReader(tmp_path / "sp.gguf"))
    assert (fast.bos_id, fast.eos_id, fast.add_bos, fast.vocab_size) == (sp.bos_id(), sp.eos_id(), True, 400)
    for text in sample_texts(1, 300):
        ids = sp.encode(text)
        assert fast.encode(text, add_bos=False) == ids, text
        assert via_reader.encode(text) == [sp.bos_id(), *ids], text
        assert fast.decode(ids) == sp.decode(ids) == streamed(fast, ids)


def test_sentencepiece_directory(tmp_path, sp_model):
    sp = sentencepiece.SentencePieceProcessor(model_proto=sp_model)
    (tmp_path / "tokenizer.model").write_bytes(sp_model)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>",
                                                                "eos_token": {"content": "</s>"}}))
    tok = load_tokenizer(tmp_path)
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.add_bos, tok.add_space_prefix) == ("sentencepiece", 1, 2, True, True)
    for text in sample_texts(2, 200):
        ids = sp.encode(text)
        assert tok.encode(text) == [1, *ids], text
        assert tok.decode([1, *ids]) == sp.decode(ids) == streamed(tok, ids)
    # control tokens written in the text: split out first, each fragment encoded by sentencepiece
    assert tok.encode("hello</s>world", add_bos=False) == [*sp.encode("hello"), 2, *sp.encode("world")]
    assert 2 not in tok.encode("hello</s>world", special=False)


def test_sentencepiece_style_tokenizer_json_matches_transformers(tmp_path, sp_model):
    transformers = pytest.importorskip("transformers")
    from transformers.tokenization_utils_base import generate_merges

    sp = sentencepiece.SentencePieceProcessor(model_proto=sp_model)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    hf = transformers.LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores))
    hf.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "tokenizer.json" and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.add_bos == (hf.encode("a")[:1] == [1])
    for text in sample_texts(3, 200):
        ids = hf.encode(text, add_special_tokens=False)
        assert tok.encode(text, add_bos=False) == ids, text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == streamed(tok, ids), text


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained with the tokenizers library, plus config files."""
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(sample_texts(4, 400), trainer)
    hf.add_tokens(["<think>"])  # an added token that is not special: decoded, and matched with special=False
    d = tmp_path_factory.mktemp("byte_level")
    hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": None}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    return d


def test_byte_level_tokenizer_json(byte_level_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(byte_level_dir / "tokenizer.json"))
    tok = load_tokenizer(byte_level_dir)
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.add_bos, tok.add_space_prefix) == ("tokenizer.json", None, 0, False, False)
    assert tok.eos_ids == {0, 2}
    chat = "<|im_start|>user\nhello <think>world<|im_end|>"
    for text in [*sample_texts(5, 200), chat]:
        ids = hf.encode(text, add_special_tokens=False)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == streamed(tok, ids), text
    assert tok.encode(chat)[0] == 1 and 1 not in tok.encode(chat, special=False)
    assert tok.token_to_piece(tok.encode("<think>")[0]) == "<think>" == tok.decode(tok.encode("<think>", special=False))
    rng = random.Random(6)
    for _ in range(100):  # any id sequence, split characters included
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 30))]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == streamed(tok, ids)
    with pytest.raises(UsageError):
        tok.encode(None)  # type: ignore[arg-type]


def test_gguf_gpt2_vocab_from_reader_matches_tokenizers(tmp_path, byte_level_dir):
    """The byte-level tokenizer written as a GGUF "gpt2" vocabulary (pre "gpt-2"), read through GGUFReader."""
    hf = tokenizers.Tokenizer.from_file(str(byte_level_dir / "tokenizer.json"))
    merges = json.loads((byte_level_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    n = hf.get_vocab_size()
    added = hf.get_added_tokens_decoder()
    types = [(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED) if i in added
             else gguf.TokenType.NORMAL for i in range(n)]
    w = gguf.GGUFWriter(str(tmp_path / "bpe.gguf"), "qwen2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([hf.id_to_token(i) for i in range(n)])
    w.add_token_types([int(t) for t in types])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = Tokenizer.from_gguf_reader(gguf.GGUFReader(tmp_path / "bpe.gguf"))
    assert (tok.kind, tok.eos_id, tok.add_bos, tok.clean_spaces) == ("gguf gpt2/gpt-2", 0, False, True)
    for text in [*sample_texts(7, 200), "<|im_start|>user\nhi <think>x<|im_end|>"]:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == ids, text
        assert streamed(tok, ids) == tok.decode(ids)

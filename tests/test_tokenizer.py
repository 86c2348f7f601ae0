"""GGUF tokenizers against llama.cpp's own test vectors (tests/test-tokenizer-0), and streaming decode.

The vectors are `ggml-vocab-*.gguf` + `.inp` / `.out` from llama.cpp's models/ directory: found in
$EDGEMOE_VOCAB_DIR or <repo>/../shared/vocab, else fetched once from the llama-cpp-python sdist on
PyPI (which vendors llama.cpp) into ~/.cache/edgemoe-test-vocab.
"""

from __future__ import annotations

import os
import pathlib
import random
import subprocess
import tarfile

import gguf
import pytest
from llamacpp_sdist import extract

from edgemoe.errors import ModelFormatError, UnsupportedError, UsageError
from edgemoe.tokenizer import StreamDecoder, clean_up_spaces, load_tokenizer

REPO = pathlib.Path(__file__).resolve().parent.parent
REQUIRED = ("llama-spm", "qwen2", "gpt-2", "deepseek-llm")


def _complete(d: pathlib.Path) -> bool:
    return all((d / f"ggml-vocab-{n}.gguf{ext}").exists() for n in REQUIRED for ext in ("", ".inp", ".out"))


def _fetch(cache: pathlib.Path) -> pathlib.Path:
    """Extract vendor/llama.cpp/models/ggml-vocab-* from the llama-cpp-python sdist into cache."""
    return extract(cache, lambda name: "/ggml-vocab-" in name, _complete)


@pytest.fixture(scope="session")
def vocab_dir() -> pathlib.Path:
    for cand in (os.environ.get("EDGEMOE_VOCAB_DIR"), REPO.parent / "shared" / "vocab"):
        if cand and _complete(pathlib.Path(cand)):
            return pathlib.Path(cand)
    try:
        return _fetch(pathlib.Path.home() / ".cache" / "edgemoe-test-vocab")
    except (OSError, subprocess.SubprocessError, StopIteration, tarfile.TarError) as e:
        pytest.skip(f"llama.cpp vocabularies not found and could not be fetched: {e}")


@pytest.fixture(scope="session")
def tok_of(vocab_dir):
    """name -> Tokenizer, each loaded once per session."""
    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = load_tokenizer(vocab_dir / f"ggml-vocab-{name}.gguf")
        return loaded[name]

    return get


def read_vectors(gguf_path: pathlib.Path) -> dict[str, list[int]]:
    """The test strings and expected ids, parsed as test-tokenizer-0.cpp's read_tests does."""
    raw = gguf_path.with_name(gguf_path.name + ".inp").read_bytes().decode("utf-8")
    out_lines = gguf_path.with_name(gguf_path.name + ".out").read_text(encoding="utf-8").split("\n")
    if out_lines and out_lines[-1] == "":
        out_lines.pop()  # std::getline yields no line after the final newline
    sep, inputs, pos = "\n__ggml_vocab_test__\n", [], 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(sep)
    assert len(inputs) == len(out_lines) > 0
    return {s: [int(t) for t in o.split()] for s, o in zip(inputs, out_lines)}


def llama_cpp_clean_spaces(text: str) -> str:
    """A line-by-line port of the clean_spaces passes of llama.cpp's llama_vocab::impl::detokenize."""
    t = bytearray(text.encode("utf-8"))
    n, total = len(t), 1 if t else 0
    for i in range(1, n):  # " ?", " !", " .", " ,"
        x = t[i]
        if t[i - 1] == 0x20 and x in b"?!.,":
            total -= 1
        t[total] = x
        total += 1
    n, total, i = total, 1 if total else 0, 1
    while i < n:  # " ' "
        x = t[i]
        if x == 0x27 and i + 1 < n and t[i - 1] == 0x20 and t[i + 1] == 0x20:
            total -= 1
            i += 1
            t[i] = 0
        t[total] = x
        total += 1
        i += 1
    n, total = total, 1 if total else 0
    for i in range(1, n):  # " 's", " 'm", " 're", " 've"
        x = t[i]
        if t[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1, x12 = t[i + 1], bytes(t[i + 1:i + 3]) if i + 2 < n else b""
            if x1 in b"sm" or (x1 not in b"td" and x12 in (b"re", b"ve")):  # " 't", " 'd", " 'll" keep it
                total -= 1
        t[total] = x
        total += 1
    return bytes(t[:total]).decode("utf-8", errors="replace")


def stream(tok, ids, special=False) -> tuple[str, list[str]]:
    sd = StreamDecoder(tok, special=special)
    pieces = [sd.push(i) for i in ids]
    pieces.append(sd.flush())
    return "".join(pieces), pieces


@pytest.mark.parametrize("name", REQUIRED)
def test_encode_matches_llama_cpp_vectors(vocab_dir, tok_of, name):
    tok = tok_of(name)
    vectors = read_vectors(vocab_dir / f"ggml-vocab-{name}.gguf")
    wrong = {s: (tok.encode(s, add_bos=False), ids) for s, ids in vectors.items() if tok.encode(s, add_bos=False) != ids}
    assert not wrong, f"{len(wrong)}/{len(vectors)} strings tokenized differently: {list(wrong.items())[:3]}"


@pytest.mark.parametrize("name", REQUIRED)
def test_decode_and_stream_round_trip_vectors(vocab_dir, tok_of, name):
    tok = tok_of(name)
    for text, ids in read_vectors(vocab_dir / f"ggml-vocab-{name}.gguf").items():
        want = llama_cpp_clean_spaces(text) if tok.clean_spaces else text
        assert tok.decode(ids) == want, (text, tok.decode(ids))
        assert stream(tok, ids)[0] == want


def test_vocabulary_switches(tok_of):
    spm, qwen, gpt2, dsk = (tok_of(n) for n in REQUIRED)
    assert (spm.add_bos, spm.add_space_prefix, spm.clean_spaces, spm.bos_id, spm.eos_id) == (True, True, False, 1, 2)
    assert (qwen.add_bos, qwen.clean_spaces, gpt2.add_bos, gpt2.clean_spaces) == (False, False, False, True)
    assert dsk.add_bos and dsk.bos_id == 100000 and dsk.eos_id == 100001
    assert spm.encode("Hello world") == [1, 15043, 3186]  # the vectors' ids, with BOS prepended
    assert {qwen.token_to_piece(i) for i in qwen.eos_ids} >= {"<|endoftext|>", "<|im_end|>"}
    assert spm.vocab_size == 32000 and qwen.vocab_size == 151936


def test_extra_vocabularies(vocab_dir):
    """Any other llama.cpp vocabulary in the directory (the sdist has llama-bpe, qwen35, starcoder, ...)."""
    ran = 0
    for path in sorted(vocab_dir.glob("ggml-vocab-*.gguf")):
        name = path.name[len("ggml-vocab-"):-len(".gguf")]
        if name in REQUIRED or not path.with_name(path.name + ".out").exists():
            continue
        try:
            tok = load_tokenizer(path)
        except UnsupportedError:
            continue
        for text, ids in read_vectors(path).items():
            assert tok.encode(text, add_bos=False) == ids, (name, text)
        ran += 1
    if not ran:
        pytest.skip("no extra vocabularies in " + str(vocab_dir))


def test_token_pieces_and_bytes(tok_of):
    spm, gpt2 = tok_of("llama-spm"), tok_of("gpt-2")
    assert spm.token_to_piece(13) == "<0x0A>" and spm.token_bytes(13) == b"\n"
    assert spm.token_to_piece(15043) == "\u2581Hello" and spm.token_bytes(15043) == b" Hello"
    assert spm.token_bytes(1) == b"" and spm.token_bytes(1, special=True) == b"<s>"
    assert spm.decode([1, 15043, 3186]) == "Hello world"  # BOS writes nothing; the leading space goes
    assert gpt2.token_bytes(gpt2.encode(" world")[0]) == b" world"
    with pytest.raises(UsageError):
        spm.decode([32000])


def test_special_tokens_in_text(tok_of):
    spm, qwen = tok_of("llama-spm"), tok_of("qwen2")
    # llama.cpp prefixes a space to the text after a special token as to the start of the text
    assert spm.encode("<s>Hello</s>", add_bos=False) == [1, 15043, 2]
    assert 1 not in spm.encode("<s>Hello", add_bos=False, special=False)
    im_start = qwen.encode("<|im_start|>", add_bos=False)
    assert len(im_start) == 1 and qwen.token_to_piece(im_start[0]) == "<|im_start|>"
    chat = "<|im_start|>user\nHi there<|im_end|>\n"
    assert qwen.encode(chat, add_bos=False) == (im_start + qwen.encode("user\nHi there", add_bos=False)
                                                + [qwen.encode("<|im_end|>")[0]] + qwen.encode("\n"))
    assert im_start[0] not in qwen.encode(chat, special=False)


def test_special_tokens_match_transformers_gguf_tokenizer(vocab_dir, tok_of):
    """transformers builds its own tokenizer from the same GGUF; added tokens must split the same way."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    arch, tok_dict, _ = mapping.get_gguf_tokenizer(str(vocab_dir / "ggml-vocab-qwen2.gguf"))
    hf, _ = mapping.convert_gguf_tokenizer(arch, tok_dict)
    qwen = tok_of("qwen2")
    rng = random.Random(1)
    words = read_vectors(vocab_dir / "ggml-vocab-qwen2.gguf").keys()
    parts = [*words, "<|im_start|>", "<|im_end|>", "<|endoftext|>", " ", "\n"]
    for _ in range(200):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 8)))
        assert qwen.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
    hf.encode_special_tokens = True
    text = "<|im_start|>system\nYou are<|im_end|>"
    assert qwen.encode(text, special=False) == hf.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("name", REQUIRED)
def test_stream_random_ids_equals_decode(tok_of, name):
    tok = tok_of(name)
    rng = random.Random(REQUIRED.index(name))
    byte_ids = [i for i in range(tok.vocab_size) if len(tok.token_bytes(i)) == 1 and tok.token_bytes(i)[0] >= 0x80]
    for trial in range(40):
        pool = byte_ids if trial % 2 and byte_ids else range(tok.vocab_size)  # split characters and garbage
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 60))]
        for special in (False, True):
            assert stream(tok, ids, special)[0] == tok.decode(ids, special=special)


@pytest.mark.parametrize("name", REQUIRED)
def test_stream_never_splits_a_character(tok_of, name):
    tok = tok_of(name)
    text = "Gödel 🦙 naïve 日本語のテキスト 😶‍🌫️ ✅ ok"
    ids = tok.encode(text, add_bos=False)
    out, pieces = stream(tok, ids)
    assert out == text == tok.decode(ids)
    assert "\ufffd" not in out and any(p == "" for p in pieces[:-1])  # some bytes were held back
    if name == "llama-spm":  # 🦙 has no token: four byte-fallback tokens, printed together by the 4th
        i = ids.index(243)
        assert ids[i:i + 4] == [243, 162, 169, 156] and pieces[i:i + 4] == ["", "", "", "\U0001f999"]


def test_flush_replaces_incomplete_tail(tok_of):
    spm = tok_of("llama-spm")
    _, pieces = stream(spm, [15043, 243, 162])  # "▁Hello" then 2 of the 4 bytes of an emoji
    assert pieces == ["Hello", "", "", "\ufffd"] and spm.decode([15043, 243, 162]) == "Hello\ufffd"


class _CharTokens:
    """A stand-in vocabulary of single ASCII characters, to drive StreamDecoder's clean-up hold-back."""

    add_space_prefix, clean_spaces = False, True

    @staticmethod
    def token_bytes(i, special=False):
        return bytes([i])


def test_clean_up_spaces_matches_llama_cpp_and_streams():
    rng = random.Random(0)
    alphabet = " '.,?!smrevtdlxé"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        want = llama_cpp_clean_spaces(text)
        assert clean_up_spaces(text) == want, text
        if text.isascii():
            assert stream(_CharTokens, text.encode())[0] == want, text


def test_load_errors(tmp_path, vocab_dir):
    def one_line(exc_info):
        assert "\n" not in str(exc_info.value)

    with pytest.raises(ModelFormatError) as e:
        load_tokenizer(tmp_path / "missing.gguf")
    one_line(e)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelFormatError):
        load_tokenizer(tmp_path / "junk.gguf")
    with pytest.raises(ModelFormatError):
        load_tokenizer(tmp_path)  # a directory without tokenizer files
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes((vocab_dir / "ggml-vocab-gpt-2.gguf").read_bytes()[:5000])
    with pytest.raises(ModelFormatError):
        load_tokenizer(truncated)

    def write(name, **kv):
        w = gguf.GGUFWriter(str(tmp_path / name), "llama")
        for key, value in kv.items():
            if isinstance(value, str):
                w.add_string(key.replace("__", "."), value)
            else:
                w.add_array(key.replace("__", "."), value)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return tmp_path / name

    with pytest.raises(ModelFormatError, match="no tokenizer.ggml.tokens"):
        load_tokenizer(write("notokens.gguf", tokenizer__ggml__model="llama"))
    with pytest.raises(ModelFormatError, match="no vocabulary"):
        load_tokenizer(write("novocab.gguf", tokenizer__ggml__model="no_vocab"))
    with pytest.raises(UnsupportedError, match="'llama'.*'gpt2'") as e:
        load_tokenizer(write("bert.gguf", tokenizer__ggml__model="bert", tokenizer__ggml__tokens=["a", "b"]))
    one_line(e)
    with pytest.raises(UnsupportedError, match="qwen2"):
        load_tokenizer(write("pre.gguf", tokenizer__ggml__model="gpt2", tokenizer__ggml__pre="no-such-pre",
                             tokenizer__ggml__tokens=["a", "b", "ab"], tokenizer__ggml__merges=["a b"]))

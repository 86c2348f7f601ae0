"""Write a SentencePiece-style (`llama`) vocabulary as a vocabulary-only GGUF file."""

from __future__ import annotations

from gguf import GGUFWriter


def write_llama_vocab(path: str, pieces: list[str], scores: list[float], types: list[int], *, bos: int, eos: int,
                      unk: int, add_space_prefix: bool = True) -> None:
    """The `tokenizer.*` keys llama.cpp's converter writes for a SentencePiece model, and no tensors."""
    w = GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_unk_token_id(unk)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if not add_space_prefix:
        w.add_add_space_prefix(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

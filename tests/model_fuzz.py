"""Structure-aware mutations of model files, and the judge every mutant must satisfy.

Mutants of a GGUF file (metadata values and types, tensor infos: dims, type, offset, name; truncation),
of an HF checkpoint's config.json and of its safetensors headers. A mutant must be refused with one typed
error, or load and generate; if it generates, its tokens must equal the unmutated model's unless the
mutation legitimately changes what the model computes (a rope base, an epsilon, the experts per token,
a type swap between formats of equal size: files that are valid, only different).

Used by tests/test_fuzz_models.py (Hypothesis, bounded) and tools/fuzz_models.py (long runs).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass

from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as T
from gguf_image import GGUFImage
from hypothesis import strategies as st

PROMPT = [1, 17, 29, 33]
N_TOKENS = 3

# Metadata whose change gives a different but valid model (the judge lets it run differently).
SEMANTIC_KEYS = {"llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.expert_used_count",
                 "llama.context_length", "rope_theta", "rms_norm_eps", "num_experts_per_tok",
                 "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                 "rope_parameters"}
SAME_SIZE = [{Q.Q4_0, Q.Q4_K}, {Q.F16, Q.BF16}]  # bytes per value equal: a swap keeps the layout valid

_INTS = [0, 1, 2, 3, 4, 5, 8, 16, 17, 64, 100, 127, 128, 129, 2048, 2**31, 2**32 - 1]
_FLOATS = [0.0, -1.0, float("nan"), float("inf"), 1e-30, 1e-5, 0.5, 10000.0, 1e30]
_STRINGS = [b"", b"llama", b"mixtral", b"\xff\xfe", b"a" * 300, b"none", b"yarn"]
GGUF_VALUES = st.one_of(
    st.tuples(st.just(T.UINT32), st.sampled_from(_INTS)),
    st.tuples(st.just(T.INT32), st.sampled_from([-1, -(2**31), 2])),
    st.tuples(st.just(T.UINT64), st.sampled_from([0, 2, 2**63, 2**64 - 1])),
    st.tuples(st.just(T.FLOAT32), st.sampled_from(_FLOATS)),
    st.tuples(st.just(T.FLOAT64), st.sampled_from(_FLOATS)),
    st.tuples(st.just(T.STRING), st.sampled_from(_STRINGS)),
    st.tuples(st.just(T.BOOL), st.booleans()),
    st.tuples(st.just(T.ARRAY), st.just((T.UINT32, [1, 2, 3]))),
)
_TYPES = [int(q) for q in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q5_0, Q.IQ2_XXS)] + [99]


@dataclass
class Mutant:
    path: str
    ops: list  # what was done, for the report
    semantic: bool  # the mutation may change the model's output legitimately


# ---------------------------------------------------------------------------------------------- GGUF

def gguf_ops(image: GGUFImage):
    """A strategy of 1-3 edits of `image`."""
    keys = [k.key.decode() for k in image.kvs if not k.key.startswith(b"tokenizer.ggml.")] + \
        ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "llama.rope.scaling.type", "general.alignment"]
    n = len(image.tensors)
    op = st.one_of(
        st.tuples(st.just("set"), st.sampled_from(keys), GGUF_VALUES),
        st.tuples(st.just("drop"), st.sampled_from(keys)),
        st.tuples(st.just("dim"), st.integers(0, n - 1), st.integers(0, 2),
                  st.sampled_from([0, 1, 16, 32, 64, 96, 128, 160, 256, 384, 2**32, 2**40, -32, 32])),
        st.tuples(st.just("ndims"), st.integers(0, n - 1), st.sampled_from([-1, 1])),
        st.tuples(st.just("type"), st.integers(0, n - 1), st.sampled_from(_TYPES)),
        st.tuples(st.just("offset"), st.integers(0, n - 1), st.sampled_from([0, 32, -32, 1, 2**40, -(2**20)])),
        st.tuples(st.just("rename"), st.integers(0, n - 1),
                  st.sampled_from([b"blk.7.attn_q.weight", b"blk.0.attn_q.weight", b"x", b"\xff.weight", b""])),
        st.tuples(st.just("remove"), st.integers(0, n - 1)),
        st.tuples(st.just("tokens"), st.sampled_from(["shorter", "longer", "bad utf-8", "scores short"])),
        st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
        st.tuples(st.just("version"), st.sampled_from([1, 2, 4, 2**32 - 1])),
    )
    return st.lists(op, min_size=1, max_size=3)


def apply_gguf(base_path: str, ops: list, out: str) -> Mutant:
    im = GGUFImage.read(base_path)
    semantic = True
    cut = None
    for op in ops:
        kind = op[0]
        if kind == "set":
            _, key, (vtype, value) = op
            im.set(key, vtype, value)
            semantic &= key in SEMANTIC_KEYS and _numeric_like(vtype, value)
        elif kind == "drop":
            im.drop(op[1])
            semantic &= op[1] in SEMANTIC_KEYS or op[1].startswith("general.") and op[1] != "general.architecture"
        elif kind in ("dim", "ndims", "type", "offset", "rename", "remove"):
            t = im.tensors[op[1] % len(im.tensors)]
            if kind == "dim":
                i = op[2] % len(t.dims)
                before = t.dims[i]
                t.dims[i] = op[3] if op[3] > 0 else max(0, t.dims[i] + op[3])
                semantic &= t.dims[i] == before
            elif kind == "ndims":
                t.dims = t.dims[:-1] if op[2] < 0 and len(t.dims) > 1 else t.dims + [1]
                semantic = False
            elif kind == "type":
                same = any({t.ggml_type, op[2]} <= {int(q) for q in g} for g in SAME_SIZE) or t.ggml_type == op[2]
                t.ggml_type = op[2]
                semantic &= same
            elif kind == "offset":
                t.offset = max(0, t.offset + op[2]) if abs(op[2]) < 2**30 else op[2] & (2**64 - 1)
                semantic = False
            elif kind == "rename":
                semantic &= t.name == op[2]
                t.name = op[2]
            else:
                im.remove_tensor(t.name.decode(errors="replace")) if _decodable(t.name) else im.tensors.remove(t)
                semantic &= t.name == b"output.weight"  # llama.cpp ties the head to the embedding (with a warning)
        elif kind == "tokens":
            _edit_tokens(im, op[1])
            semantic = False
        elif kind == "truncate":
            cut = int(op[1] * (len(im.data) + 50000))
            semantic = False
        elif kind == "version":
            im.version = op[1]
            semantic = False
    im.write(out)
    if cut is not None:
        with open(out, "r+b") as f:
            f.truncate(min(cut, os.path.getsize(out)))
    return Mutant(out, ops, semantic)


def _decodable(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


def _numeric_like(vtype: int, value) -> bool:
    return vtype not in (T.STRING, T.ARRAY) and not isinstance(value, bool)


def _edit_tokens(im: GGUFImage, how: str) -> None:
    kv = im.kv("tokenizer.ggml.tokens")
    et, items = kv.value
    if how == "shorter":
        kv.value = (et, items[:-1])
    elif how == "longer":
        kv.value = (et, items + [b"extra"])
    elif how == "bad utf-8":
        kv.value = (et, items[:5] + [b"\xff\xfe"] + items[6:])
    else:
        scores = im.kv("tokenizer.ggml.scores")
        if scores is not None:
            scores.value = (scores.value[0], scores.value[1][:10])


# ----------------------------------------------------------------------------------------- HF checkpoints

HF_VALUES = st.one_of(
    st.sampled_from(_INTS + [-1, 10**30]), st.sampled_from(_FLOATS + [2.0, 64.0]), st.booleans(), st.none(),
    st.sampled_from(["64", "silu", "gelu", "", "mixtral", "llama", "\udcff"]),
    st.sampled_from([[], [1, 2], {}, {"rope_type": "yarn", "factor": 2.0}, {"rope_type": "default"}]),
)
HF_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "rms_norm_eps",
           "rope_parameters", "rope_scaling", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
           "bos_token_id", "eos_token_id", "model_type", "hidden_act", "sliding_window", "torch_dtype",
           "unknown_key"]


def hf_ops():
    op = st.one_of(
        st.tuples(st.just("set"), st.sampled_from(HF_KEYS), HF_VALUES),
        st.tuples(st.just("drop"), st.sampled_from(HF_KEYS)),
        st.tuples(st.just("raw"), st.sampled_from(["list", "truncate", "latin-1", "deep", "digits", "empty"])),
        st.tuples(st.just("header"), st.sampled_from(["dtype", "shape", "offsets", "length", "garbage"]),
                  st.integers(0, 10**6)),
    )
    return st.lists(op, min_size=1, max_size=3)


def apply_hf(base_dir: str, ops: list, out: str) -> Mutant:
    if os.path.exists(out):
        shutil.rmtree(out)
    shutil.copytree(base_dir, out)
    cfg_path = os.path.join(out, "config.json")
    cfg = json.load(open(cfg_path))
    raw_edit, semantic = None, True
    for op in ops:
        if op[0] == "set":
            before = cfg.get(op[1], "<absent>")
            cfg[op[1]] = op[2]
            unchanged = before == op[2] and type(before) is type(op[2])
            semantic &= unchanged or op[1] in SEMANTIC_KEYS or op[1] in ("torch_dtype", "unknown_key")
        elif op[0] == "drop":
            semantic &= op[1] not in cfg or op[1] in SEMANTIC_KEYS or op[1] in (
                "torch_dtype", "unknown_key", "head_dim", "sliding_window", "rope_scaling", "hidden_act")
            cfg.pop(op[1], None)
        elif op[0] == "raw":
            raw_edit, semantic = op[1], False
        else:
            _edit_header(out, op[1], op[2])
            semantic = False
    try:
        text = json.dumps(cfg, allow_nan=True)
    except (ValueError, UnicodeEncodeError):
        text = "{"
    data = text.encode("utf-8", "surrogatepass")
    if raw_edit == "list":
        data = b"[" + data + b"]"
    elif raw_edit == "truncate":
        data = data[: len(data) // 2]
    elif raw_edit == "latin-1":
        data = data.replace(b"mixtral", b"mixtr\xe9l")
    elif raw_edit == "deep":
        data = b"[" * 50000 + b"]" * 50000
    elif raw_edit == "digits":
        data = data.replace(b'"hidden_size": 64', b'"hidden_size": 1' + b"0" * 5000)
    elif raw_edit == "empty":
        data = b""
    with open(cfg_path, "wb") as f:
        f.write(data)
    return Mutant(out, ops, semantic)


def _edit_header(directory: str, how: str, k: int) -> None:
    fn = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))[0]
    path = os.path.join(directory, fn)
    blob = open(path, "rb").read()
    (n,) = struct.unpack("<Q", blob[:8])
    try:
        header = json.loads(blob[8:8 + n])
    except ValueError:  # an earlier edit already broke it: break it further
        how = "garbage"
        n = min(n, len(blob) - 8)
        header = {"x": {}}
    names = sorted(k for k in header if k != "__metadata__")
    name = names[k % len(names)]
    h = header[name]
    if how == "dtype":
        h["dtype"] = ["F64", "I8", "U8", "BF16", "F16", "bogus"][k % 6]
    elif how == "shape":
        h["shape"] = [max(1, h["shape"][0] // 2)] + h["shape"][1:] if k % 2 else h["shape"][::-1] + [1]
    elif how == "offsets":
        lo, hi = h["data_offsets"]
        h["data_offsets"] = [lo + 4, hi + 4] if k % 2 else [hi, lo]
    new = json.dumps(header).encode()
    if how == "length":
        out = struct.pack("<Q", n + 1 + k % 100) + blob[8:]
    elif how == "garbage":
        out = blob[:8] + b"\xff" * n + blob[8 + n:]
    else:
        new += b" " * (-len(new) % 8)
        out = struct.pack("<Q", len(new)) + new + blob[8 + n:]
    with open(path, "wb") as f:
        f.write(out)


# ------------------------------------------------------------------------------------------- pack manifests

MANIFEST_VALUES = st.one_of(st.sampled_from([0, 1, -1, 4096, 2**40, 2**64, 7.5, True, None, "", "Q4_0", "zz",
                                             "00000000", [], {}, "\udcff"]))
ENTRY_KEYS = ["layer", "expert", "byte_offset", "byte_length", "checksum", "parts", "alignment_padding"]
PART_KEYS = ["offset", "length", "rows", "cols", "quantization"]


def manifest_ops():
    op = st.one_of(
        st.tuples(st.just("entry"), st.integers(0, 10**6), st.sampled_from(ENTRY_KEYS), MANIFEST_VALUES),
        st.tuples(st.just("part"), st.integers(0, 10**6), st.sampled_from(["gate", "up", "down"]),
                  st.sampled_from(PART_KEYS), MANIFEST_VALUES),
        st.tuples(st.just("drop_entry"), st.integers(0, 10**6)),
        st.tuples(st.just("dup_entry"), st.integers(0, 10**6)),
        st.tuples(st.just("top"), st.sampled_from(["pack_bytes", "experts", "alignment", "format_version"]),
                  MANIFEST_VALUES),
        st.tuples(st.just("raw"), st.sampled_from(["truncate", "latin-1", "list", "empty"])),
    )
    return st.lists(op, min_size=1, max_size=3)


def apply_manifest(pack: str, manifest: str, ops: list, out_manifest: str) -> Mutant:
    """Writes a mutated copy of `manifest` to `out_manifest` (the pack's own manifest path in the caller's copy)."""
    m = json.load(open(manifest))
    raw = None
    for op in ops:
        entries = m.get("experts") if isinstance(m.get("experts"), list) else []
        if op[0] in ("entry", "part", "drop_entry", "dup_entry") and entries:
            x = entries[op[1] % len(entries)]
            if op[0] == "entry" and isinstance(x, dict):
                x[op[2]] = op[3]
            elif op[0] == "part" and isinstance(x, dict) and isinstance(x.get("parts"), dict) \
                    and isinstance(x["parts"].get(op[2]), dict):
                x["parts"][op[2]][op[3]] = op[4]
            elif op[0] == "drop_entry":
                entries.remove(x)
            elif op[0] == "dup_entry":
                entries.append(json.loads(json.dumps(x)))
        elif op[0] == "top":
            m[op[1]] = op[2]
        elif op[0] == "raw":
            raw = op[1]
    data = json.dumps(m).encode("utf-8", "surrogatepass")
    if raw == "truncate":
        data = data[: len(data) // 2]
    elif raw == "latin-1":
        data = data.replace(b"experts", b"exp\xe9rts", 1)
    elif raw == "list":
        data = b"[" + data + b"]"
    elif raw == "empty":
        data = b""
    with open(out_manifest, "wb") as f:
        f.write(data)
    # A manifest edit never makes another valid model: the experts either verify or they do not.
    return Mutant(pack, ops, semantic=False)


# ----------------------------------------------------------------------------------------------- the judge

def outcome(path: str, stream=None) -> tuple[str, object]:
    """("refused", message) | ("failed", message) | ("ran", tokens). Anything else raises: a bug.
    stream: StreamOptions to stream the experts (None: memory-mapped)."""
    from edgemoe.engine.core import generate
    from edgemoe.errors import EdgeMoEError
    from edgemoe.loader import load_model
    from edgemoe.sampling import SamplingParams

    loaded = None
    try:
        loaded = load_model(path, stream)
        prompt = [t % loaded.args.vocab_size for t in PROMPT]
        req = generate(loaded.model, prompt, N_TOKENS, SamplingParams(temperature=0.0), eos=False)
    except EdgeMoEError as e:  # at load, or when the engine starts (a mapped pack's checksums)
        msg = str(e)
        assert "\n" not in msg and len(msg) < 600, msg
        return "refused", msg
    finally:
        if loaded is not None:
            loaded.model.experts.close()
    if req.error is not None:
        if isinstance(req.error, EdgeMoEError):
            return "failed", str(req.error)
        raise req.error
    return "ran", req.tokens


def judge(m: Mutant, base_tokens: list[int], stream=None) -> str:
    """The mutant's outcome; raises AssertionError for a silent run of a changed model."""
    kind, detail = outcome(m.path, stream)
    if kind == "ran" and detail != base_tokens and not m.semantic:
        raise AssertionError(f"a mutant ran silently with other tokens ({detail} != {base_tokens}): {m.ops}")
    return kind


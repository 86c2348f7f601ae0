"""Whether two tokenizers are the same: a draft model must read and write exactly the target's token ids."""

from __future__ import annotations

PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "ROMEO. But soft, what light through yonder window breaks?\n\n  Indented  text,\ttabs 1603 & 42!",
    "naïve café — “quotes” ünïcödé 日本語 😀",
    "def f(x):\n    return x ** 2  # code\n",
)


def first_difference(target, draft) -> str | None:
    """None when `draft` tokenizes like `target`; else the first difference, as words for one error line.
    Compared: the vocabulary piece by piece, the special ids and flags, and the encodings of probe texts
    (which differ when merges or scores differ)."""
    if target is None or draft is None:
        return None if target is draft else "one of the two models carries no vocabulary"
    if target.vocab_size != draft.vocab_size:
        return f"vocabulary sizes differ ({target.vocab_size} tokens in the target, {draft.vocab_size} in the draft)"
    for i, (a, b) in enumerate(zip(target._pieces, draft._pieces)):
        if a != b:
            return f"token {i} is {a!r} in the target but {b!r} in the draft"
    for what in ("bos_id", "eos_id", "eos_ids", "add_bos", "add_space_prefix", "kind"):
        a, b = getattr(target, what), getattr(draft, what)
        if a != b:
            return f"{what} is {sorted(a) if isinstance(a, frozenset) else a!r} in the target but " \
                   f"{sorted(b) if isinstance(b, frozenset) else b!r} in the draft"
    for text in PROBES:
        a, b = target.encode(text), draft.encode(text)
        if a != b:
            j = next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"{text[:24]!r}... encodes differently (token {j}: {a[j:j + 1]} vs {b[j:j + 1]}; merges or " \
                   "scores differ)"
    return None

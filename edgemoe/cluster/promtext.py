"""Prometheus text from several replicas as one exposition: each sample labelled with its replica, each metric
family's HELP/TYPE once with all of its samples together (as the format requires)."""

from __future__ import annotations


def label(sample: str, labels: dict[str, str]) -> str:
    """`name{a="1"} 3` or `name 3` with `labels` added first."""
    if not labels:
        return sample
    extra = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    name, _, rest = sample.partition("{")
    if rest:  # name{...} value
        return f"{name}{{{extra},{rest}"
    name, _, value = sample.partition(" ")
    return f"{name}{{{extra}}} {value}"


def merge(texts: list[tuple[dict[str, str], str]]) -> str:
    """One exposition from (labels, text) pairs; families keep the order they are first seen in."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for labels, text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = headers.setdefault(parts[2], [])
                    samples.setdefault(parts[2], [])
                    if not any(h.split(None, 2)[1] == parts[1] for h in family):
                        family.append(line)
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            samples.setdefault(name, []).append(label(line, labels))
    out = []
    for name, lines in samples.items():
        out.extend(headers.get(name, []))
        out.extend(lines)
    return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

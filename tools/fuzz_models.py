"""Fuzz the model loader for longer than the test suite does: structure-aware mutants of a GGUF file and of
an HF checkpoint (tests/model_fuzz.py), fresh random seeds, until the time is up. Prints the outcome counts
and every failure (a crash kills the run: the last mutant is left in --work for reproduction).

    python tools/fuzz_models.py --minutes 10 [--target gguf|hf|both]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def main(argv: list[str] | None = None) -> int:
    from gguf_image import GGUFImage
    from hypothesis import HealthCheck, given, settings
    from model_fuzz import apply_gguf, apply_hf, gguf_ops, hf_ops, judge, outcome

    from edgemoe.default_model import draft_model_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--target", choices=("gguf", "hf", "both"), default="both")
    p.add_argument("--work", default=None, help="directory for the mutants (default: a temporary one)")
    args = p.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="edgemoe-fuzz-")
    os.makedirs(work, exist_ok=True)

    targets = []
    if args.target in ("gguf", "both"):
        base = os.path.join(work, "base.gguf")
        GGUFImage.read(draft_model_path()).write(base)
        targets.append(("gguf", base, outcome(base)[1], gguf_ops(GGUFImage.read(base)), apply_gguf,
                        os.path.join(work, "mutant.gguf")))
    if args.target in ("hf", "both"):
        from mixtral_factory import make_hf_mixtral

        hf, _, _ = make_hf_mixtral(vocab=300, hidden=64, layers=2)
        base = os.path.join(work, "base-hf")
        hf.save_pretrained(base)
        targets.append(("hf", base, outcome(base)[1], hf_ops(), apply_hf, os.path.join(work, "mutant-hf")))

    end = time.monotonic() + 60 * args.minutes
    counts: dict[str, dict[str, int]] = {name: {} for name, *_ in targets}
    failures: list[str] = []
    def campaign(name, base, tokens, ops_strategy, apply, out):
        @settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(ops=ops_strategy)
        def one(ops):
            if time.monotonic() > end:
                return
            m = apply(base, ops, out)
            try:
                kind = judge(m, tokens)
            except Exception as e:  # noqa: BLE001 - recorded and reported
                kind = "FAILURE"
                failures.append(f"{name} {ops}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
            counts[name][kind] = counts[name].get(kind, 0) + 1

        one()

    while time.monotonic() < end:
        for target in targets:
            campaign(*target)
    for name, c in counts.items():
        print(f"{name}: {sum(c.values())} mutants: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    for f in failures:
        print("FAILURE", f)
    print(f"{len(failures)} failures in {args.minutes:g} minutes")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

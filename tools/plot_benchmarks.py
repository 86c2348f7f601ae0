"""Draw decode tokens/s against the expert-cache budget (from bench_stream.py --json), with llama.cpp's decode
speed on the same file (from compare_llamacpp.py --json) as a horizontal line.

    python tools/bench_stream.py --json > stream.json
    python tools/compare_llamacpp.py MODEL.gguf --memory-limit-mb 600 --cache-mb 250 --json > compare.json
    python tools/plot_benchmarks.py stream.json compare.json -o docs/decode_vs_budget.png
"""

from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stream_json")
    p.add_argument("compare_json", nargs="*", help="compare_llamacpp.py results to draw as lines")
    p.add_argument("-o", "--output", default="decode_vs_budget.png")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.stream_json) as f:
        stream = json.load(f)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    depths = sorted({int(r["prefetch"]) for r in stream["rows"]}, reverse=True)  # older files: True / False
    for n, depth in enumerate(depths):
        rows = [r for r in stream["rows"] if int(r["prefetch"]) == depth]
        label = f"{depth} layer{'s' * (depth > 1)} ahead" if depth else "off"
        ax.plot([r["budget_pct"] for r in rows], [r["decode_tok_s"] for r in rows], "os^v"[n % 4] + ("-" if depth else "--"),
                label=f"edgemoe, prefetch {label}")
    for path in args.compare_json:
        with open(path) as f:
            c = json.load(f)
        where = f"cgroup {c['memory_limit_mb']} MB" if c.get("memory_limit_mb") else "in RAM"
        ax.axhline(c["llamacpp_decode_tok_s"], color="gray", linestyle=":", label=f"llama.cpp (mmap, {where})")
    info = stream["info"]
    ax.set_xlabel("expert cache budget (% of expert bytes)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{info['model'].rsplit('/', 1)[-1]}: {info['expert_gb']:.2f} GB of experts, "
                 f"disk {info['disk_direct_gb_s']:.2f} GB/s", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output)
    print(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

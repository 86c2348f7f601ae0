"""The soak's verdict (tools/soak.py): what the clients counted and the server sampled, summarised into one
report dict with its failures, and that report as a table."""

from __future__ import annotations

import collections
import os

from tools.soak_clients import Tally

SAMPLE_S = 2.0  # RSS / fds / health sampling period
FLAT = 0.10  # RSS may grow less than this over the run's second half


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile, None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def summarise(args, tally: Tally, samples: list, health: dict, t_load: float, fds_settled: int | None,
              faults: dict | None, counters: dict, server: dict, cache_mb: int | None) -> dict:
    g = tally.good
    bad_status = collections.Counter()
    for statuses in tally.bad.values():
        bad_status.update(statuses)
    bad_5xx = sum(n for k, n in bad_status.items() if k.startswith("5"))
    bad_other = sum(n for k, n in bad_status.items() if not k.startswith(("4", "5")))
    load = [s for s in samples if s[0] <= t_load + SAMPLE_S]
    rss = [s[1] for s in load] or [0.0]
    mid = min(load, key=lambda s: abs(s[0] - t_load / 2))[1] if load else 0.0
    growth = (rss[-1] - mid) / mid if mid else 0.0
    fds = [s[2] for s in samples] or [0]
    fd_bound = fds[0] + 2 * args.clients + 32  # a connection and a raw socket per client, and headroom
    fds_ok = max(fds) <= fd_bound and fds_settled is not None and fds_settled <= fds[0] + 8

    def sec(x):
        return None if x is None else round(x, 4)

    report = {
        "config": {"minutes": args.minutes, "clients": args.clients, "model": args.model or "embedded default",
                   "stream_cache_mb": cache_mb, "faults": args.faults,
                   "fault_eio_ms": list(args.fault_ms) if args.faults else None, "seed": args.seed,
                   "cores": os.cpu_count(), "load_avg_end": [round(x, 2) for x in os.getloadavg()]},
        "good": {"sent": g["sent"], "ok": g["ok"], "lost": g["sent"] - g["ok"], "lost_reasons": dict(tally.lost_reasons),
                 "greedy_checked": g["greedy_checked"], "greedy_prompts": len(tally.greedy),
                 "greedy_mismatch": g["mismatch"]},
        "bad": {"sent": sum(bad_status.values()), "status": dict(sorted(bad_status.items())), "5xx": bad_5xx,
                "not_4xx": bad_5xx + bad_other,
                "by_kind": {k: dict(v) for k, v in sorted(tally.bad.items())}},
        "disconnects": {"total": sum(tally.disconnects.values()), **dict(sorted(tally.disconnects.items()))},
        "latency_s": {"whole_p50": sec(percentile(tally.whole_s, 50)), "whole_p99": sec(percentile(tally.whole_s, 99)),
                      "first_token_p50": sec(percentile(tally.ttft_s, 50)),
                      "first_token_p99": sec(percentile(tally.ttft_s, 99)),
                      "stream_p50": sec(percentile(tally.stream_s, 50)),
                      "stream_p99": sec(percentile(tally.stream_s, 99))},
        "tokens": tally.tokens, "load_seconds": round(t_load, 1),
        "tokens_per_s": round(tally.tokens / t_load, 2) if t_load else 0.0,
        "rss_mb": {"start": round(rss[0], 1), "middle": round(mid, 1), "end": round(rss[-1], 1),
                   "max": round(max(rss), 1), "second_half_growth_pct": round(100 * growth, 2), "flat": growth < FLAT},
        "fds": {"start": fds[0], "max": max(fds), "bound": fd_bound, "settled": fds_settled, "bounded": fds_ok},
        "health": {k: v for k, v in health.items() if k != "last"},
        "server_requests": health.get("last", {}).get("requests"),
        "faults": faults, "server_counters": counters, "server": server, "examples": tally.examples,
    }
    failures = []
    if report["good"]["lost"]:
        failures.append(f"{report['good']['lost']} good requests lost")
    if g["mismatch"]:
        failures.append(f"{g['mismatch']} greedy replies differ from the first")
    if report["bad"]["not_4xx"]:
        failures.append(f"{report['bad']['not_4xx']} bad requests not answered 4xx ({bad_5xx} 5xx)")
    if set(health) - {"ok", "last"}:
        failures.append(f"/health failed: {report['health']}")
    if not server["alive_at_end"]:
        failures.append("the server died")
    if not server["clean_exit"]:
        failures.append(f"SIGTERM exit status {server['exit_code']}")
    if not report["rss_mb"]["flat"]:
        failures.append(f"RSS grew {report['rss_mb']['second_half_growth_pct']} % over the second half")
    if not fds_ok:
        failures.append(f"open fds not bounded: {report['fds']}")
    if server.get("clients_stuck"):
        failures.append(f"{server['clients_stuck']} client threads still waiting at the end")
    report["failures"] = failures
    report["pass"] = not failures
    failed_reads = counters.get("edgemoe_expert_reads_failed_total", 0)
    report["notes"] = [f"{failed_reads:.0f} expert reads failed all 4 attempts"
                       + ("; no request was lost to them (a failed prefetch is read again on demand)"
                          if not report["good"]["lost"] else "")] if failed_reads else []
    return report


def table(r: dict) -> str:
    c, g, b, lat, rss, fds, srv = r["config"], r["good"], r["bad"], r["latency_s"], r["rss_mb"], r["fds"], r["server"]

    def ms(x):
        return "-" if x is None else f"{1000 * x:.0f} ms"

    cache = "memory-mapped experts" if c["stream_cache_mb"] is None else f"experts streamed, {c['stream_cache_mb']} MB cache"
    rows = [
        ("run", f"{c['minutes']} min, {c['clients']} clients, {c['model']}, {cache}, faults "
                + (f"on (EIO windows {c['fault_eio_ms'][0]}-{c['fault_eio_ms'][1]} ms)" if c["faults"] else "off")),
        ("machine", f"{c['cores']} cores shared with other work; load average at the end {c['load_avg_end']}"),
        ("good requests", f"sent {g['sent']}, ok {g['ok']}, lost {g['lost']} {g['lost_reasons'] or ''}"),
        ("  greedy check", f"{g['greedy_checked']} replies against {g['greedy_prompts']} first replies, "
                           f"{g['greedy_mismatch']} differ"),
        ("  latency", f"whole p50 {ms(lat['whole_p50'])} p99 {ms(lat['whole_p99'])}; streamed first token "
                      f"p50 {ms(lat['first_token_p50'])} p99 {ms(lat['first_token_p99'])}, total "
                      f"p50 {ms(lat['stream_p50'])} p99 {ms(lat['stream_p99'])}"),
        ("  throughput", f"{r['tokens']} tokens in {r['load_seconds']} s = {r['tokens_per_s']} tok/s"),
        ("bad requests", f"sent {b['sent']}, 5xx {b['5xx']}, not 4xx {b['not_4xx']}; status "
                         + " ".join(f"{k}×{v}" for k, v in b["status"].items())),
        ("disconnects", ", ".join(f"{k} {v}" for k, v in r["disconnects"].items())),
        ("RSS MB", f"start {rss['start']}, middle {rss['middle']}, end {rss['end']}, max {rss['max']}; "
                   f"second half {rss['second_half_growth_pct']:+} % ({'flat' if rss['flat'] else 'GROWING'})"),
        ("open fds", f"start {fds['start']}, max {fds['max']} (bound {fds['bound']}), after load {fds['settled']} "
                     f"({'bounded' if fds['bounded'] else 'NOT BOUNDED'})"),
        ("/health", ", ".join(f"{k} {v}" for k, v in r["health"].items()) + f"; server requests {r['server_requests']}"),
    ]
    if r["faults"] is not None:
        f = r["faults"]
        rows.append(("faults", f"{f['windows']} windows opened ({f['windows_hit']} hit a read); injected {f['injected']}"))
    if r["server_counters"]:
        rows.append(("server counters", ", ".join(f"{k.removeprefix('edgemoe_')} {int(v) if v == int(v) else round(v, 4)}"
                                                  for k, v in r["server_counters"].items())))
    rows.append(("server", f"alive at the end: {'yes' if srv['alive_at_end'] else 'NO'}; SIGTERM → exit "
                           f"{srv['exit_code']} in {srv['stop_seconds']} s ({'clean' if srv['clean_exit'] else 'NOT CLEAN'});"
                           f" log {srv['log_lines']} lines, {srv['tracebacks']} tracebacks"))
    rows += [("note", n) for n in r["notes"]]
    rows.append(("RESULT", "PASS" if r["pass"] else "FAIL: " + "; ".join(r["failures"])))
    out = [f"{k:<16} {v}" for k, v in rows]
    out += [f"  e.g. {e}" for e in r["examples"]]
    return "\n".join(out)

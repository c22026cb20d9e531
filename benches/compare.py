#!/usr/bin/env python3
"""Our criterion figures next to PyTorch's for the same cases, as a markdown table for
docs/performance.md.

Inputs: the output of the bench binary (criterion's text, e.g. gpu-bundle's logs/bench-*.log) and
the JSON lines of benches/torch_reference.py (--json). Cases are matched by id: a PyTorch id is
our `group/id`, optionally followed by the variant it timed (" flex", " sdpa", " [cdist]",
" [tf32 convs]"), which then gets a row of its own. Our time is criterion's point estimate (the middle of `time: [...]`);
PyTorch's is its median over repetitions. Rates are recomputed from the FLOP or byte count the
PyTorch script states, which benches/ops.rs counts the same way, so the two columns use one unit
(TFLOP/s, or GB/s = 1e9 bytes/s). "speed-up" is PyTorch's time over ours (> 1: we are faster).

Usage: python3 benches/compare.py logs/bench-ops.log logs/torch-reference.jsonl [--all]
(--all also lists our cases that have no PyTorch counterpart)
"""

import argparse
import json
import re
import sys

UNIT_MS = {"ps": 1e-9, "ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}
TIME = re.compile(r"time:\s+\[\S+ \S+ (?P<value>[0-9.]+) (?P<unit>ps|ns|µs|us|ms|s) \S+ \S+\]")
VARIANTS = (" flex", " sdpa", " [cdist]", " [tf32 convs]")


def criterion_times(text):
    """{id: milliseconds} from criterion's output. The id is the line before `time:`, or the
    start of the same line when criterion fits both on one."""
    times, last = {}, None
    for line in text.splitlines():
        m = TIME.search(line)
        if m:
            head = line[: m.start()].strip()
            case = head or last
            if case:
                times[case] = float(m.group("value")) * UNIT_MS[m.group("unit")]
            last = None
        elif line and not line[0].isspace() and not line.startswith(("Benchmarking", "Found", "Warning", "Gnuplot")):
            last = line.strip()
    return times


def rate(row, ms):
    if row.get("flops"):
        return f"{row['flops'] / ms / 1e9:.1f} TFLOP/s"
    if row.get("bytes"):
        return f"{row['bytes'] / ms / 1e6:.0f} GB/s"
    return ""


def fmt_ms(ms):
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.3f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bench_log")
    ap.add_argument("torch_jsonl")
    ap.add_argument("--all", action="store_true")
    args = ap.parse_args()
    with open(args.bench_log, encoding="utf-8") as f:
        ours = criterion_times(f.read())
    with open(args.torch_jsonl, encoding="utf-8") as f:
        torch_rows = [json.loads(line) for line in f if line.strip()]
    if not ours:
        sys.exit(f"{args.bench_log}: no criterion `time:` lines found")

    print("| case | mvar | mvar rate | PyTorch | PyTorch rate | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    matched = set()
    for row in torch_rows:
        full = f"{row['group']}/{row['id']}"
        case, variant = full, ""
        if case not in ours:
            for v in VARIANTS:
                if full.endswith(v) and full[: -len(v)] in ours:
                    case, variant = full[: -len(v)], v.strip()
                    break
        ref = f"{fmt_ms(row['ms'])}{' (' + variant + ')' if variant else ''}"
        if case not in ours:
            print(f"| {full} | not measured | | {ref} | {rate(row, row['ms'])} | |")
            continue
        matched.add(case)
        ms = ours[case]
        print(f"| {case} | {fmt_ms(ms)} | {rate(row, ms)} | {ref} | {rate(row, row['ms'])} | {row['ms'] / ms:.2f}x |")
    if args.all:
        for case, ms in ours.items():
            if case not in matched:
                print(f"| {case} | {fmt_ms(ms)} | | no PyTorch case | | |")


if __name__ == "__main__":
    main()

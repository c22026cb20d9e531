#!/usr/bin/env python3
"""Markdown summary of Nsight Compute profiles: one row per profiled kernel launch with where its
time goes, from the raw metrics page that `ncu --import R.ncu-rep --page raw --csv` prints.

    python3 tools/ncu_summary.py logs/ncu-1.csv [logs/ncu-2.csv ...] > logs/ncu-summary.md

`run-all.sh ncu` (tools/gpu-test.sh) writes those files. A metric that a section did not collect
(another ncu version, another section set) shows as "-"; nothing here depends on the order of
the columns. The first table: time, the throughputs as % of the peak (SM = the busiest compute
pipe, memory = the busiest of DRAM, L2 and L1), the L2 hit rate, occupancy (achieved / the
launch's theoretical), registers, issue-slot use and the cycles a warp waits between its
instructions. The second: per kernel, the reasons warps were stalled, in cycles per issued
instruction, largest first (their sum is about the "cycles per instruction" of the first table).
"""
import csv
import re
import sys

# (column, metric names tried in order, scale, format)
COLUMNS = [
    ("time (us)", ["gpu__time_duration.sum"], "time", "{:.1f}"),
    ("SM %", ["sm__throughput.avg.pct_of_peak_sustained_elapsed"], 1, "{:.1f}"),
    ("memory %", ["gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"], 1, "{:.1f}"),
    ("DRAM %", ["dram__throughput.avg.pct_of_peak_sustained_elapsed",
                "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"], 1, "{:.1f}"),
    ("L2 hit %", ["lts__t_sector_hit_rate.pct"], 1, "{:.1f}"),
    ("occupancy %", ["sm__warps_active.avg.pct_of_peak_sustained_active"], 1, "{:.1f}"),
    ("theoretical %", ["sm__maximum_warps_per_active_cycle_pct"], 1, "{:.1f}"),
    ("registers", ["launch__registers_per_thread"], 1, "{:.0f}"),
    ("issue busy %", ["smsp__issue_active.avg.pct_of_peak_sustained_active",
                      "sm__inst_issued.avg.pct_of_peak_sustained_active"], 1, "{:.1f}"),
    ("cycles / instr", ["smsp__average_warp_latency_per_inst_issued.ratio",
                        "smsp__average_warps_issue_stalled_per_issue_active.ratio"], 1, "{:.1f}"),
]
STALL = re.compile(r"^smsp__average_warps?_issue_stalled_(.+)_per_issue_active\.ratio$")
# Units of gpu__time_duration that ncu may print, to microseconds.
TIME_UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
              "s": 1e6, "second": 1e6}


def number(text):
    text = (text or "").strip().replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def read(path):
    """The launches of one raw CSV page: (header, units, rows), rows as dicts."""
    with open(path, newline="") as f:
        # ncu prints its own lines (==PROF==, ==WARNING==) before the table when they go to stdout.
        lines = [l for l in f if not l.startswith("==")]
    table = list(csv.reader(lines))
    if not table:
        return [], {}, []
    header = table[0]
    units, rows = {}, []
    for cells in table[1:]:
        row = dict(zip(header, cells))
        # The units row: no launch ID.
        if not (row.get("ID") or "").strip():
            units = row
            continue
        rows.append(row)
    return header, units, rows


def value(row, units, names, scale):
    for name in names:
        v = number(row.get(name))
        if v is None:
            continue
        if scale == "time":
            unit = (units.get(name) or "ns").strip()
            return v * TIME_UNITS.get(unit, 1e-3)
        return v * scale
    return None


def main(paths):
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    launches = []
    for path in paths:
        header, units, rows = read(path)
        for row in rows:
            launches.append((path, header, units, row))
    if not launches:
        print("no profiled launches in " + ", ".join(paths))
        return 1
    print("| file | kernel | grid x block | " + " | ".join(c[0] for c in COLUMNS) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |")
    for path, _, units, row in launches:
        cells = []
        for _, names, scale, fmt in COLUMNS:
            v = value(row, units, names, scale)
            cells.append("-" if v is None else fmt.format(v))
        shape = "{} x {}".format(row.get("Grid Size", "?"), row.get("Block Size", "?"))
        print("| {} | {} | {} | {} |".format(path.rsplit("/", 1)[-1], row.get("Kernel Name", "?"), shape,
                                             " | ".join(cells)))
    print()
    print("Stall reasons (cycles per issued instruction, largest first):")
    print()
    for path, header, _, row in launches:
        stalls = []
        for name in header:
            m = STALL.match(name)
            v = number(row.get(name)) if m else None
            # "not_issued" and "selected" are not waits on something; the rest are.
            if v is not None and v > 0 and m.group(1) not in ("not_issued", "selected"):
                stalls.append((v, m.group(1)))
        stalls.sort(reverse=True)
        text = ", ".join("{} {:.2f}".format(n, v) for v, n in stalls[:8]) or "(not collected)"
        print("- {} {}: {}".format(path.rsplit("/", 1)[-1], row.get("Kernel Name", "?"), text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

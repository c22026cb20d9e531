#!/usr/bin/env python3
"""Bytes the neighbourhood-attention mma kernels stage from global memory into shared memory,
per pass, for the block tiles and for ring staging (cuda/kernels/na2d.cu), counted from the
window rule: how much L2 traffic each staging adds on top of reading every tensor once.

A block tile (4 map rows x 16 columns) stages every row its warps' windows (forward, dq: K and
V) or inverse windows (dk/dv: Q, dO, lse and delta, plus the tile's own K and V) need; a ring
work item of G row groups stages each of those rows once. Only columns inside the map are read
(the kernels zero-fill the padding). Head dim d, bf16 tensors, f32 statistics.

    python3 tools/na_staging_bytes.py                  # MVAR's maps, batch 64 x 16 heads, k 7
    python3 tools/na_staging_bytes.py --maps 512 --side 13 --k 7 --groups 1 2 4
"""
import argparse

WARPS = 4  # map rows per block tile (NA_WARPS)
TILE = 16  # columns per block tile (NA_TILE)


def start(i, n, k):
    return min(max(i - k // 2, 0), n - k)


def inv_lo(j, k):
    return 0 if j < k else j - k // 2


def inv_hi(j, n, k):
    return n if j + k >= n else j + k // 2 + 1


def span(first, last, n, k, key_side):
    """Rows (or columns) staged for tokens first..last: window union, or inverse-window union."""
    if key_side:
        return inv_lo(first, k), inv_hi(last, n, k)
    return start(first, n, k), start(last, n, k) + k


def staged_bytes(x, y, k, d, key_side, groups):
    """Bytes one map stages in one pass; groups 1 is the block tiles."""
    xtiles = -(-x // WARPS)
    total = 0
    for y0 in range(0, y, TILE):
        yl = min(y0 + TILE, y) - 1
        c0, c1 = span(y0, yl, y, k, key_side)
        cols = min(c1, y) - c0
        per_row = cols * d * 2 * 2 + (cols * 4 * 2 if key_side else 0)
        for g0 in range(0, xtiles, groups):
            rows = set()
            for gi in range(g0, min(g0 + groups, xtiles)):
                x0, xl = gi * WARPS, min(gi * WARPS + WARPS, x) - 1
                rows |= set(range(*span(x0, xl, x, k, key_side)))
                if key_side:  # the tile's own K and V
                    total += (xl - x0 + 1) * (yl - y0 + 1) * d * 2 * 2
            total += len(rows) * per_row
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maps", type=int, default=64 * 16, help="batch x heads")
    ap.add_argument("--side", type=int, nargs="+", default=[16, 13], help="square map sides")
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--groups", type=int, nargs="+", default=[2, 4], help="ring groups per item")
    a = ap.parse_args()
    head = ["map", "pass (stages)", "block tiles"] + [f"ring, {g} groups" for g in a.groups]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for n in a.side:
        once = n * n * a.d * 2 * a.maps / 1e6
        for key_side, name in ((False, "forward, dq (K, V)"), (True, "dk/dv (Q, dO, lse, delta; own K, V)")):
            cells = [staged_bytes(n, n, a.k, a.d, key_side, g) * a.maps / 1e6 for g in [1] + a.groups]
            print(f"| {n}x{n} | {name} | " + " | ".join(f"{c:.1f} MB" for c in cells) + " |")
        print(f"| {n}x{n} | one tensor read once | {once:.1f} MB |" + " |" * len(a.groups))


if __name__ == "__main__":
    main()

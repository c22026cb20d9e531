#!/usr/bin/env python3
"""What the official sampler's top-k / top-p filter keeps, for tests/fixtures/sampler_filter.rs.

`models.helpers.sample_with_top_k_top_p_` (the same in FoundationVision/VAR and CVL-UESTC/MVAR)
masks a row of logits with top-k, then top-p, and draws with torch.multinomial. Its draw depends
on torch's generator, which no reimplementation shares, but what it draws from does not: this
script runs it on fixed rows of logits for several (top_k, top_p) pairs with torch.multinomial
replaced by a recorder, and writes which codes kept a nonzero probability. Rows: random, peaked,
with ties (values on a 0.5 grid), constant, and rows whose top-k boundary value is tied. A row
is marked `near_cut` where a running sum of top-p lies within 1e-6 of its cut (1 - top_p),
computed in float64 from the sorted order torch used: float32 sums may then round either way;
and `tie_at_cut` where top-p drops some of a run of equal logits and keeps others: torch's sort
is not stable, so which of the equal codes survive is its choice, and only their number (and
values) is the official behaviour.

Usage: python3 tools/official_reference/sampler_filter.py --var-repo VAR --out tests/official
It imports the official sources and copies none of their code.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from official import prepare_official_import, var_repo_args, write_json  # noqa: E402

PAIRS = [(1, 0.0), (5, 0.0), (0, 0.5), (0, 0.9), (0, 0.99), (10, 0.8), (3, 0.96), (64, 0.96), (20, 0.3)]


def rows(v):
    import torch

    g = torch.Generator().manual_seed(1234)
    out = [torch.randn(v, generator=g) * 2 for _ in range(8)]
    for _ in range(3):  # peaked
        r = torch.randn(v, generator=g)
        r[int(torch.randint(0, v, (1,), generator=g))] += 8
        out.append(r)
    for _ in range(3):  # ties on a coarse grid
        out.append(torch.round(torch.randn(v, generator=g) * 2) / 2)
    out.append(torch.zeros(v))  # constant
    r = torch.randn(v, generator=g)
    r[:6] = r.max() + 1  # six tied maxima: top-k 1, 3, 5 cut inside the tie
    out.append(r)
    return torch.stack(out).float()


def main():
    args = var_repo_args()
    import torch

    prepare_official_import(args.var_repo)
    import models.helpers as helpers

    v = 64
    logits = rows(v)
    recorded = {}
    real = torch.multinomial

    def recorder(probs, num_samples, replacement=False, generator=None):
        recorded["probs"] = probs.clone()
        return real(probs, num_samples, replacement=replacement, generator=generator)

    helpers.torch.multinomial = recorder
    cases = []
    for top_k, top_p in PAIRS:
        x = logits.clone().unsqueeze(0)  # (B=1, l=rows, V)
        helpers.sample_with_top_k_top_p_(x, top_k=top_k, top_p=top_p, rng=torch.Generator().manual_seed(0))
        probs = recorded["probs"]
        kept = [[int(i) for i in torch.nonzero(p > 0).flatten()] for p in probs]
        near, tie = [], []
        for r in range(logits.shape[0]):
            # The top-p cut inside a run of equal logits: which of them torch's (unstable) sort put
            # first decides which are kept, so only their number and values are the official's.
            kept_vals = sorted(float(logits[r][i]) for i in kept[r])
            dropped = [float(logits[r][i]) for i in range(v) if i not in kept[r]]
            tie.append(top_p > 0 and bool(dropped) and max(dropped) == kept_vals[0])
            if top_p <= 0:
                near.append(False)
                continue
            row = logits[r].double()
            if 0 < top_k < v:
                kth = logits[r].topk(top_k).values.min().double()
                row = torch.where(row < kth, torch.tensor(float("-inf"), dtype=torch.float64), row)
            s, _ = row.sort()
            cum = s.softmax(-1).cumsum(-1)
            near.append(bool(((cum - (1 - top_p)).abs() < 1e-6).any()))
        cases.append(dict(top_k=top_k, top_p=top_p, kept=kept, near_cut=near, tie_at_cut=tie))
    out = dict(
        what="codes the official sample_with_top_k_top_p_ keeps (nonzero probability) for each row and "
             "(top_k, top_p) (tools/official_reference/sampler_filter.py)",
        torch_version=torch.__version__,
        logits=[[float(x) for x in r] for r in logits],
        cases=cases,
    )
    path = write_json(args.out, "sampler_filter.json", out)
    print(f"wrote {path}: {len(cases)} cases of {logits.shape[0]} rows; "
          f"{sum(sum(c['near_cut']) for c in cases)} rows near a cut, "
          f"{sum(sum(c['tie_at_cut']) for c in cases)} with a tie at the cut", file=sys.stderr)


if __name__ == "__main__":
    main()

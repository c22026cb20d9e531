#!/usr/bin/env python3
"""Which tokens the official zero-shot editing keeps, for tests/fixtures/edit_mask.rs.

The VAR repository's editing lives in `demo_zero_shot_edit.ipynb`: `get_edit_mask` (the kept
region on the last scale's token grid, from a box given as fractions of the image) and
`replace_embedding` (a scale's tokens are forced to the image's where the grid, bilinearly
resized, is above 0.5; all of them on a scale of at most 3 tokens). This script runs that cell
of the notebook (its source, read from the file; nothing copied) and records, for pixel boxes on
several pyramids, in- and out-painting, the kept tokens of every scale.

Usage: python3 tools/official_reference/edit_mask.py --var-repo VAR --out tests/official
"""

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from official import prepare_official_import, var_repo_args, write_json  # noqa: E402

PYRAMIDS = {
    32: (1, 2, 3, 4, 5, 6, 8),  # the demo's 32-px images, 4x downsampling
    64: (1, 2, 3, 4),
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
}


def main():
    args = var_repo_args()
    prepare_official_import(args.var_repo)
    import torch

    nb = json.load(open(os.path.join(args.var_repo, "demo_zero_shot_edit.ipynb")))
    cell = next("".join(c["source"]) for c in nb["cells"]
                if c["cell_type"] == "code" and "def replace_embedding" in "".join(c["source"]))
    scope = {}
    exec(compile(cell, "demo_zero_shot_edit.ipynb", "exec"), scope)
    get_edit_mask, replace_embedding = scope["get_edit_mask"], scope["replace_embedding"]

    rng = random.Random(5)
    cases = []
    for side, pns in PYRAMIDS.items():
        boxes = [[side // 4, side // 4, side - side // 4, side - side // 4],  # mvar edit's default
                 [0, 0, side // 2, side], [1, 3, side - 5, side // 3], [0, 0, side, side]]
        boxes += [[side // 10, side // 10, side * 8 // 10, side * 8 // 10]]  # the notebook's 0.1 .. 0.8
        for _ in range(12):
            x0, x1 = sorted(rng.sample(range(side + 1), 2))
            y0, y1 = sorted(rng.sample(range(side + 1), 2))
            boxes.append([x0, y0, x1, y1])
        for x0, y0, x1, y1 in boxes:
            for inpainting in (True, False):
                mask = get_edit_mask(pns, y0 / side, x0 / side, y1 / side, x1 / side, "cpu", inpainting=inpainting)
                kept = []
                for pn in pns:
                    forced = replace_embedding(mask, torch.zeros(1, 1, pn, pn), torch.ones(1, 1, pn, pn), pn, pn)
                    kept.append("".join(str(int(v)) for v in forced.flatten().tolist()))
                cases.append(dict(side=side, patch_nums=list(pns), box=[x0, y0, x1, y1], outpaint=not inpainting,
                                  kept=kept))
    out = dict(
        what="tokens the official zero-shot editing (demo_zero_shot_edit.ipynb: get_edit_mask, replace_embedding) "
             "keeps at every scale, row-major as a string, 1 = the image's token (tools/official_reference/edit_mask.py)",
        torch_version=torch.__version__,
        cases=cases,
    )
    path = write_json(args.out, "edit_mask.json", out)
    print(f"wrote {path}: {len(cases)} cases", file=sys.stderr)


if __name__ == "__main__":
    main()

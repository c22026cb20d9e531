#!/usr/bin/env python3
"""Greedy zero-shot edits of the official editing code, for tests/fixtures/edit_mask.rs.

Runs `autoregressive_infer_cfg_with_mask` of VAR's `demo_zero_shot_edit.ipynb` (the notebook's
cell, read from the file; nothing copied) on the public fixture set's VAR weights, with the
token maps of its two 256-px images (`vqvae_256.safetensors`, the official img_to_idxBl), cfg
1.5 and top_k 1, so torch.multinomial picks the argmax of the guided logits and the edit is
deterministic. The sampler is wrapped to record each scale's tokens and the smallest gap between
the best and second-best guided logit of the tokens it draws; of a few candidate (box, mode,
labels), for each box and mode the labels with the widest smallest gap are written if that gap is
at least 5e-4 (the public set's greedy sampling fixture has 8.3e-4), with the tokens after the
kept ones are put back.

Usage: python3 tools/official_reference/edit_sample.py --var-repo VAR --fixtures ../shared/fixtures
    --out tests/official
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from official import prepare_official_import, write_json  # noqa: E402

MIN_MARGIN = 5e-4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--var-repo", required=True)
    ap.add_argument("--fixtures", default="../shared/fixtures")
    ap.add_argument("--out", default="tests/official")
    args = ap.parse_args()
    prepare_official_import(args.var_repo)
    import torch
    from safetensors.torch import load_file

    from models.var import VAR
    from models.vqvae import VQVAE

    manifest = json.load(open(os.path.join(args.fixtures, "manifest.json")))
    wcfg = manifest["files"]["var_weights.safetensors"]["config"]
    vq = manifest["files"]["vqvae_weights.safetensors"]["config"]
    pns = tuple(wcfg["patch_nums"])
    vae = VQVAE(vocab_size=vq["vocab_size"], z_channels=vq["z_channels"], ch=vq["ch"], test_mode=True,
                share_quant_resi=vq["share_quant_resi"], v_patch_nums=pns)
    vae.load_state_dict(load_file(os.path.join(args.fixtures, "vqvae_weights.safetensors")), strict=True)
    var = VAR(vae_local=vae, num_classes=wcfg["num_classes"], depth=wcfg["depth"], embed_dim=wcfg["embed_dim"],
              num_heads=wcfg["num_heads"], mlp_ratio=wcfg["mlp_ratio"], drop_rate=0.0, attn_drop_rate=0.0,
              drop_path_rate=0.0, norm_eps=wcfg["norm_eps"], shared_aln=wcfg["shared_aln"], cond_drop_rate=0.0,
              attn_l2_norm=wcfg["attn_l2_norm"], patch_nums=pns, flash_if_available=False, fused_if_available=False)
    var.load_state_dict(load_file(os.path.join(args.fixtures, "var_weights.safetensors")), strict=True)
    var.eval()
    images = load_file(os.path.join(args.fixtures, "vqvae_256.safetensors"))
    tokens = [images[f"idx.{si}"] for si in range(len(pns))]
    side = images["img_u8"].shape[-1]

    nb = json.load(open(os.path.join(args.var_repo, "demo_zero_shot_edit.ipynb")))
    cell = next("".join(c["source"]) for c in nb["cells"]
                if c["cell_type"] == "code" and "def replace_embedding" in "".join(c["source"]))
    scope = {}
    exec(compile(cell, "demo_zero_shot_edit.ipynb", "exec"), scope)
    real_sample = scope["sample_with_top_k_top_p_"]
    drawn, margins = [], []

    def recording_sample(logits_BlV, **kw):
        top2 = logits_BlV.topk(2, dim=-1).values
        margins.append(float((top2[..., 0] - top2[..., 1]).min()))
        idx = real_sample(logits_BlV, **kw)
        drawn.append(idx[:, :, 0].clone())
        return idx

    scope["sample_with_top_k_top_p_"] = recording_sample
    infer = scope["autoregressive_infer_cfg_with_mask"]
    cases = []
    for bx, inpainting in (([64, 64, 192, 192], True), ([0, 0, 128, 256], True), ([64, 64, 192, 192], False),
                           ([32, 96, 224, 160], True)):
        candidates = []
        for labels in ([1, 3], [3, 1], [0, 7], [5, 2]):
            x0, y0, x1, y1 = bx
            mask = scope["get_edit_mask"](pns, y0 / side, x0 / side, y1 / side, x1 / side, "cpu", inpainting=inpainting)
            drawn.clear()
            margins.clear()
            with torch.inference_mode():
                infer(var, B=2, label_B=torch.tensor(labels), g_seed=0, cfg=1.5, top_k=1, top_p=0.0,
                      more_smooth=False, input_img_tokens=tokens, edit_mask=mask)
            final = []
            for si, pn in enumerate(pns):
                forced = scope["replace_embedding"](mask, torch.zeros(1, 1, pn, pn), torch.ones(1, 1, pn, pn), pn, pn)
                keep = forced.flatten().bool()
                final.append(torch.where(keep, tokens[si], drawn[si]).tolist())
            # Only the gaps of drawn tokens that were not put back matter; the smallest over all
            # of them is a bound.
            if min(margins) >= MIN_MARGIN:
                candidates.append(dict(box=bx, outpaint=not inpainting, labels=labels, cfg=1.5,
                                       min_margin=min(margins), tokens=final))
            print(f"box {bx} {'in' if inpainting else 'out'}painting labels {labels}: smallest gap {min(margins):.2e}",
                  file=sys.stderr)
        # One case per box and mode: the labels with the widest gap.
        if candidates:
            cases.append(max(candidates, key=lambda c: c["min_margin"]))
    out = dict(
        what="greedy zero-shot edits (cfg 1.5, top_k 1) of demo_zero_shot_edit.ipynb's "
             "autoregressive_infer_cfg_with_mask on the public set's VAR weights and vqvae_256 token maps; tokens "
             "per scale, [B, pn*pn], after the kept ones are put back (tools/official_reference/edit_sample.py)",
        torch_version=torch.__version__,
        weights_file="var_weights.safetensors",
        vqvae_weights_file="vqvae_weights.safetensors",
        images_file="vqvae_256.safetensors",
        cases=cases,
    )
    path = write_json(args.out, "edit_sample.json", out)
    print(f"wrote {path}: {len(cases)} cases", file=sys.stderr)


if __name__ == "__main__":
    main()

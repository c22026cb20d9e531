#!/usr/bin/env python3
"""Reference training steps of the official VAR and MVAR code, for tests/fixtures/train_steps.rs.

The public fixture set (../shared/fixtures) holds the official forwards and samplers, not a
training step. This script runs the official code's training step on the public set's weights
and teacher-forcing batch, and writes what a reimplementation's trainer must reproduce:

- VAR (FoundationVision/VAR): three steps on the fixture batch, the full pyramid each step;
- MVAR (CVL-UESTC/MVAR): three steps, one per segment in the official cycle with ratio_k = 1
  (scales [0, refine_step) with the block-diagonal mask, then each later scale alone with 7x7
  neighbourhood attention).

Each step uses the official pieces: the loss of `VARTrainer.train_step` / `MVARTrainer.train_step`
(CE(reduction='none') times loss_weight = 1/L over the trained tokens, summed over tokens, mean
over the batch; the three lines are restated below since the trainers need a data loader and
loggers), `utils.lr_control.filter_params` with train.py's no-weight-decay keys,
`torch.optim.AdamW(betas=(0.9, 0.95), weight_decay=0)` (not fused: CPU),
`utils.amp_sc.AmpOptimizer.backward_clip_step` (backward, `clip_grad_norm_`, step) and
`utils.lr_control.lr_wd_annealing('lin0', ...)` before each step, as train.py calls it. The model
is in train mode with label dropout and drop-path off (both random), so the steps are
deterministic. MVAR calls `natten.na2d`, which is not installable here: a pure-PyTorch na2d with
NATTEN's window rule (window start clamp(i - k//2, 0, n - k) per axis, every query sees k*k
keys; autograd gives its backward) is injected as the `natten` module, as the public set's
generator did.

Tensors are summarised, not stored (the model has ~0.9 M parameters): for each parameter, the
element count, sum, sum of squares and the dot product with a fixed probe vector,
probe[i] = ((i * 2654435761 + 12345) mod 2^32) / 2^32 - 0.5 over the row-major flattened
index, all in float64 from the float32 values. Recorded per step: the loss, the gradient norm
before clipping (clip_grad_norm_'s return), lr and weight decay, and the summaries of the
gradients after clipping (what the optimizer steps with; null for a parameter the step's loss
does not reach, which torch's AdamW leaves alone); after the last step, the summaries of
each parameter's change (after - before), with the largest share of its gradient's elements
that were rounding noise at any step (`noise_share`; a reimplementation's change of such a
tensor is not comparable, see `noise_share` below).

Usage (torch 2.x on the CPU, einops and safetensors installed; the official sources at the
commits manifest.json names, checked out anywhere):
  python3 tools/official_reference/train_steps.py --var-repo VAR --mvar-repo MVAR \\
      --fixtures ../shared/fixtures --out tests/official
It writes var_train_steps.json, mvar_train_steps.json and tokenizer_train_steps.json (two steps of
the official VQVAE's training forward, see `run_tokenizer`). It imports the official sources and
copies none of their code.
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from official import prepare_official_import, write_json  # noqa: E402

# The settings of the reference run (written into the JSON; the Rust test reads them from there).
SETTINGS = dict(
    steps=3,
    peak_lr=1e-3,  # train.py's tlr after the batch rule
    warmup_steps=1,  # wp_it
    total_steps=6,  # max_it
    wp0=0.25,
    wpe=0.1,
    weight_decay=0.05,  # twd
    weight_decay_end=0.01,  # twde
    schedule="lin0",
)


def probe_sums(values):
    """(n, sum, sum of squares, probe dot) of a float64 numpy vector."""
    import numpy as np

    n = values.size
    i = np.arange(n, dtype=np.uint64)
    probe = ((i * np.uint64(2654435761) + np.uint64(12345)) % np.uint64(1 << 32)).astype(np.float64)
    probe = probe / float(1 << 32) - 0.5
    return dict(n=int(n), sum=float(values.sum()), sumsq=float((values * values).sum()),
                dot=float((values * probe).sum()))


def summary(t):
    return probe_sums(t.detach().double().reshape(-1).cpu().numpy())


def half_first_norm(module, loss):
    """A gradient-clipping threshold below the first step's norm (half of it, three digits), so
    that the reference covers the scaling; the gradients are cleared again, and the official step
    computes (and records) the norm itself."""
    import torch

    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in module.parameters() if p.grad is not None))
    module.zero_grad(set_to_none=True)
    return float(f"{0.5 * norm.item():.3g}")


def noise_share(g):
    """The share of a gradient's elements at rounding-noise level (not zero, below 1e-6 of its
    largest): attention's key bias (softmax ignores a constant added to every score of a query)
    has a gradient that is zero in exact arithmetic and computed as noise, which Adam turns into
    steps of +-lr in directions that rounding picks. (Exact zeros, e.g. the rows of classes not in
    the batch, are not noise: every implementation gets them.)"""
    a = g.detach().double().abs()
    top = a.max()
    return float(((a > 0) & (a < 1e-6 * top)).double().mean()) if top > 0 else 0.0


def run_tokenizer(repo, fixtures, out_dir):
    """Two steps of the tokenizer: the official VQVAE's training forward (`VQVAE.forward`: the
    quantizer's straight-through f_hat and its commitment + codebook loss) with the loss our
    tokenizer trainer adds to it (the official repositories never released theirs):
    mean |rec - x| + mean (rec - x)^2 + vq_loss, then `clip_grad_norm_` and torch's AdamW with
    the trainer's defaults (betas 0.9 / 0.99, no weight decay)."""
    import torch
    from safetensors.torch import load_file

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    prepare_official_import(repo)
    from models.vqvae import VQVAE

    manifest = json.load(open(os.path.join(fixtures, "manifest.json")))
    # The 64-px images (scales 1..4): the same code paths as 256 px at a sixteenth of the work.
    weights_file, batch_file = "vqvae_weights.safetensors", "vqvae_64.safetensors"
    vq = manifest["files"][weights_file]["config"]
    patch_nums = tuple(manifest["files"][batch_file]["config"]["v_patch_nums"])
    vae = VQVAE(vocab_size=vq["vocab_size"], z_channels=vq["z_channels"], ch=vq["ch"], dropout=0.0,
                beta=vq["beta"], using_znorm=vq["using_znorm"], quant_conv_ks=vq["quant_conv_ks"],
                quant_resi=vq["quant_resi"], share_quant_resi=vq["share_quant_resi"],
                v_patch_nums=patch_nums, test_mode=False)
    vae.load_state_dict(load_file(os.path.join(fixtures, weights_file)), strict=True)
    vae.train()
    # VectorQuantizer2.forward reads torch.distributed's world size (for its usage margin): one
    # process, a file rendezvous, no network.
    import tempfile

    import torch.distributed as tdist

    if not tdist.is_initialized():
        rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
        tdist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    img_u8 = load_file(os.path.join(fixtures, batch_file))["img_u8"]
    x = img_u8.float() / 255
    x = x + x - 1
    before = {n: p.detach().clone() for n, p in vae.named_parameters()}
    settings = dict(steps=2, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0, l1=1.0, l2=1.0)

    def loss_of():
        rec, _, vq_loss = vae(x)
        l1 = (rec - x).abs().mean()
        l2 = (rec - x).square().mean()
        return settings["l1"] * l1 + settings["l2"] * l2 + vq_loss, vq_loss

    settings["clip"] = half_first_norm(vae, loss_of()[0])
    opt = torch.optim.AdamW(vae.parameters(), lr=settings["lr"], betas=(settings["beta1"], settings["beta2"]),
                            weight_decay=settings["weight_decay"], eps=1e-8, foreach=False)
    steps = []
    noisy = {n: 0.0 for n, _ in vae.named_parameters()}
    for it in range(settings["steps"]):
        loss, vq_loss = loss_of()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(vae.parameters()), settings["clip"])
        clipped = {n: None if p.grad is None else summary(p.grad) for n, p in vae.named_parameters()}
        for n, p in vae.named_parameters():
            noisy[n] = max(noisy[n], noise_share(p.grad))
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(dict(step=it, loss=loss.item(), vq_loss=vq_loss.item(), grad_norm=float(norm),
                          clipped_grads=clipped))
        print(f"tokenizer step {it}: loss {loss.item():.6f} vq {vq_loss.item():.6f} grad norm {float(norm):.6f}",
              file=sys.stderr)
    out = dict(
        what="two tokenizer training steps on the official VQVAE modules, the public fixture set's weights and "
             "images (tools/official_reference/train_steps.py)",
        official_source=manifest["official_sources"]["VAR"],
        torch_version=torch.__version__,
        initial={n: summary(t) for n, t in before.items()},
        batch={"img_u8": summary(img_u8)},
        weights_file=weights_file,
        batch_file=batch_file,
        patch_nums=list(patch_nums),
        settings=settings,
        probe="probe[i] = ((i * 2654435761 + 12345) mod 2^32) / 2^32 - 0.5, i the row-major index",
        steps=steps,
        change={n: dict(summary(p.detach() - before[n]), noise_share=noisy[n]) for n, p in vae.named_parameters()},
    )
    path = write_json(out_dir, "tokenizer_train_steps.json", out, indent=1)
    print(f"wrote {path}", file=sys.stderr)


def run_kind(kind, repo, fixtures, out_dir):
    import torch
    from safetensors.torch import load_file

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    prepare_official_import(repo, natten=kind == "mvar")
    from models.vqvae import VQVAE
    from utils.amp_sc import AmpOptimizer
    from utils.lr_control import filter_params, lr_wd_annealing

    manifest = json.load(open(os.path.join(fixtures, "manifest.json")))
    fwd_file = f"{kind}_forward.safetensors"
    fwd_cfg = manifest["files"][fwd_file]["config"]
    weights_file = "var_weights.safetensors"
    wcfg = manifest["files"][weights_file]["config"]
    vq = manifest["files"]["vqvae_weights.safetensors"]["config"]
    pns = tuple(wcfg["patch_nums"])
    vae = VQVAE(vocab_size=vq["vocab_size"], z_channels=vq["z_channels"], ch=vq["ch"], test_mode=True,
                share_quant_resi=vq["share_quant_resi"], v_patch_nums=pns)
    common = dict(vae_local=vae, num_classes=wcfg["num_classes"], depth=wcfg["depth"],
                  embed_dim=wcfg["embed_dim"], num_heads=wcfg["num_heads"], mlp_ratio=wcfg["mlp_ratio"],
                  drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, norm_eps=wcfg["norm_eps"],
                  shared_aln=wcfg["shared_aln"], cond_drop_rate=0.0, attn_l2_norm=wcfg["attn_l2_norm"],
                  patch_nums=pns, flash_if_available=False, fused_if_available=False)
    state = load_file(os.path.join(fixtures, weights_file))
    if kind == "var":
        from models.var import VAR

        model = VAR(**common)
    else:
        from models.mvar import MVAR

        model = MVAR(**common, kernel_size=fwd_cfg["kernel_size"], refine_step=fwd_cfg["refine_step"])
        # The shared weights carry VAR's mask buffer; MVAR keeps its own block-diagonal one.
        state["attn_bias_for_masking"] = model.attn_bias_for_masking.clone()
    model.load_state_dict(state, strict=True)
    model.train()

    batch = load_file(os.path.join(fixtures, fwd_file))
    label_B, x_in, gt_BL = batch["label_B"], batch["x_BLCv_wo_first_l"], batch["gt_idx_BL"]
    B = label_B.shape[0]
    L = sum(p * p for p in pns)
    first_l = pns[0] ** 2
    begin_ends, cur = [], 0
    for p in pns:
        begin_ends.append((cur, cur + p * p))
        cur += p * p

    names, paras, groups = filter_params(model, nowd_keys={
        "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
        "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul"})
    opt = torch.optim.AdamW(params=groups, lr=SETTINGS["peak_lr"], weight_decay=0, betas=(0.9, 0.95),
                            fused=False, foreach=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def segment(it):
        if kind == "var":
            return 0, L, False
        refine = fwd_cfg["refine_step"]
        segs = [(begin_ends[0][0], begin_ends[refine - 1][1], False)]
        segs += [(begin_ends[s][0], begin_ends[s][1], True) for s in range(refine, len(pns))]
        return segs[it % len(segs)]

    def forward_loss(it):
        bg, ed, nattn = segment(it)
        if kind == "var":
            logits = model(label_B, x_in)
        else:
            logits = model(label_B=label_B, x_BlCv_wo_first_l=x_in[:, max(0, bg - first_l):ed - first_l],
                           L_bg=bg, L_ed=ed, using_nattn=nattn)
        # VARTrainer.train_step / MVARTrainer.train_step: CE(reduction='none'), loss_weight = 1/L.
        V = logits.shape[-1]
        loss = torch.nn.CrossEntropyLoss(reduction="none")(logits.reshape(-1, V), gt_BL[:, bg:ed].reshape(-1))
        lw = (torch.ones(1, L) / L)[:, bg:ed]
        return loss.view(B, -1).mul(lw).sum(dim=-1).mean(), (bg, ed)

    settings = dict(SETTINGS, clip=half_first_norm(model, forward_loss(0)[0]))
    amp = AmpOptimizer(mixed_precision=0, optimizer=opt, names=names, paras=paras, grad_clip=settings["clip"],
                       n_gradient_accumulation=1)

    # The optimizer steps with the clipped gradients; they are read just before it does.
    clipped = {}
    real_step = opt.step

    noisy = {n: 0.0 for n, _ in model.named_parameters()}

    def step_and_record(*a, **kw):
        for n, p in model.named_parameters():
            if p.grad is not None:
                noisy[n] = max(noisy[n], noise_share(p.grad))
            # None: the parameter took no part in this step's loss; torch's AdamW then skips it
            # (no moment update, no weight decay).
            clipped[n] = None if p.grad is None else summary(p.grad)
        return real_step(*a, **kw)

    opt.step = step_and_record
    steps = []
    for it in range(settings["steps"]):
        _, _, min_wd, max_wd = lr_wd_annealing(settings["schedule"], opt, settings["peak_lr"], settings["weight_decay"],
                                               settings["weight_decay_end"], it, settings["warmup_steps"],
                                               settings["total_steps"], wp0=settings["wp0"], wpe=settings["wpe"])
        lr = opt.param_groups[0]["lr"]
        loss, (bg, ed) = forward_loss(it)
        norm, _ = amp.backward_clip_step(stepping=True, loss=loss)
        steps.append(dict(step=it, tokens=[bg, ed], loss=loss.item(), grad_norm=float(norm), lr=lr,
                          weight_decay=max_wd, clipped_grads=dict(clipped)))
        print(f"{kind} step {it}: tokens [{bg}, {ed}) loss {loss.item():.6f} grad norm {float(norm):.6f} "
              f"lr {lr:.3g} wd {max_wd:.3g}", file=sys.stderr)
    change = {n: dict(summary(p.detach() - before[n]), noise_share=noisy[n]) for n, p in model.named_parameters()}
    out = dict(
        what=f"the official {kind.upper()} training steps on the public fixture set's weights and batch "
             "(tools/official_reference/train_steps.py)",
        official_source=manifest["official_sources"]["VAR" if kind == "var" else "MVAR"],
        torch_version=torch.__version__,
        # What the run started from, so that a test can tell whether a fixture folder holds the
        # same weights and batch.
        initial={n: summary(t) for n, t in before.items()},
        batch={"label_B": summary(label_B), "x_BLCv_wo_first_l": summary(x_in), "gt_idx_BL": summary(gt_BL)},
        weights_file=weights_file,
        batch_file=fwd_file,
        ratio_k=1 if kind == "mvar" else None,
        settings=settings,
        probe="probe[i] = ((i * 2654435761 + 12345) mod 2^32) / 2^32 - 0.5, i the row-major index",
        no_weight_decay=[n for n, p in model.named_parameters()
                         if any(p is q for g in groups if g["wd_sc"] == 0.0 for q in g["params"])],
        steps=steps,
        change=change,
    )
    path = write_json(out_dir, f"{kind}_train_steps.json", out, indent=1)
    print(f"wrote {path}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--var-repo", help="FoundationVision/VAR checked out at the manifest's commit")
    ap.add_argument("--mvar-repo", help="CVL-UESTC/MVAR checked out at the manifest's commit")
    ap.add_argument("--fixtures", default="../shared/fixtures")
    ap.add_argument("--out", default="tests/official")
    ap.add_argument("--kind", choices=["var", "mvar", "tokenizer"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.kind == "tokenizer":
        run_tokenizer(args.var_repo, args.fixtures, args.out)
        return
    if args.kind:
        run_kind(args.kind, args.var_repo if args.kind == "var" else args.mvar_repo, args.fixtures, args.out)
        return
    os.makedirs(args.out, exist_ok=True)
    # One process per model: both repositories name their packages `models` and `utils`.
    for kind, repo in (("var", args.var_repo), ("mvar", args.mvar_repo), ("tokenizer", args.var_repo)):
        if not repo:
            sys.exit(f"--{kind}-repo is required")
        subprocess.run([sys.executable, __file__, "--kind", kind, "--var-repo", args.var_repo or "",
                        "--mvar-repo", args.mvar_repo or "", "--fixtures", args.fixtures, "--out", args.out],
                       check=True)


if __name__ == "__main__":
    main()

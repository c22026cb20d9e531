#!/usr/bin/env python3
"""The official VAR and MVAR code on the CPU, timed as `mvar bench` times ours: PyTorch's figures
for the same model-level measurements on the same machine.

`mvar bench --model var-dN --model mvar-dN --batch B --sample-batch S --vae-ch C` builds fresh
models (the official init), a fresh tokenizer with C base channels, random token maps and
labels, and times
- a training step: forward, the trainer's loss, backward, `clip_grad_norm_` (2.0) and AdamW,
  the median of `--steps` steps after warm-up; MVAR per segment (scales 0..refine_step, then
  each later scale), weighted over the official ratio_k : 1 : 1 cycle;
- sampling S images with the official sampler (cfg 1.5 ramp on the doubled batch, top-k 900,
  top-p 0.96) plus the tokenizer's decode, the median of `--sample-reps` batches.
This script does the same with the official sources (FoundationVision/VAR, CVL-UESTC/MVAR):
`VAR`/`MVAR` with their `init_weights` as `build_vae_var` calls it, drop-path 0.1 depth / 24
and label dropout 0.1 as train.py sets them, `filter_params` + `torch.optim.AdamW(betas=(0.9,
0.95))` (not fused: CPU) + `AmpOptimizer.backward_clip_step`, `autoregressive_infer_cfg`
(VAR; it decodes) and `autoregressive_infer` + `fhat_to_img` (MVAR). f32, `--threads` intra-op
threads (match RAYON_NUM_THREADS / the cores `mvar bench` uses).

MVAR's large scales call `natten.na2d`; NATTEN is not installed here, so a pure-PyTorch na2d
(gather of each query's 7x7 window, einsum, softmax; tools/official_reference/official.py)
stands in, and its time is not NATTEN's: the MVAR rows of scales from refine_step on say so.

Usage: python3 benches/torch_cpu_models.py --var-repo VAR --mvar-repo MVAR [--depth 4 --batch 4
--sample-batch 4 --vae-ch 32 --steps 5 --sample-reps 2 --threads 2]

With --tokenizer it times the tokenizer's training step instead, as `mvar bench --what tokenizer`
does (see `run_tokenizer`); `mvar demo`'s tokenizer: --tokenizer --vae-ch 32 --vae-ch-mult 1,2,2
--vae-res-blocks 1 --patch-nums 1,2,3,4,6,8 --batch 16 --steps 20. With --ops it times the
criterion bench's CPU conv2d and nearest_code cases (`cargo bench --bench ops -- 'cpu/conv2d 3x3'`,
`-- 'cpu/nearest_code'`) the neighbourhood-attention cases (`-- 'cpu/na2d'`, as masked SDPA
and flex_attention), the CPU matrix products in f32 and bf16 (`-- 'matmul/cpu/(f32|bf16)'`)
and the optimizer's (`-- 'optim/cpu'`) instead.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "official_reference"))
from official import prepare_official_import  # noqa: E402

NOWD_KEYS = {"cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
             "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul"}


def call_times(f, n):
    """The seconds of each of n calls of f()."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return times


def run(kind, args):
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    prepare_official_import(args.var_repo if kind == "var" else args.mvar_repo, natten=kind == "mvar")
    from models.vqvae import VQVAE
    from utils.amp_sc import AmpOptimizer
    from utils.lr_control import filter_params

    depth = args.depth
    PATCH_NUMS = tuple(args.patch_nums)
    vae = VQVAE(vocab_size=args.vocab, z_channels=32, ch=args.vae_ch, test_mode=True, share_quant_resi=4,
                v_patch_nums=PATCH_NUMS)
    common = dict(vae_local=vae, num_classes=args.classes, depth=depth, embed_dim=depth * 64, num_heads=depth,
                  mlp_ratio=4.0, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1 * depth / 24,
                  norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.1, attn_l2_norm=True, patch_nums=PATCH_NUMS,
                  flash_if_available=False, fused_if_available=False)
    if kind == "var":
        from models.var import VAR

        model = VAR(**common)
    else:
        from models.mvar import MVAR

        model = MVAR(**common, kernel_size=7, refine_step=args.refine_step)
    model.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
    params = sum(p.numel() for p in model.parameters())
    print(f"== official {kind}-d{depth}: width {depth * 64}, {depth} heads, {params / 1e6:.1f} M parameters, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    # Training: random token maps, their teacher-forcing input from the tokenizer's quantizer.
    B, V, L = args.batch, args.vocab, sum(p * p for p in PATCH_NUMS)
    g = torch.Generator().manual_seed(args.seed + 1)
    idx = [torch.randint(0, V, (B, p * p), generator=g) for p in PATCH_NUMS]
    gt = torch.cat(idx, dim=1)
    with torch.no_grad():
        to_input = (vae.quantize.idxBl_to_var_input if kind == "var" else vae.quantize.idxBl_to_mvar_input)
        x_in = to_input(idx)
    labels = torch.randint(0, args.classes, (B,), generator=g)
    names, paras, groups = filter_params(model, nowd_keys=NOWD_KEYS)
    opt = torch.optim.AdamW(params=groups, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95), fused=False)
    amp = AmpOptimizer(mixed_precision=0, optimizer=opt, names=names, paras=paras, grad_clip=2.0,
                       n_gradient_accumulation=1)
    begin_ends, cur = [], 0
    for p in PATCH_NUMS:
        begin_ends.append((cur, cur + p * p))
        cur += p * p
    if kind == "var":
        segments = [(0, L, False, 1.0)]
    else:
        r, k = args.refine_step, args.ratio_k
        later = len(PATCH_NUMS) - r
        segments = [(0, begin_ends[r - 1][1], False, k / (k + later))]
        segments += [(begin_ends[s][0], begin_ends[s][1], True, 1 / (k + later)) for s in range(r, len(PATCH_NUMS))]
    model.train()

    def step(bg, ed, nattn):
        if kind == "var":
            logits = model(labels, x_in)
        else:
            logits = model(label_B=labels, x_BlCv_wo_first_l=x_in[:, max(0, bg - 1):ed - 1], L_bg=bg, L_ed=ed,
                           using_nattn=nattn)
        loss = torch.nn.CrossEntropyLoss(reduction="none")(logits.reshape(-1, V), gt[:, bg:ed].reshape(-1))
        loss = loss.view(B, -1).mul(1.0 / L).sum(dim=-1).mean()
        amp.backward_clip_step(stepping=True, loss=loss)

    for bg, ed, nattn, _ in segments:  # warm-up: every segment, two steps at least
        step(bg, ed, nattn)
    if len(segments) == 1:
        step(*segments[0][:3])
    weighted = 0.0
    for bg, ed, nattn, share in segments:
        med = statistics.median(call_times(lambda: step(bg, ed, nattn), args.steps))
        weighted += share * med
        note = " (na2d: the pure-PyTorch stand-in, not NATTEN)" if nattn else ""
        print(f"train segment tokens [{bg}, {ed}) ({ed - bg} tokens, {share * 100:.0f} % of steps): "
              f"{med:.4f} s/step median of {args.steps}{note}", flush=True)
    print(f"train step, batch {B}: {weighted:.4f} s/it", flush=True)

    # Sampling plus decode.
    model.eval()
    S = args.sample_batch
    sample_labels = torch.randint(0, args.classes, (S,), generator=g)

    def sample():
        with torch.inference_mode():
            if kind == "var":
                return model.autoregressive_infer_cfg(B=S, label_B=sample_labels, g_seed=args.seed, cfg=1.5,
                                                      top_k=900, top_p=0.96, more_smooth=False)
            f_hat = model.autoregressive_infer(B=S, label_B=sample_labels, g_seed=args.seed, cfg=1.5, top_k=900,
                                               top_p=0.96, more_smooth=False)
            return vae.fhat_to_img(f_hat)

    sample()
    totals = call_times(sample, args.sample_reps)
    f_hat = torch.randn(S, 32, PATCH_NUMS[-1], PATCH_NUMS[-1], generator=g)
    with torch.inference_mode():
        vae.fhat_to_img(f_hat)
        decodes = call_times(lambda: vae.fhat_to_img(f_hat), args.sample_reps)
    note = " (na2d on scales from refine_step: the stand-in)" if kind == "mvar" else ""
    print(f"sample {S} images: {statistics.median(totals):.4f} s/batch (decode {statistics.median(decodes):.4f} s)"
          f"{note}", flush=True)


def run_tokenizer(args):
    """`mvar bench --what tokenizer`: the official VQVAE's training forward (`VQVAE.forward`:
    encoder, quant_conv, the residual quantizer's straight-through f_hat with its commitment and
    codebook loss, post_quant_conv, decoder) with the loss `mvar train-tokenizer` adds, mean
    |rec - x| + mean (rec - x)^2 + vq_loss, backward, `clip_grad_norm_` (2.0) and AdamW (betas
    0.9 / 0.99, not fused), on one batch of random images in [-1, 1]. The official VQVAE fixes
    ch_mult (1, 1, 2, 2, 4) and two residual blocks; other values replace its encoder and decoder
    with the official `Encoder` / `Decoder` built with them (the parameter count is printed, to
    compare with `mvar bench`'s)."""
    import torch
    import torch.distributed as tdist

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    prepare_official_import(args.var_repo)
    from models.basic_vae import Decoder, Encoder
    from models.vqvae import VQVAE

    if not tdist.is_initialized():
        # VectorQuantizer2.forward reads the world size: one process, a file rendezvous.
        import tempfile

        rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
        tdist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    pns = tuple(args.patch_nums)
    vae = VQVAE(vocab_size=args.vocab, z_channels=32, ch=args.vae_ch, test_mode=False, v_patch_nums=pns)
    levels = dict(dropout=0.0, ch=args.vae_ch, z_channels=32, in_channels=3, ch_mult=tuple(args.vae_ch_mult),
                  num_res_blocks=args.vae_res_blocks, using_sa=True, using_mid_sa=True)
    vae.encoder = Encoder(double_z=False, **levels)
    vae.decoder = Decoder(**levels)
    vae.train()
    side = pns[-1] * 2 ** (len(args.vae_ch_mult) - 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-4, betas=(0.9, 0.99), weight_decay=0.0, foreach=False)
    x = torch.rand(args.batch, 3, side, side) * 2 - 1

    def step():
        rec, _, vq_loss = vae(x)
        loss = (rec - x).abs().mean() + (rec - x).square().mean() + vq_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = call_times(step, args.steps)
    params = sum(p.numel() for p in vae.parameters())
    print(f"tokenizer (official VQVAE, ch {args.vae_ch}, ch_mult {tuple(args.vae_ch_mult)}, "
          f"{args.vae_res_blocks} residual blocks, {params / 1e6:.2f} M parameters), {side}x{side}, "
          f"torch {torch.__version__}, {args.threads} threads: train step, batch {args.batch}: "
          f"{statistics.median(times):.4f} s/step median of {args.steps}", flush=True)


def run_ops(args):
    """Criterion cases of the tokenizer's ops, the PyTorch way: `spatial/cpu/conv2d 3x3
    [N,C,S,S] f32 fwd|fwd+bwd` (the demo tokenizer's commonest convolutions: C -> C channels,
    3x3, padding 1, bias) with `F.conv2d`, forward under no_grad and forward + backward of the
    output's sum (input, weight and bias gradients); and `quant/cpu/nearest_code ... f32` as the
    official quantizer searches (||z||^2 + ||e||^2, `addmm_` of -2 z e^T, `argmin`). Medians of 5
    rounds (of 50 calls for the convolutions, of 1 for the search) after 5 warm-up calls."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    def timed(f, calls):
        for _ in range(5):
            f()
        rounds = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(calls):
                f()
            rounds.append((time.perf_counter() - t) / calls)
        return statistics.median(rounds)

    for n, c, side in ((32, 32, 32), (16, 64, 16), (16, 64, 8)):
        x = torch.randn(n, c, side, side, requires_grad=True)
        w = torch.randn(c, c, 3, 3, requires_grad=True)
        b = torch.randn(c, requires_grad=True)

        def fwd():
            with torch.no_grad():
                F.conv2d(x, w, b, padding=1)

        def fwd_bwd():
            x.grad = w.grad = b.grad = None
            F.conv2d(x, w, b, padding=1).sum().backward()

        print(f"conv2d 3x3 [{n},{c},{side},{side}] f32, torch {torch.__version__}, {args.threads} threads: "
              f"fwd {timed(fwd, 50) * 1e3:.3f} ms, fwd+bwd {timed(fwd_bwd, 50) * 1e3:.3f} ms", flush=True)

    codes = torch.randn(4096, 32)
    for rows in (32 * 16 * 16, 32 * 680):
        z = torch.randn(rows, 32)

        @torch.no_grad()
        def search():
            d = torch.sum(z.square(), dim=1, keepdim=True) + torch.sum(codes.square(), dim=1)
            d.addmm_(z, codes.T, alpha=-2, beta=1)
            return torch.argmin(d, dim=1)

        print(f"nearest_code [{rows},32] x [4096,32] f32, torch {torch.__version__}, {args.threads} threads: "
              f"{timed(search, 1) * 1e3:.3f} ms", flush=True)

    run_na2d_ops(args, timed)
    run_matmul_ops(args, timed)
    run_optim_ops(args)


def run_matmul_ops(args, timed):
    """`matmul/cpu/{f32,bf16}/MxKxN` (a @ b, row-major) and `.../4096x1020x256 a^T b` (the
    transposed view's product, g.T @ x), with `torch.matmul` on the same shapes and dtypes:
    bf16 products on the CPU are oneDNN's (AVX512-BF16 or AMX where the CPU has them). Medians
    of 5 rounds of 10 calls after 5."""
    import torch

    for dt in (torch.float32, torch.bfloat16):
        name = "f32" if dt == torch.float32 else "bf16"
        for m, k, n in ((1024, 1024, 1024), (680, 1024, 4096), (1020, 256, 4096)):
            a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
            ms = timed(lambda: torch.matmul(a, b), 10) * 1e3
            print(f"matmul/cpu/{name}/{m}x{k}x{n}, torch {torch.__version__}, {args.threads} threads: "
                  f"{ms:.3f} ms, {2 * m * k * n / ms / 1e6:.0f} GFLOP/s", flush=True)
        g, x = torch.randn(1020, 4096, dtype=dt), torch.randn(1020, 256, dtype=dt)
        ms = timed(lambda: torch.matmul(g.T, x), 10) * 1e3
        print(f"matmul/cpu/{name}/4096x1020x256 a^T b, torch {torch.__version__}, {args.threads} threads: "
              f"{ms:.3f} ms, {2 * 4096 * 1020 * 256 / ms / 1e6:.0f} GFLOP/s", flush=True)


def run_optim_ops(args):
    """`optim/cpu/adamw step` and `optim/cpu/clip_grad_norm` over one block of VAR-d16 (the
    bench's parameter shapes, 18.9 M parameters, values filled as there): torch.optim.AdamW
    (VAR's betas, weight decay 0.05 on the matrices only) in its three CPU implementations, and
    clip_grad_norm_ (2.0). Medians of 15 steps after 3."""
    import torch

    c = 1024
    shapes = [(3 * c, c), (c, c), (c,), (4 * c, c), (4 * c,), (c, 4 * c), (c,), (6 * c, c), (6 * c,)]
    params = [torch.full(s, 0.02, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.full(p.shape, 1e-3)
    n = sum(p.numel() for p in params)

    def median_ms(f):
        for _ in range(3):
            f()
        return statistics.median(call_times(f, 15)) * 1e3

    for impl in ({"foreach": False}, {"foreach": True}, {"fused": True}):
        groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.05},
                  {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), **impl)
        print(f"adamw step, 1 block of VAR-d16 ({n / 1e6:.1f} M parameters) f32, {impl}, torch {torch.__version__}, "
              f"{args.threads} threads: {median_ms(opt.step):.2f} ms", flush=True)
    clip = lambda: torch.nn.utils.clip_grad_norm_(params, 2.0)  # noqa: E731
    print(f"clip_grad_norm_, the same parameters, torch {torch.__version__}, {args.threads} threads: "
          f"{median_ms(clip):.2f} ms", flush=True)


def natten_start(i, n, k):
    """NATTEN's window start, clamp(i - k/2, 0, n - k) (ops/src/na2d.rs)."""
    return min(max(i - k // 2, 0), n - k)


def run_na2d_ops(args, timed):
    """`attention/cpu/na2d k7 fwd|fwd+bwd [2,16,S,S,64] f32` (scale 1, the sum's gradient), the
    PyTorch ways NATTEN is absent from: SDPA over the flattened map with the window as a dense
    [L, L] boolean mask, and flex_attention with the window as its mask_mod (torch.compile'd,
    which needs a C++ compiler; forward only, as torch 2.15 has no CPU backward for it; if it
    cannot be built, the reason is printed)."""
    import torch
    import torch.nn.functional as F

    k = 7
    for side in (16, 13):
        L = side * side
        idx = torch.arange(L)
        rows, cols = idx // side, idx % side
        starts = torch.tensor([natten_start(i, side, k) for i in range(side)])
        sx, sy = starts[rows], starts[cols]

        def sees(qi, kj):
            return ((rows[kj] >= sx[qi]) & (rows[kj] < sx[qi] + k)
                    & (cols[kj] >= sy[qi]) & (cols[kj] < sy[qi] + k))

        mask = sees(idx[:, None], idx[None, :])
        q, kk, v = (torch.randn(2, 16, L, 64, requires_grad=True) for _ in range(3))

        def sdpa():
            return F.scaled_dot_product_attention(q, kk, v, attn_mask=mask, scale=1.0)

        variants = [("masked SDPA", sdpa, True)]
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            block_mask = create_block_mask(lambda b, h, qi, kj: sees(qi, kj), None, None, L, L, device="cpu")
            flex = torch.compile(flex_attention)
            # torch 2.15 has no flex_attention backward on the CPU: the forward alone, on
            # inputs that need no gradient.
            qd, kd, vd = (t.detach() for t in (q, kk, v))

            def flex_call():
                return flex(qd, kd, vd, block_mask=block_mask, scale=1.0)

            flex_call()
            variants.append(("flex_attention", flex_call, False))
        except Exception as e:  # noqa: BLE001: any failure to build it is reported, not fatal
            print(f"na2d k7 [2,16,{side},{side},64]: flex_attention unavailable on the CPU here: "
                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
        for name, f, backward in variants:
            def fwd():
                with torch.no_grad():
                    f()

            def fwd_bwd():
                q.grad = kk.grad = v.grad = None
                f().sum().backward()

            both = f"fwd+bwd {timed(fwd_bwd, 20) * 1e3:.3f} ms" if backward else "no backward on the CPU"
            print(f"na2d k7 [2,16,{side},{side},64] f32 as {name}, torch {torch.__version__}, "
                  f"{args.threads} threads: fwd {timed(fwd, 20) * 1e3:.3f} ms, {both}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--var-repo", required="--ops" not in sys.argv)
    ap.add_argument("--mvar-repo")
    # The integer settings, with `mvar bench`'s defaults where it has them.
    for name, default in (("depth", 4), ("batch", 4), ("sample-batch", 4), ("vae-ch", 32), ("vocab", 4096),
                          ("classes", 1000), ("refine-step", 8), ("ratio-k", 8), ("steps", 5), ("sample-reps", 2),
                          ("threads", 2), ("seed", 0)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    ap.add_argument("--patch-nums", type=ints, default=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
    ap.add_argument("--vae-ch-mult", type=ints, default=[1, 1, 2, 2, 4], help="--tokenizer only")
    ap.add_argument("--vae-res-blocks", type=int, default=2, help="--tokenizer only")
    ap.add_argument("--tokenizer", action="store_true",
                    help="time the tokenizer's training step instead (mvar bench --what tokenizer)")
    ap.add_argument("--ops", action="store_true",
                    help="time the criterion bench's CPU conv2d and nearest_code cases instead (needs no repository)")
    ap.add_argument("--kind", choices=["var", "mvar"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ops:
        run_ops(args)
        return
    if args.tokenizer:
        run_tokenizer(args)
        return
    if args.kind:
        run(args.kind, args)
        return
    # One process per model: both repositories name their packages `models` and `utils`.
    kinds = ["var"] + (["mvar"] if args.mvar_repo else [])
    for kind in kinds:
        subprocess.run([sys.executable, __file__, "--kind", kind] + sys.argv[1:], check=True)


if __name__ == "__main__":
    main()

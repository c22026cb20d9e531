#!/usr/bin/env python3
"""PyTorch timings of the cases in benches/ops.rs, on the same GPU, under the same ids.

The reference for speed is "the PyTorch way of doing the same thing": eager PyTorch ops (cuBLAS
for matmul, its own kernels for the rest), timed with CUDA events around `iters` calls after a
warm-up, median of `reps` repetitions. Each line: id, median time, and the rate counted exactly as
the criterion bench counts it (FLOPs with a multiply-add as 2, or bytes read + written once).

Usage on the GPU machine: python3 benches/torch_reference.py [--json out.jsonl]
A check of the script itself where there is no GPU (every case once, wall-clock timing, figures
meaningless): python3 benches/torch_reference.py --device cpu --iters 1 --reps 1
"""

import argparse
import itertools
import json
import re
import statistics
import time

import torch
import torch.nn.functional as F


def make_timer(dev, iters, reps):
    """`timed(fn)`: a thunk that, when `report` calls it (the case's id passed `--only`), gives
    the median milliseconds per call of `iters` calls after a warm-up, over `reps` repetitions;
    CUDA events on a GPU, the wall clock on the CPU (only for checking the script)."""

    def timed(fn):
        return lambda: measure(fn)

    def measure(fn):
        for _ in range(min(3, iters)):
            fn()
        times = []
        for _ in range(reps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn()
                stop.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(stop) / iters)
            else:
                start = time.perf_counter()
                for _ in range(iters):
                    fn()
                times.append((time.perf_counter() - start) * 1e3 / iters)
        return statistics.median(times)

    return timed


def tokenizer_cases(report, timed, dev):
    """The tokenizer's multi-scale residual quantization of [32, 32, 16, 16] latents against 4096
    codes, and the full 10-scale encode of 256-px images with the released vae_ch160v4096z32
    shape (batch 32 on a GPU, 1 in the script check), written here from the spec (sections
    1.2-1.4) in eager PyTorch the way the official code computes them: per scale
    F.interpolate(area), squared distances through one addmm, argmin, F.embedding,
    F.interpolate(bicubic), the Phi conv mix, in-place f_hat / residual updates. Random weights
    (the work does not depend on them), no_grad, f32. Our f32 convolutions run without TF32, so
    the main ids disable it for cuDNN too; the encode is also timed with PyTorch's default (TF32
    convolutions) under the id with " [tf32 convs]" appended. Rate: the cross-term FLOPs of the
    nearest-code searches, as benches/ops.rs counts them (for the single-scale "phi step" cases,
    the FLOPs of Phi's convolution)."""
    nn = torch.nn
    ch, mult, zc, codes = 160, (1, 1, 2, 2, 4), 32, 4096
    pns = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    phi_of = (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)  # spec 1.3: the Phi of each of the 10 scales
    tokens = sum(p * p for p in pns)

    def norm(c):
        return nn.GroupNorm(32, c, eps=1e-6)

    class Res(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.n1, self.c1 = norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
            self.n2, self.c2 = norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
            self.short = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

        def forward(self, x):
            h = self.c1(F.silu(self.n1(x)))
            return self.short(x) + self.c2(F.silu(self.n2(h)))

    class Attn(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.n, self.qkv, self.proj = norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

        def forward(self, x):
            b, c, h, w = x.shape
            q, k, v = self.qkv(self.n(x)).reshape(b, 3, c, h * w).unbind(1)
            p = torch.bmm(q.transpose(1, 2), k).mul_(c ** -0.5).softmax(dim=2)
            return x + self.proj(torch.bmm(v, p.transpose(1, 2)).reshape(b, c, h, w))

    class Down(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, 2, 0)

        def forward(self, x):
            return self.conv(F.pad(x, (0, 1, 0, 1)))

    layers, cin = [nn.Conv2d(3, ch, 3, 1, 1)], ch
    for i, m in enumerate(mult):
        for _ in range(2):
            layers.append(Res(cin, ch * m))
            cin = ch * m
            if i == len(mult) - 1:
                layers.append(Attn(cin))
        if i < len(mult) - 1:
            layers.append(Down(cin))
    layers += [Res(cin, cin), Attn(cin), Res(cin, cin), norm(cin), nn.SiLU(), nn.Conv2d(cin, zc, 3, 1, 1),
               nn.Conv2d(zc, zc, 3, 1, 1)]  # the last one is quant_conv
    encoder = nn.Sequential(*layers).to(dev).eval()
    codebook = torch.randn(codes, zc, device=dev)
    phis = [nn.Conv2d(zc, zc, 3, 1, 1).to(dev).eval() for _ in range(4)]

    def f_to_idx(f):
        b, c, hh, ww = f.shape
        rest, f_hat, out = f.clone(), torch.zeros_like(f), []
        for si, pn in enumerate(pns):
            last = si == len(pns) - 1
            z = rest if last else F.interpolate(rest, size=(pn, pn), mode="area")
            z = z.permute(0, 2, 3, 1).reshape(-1, c)
            d = z.square().sum(1, keepdim=True) + codebook.square().sum(1)
            idx = d.addmm_(z, codebook.t(), alpha=-2, beta=1).argmin(1)
            h = F.embedding(idx, codebook).view(b, pn, pn, c).permute(0, 3, 1, 2)
            if not last:
                h = F.interpolate(h, size=(hh, ww), mode="bicubic")
            h = h.mul(0.5) + phis[phi_of[si]](h).mul_(0.5)
            f_hat.add_(h)
            rest.sub_(h)
            out.append(idx.view(b, -1))
        return out

    tf32_before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        with torch.no_grad():
            f = torch.randn(32, zc, 16, 16, device=dev)
            report("quant", f"cuda/residual quantize [32,{zc},16,16] x [{codes},{zc}] f32",
                   timed(lambda: f_to_idx(f)), flops=2 * 32 * tokens * codes * zc)
            # One scale's update alone (ops::phi_accumulate's cases): look up, bicubic-up unless
            # the scale is the full map, the Phi mix, residual - that (out of place, as ours).
            for pn in (8, 16):
                ids = torch.zeros(32, pn * pn, dtype=torch.long, device=dev)

                def step(ids=ids, pn=pn):
                    h = F.embedding(ids, codebook).view(32, pn, pn, zc).permute(0, 3, 1, 2)
                    if pn != 16:
                        h = F.interpolate(h, size=(16, 16), mode="bicubic")
                    return f - (h.mul(0.5) + phis[0](h).mul_(0.5))

                report("quant", f"cuda/phi step [32,{zc},16,16] scale {pn}x{pn} f32", timed(step),
                       flops=2 * 32 * zc * zc * 9 * 16 * 16)
            batch = 32 if dev.type == "cuda" else 1
            img = torch.randn(batch, 3, 256, 256, device=dev)
            case = f"cuda/10-scale encode [{batch},3,256,256] vae_ch160v4096z32 f32"
            flops = 2 * batch * tokens * codes * zc
            report("quant", case, timed(lambda: f_to_idx(encoder(img))), flops=flops)
            torch.backends.cudnn.allow_tf32 = True
            report("quant", case + " [tf32 convs]", timed(lambda: f_to_idx(encoder(img))), flops=flops)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32_before


def na2d_cases(report, timed, dev):
    """Neighbourhood attention at MVAR's shapes ([B, 16, X, X, 64] bf16, k = 7, NATTEN's window
    rule: query i sees keys clamp(i - k // 2, 0, n - k) .. + k per axis) the PyTorch ways:
    flex_attention with a block mask built from the rule (compiled, as its docs require), and
    dense F.scaled_dot_product_attention with the equivalent boolean mask. Bytes are counted as
    the Rust bench counts them: q, k, v, out for the forward; 12 such tensors for forward +
    backward (also dO, dq, dk, dv, and q, k, v, out read again), so GB/s against the HBM peak is
    the share of the roofline."""
    ks, scale = 7, 0.125
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention)
    except Exception as e:  # noqa: BLE001 - any failure means no flex numbers
        print(f"flex unavailable: {e}", flush=True)
        flex = None
    for b, side in [(32, 13), (32, 16), (64, 13), (64, 16)]:
        n = side * side
        shape = f"[{b},16,{side},{side},64]"
        q, k, v, dout = (torch.randn(b, 16, n, 64, device=dev, dtype=torch.bfloat16) for _ in range(4))
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        fwd_bytes, fb_bytes = 4 * q.numel() * 2, 12 * q.numel() * 2

        def window(q_idx, kv_idx):
            qx, qy, kx, ky = q_idx // side, q_idx % side, kv_idx // side, kv_idx % side
            sx = torch.clamp(qx - ks // 2, 0, side - ks)
            sy = torch.clamp(qy - ks // 2, 0, side - ks)
            return (kx >= sx) & (kx < sx + ks) & (ky >= sy) & (ky < sy + ks)

        idx = torch.arange(n, device=dev)
        mask = window(idx[:, None], idx[None, :])  # [L, L], True = attend

        def cases(name, attend):
            def fwd():
                with torch.no_grad():
                    attend(q, k, v)

            def fwd_bwd():
                for t in leaves:
                    t.grad = None
                attend(*leaves).backward(dout)

            report("attention", f"cuda/na2d k7 fwd {shape} bf16 {name}", timed(fwd), nbytes=fwd_bytes)
            report("attention", f"cuda/na2d k7 fwd+bwd {shape} bf16 {name}", timed(fwd_bwd), nbytes=fb_bytes)

        if flex is not None:
            try:
                block_mask = create_block_mask(lambda b_, h_, qi, ki: window(qi, ki), B=None, H=None,
                                               Q_LEN=n, KV_LEN=n, device=dev)
                cases("flex", lambda q_, k_, v_: flex(q_, k_, v_, block_mask=block_mask, scale=scale))
            except Exception as e:  # noqa: BLE001
                print(f"flex unavailable: {e}", flush=True)
        cases("sdpa", lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=scale))


def optim_cases(report, timed, dev):
    """`optim/cuda/adamw step` and `clip_grad_norm` of benches/ops.rs: VAR-d16's 16 transformer
    blocks (C = 1024: qkv, proj, the MLP, AdaLN's linear; 302.2 M f32 parameters, filled), with
    torch.optim.AdamW(fused=True) as the official trainer runs it (VAR's betas, weight decay
    0.05 on all but the biases) and clip_grad_norm_ (2.0)."""
    c, blocks = 1024, 16
    shapes = [(3 * c, c), (c, c), (c,), (4 * c, c), (4 * c,), (c, 4 * c), (c,), (6 * c, c), (6 * c,)] * blocks
    params = [torch.full(s, 0.02, device=dev, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.full(p.shape, 1e-3, device=dev)
    n = sum(p.numel() for p in params)
    what = f"{blocks} block(s) of VAR-d16, {n / 1e6:.1f} M parameters, f32"
    groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.05},
              {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0}]
    fused = dev.type == "cuda"
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=fused)
    report("optim", f"cuda/adamw step {what}", timed(opt.step), nbytes=7 * n * 4)
    report("optim", f"cuda/clip_grad_norm {what}", timed(lambda: torch.nn.utils.clip_grad_norm_(params, 2.0)),
           nbytes=n * 4)
    del params, groups, opt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="also write one JSON object per case to this file")
    ap.add_argument("--device", default="cuda", help="cuda (the reference figures) or cpu (a check of the script)")
    ap.add_argument("--iters", type=int, default=20, help="calls per timed repetition")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (the median is reported)")
    ap.add_argument("--only", default="", help="time only the cases whose group/id matches this regular "
                    "expression (searched, as criterion's filter), e.g. 'cuda/sum'")
    args = ap.parse_args()
    only = re.compile(args.only)
    torch.backends.cuda.matmul.allow_tf32 = False  # our f32 GEMM runs without TF32 too
    dev = torch.device(args.device)
    timed = make_timer(dev, args.iters, args.reps)
    # Each case goes to the JSON file as soon as it is timed, so that a run cut short (a
    # time-limited GPU machine) keeps what it finished.
    json_out = open(args.json, "w") if args.json else None

    def report(group, case_id, thunk, flops=None, nbytes=None):
        if not only.search(f"{group}/{case_id}"):
            return
        ms = thunk()
        rate = f"{flops / ms / 1e9:.1f} TFLOP/s" if flops else f"{nbytes / ms / 1e6:.1f} GB/s"
        if json_out:
            row = {"group": group, "id": case_id, "ms": ms, "flops": flops, "bytes": nbytes}
            json_out.write(json.dumps(row) + "\n")
            json_out.flush()
        print(f"{group}/{case_id}\t{ms:.4f} ms\t{rate}", flush=True)

    size = {torch.float32: 4, torch.bfloat16: 2}
    name = {torch.float32: "f32", torch.bfloat16: "bf16"}

    # matmul
    for m, k, n, dt in [(1024, 1024, 1024, torch.float32), (680, 1024, 1024, torch.float32),
                        (680, 1024, 4096, torch.float32), (1024, 1024, 1024, torch.bfloat16),
                        (4096, 4096, 4096, torch.bfloat16), (4096, 4096, 4096, torch.float32),
                        (8 * 680, 1024, 4096, torch.bfloat16)]:
        a, b = torch.randn(m, k, device=dev, dtype=dt), torch.randn(k, n, device=dev, dtype=dt)
        report("matmul", f"cuda/{name[dt]}/{m}x{k}x{n}", timed(lambda: a @ b), flops=2 * m * k * n)
    q, kt = torch.randn(512, 256, 64, device=dev), torch.randn(512, 256, 64, device=dev)
    report("matmul", "cuda/f32/batched 512x(256x64 @ 64x256)", timed(lambda: q @ kt.transpose(1, 2)),
           flops=2 * 512 * 256 * 256 * 64)

    # elementwise
    n = 1 << 26
    x = torch.full((n // 1024, 1024), 1.5, device=dev)
    y = torch.full((n // 1024, 1024), -0.5, device=dev)
    bias = torch.randn(1024, device=dev)
    report("elementwise", f"cuda/add f32 [{n // 1024},1024]", timed(lambda: x + y), nbytes=3 * n * 4)
    report("elementwise", f"cuda/gelu_tanh f32 [{n // 1024},1024]",
           timed(lambda: F.gelu(x, approximate="tanh")), nbytes=2 * n * 4)
    report("elementwise", f"cuda/add broadcast f32 [{n // 1024},1024]+[1024]", timed(lambda: x + bias),
           nbytes=2 * n * 4)
    x3, mod = x.reshape(64, n // (64 * 1024), 1024), torch.randn(64, 1, 1024, device=dev)
    report("elementwise", f"cuda/mul broadcast f32 [64,{n // (64 * 1024)},1024]*[64,1,1024]",
           timed(lambda: x3 * mod), nbytes=2 * n * 4)
    heads = torch.randn(32, 16, 255, 64, device=dev, dtype=torch.bfloat16)
    head_scale = torch.randn(1, 16, 1, 1, device=dev, dtype=torch.bfloat16)
    report("elementwise", "cuda/mul per-head bf16 [32,16,255,64]*[1,16,1,1]", timed(lambda: heads * head_scale),
           nbytes=2 * heads.numel() * 2)
    xb = x.to(torch.bfloat16)
    report("elementwise", f"cuda/gelu_tanh bf16 [{n // 1024},1024]",
           timed(lambda: F.gelu(xb, approximate="tanh")), nbytes=2 * n * 2)
    # Forward + backward: under autocast the FFN's activation gets a bf16 input (the linear's
    # output), which is what ours keeps of its f32 input; and the plain f32 case.
    for dt, label, per in [(torch.bfloat16, "autocast bf16", 2), (torch.float32, "f32", 4)]:
        leaf = torch.randn(n // 1024, 1024, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(n // 1024, 1024, device=dev, dtype=dt)

        def gelu_fwd_bwd(leaf=leaf, dy=dy):
            leaf.grad = None
            F.gelu(leaf, approximate="tanh").backward(dy)
        report("elementwise", f"cuda/gelu_tanh fwd+bwd {label} [{n // 1024},1024]", timed(gelu_fwd_bwd),
               nbytes=5 * n * per)

    # reduce
    r = torch.randn(4096, 1024, device=dev)
    report("reduce", "cuda/sum last axis [4096,1024] f32", timed(lambda: r.sum(-1)), nbytes=r.numel() * 4)
    report("reduce", "cuda/sum first axis [4096,1024] f32", timed(lambda: r.sum(0)), nbytes=r.numel() * 4)
    report("reduce", "cuda/max last axis [4096,1024] f32", timed(lambda: r.max(-1)), nbytes=r.numel() * 4)
    bias = torch.randn(21760, 1024, device=dev)
    report("reduce", "cuda/sum first axis [21760,1024] f32", timed(lambda: bias.sum(0)), nbytes=bias.numel() * 4)
    whole = torch.randn(32, 32, 32, 32, device=dev)
    report("reduce", "cuda/sum all [32,32,32,32] f32", timed(lambda: whole.sum()), nbytes=whole.numel() * 4)

    # layout
    qkv = torch.randn(8, 680, 3, 16, 64, device=dev)
    report("layout", "cuda/permute qkv [8,680,3,16,64]", timed(lambda: qkv.permute(2, 0, 3, 1, 4).contiguous()),
           nbytes=2 * qkv.numel() * 4)
    # MVAR's qkv at its segment of scales 0..8 (255 tokens), batch 32, bf16: the permute, and
    # the split's narrow forward + backward (a copy of the band; its gradient is the full axis,
    # zero around the band).
    qkv16 = torch.randn(32, 255, 3, 16, 64, device=dev, dtype=torch.bfloat16)
    report("layout", "cuda/permute qkv [32,255,3,16,64] bf16",
           timed(lambda: qkv16.permute(2, 0, 3, 1, 4).contiguous()), nbytes=2 * qkv16.numel() * 2)
    split = torch.randn(3, 32, 16, 255, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dq = torch.randn(1, 32, 16, 255, 64, device=dev, dtype=torch.bfloat16)

    def narrow_fwd_bwd():
        split.grad = None
        split.narrow(0, 1, 1).contiguous().backward(dq)

    report("layout", "cuda/narrow qkv fwd+bwd [3,32,16,255,64] bf16", timed(narrow_fwd_bwd),
           nbytes=6 * dq.numel() * 2)
    table = torch.randn(4096, 32, device=dev)
    ids = (torch.arange(8 * 680, device=dev) * 7919 % 4096).reshape(8, 680)
    report("layout", "cuda/embedding 8x680 from [4096,32]", timed(lambda: F.embedding(ids, table)),
           nbytes=8 * 680 * 32 * 4)

    # nn
    h = torch.randn(8 * 680, 1024, device=dev)
    report("nn", "cuda/layer_norm [5440,1024] f32", timed(lambda: F.layer_norm(h, (1024,), eps=1e-6)),
           nbytes=2 * h.numel() * 4)
    report("nn", "cuda/softmax [5440,1024] f32", timed(lambda: h.softmax(-1)), nbytes=2 * h.numel() * 4)
    for dt in (torch.float32, torch.bfloat16):
        big = torch.full((65536, 1024), 0.25, device=dev, dtype=dt)
        report("nn", f"cuda/layer_norm [65536,1024] {name[dt]}",
               timed(lambda: F.layer_norm(big, (1024,), eps=1e-6)), nbytes=2 * big.numel() * size[dt])
    logits = torch.randn(2 * 680, 4096, device=dev)
    targets = torch.arange(2 * 680, device=dev) * 31 % 4096
    heads = torch.randn(32, 16, 255, 64, device=dev, dtype=torch.bfloat16)
    leaf = heads.detach().requires_grad_()
    dy = torch.randn_like(heads)
    report("attention", "cuda/l2_normalize heads fwd [32,16,255,64] bf16",
           timed(lambda: F.normalize(heads, dim=-1, eps=1e-12)), nbytes=2 * heads.numel() * 2)

    def l2_fwd_bwd():
        leaf.grad = None
        F.normalize(leaf, dim=-1, eps=1e-12).backward(dy)

    report("attention", "cuda/l2_normalize heads fwd+bwd [32,16,255,64] bf16", timed(l2_fwd_bwd),
           nbytes=5 * heads.numel() * 2)
    branch = torch.randn(32, 255, 1024, device=dev, dtype=torch.bfloat16)

    def drop_path():
        # timm's drop_path: a Bernoulli decision per sample, the kept ones scaled by 1 / keep.
        keep = branch.new_empty(32, 1, 1).bernoulli_(0.9).div_(0.9)
        return branch * keep

    report("nn", "cuda/drop_path [32,255,1024] bf16", timed(drop_path), nbytes=2 * branch.numel() * 2)
    report("nn", "cuda/cross_entropy [1360,4096] f32",
           timed(lambda: F.cross_entropy(logits, targets, reduction="none")), nbytes=logits.numel() * 4)
    # Forward + backward of softmax and of the per-token cross-entropy (the bench's gradients:
    # a random dy, a random per-token dloss).
    h_leaf = h.detach().requires_grad_()
    dh = torch.randn_like(h)

    def softmax_fwd_bwd():
        h_leaf.grad = None
        h_leaf.softmax(-1).backward(dh)

    report("nn", "cuda/softmax fwd+bwd [5440,1024] f32", timed(softmax_fwd_bwd), nbytes=5 * h.numel() * 4)
    big_logits = torch.randn(8 * 680, 4096, device=dev, requires_grad=True)
    big_targets = torch.arange(8 * 680, device=dev) * 31 % 4096
    dloss = torch.randn(8 * 680, device=dev)

    def cross_entropy_fwd_bwd():
        big_logits.grad = None
        F.cross_entropy(big_logits, big_targets, reduction="none").backward(dloss)

    report("nn", "cuda/cross_entropy fwd+bwd [5440,4096] f32", timed(cross_entropy_fwd_bwd),
           nbytes=3 * big_logits.numel() * 4)
    img = torch.randn(4, 128, 64, 64, device=dev)
    w, b = torch.randn(128, device=dev), torch.randn(128, device=dev)
    report("nn", "cuda/group_norm 32 groups [4,128,64,64] f32",
           timed(lambda: F.group_norm(img, 32, w, b, eps=1e-6)), nbytes=2 * img.numel() * 4)

    # attention: VAR-d16 at batch 8 (16 heads, the 10-scale 256-px pyramid, L = 680), block-causal
    # through SDPA with the equivalent boolean mask (True = attend), forward and forward + backward;
    # one KV-cache decode step (2 x 32 samples, 256 new tokens against 680 cached ones, no mask).
    # Useful FLOPs as benches/ops.rs counts them: 4 * D per visible pair, 3.5x that with backward.
    lens = [p * p for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
    L = sum(lens)
    sid = torch.repeat_interleave(torch.arange(len(lens), device=dev), torch.tensor(lens, device=dev))
    causal = sid[:, None] >= sid[None, :]
    pairs = sum(n * end for n, end in zip(lens, itertools.accumulate(lens)))
    qa, ka, va = (torch.randn(8, 16, L, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    fwd_flops = 4 * 8 * 16 * 64 * pairs
    with torch.no_grad():
        report("attention", f"cuda/block-causal fwd [8,16,{L},64] bf16",
               timed(lambda: F.scaled_dot_product_attention(qa, ka, va, attn_mask=causal, scale=0.125)),
               flops=fwd_flops)
    qg, kg, vg = (t.clone().requires_grad_() for t in (qa, ka, va))
    dout_a = torch.randn_like(qa)

    def attn_fwd_bwd():
        for t in (qg, kg, vg):
            t.grad = None
        F.scaled_dot_product_attention(qg, kg, vg, attn_mask=causal, scale=0.125).backward(dout_a)

    report("attention", f"cuda/block-causal fwd+bwd [8,16,{L},64] bf16", timed(attn_fwd_bwd),
           flops=fwd_flops * 7 // 2)
    # The tokenizer's attention: one head over 640 channels of a 16x16 map, batch 32, f32.
    qt, kt_, vt = (torch.randn(32, 1, 256, 640, device=dev) for _ in range(3))
    with torch.no_grad():
        report("attention", "cuda/tokenizer attention [32,1,256,640] f32",
               timed(lambda: F.scaled_dot_product_attention(qt, kt_, vt)), flops=4 * 32 * 256 * 256 * 640)
    qd = torch.randn(64, 16, 256, 64, device=dev, dtype=torch.bfloat16)
    kd, vd = (torch.randn(64, 16, L, 64, device=dev, dtype=torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        report("attention", f"cuda/decode fwd q [64,16,256,64] kv {L} bf16",
               timed(lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=0.125)),
               flops=4 * 64 * 16 * 64 * 256 * L)

    # spatial
    xs = torch.randn(2, 64, 64, 64, device=dev)
    wc, bc = torch.randn(64, 64, 3, 3, device=dev), torch.randn(64, device=dev)
    report("spatial", "cuda/conv2d 3x3 [2,64,64,64] f32 (FLOPs)", timed(lambda: F.conv2d(xs, wc, bc, padding=1)),
           flops=2 * 2 * 64 * 64 * 64 * 64 * 9)
    xdec = torch.full((8, 160, 256, 256), 0.5, device=dev, dtype=torch.bfloat16)
    wdec = torch.randn(160, 160, 3, 3, device=dev, dtype=torch.bfloat16)
    bdec = torch.randn(160, device=dev, dtype=torch.bfloat16)
    wrgb = torch.randn(3, 160, 3, 3, device=dev, dtype=torch.bfloat16)
    brgb = torch.randn(3, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        report("spatial", "cuda/conv2d 3x3 [8,160,256,256] bf16 fwd (FLOPs)",
               timed(lambda: F.conv2d(xdec, wdec, bdec, padding=1)), flops=2 * 8 * 160 * 160 * 9 * 256 * 256)
        report("spatial", "cuda/conv2d 3x3 to rgb [8,160,256,256] -> 3 bf16 fwd (FLOPs)",
               timed(lambda: F.conv2d(xdec, wrgb, brgb, padding=1)), flops=2 * 8 * 3 * 160 * 9 * 256 * 256)
    del xdec
    x64 = torch.randn(8, 160, 64, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    wdec.requires_grad_(True)
    bdec.requires_grad_(True)

    def dec_conv_fwd_bwd():
        for t in (x64, wdec, bdec):
            t.grad = None
        F.conv2d(x64, wdec, bdec, padding=1).sum().backward()

    report("spatial", "cuda/conv2d 3x3 [8,160,64,64] bf16 fwd+bwd (FLOPs)", timed(dec_conv_fwd_bwd),
           flops=3 * 2 * 8 * 160 * 160 * 9 * 64 * 64)
    del x64
    report("spatial", "cuda/conv2d 3x3 stride 2 downsampler [2,64,64,64] f32 (FLOPs)",
           timed(lambda: F.conv2d(F.pad(xs, (0, 1, 0, 1)), wc, bc, stride=2)), flops=2 * 2 * 64 * 32 * 32 * 64 * 9)
    # The demo tokenizer's commonest conv and activation, forward and forward + backward (a sum
    # as the loss, gradients of every input), counted as benches/ops.rs counts them.
    xt = torch.randn(32, 32, 32, 32, device=dev, requires_grad=True)
    wt = torch.randn(32, 32, 3, 3, device=dev, requires_grad=True)
    bt = torch.randn(32, device=dev, requires_grad=True)
    conv_flops = 2 * 32 * 32 * 32 * 32 * 32 * 9
    with torch.no_grad():
        report("spatial", "cuda/conv2d 3x3 [32,32,32,32] f32 fwd (FLOPs)",
               timed(lambda: F.conv2d(xt, wt, bt, padding=1)), flops=conv_flops)

    def conv_fwd_bwd():
        for t in (xt, wt, bt):
            t.grad = None
        F.conv2d(xt, wt, bt, padding=1).sum().backward()

    report("spatial", "cuda/conv2d 3x3 [32,32,32,32] f32 fwd+bwd (FLOPs)", timed(conv_fwd_bwd),
           flops=3 * conv_flops)
    with torch.no_grad():
        report("spatial", "cuda/silu [32,32,32,32] f32 fwd", timed(lambda: F.silu(xt)),
               nbytes=2 * xt.numel() * 4)

    def silu_fwd_bwd():
        xt.grad = None
        F.silu(xt).sum().backward()

    report("spatial", "cuda/silu [32,32,32,32] f32 fwd+bwd", timed(silu_fwd_bwd), nbytes=5 * xt.numel() * 4)
    lat, small = torch.randn(32, 32, 16, 16, device=dev), torch.randn(32, 32, 5, 5, device=dev)
    report("spatial", "cuda/area_downsample 16->5 [32,32] f32",
           timed(lambda: F.interpolate(lat, size=(5, 5), mode="area")), nbytes=(lat.numel() + small.numel()) * 4)
    report("spatial", "cuda/bicubic_upsample 5->16 [32,32] f32",
           timed(lambda: F.interpolate(small, size=(16, 16), mode="bicubic")), nbytes=(lat.numel() + small.numel()) * 4)
    report("spatial", "cuda/upsample_nearest x2 [2,64,64,64] f32",
           timed(lambda: F.interpolate(xs, scale_factor=2, mode="nearest")), nbytes=5 * xs.numel() * 4)
    # The decoder's nearest upsampling (160 channels, 128 -> 256, batch 8, bf16), forward and
    # forward + backward with a random output gradient.
    low = torch.randn(8, 160, 128, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dup = torch.randn(8, 160, 256, 256, device=dev, dtype=torch.bfloat16)
    report("spatial", "cuda/upsample_nearest x2 [8,160,128,128] bf16 fwd",
           timed(lambda: F.interpolate(low.detach(), scale_factor=2, mode="nearest")), nbytes=5 * low.numel() * 2)

    def upsample_fwd_bwd():
        low.grad = None
        F.interpolate(low, scale_factor=2, mode="nearest").backward(dup)

    report("spatial", "cuda/upsample_nearest x2 [8,160,128,128] bf16 fwd+bwd", timed(upsample_fwd_bwd),
           nbytes=10 * low.numel() * 2)

    # quant: the nearest code of every row. The quantizer's own formulation (squared distances
    # through one GEMM, then argmin) under the bench's id; torch.cdist + argmin under the same id
    # with " [cdist]" appended. Both materialise the N x V distance matrix.
    codes = 4096
    for dt in (torch.float32, torch.bfloat16):
        e = torch.randn(codes, 32, device=dev, dtype=dt)
        for n, what in ((32 * 16 * 16, "16x16 latents"), (32 * 680, "10-scale pyramid")):
            z = torch.randn(n, 32, device=dev, dtype=dt)
            case = f"cuda/nearest_code {what} [{n},32] x [{codes},32] {name[dt]}"
            flops = 2 * n * codes * 32

            def official(z=z, e=e):
                d = z.square().sum(1, keepdim=True) + e.square().sum(1)
                return d.addmm_(z, e.t(), alpha=-2, beta=1).argmin(1)

            report("quant", case, timed(official), flops=flops)
            try:
                report("quant", case + " [cdist]", timed(lambda z=z, e=e: torch.cdist(z, e).argmin(1)),
                       flops=flops)
            except RuntimeError as err:  # cdist lacks some dtypes on some versions
                print(f"quant/{case} [cdist]\tskipped: {err}", flush=True)

    tokenizer_cases(report, timed, dev)

    # sample: VAR's last scale at batch 32 (8192 rows of 4096 codes), top-k 900, top-p 0.96, the
    # way the official sampler filters and draws: topk for the k-th value and a mask, an ascending
    # sort with the softmax's cumulative sum for the top-p mask, then multinomial on the softmax.
    rows, codes, top_k, top_p = 32 * 16 * 16, 4096, 900, 0.96
    for dt in (torch.float32, torch.bfloat16):
        logits = (torch.randn(rows, codes, device=dev) * 3).to(dt)

        def filtered(logits=logits):
            x = logits.clone()
            kth = x.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
            x.masked_fill_(x < kth, -torch.inf)
            ascending, order = x.sort(dim=-1, descending=False)
            drop = ascending.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
            drop[..., -1:] = False
            x.masked_fill_(drop.scatter(1, order, drop), -torch.inf)
            return x

        def draw():
            return torch.multinomial(filtered().softmax(dim=-1), num_samples=1)

        shape = f"[{rows},{codes}] top-k {top_k} top-p {top_p} {name[dt]}"
        report("sample", f"cuda/sample {shape}", timed(draw), nbytes=rows * codes * size[dt])
        # The filter alone: what more_smooth's Gumbel softmax reads (our filter_top_k_top_p).
        report("sample", f"cuda/filter {shape}", timed(filtered), nbytes=rows * codes * size[dt])

    # attention
    na2d_cases(report, timed, dev)

    optim_cases(report, timed, dev)

    if json_out:
        json_out.close()
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (script check, not a reference)"
    print(f"# torch {torch.__version__}, {where}")


if __name__ == "__main__":
    main()

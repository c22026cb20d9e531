//! criterion benchmarks, one group per op family, on the CPU (the CUDA backend adds its device
//! to the same groups).
//!
//! Throughput is reported the way each family is judged: matmul and conv in FLOPs (criterion
//! prints them as "elem/s": 1 Gelem/s = 1 GFLOP/s, counting a multiply-add as 2 FLOPs), memory-
//! bound ops in bytes read + written.
//!
//! Run: `cargo bench --bench ops` (all) or `cargo bench --bench ops -- matmul` (one family).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mvar::engine::{no_grad, DType, Device, Generator, Tensor};
use mvar::ops;

fn randn(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    Tensor::randn(
        shape.to_vec(),
        0.0,
        1.0,
        dtype,
        &Device::Cpu,
        &mut Generator::new(seed),
    )
    .unwrap()
}

fn bytes(n: usize, dtype: DType) -> u64 {
    (n * dtype.size_in_bytes()) as u64
}

fn matmul(c: &mut Criterion) {
    let _ng = no_grad();
    let mut g = c.benchmark_group("matmul");
    // Square, VAR-d16-like projections (680 tokens, width 1024, MLP 4096), and per-head attention
    // products (batch 32 x 16 heads of 256 x 64).
    for &(m, k, n, dt) in &[
        (1024, 1024, 1024, DType::F32),
        (680, 1024, 1024, DType::F32),
        (680, 1024, 4096, DType::F32),
        (256, 256, 256, DType::F64),
        (1024, 1024, 1024, DType::BF16),
    ] {
        let (a, b) = (randn(&[m, k], dt, 1), randn(&[k, n], dt, 2));
        g.throughput(Throughput::Elements((2 * m * k * n) as u64));
        g.bench_with_input(
            BenchmarkId::new(format!("{dt}"), format!("{m}x{k}x{n}")),
            &(),
            |bch, _| bch.iter(|| ops::matmul(&a, &b).unwrap()),
        );
    }
    let (q, kt) = (
        randn(&[512, 256, 64], DType::F32, 3),
        randn(&[512, 256, 64], DType::F32, 4),
    );
    g.throughput(Throughput::Elements(2 * 512 * 256 * 256 * 64));
    g.bench_function("f32/batched 512x(256x64 @ 64x256)", |bch| {
        bch.iter(|| ops::matmul_t(&q, &kt, false, true).unwrap())
    });
    g.finish();
}

fn elementwise(c: &mut Criterion) {
    let _ng = no_grad();
    let mut g = c.benchmark_group("elementwise");
    let n = 1 << 22;
    let (x, y) = (
        randn(&[n / 1024, 1024], DType::F32, 1),
        randn(&[n / 1024, 1024], DType::F32, 2),
    );
    let bias = randn(&[1024], DType::F32, 3);
    g.throughput(Throughput::Bytes(bytes(2 * n, DType::F32)));
    g.bench_function("gelu_tanh f32 4M", |b| {
        b.iter(|| ops::gelu_tanh(&x).unwrap())
    });
    g.throughput(Throughput::Bytes(bytes(3 * n, DType::F32)));
    g.bench_function("add f32 4M", |b| b.iter(|| ops::add(&x, &y).unwrap()));
    g.throughput(Throughput::Bytes(bytes(2 * n, DType::F32)));
    g.bench_function("add broadcast [4096,1024]+[1024] f32", |b| {
        b.iter(|| ops::add(&x, &bias).unwrap())
    });
    g.finish();
}

fn reduce(c: &mut Criterion) {
    let _ng = no_grad();
    let mut g = c.benchmark_group("reduce");
    let x = randn(&[4096, 1024], DType::F32, 1);
    g.throughput(Throughput::Bytes(bytes(x.elem_count(), DType::F32)));
    g.bench_function("sum last axis [4096,1024] f32", |b| {
        b.iter(|| ops::sum(&x, -1, false).unwrap())
    });
    g.bench_function("sum first axis [4096,1024] f32", |b| {
        b.iter(|| ops::sum(&x, 0, false).unwrap())
    });
    g.bench_function("max last axis [4096,1024] f32", |b| {
        b.iter(|| ops::max(&x, -1, false).unwrap())
    });
    g.finish();
}

fn layout(c: &mut Criterion) {
    let _ng = no_grad();
    let mut g = c.benchmark_group("layout");
    // [B, L, 3, H, D] -> [3, B, H, L, D]: the qkv split of a VAR-d16 block at batch 8.
    let qkv = randn(&[8, 680, 3, 16, 64], DType::F32, 1);
    g.throughput(Throughput::Bytes(bytes(2 * qkv.elem_count(), DType::F32)));
    g.bench_function("permute qkv [8,680,3,16,64]", |b| {
        b.iter(|| ops::permute(&qkv, &[2, 0, 3, 1, 4]).unwrap())
    });
    let table = randn(&[4096, 32], DType::F32, 2);
    let ids = Tensor::from_vec(
        (0..8 * 680)
            .map(|i| (i * 7919 % 4096) as i64)
            .collect::<Vec<_>>(),
        [8, 680],
        &Device::Cpu,
    )
    .unwrap();
    g.throughput(Throughput::Bytes(bytes(8 * 680 * 32, DType::F32)));
    g.bench_function("embedding 8x680 from [4096,32]", |b| {
        b.iter(|| ops::embedding(&ids, &table).unwrap())
    });
    g.finish();
}

fn nn(c: &mut Criterion) {
    let _ng = no_grad();
    let mut g = c.benchmark_group("nn");
    // VAR-d16 shapes at batch 8: 8 x 680 tokens of width 1024; logits over a 4096-code vocabulary.
    let x = randn(&[8 * 680, 1024], DType::F32, 1);
    g.throughput(Throughput::Bytes(bytes(2 * x.elem_count(), DType::F32)));
    g.bench_function("layer_norm [5440,1024] f32", |b| {
        b.iter(|| ops::layer_norm(&x, 1e-6).unwrap())
    });
    g.bench_function("softmax [5440,1024] f32", |b| {
        b.iter(|| ops::softmax(&x, -1).unwrap())
    });
    let logits = randn(&[2 * 680, 4096], DType::F32, 2);
    let targets = Tensor::from_vec(
        (0..2 * 680)
            .map(|i| (i * 31 % 4096) as i64)
            .collect::<Vec<_>>(),
        [2 * 680],
        &Device::Cpu,
    )
    .unwrap();
    g.throughput(Throughput::Bytes(bytes(logits.elem_count(), DType::F32)));
    g.bench_function("cross_entropy [1360,4096] f32", |b| {
        b.iter(|| ops::cross_entropy(&logits, &targets, None, 0.0).unwrap())
    });
    // VQVAE GroupNorm: 32 groups over [4, 128, 64, 64].
    let img = randn(&[4, 128, 64, 64], DType::F32, 3);
    let (w, bias) = (randn(&[128], DType::F32, 4), randn(&[128], DType::F32, 5));
    g.throughput(Throughput::Bytes(bytes(2 * img.elem_count(), DType::F32)));
    g.bench_function("group_norm 32 groups [4,128,64,64] f32", |b| {
        b.iter(|| ops::group_norm(&img, 32, &w, &bias, 1e-6).unwrap())
    });
    g.finish();
}

/// Forward and backward of the attention references on MVAR-like shapes (head dim 64).
fn attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    // Block-causal VAR attention over the 10-scale pyramid up to 10x10 (L = 255 ... the first 8
    // scales), batch 2 x 16 heads; and 7x7 neighbourhood attention on a 16x16 map.
    let scales: Vec<usize> = [1usize, 2, 3, 4, 5, 6, 8, 10]
        .iter()
        .map(|p| p * p)
        .collect();
    let l: usize = scales.iter().sum();
    let (q, k, v) = (
        randn(&[2, 16, l, 64], DType::F32, 1),
        randn(&[2, 16, l, 64], DType::F32, 2),
        randn(&[2, 16, l, 64], DType::F32, 3),
    );
    let mask = ops::AttnMask::BlockCausal(scales);
    g.throughput(Throughput::Bytes(bytes(4 * q.elem_count(), DType::F32)));
    g.bench_function(format!("block-causal fwd [2,16,{l},64] f32"), |b| {
        b.iter(|| mvar::engine::with_no_grad(|| ops::attention(&q, &k, &v, 1.0, &mask).unwrap()))
    });
    let (qg, kg, vg) = (
        q.with_grad().unwrap(),
        k.with_grad().unwrap(),
        v.with_grad().unwrap(),
    );
    g.bench_function(format!("block-causal fwd+bwd [2,16,{l},64] f32"), |b| {
        b.iter(|| {
            ops::sum_all(&ops::attention(&qg, &kg, &vg, 1.0, &mask).unwrap())
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    let (nq, nk, nv) = (
        randn(&[2, 16, 16, 16, 64], DType::F32, 4),
        randn(&[2, 16, 16, 16, 64], DType::F32, 5),
        randn(&[2, 16, 16, 16, 64], DType::F32, 6),
    );
    g.throughput(Throughput::Bytes(bytes(4 * nq.elem_count(), DType::F32)));
    g.bench_function("na2d k7 fwd [2,16,16,16,64] f32", |b| {
        b.iter(|| mvar::engine::with_no_grad(|| ops::na2d(&nq, &nk, &nv, 7, 1.0).unwrap()))
    });
    let (nqg, nkg, nvg) = (
        nq.with_grad().unwrap(),
        nk.with_grad().unwrap(),
        nv.with_grad().unwrap(),
    );
    g.bench_function("na2d k7 fwd+bwd [2,16,16,16,64] f32", |b| {
        b.iter(|| {
            ops::sum_all(&ops::na2d(&nqg, &nkg, &nvg, 7, 1.0).unwrap())
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    g.finish();
}

fn spatial(c: &mut Criterion) {
    let _ng = no_grad();
    let mut g = c.benchmark_group("spatial");
    // VQVAE-like convolutions: 3x3 same conv at 64 channels on 64x64, and the stride-2
    // downsampler with its right/bottom pad.
    let x = randn(&[2, 64, 64, 64], DType::F32, 1);
    let w = randn(&[64, 64, 3, 3], DType::F32, 2);
    let b = randn(&[64], DType::F32, 3);
    g.throughput(Throughput::Elements(2 * 2 * 64 * 64 * 64 * 64 * 9));
    g.bench_function("conv2d 3x3 [2,64,64,64] f32 (FLOPs)", |bch| {
        bch.iter(|| ops::conv2d(&x, &w, Some(&b), (1, 1), ops::Padding::same(1)).unwrap())
    });
    let pad = ops::Padding {
        top: 0,
        bottom: 1,
        left: 0,
        right: 1,
    };
    g.throughput(Throughput::Elements(2 * 2 * 64 * 32 * 32 * 64 * 9));
    g.bench_function(
        "conv2d 3x3 stride 2 downsampler [2,64,64,64] f32 (FLOPs)",
        |bch| bch.iter(|| ops::conv2d(&x, &w, Some(&b), (2, 2), pad).unwrap()),
    );
    // The quantizer's interpolations: batch 32 of 32-channel 16x16 latents <-> a 5x5 scale.
    let latents = randn(&[32, 32, 16, 16], DType::F32, 4);
    let small = randn(&[32, 32, 5, 5], DType::F32, 5);
    g.throughput(Throughput::Bytes(bytes(
        latents.elem_count() + small.elem_count(),
        DType::F32,
    )));
    g.bench_function("area_downsample 16->5 [32,32] f32", |bch| {
        bch.iter(|| ops::area_downsample(&latents, 5, 5).unwrap())
    });
    g.bench_function("bicubic_upsample 5->16 [32,32] f32", |bch| {
        bch.iter(|| ops::bicubic_upsample(&small, 16, 16).unwrap())
    });
    g.throughput(Throughput::Bytes(bytes(5 * x.elem_count(), DType::F32)));
    g.bench_function("upsample_nearest x2 [2,64,64,64] f32", |bch| {
        bch.iter(|| ops::upsample_nearest(&x, 2).unwrap())
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = matmul, elementwise, reduce, layout, nn, attention, spatial
}
criterion_main!(benches);

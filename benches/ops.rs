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

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = matmul, elementwise, reduce, layout
}
criterion_main!(benches);

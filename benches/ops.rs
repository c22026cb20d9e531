//! criterion benchmarks, one group per op family, on the CPU and, when one is found at run time,
//! on the GPU (same groups, ids prefixed `cpu/` or `cuda/`).
//!
//! Throughput is reported the way each family is judged: matmul and conv in FLOPs (criterion
//! prints them as "elem/s": 1 Gelem/s = 1 GFLOP/s, counting a multiply-add as 2 FLOPs), memory-
//! bound ops in bytes read + written once. GPU timings synchronise the device inside the timed
//! region, so they measure finished work, not queued launches. `benches/torch_reference.py`
//! times the same cases with PyTorch on the same GPU, under the same ids.
//!
//! Run: `cargo bench --bench ops` (all) or `cargo bench --bench ops -- matmul` (one family);
//! `MVAR_BENCH_DEVICES=cpu` or `=cuda` restricts the devices.

use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use mvar::engine::{no_grad, DType, Device, Generator, Tensor};
use mvar::ops;

/// The devices to benchmark on: the CPU, and the first GPU if one opens.
fn devices() -> Vec<Device> {
    let want = std::env::var("MVAR_BENCH_DEVICES").unwrap_or_default();
    let mut out = Vec::new();
    if want.is_empty() || want.contains("cpu") {
        out.push(Device::Cpu);
    }
    if want.is_empty() || want.contains("cuda") {
        if let Ok(d) = Device::cuda(0) {
            out.push(d);
        }
    }
    out
}

fn tag(d: &Device) -> &'static str {
    if d.is_cpu() {
        "cpu"
    } else {
        "cuda"
    }
}

/// Random values (generated on the host, then moved).
fn randn(shape: &[usize], dtype: DType, device: &Device, seed: u64) -> Tensor {
    Tensor::randn(
        shape.to_vec(),
        0.0,
        1.0,
        DType::F32,
        &Device::Cpu,
        &mut Generator::new(seed),
    )
    .and_then(|t| t.to_dtype(dtype))
    .and_then(|t| t.to_device(device))
    .expect("bench input")
}

/// A large tensor filled on the device itself (generating hundreds of millions of random values
/// on the host would dominate the run; bandwidth-bound ops do not care about the values).
fn filled(shape: &[usize], dtype: DType, device: &Device, value: f64) -> Tensor {
    Tensor::full(value, shape.to_vec(), dtype, device).expect("bench input")
}

/// f32 everywhere, and bf16 on a GPU (on the CPU bf16 is only a storage format).
fn float_dtypes(d: &Device) -> Vec<DType> {
    if d.is_cuda() {
        vec![DType::F32, DType::BF16]
    } else {
        vec![DType::F32]
    }
}

fn bytes(n: usize, dtype: DType) -> u64 {
    (n * dtype.size_in_bytes()) as u64
}

/// Times `f` on `device`; on a GPU the device is synchronised before the clock starts and stops.
fn bench(g: &mut BenchmarkGroup<'_, WallTime>, device: &Device, id: String, mut f: impl FnMut()) {
    let dev = device.clone();
    g.bench_function(BenchmarkId::from_parameter(id), move |b| {
        b.iter_custom(|iters| {
            dev.synchronize().expect("sync");
            let start = Instant::now();
            for _ in 0..iters {
                f();
            }
            dev.synchronize().expect("sync");
            start.elapsed()
        })
    });
}

fn matmul(c: &mut Criterion) {
    let _ng = no_grad();
    let mut g = c.benchmark_group("matmul");
    for d in devices() {
        // Square; VAR-d16 projections (680 tokens, width 1024, MLP 4096); on the GPU the bf16
        // 4096^3 product of the acceptance figure.
        let mut cases = vec![
            (1024, 1024, 1024, DType::F32),
            (680, 1024, 1024, DType::F32),
            (680, 1024, 4096, DType::F32),
            (1024, 1024, 1024, DType::BF16),
        ];
        if d.is_cpu() {
            // bf16 on the CPU runs VDPBF16PS where the CPU has AVX512-BF16 (else it is widened to
            // f32; MVAR_CPU_BF16_GEMM=0 forces that): the VAR-d16 MLP and MVAR-d4's head
            // (4 x 255 tokens, width 256, 4096 codes), beside their f32 cases.
            cases.extend([
                (256, 256, 256, DType::F64),
                (680, 1024, 4096, DType::BF16),
                (1020, 256, 4096, DType::F32),
                (1020, 256, 4096, DType::BF16),
            ]);
        } else {
            cases.extend([
                (4096, 4096, 4096, DType::BF16),
                (4096, 4096, 4096, DType::F32),
                (8 * 680, 1024, 4096, DType::BF16),
            ]);
        }
        for (m, k, n, dt) in cases {
            let (a, b) = (randn(&[m, k], dt, &d, 1), randn(&[k, n], dt, &d, 2));
            g.throughput(Throughput::Elements((2 * m * k * n) as u64));
            bench(&mut g, &d, format!("{}/{dt}/{m}x{k}x{n}", tag(&d)), || {
                ops::matmul(&a, &b).unwrap();
            });
        }
        if d.is_cpu() {
            // A weight gradient of MVAR-d4's MLP (g^T x: [1020,4096]^T @ [1020,256]), whose
            // transposed operand the bf16 kernel packs with interleaved rows.
            for dt in [DType::F32, DType::BF16] {
                let (g_out, x) = (
                    randn(&[1020, 4096], dt, &d, 5),
                    randn(&[1020, 256], dt, &d, 6),
                );
                g.throughput(Throughput::Elements(2 * 4096 * 1020 * 256));
                bench(
                    &mut g,
                    &d,
                    format!("{}/{dt}/4096x1020x256 a^T b", tag(&d)),
                    || {
                        ops::matmul_t(&g_out, &x, true, false).unwrap();
                    },
                );
            }
        }
        let (q, kt) = (
            randn(&[512, 256, 64], DType::F32, &d, 3),
            randn(&[512, 256, 64], DType::F32, &d, 4),
        );
        g.throughput(Throughput::Elements(2 * 512 * 256 * 256 * 64));
        bench(
            &mut g,
            &d,
            format!("{}/f32/batched 512x(256x64 @ 64x256)", tag(&d)),
            || {
                ops::matmul_t(&q, &kt, false, true).unwrap();
            },
        );
    }
    g.finish();
}

/// Runs `f` with the kernel-family variable `var` set to `value` (the reference variants of the
/// tuned kernels are benchmarked this way), then restores what it was.
fn with_kernel_env(var: &str, value: &str, f: impl FnOnce()) {
    let before = std::env::var_os(var);
    std::env::set_var(var, value);
    f();
    match before {
        Some(v) => std::env::set_var(var, v),
        None => std::env::remove_var(var),
    }
}

fn elementwise(c: &mut Criterion) {
    let _ng = no_grad();
    let mut g = c.benchmark_group("elementwise");
    for d in devices() {
        let t = tag(&d);
        let n = if d.is_cpu() { 1 << 22 } else { 1 << 26 };
        let (x, y) = if d.is_cpu() {
            (
                randn(&[n / 1024, 1024], DType::F32, &d, 1),
                randn(&[n / 1024, 1024], DType::F32, &d, 2),
            )
        } else {
            (
                filled(&[n / 1024, 1024], DType::F32, &d, 1.5),
                filled(&[n / 1024, 1024], DType::F32, &d, -0.5),
            )
        };
        let bias = randn(&[1024], DType::F32, &d, 3);
        g.throughput(Throughput::Bytes(bytes(3 * n, DType::F32)));
        bench(
            &mut g,
            &d,
            format!("{t}/add f32 [{},1024]", n / 1024),
            || {
                ops::add(&x, &y).unwrap();
            },
        );
        g.throughput(Throughput::Bytes(bytes(2 * n, DType::F32)));
        bench(
            &mut g,
            &d,
            format!("{t}/gelu_tanh f32 [{},1024]", n / 1024),
            || {
                ops::gelu_tanh(&x).unwrap();
            },
        );
        bench(
            &mut g,
            &d,
            format!("{t}/add broadcast f32 [{},1024]+[1024]", n / 1024),
            || {
                ops::add(&x, &bias).unwrap();
            },
        );
        // AdaLN's modulation: a per-sample [B, 1, C] scale over [B, L, C].
        let x3 = x.reshape([64, n / (64 * 1024), 1024]).unwrap();
        let scale = randn(&[64, 1, 1024], DType::F32, &d, 4);
        bench(
            &mut g,
            &d,
            format!(
                "{t}/mul broadcast f32 [64,{},1024]*[64,1,1024]",
                n / (64 * 1024)
            ),
            || {
                ops::mul(&x3, &scale).unwrap();
            },
        );
        if d.is_cuda() {
            let xb = filled(&[n / 1024, 1024], DType::BF16, &d, 1.5);
            g.throughput(Throughput::Bytes(bytes(2 * n, DType::BF16)));
            bench(
                &mut g,
                &d,
                format!("{t}/gelu_tanh bf16 [{},1024]", n / 1024),
                || {
                    ops::gelu_tanh(&xb).unwrap();
                },
            );
            // VAR's per-head query scale at MVAR-d16's segment of scales 0..8, batch 32: an input
            // constant along the trailing axes (one element per 16-byte vector since
            // 2026-12-04; the general kernel before), and that kernel beside it.
            let heads = randn(&[32, 16, 255, 64], DType::BF16, &d, 5);
            let head_scale = randn(&[1, 16, 1, 1], DType::BF16, &d, 6);
            for (variant, env) in [("", "vector"), (" per-element", "scalar")] {
                with_kernel_env("MVAR_EW_KERNEL", env, || {
                    g.throughput(Throughput::Bytes(bytes(
                        2 * heads.elem_count(),
                        DType::BF16,
                    )));
                    bench(
                        &mut g,
                        &d,
                        format!("{t}/mul per-head{variant} bf16 [32,16,255,64]*[1,16,1,1]"),
                        || {
                            ops::mul(&heads, &head_scale).unwrap();
                        },
                    );
                });
            }
            // The per-element kernels (the general ones, and the reference variant of the 16-byte
            // vector kernels that the cases above run).
            with_kernel_env("MVAR_EW_KERNEL", "scalar", || {
                g.throughput(Throughput::Bytes(bytes(3 * n, DType::F32)));
                bench(
                    &mut g,
                    &d,
                    format!("{t}/add per-element f32 [{},1024]", n / 1024),
                    || {
                        ops::add(&x, &y).unwrap();
                    },
                );
                g.throughput(Throughput::Bytes(bytes(2 * n, DType::BF16)));
                bench(
                    &mut g,
                    &d,
                    format!("{t}/gelu_tanh per-element bf16 [{},1024]", n / 1024),
                    || {
                        ops::gelu_tanh(&xb).unwrap();
                    },
                );
            });
        }
    }
    g.finish();
}

/// GELU forward + backward as VAR's FFN trains it under bf16 autocast: an f32 input whose bf16
/// copy the forward keeps for the backward (one kernel each way), its per-element twin, and the
/// f32-keeping path outside autocast. PyTorch's counterpart runs GELU on a bf16 input, which is
/// what its autocast linear hands the activation.
fn activations(c: &mut Criterion) {
    let mut g = c.benchmark_group("elementwise");
    for d in devices() {
        let t = tag(&d);
        let n = if d.is_cpu() { 1 << 22 } else { 1 << 26 };
        let x = randn(&[n / 1024, 1024], DType::F32, &d, 11)
            .with_grad()
            .unwrap();
        let dy = randn(&[n / 1024, 1024], DType::F32, &d, 12);
        let fwd_bwd = || {
            x.zero_grad();
            ops::gelu_tanh(&x)
                .unwrap()
                .backward_with(dy.clone())
                .unwrap();
        };
        // Forward: read x, write y and the bf16 copy; backward: read the copy and dy, write dx.
        g.throughput(Throughput::Bytes(
            bytes(4 * n, DType::F32) + bytes(2 * n, DType::BF16),
        ));
        let variants: &[(&str, &str)] = if d.is_cuda() {
            &[("", "vector"), (" per-element", "scalar")]
        } else {
            &[("", "vector")]
        };
        for (variant, env) in variants {
            with_kernel_env("MVAR_EW_KERNEL", env, || {
                bench(
                    &mut g,
                    &d,
                    format!(
                        "{t}/gelu_tanh{variant} fwd+bwd autocast bf16 [{},1024]",
                        n / 1024
                    ),
                    || {
                        let _bf16 = mvar::engine::autocast(Some(DType::BF16)).unwrap();
                        fwd_bwd();
                    },
                );
            });
        }
        // Outside autocast the f32 input is kept: read x, write y; read x and dy, write dx.
        g.throughput(Throughput::Bytes(bytes(5 * n, DType::F32)));
        bench(
            &mut g,
            &d,
            format!("{t}/gelu_tanh fwd+bwd f32 [{},1024]", n / 1024),
            fwd_bwd,
        );
    }
    g.finish();
}

fn reduce(c: &mut Criterion) {
    let _ng = no_grad();
    let mut g = c.benchmark_group("reduce");
    for d in devices() {
        let t = tag(&d);
        let x = randn(&[4096, 1024], DType::F32, &d, 1);
        g.throughput(Throughput::Bytes(bytes(x.elem_count(), DType::F32)));
        bench(
            &mut g,
            &d,
            format!("{t}/sum last axis [4096,1024] f32"),
            || {
                ops::sum(&x, -1, false).unwrap();
            },
        );
        bench(
            &mut g,
            &d,
            format!("{t}/sum first axis [4096,1024] f32"),
            || {
                ops::sum(&x, 0, false).unwrap();
            },
        );
        bench(
            &mut g,
            &d,
            format!("{t}/max last axis [4096,1024] f32"),
            || {
                ops::max(&x, -1, false).unwrap();
            },
        );
        // The trainers' token accuracy: the argmax of the logits over the vocabulary.
        bench(
            &mut g,
            &d,
            format!("{t}/argmax last axis [4096,1024] f32"),
            || {
                ops::argmax(&x, -1, false).unwrap();
            },
        );
        // A bias gradient of VAR-d16's training step at batch 32 (B * L = 21760 rows), and a
        // whole-tensor sum (the scalar loss of the conv and silu fwd+bwd cases).
        let bias = randn(&[21760, 1024], DType::F32, &d, 3);
        g.throughput(Throughput::Bytes(bytes(bias.elem_count(), DType::F32)));
        bench(
            &mut g,
            &d,
            format!("{t}/sum first axis [21760,1024] f32"),
            || {
                ops::sum(&bias, 0, false).unwrap();
            },
        );
        let whole = randn(&[32, 32, 32, 32], DType::F32, &d, 4);
        g.throughput(Throughput::Bytes(bytes(whole.elem_count(), DType::F32)));
        bench(&mut g, &d, format!("{t}/sum all [32,32,32,32] f32"), || {
            ops::sum_all(&whole).unwrap();
        });
        if !d.is_cpu() {
            // The reference variant: one block per row, one thread per column, no split.
            with_kernel_env("MVAR_SUM_KERNEL", "naive", || {
                g.throughput(Throughput::Bytes(bytes(bias.elem_count(), DType::F32)));
                bench(
                    &mut g,
                    &d,
                    format!("{t}/sum first axis naive [21760,1024] f32"),
                    || {
                        ops::sum(&bias, 0, false).unwrap();
                    },
                );
                g.throughput(Throughput::Bytes(bytes(whole.elem_count(), DType::F32)));
                bench(
                    &mut g,
                    &d,
                    format!("{t}/sum all naive [32,32,32,32] f32"),
                    || {
                        ops::sum_all(&whole).unwrap();
                    },
                );
            });
        }
    }
    g.finish();
}

fn layout(c: &mut Criterion) {
    let _ng = no_grad();
    let mut g = c.benchmark_group("layout");
    for d in devices() {
        let t = tag(&d);
        // [B, L, 3, H, D] -> [3, B, H, L, D]: the qkv split of a VAR-d16 block at batch 8.
        let qkv = randn(&[8, 680, 3, 16, 64], DType::F32, &d, 1);
        g.throughput(Throughput::Bytes(bytes(2 * qkv.elem_count(), DType::F32)));
        bench(
            &mut g,
            &d,
            format!("{t}/permute qkv [8,680,3,16,64]"),
            || {
                ops::permute(&qkv, &[2, 0, 3, 1, 4]).unwrap();
            },
        );
        // MVAR's segment of scales 0..8 (255 tokens) at batch 32, bf16: the qkv permute and the
        // split into q, k, v (narrow of the leading axis; forward + backward, whose backward
        // writes the full axis). Beside them the per-element copies (MVAR_EW_KERNEL=scalar), the
        // reference variant of the word copies (2026-12-04).
        if d.is_cuda() {
            let qkv16 = randn(&[32, 255, 3, 16, 64], DType::BF16, &d, 3);
            let split = randn(&[3, 32, 16, 255, 64], DType::BF16, &d, 4)
                .with_grad()
                .unwrap();
            let dq = randn(&[1, 32, 16, 255, 64], DType::BF16, &d, 5);
            for (variant, env) in [("", "vector"), (" per-element", "scalar")] {
                with_kernel_env("MVAR_EW_KERNEL", env, || {
                    g.throughput(Throughput::Bytes(bytes(
                        2 * qkv16.elem_count(),
                        DType::BF16,
                    )));
                    bench(
                        &mut g,
                        &d,
                        format!("{t}/permute qkv{variant} [32,255,3,16,64] bf16"),
                        || {
                            ops::permute(&qkv16, &[2, 0, 3, 1, 4]).unwrap();
                        },
                    );
                    // Read the band, write it; backward: read its gradient, write the full axis.
                    g.throughput(Throughput::Bytes(bytes(6 * dq.elem_count(), DType::BF16)));
                    bench(
                        &mut g,
                        &d,
                        format!("{t}/narrow qkv{variant} fwd+bwd [3,32,16,255,64] bf16"),
                        || {
                            split.zero_grad();
                            ops::narrow(&split, 0, 1, 1)
                                .unwrap()
                                .backward_with(dq.clone())
                                .unwrap();
                        },
                    );
                });
            }
        }
        if d.is_cpu() {
            // MVAR-d4's qkv split at batch 32 (255 tokens): one part cut out of the permuted
            // qkv tensor, and the three parts' gradients joined back (the tape's concat).
            let qkv4 = randn(&[3, 32, 4, 255, 64], DType::F32, &d, 6);
            let part = randn(&[1, 32, 4, 255, 64], DType::F32, &d, 7);
            g.throughput(Throughput::Bytes(bytes(2 * part.elem_count(), DType::F32)));
            bench(
                &mut g,
                &d,
                format!("{t}/narrow qkv [3,32,4,255,64] f32"),
                || {
                    ops::narrow(&qkv4, 0, 1, 1).unwrap();
                },
            );
            g.throughput(Throughput::Bytes(bytes(2 * qkv4.elem_count(), DType::F32)));
            bench(
                &mut g,
                &d,
                format!("{t}/concat qkv 3x[1,32,4,255,64] f32"),
                || {
                    ops::concat(&[&part, &part, &part], 0).unwrap();
                },
            );
        }
        let table = randn(&[4096, 32], DType::F32, &d, 2);
        let ids = Tensor::from_vec(
            (0..8 * 680)
                .map(|i| (i * 7919 % 4096) as i64)
                .collect::<Vec<_>>(),
            [8, 680],
            &d,
        )
        .expect("ids");
        g.throughput(Throughput::Bytes(bytes(8 * 680 * 32, DType::F32)));
        bench(
            &mut g,
            &d,
            format!("{t}/embedding 8x680 from [4096,32]"),
            || {
                ops::embedding(&ids, &table).unwrap();
            },
        );
    }
    g.finish();
}

fn nn(c: &mut Criterion) {
    let ng = no_grad();
    let mut g = c.benchmark_group("nn");
    for d in devices() {
        let t = tag(&d);
        // VAR-d16 at batch 8: 8 x 680 tokens of width 1024; on the GPU also a large layer_norm for
        // the bandwidth figure.
        let x = randn(&[8 * 680, 1024], DType::F32, &d, 1);
        g.throughput(Throughput::Bytes(bytes(2 * x.elem_count(), DType::F32)));
        bench(
            &mut g,
            &d,
            format!("{t}/layer_norm [5440,1024] f32"),
            || {
                ops::layer_norm(&x, 1e-6).unwrap();
            },
        );
        bench(&mut g, &d, format!("{t}/softmax [5440,1024] f32"), || {
            ops::softmax(&x, -1).unwrap();
        });
        // The transformer's drop-path (one decision per sample) and dropout (one per element;
        // drawing the decisions on the host is part of it on the CPU), as training runs them.
        let x3 = x.reshape([8, 680, 1024]).unwrap();
        let mut rng = Generator::new(3);
        bench(
            &mut g,
            &d,
            format!("{t}/drop_path p 0.1 [8,680,1024] f32"),
            || {
                ops::drop_path(&x3, 0.1, &mut rng).unwrap();
            },
        );
        bench(
            &mut g,
            &d,
            format!("{t}/dropout p 0.1 [8,680,1024] f32"),
            || {
                ops::dropout(&x3, 0.1, &mut rng).unwrap();
            },
        );
        if d.is_cuda() {
            for dt in [DType::F32, DType::BF16] {
                let big = filled(&[65536, 1024], dt, &d, 0.25);
                g.throughput(Throughput::Bytes(bytes(2 * big.elem_count(), dt)));
                bench(
                    &mut g,
                    &d,
                    format!("{t}/layer_norm [65536,1024] {dt}"),
                    || {
                        ops::layer_norm(&big, 1e-6).unwrap();
                    },
                );
                // The block-per-row kernel (the general one, and the reference variant of the
                // warp-per-row kernel that the case above runs).
                with_kernel_env("MVAR_LN_KERNEL", "block", || {
                    bench(
                        &mut g,
                        &d,
                        format!("{t}/layer_norm block-per-row [65536,1024] {dt}"),
                        || {
                            ops::layer_norm(&big, 1e-6).unwrap();
                        },
                    );
                });
            }
        }
        // The drop-path of a residual branch at MVAR-d16's segment of scales 0..8, batch 32
        // ([32, 255, 1024] bf16, a decision per sample), and beside it the per-element mask kernel
        // it ran in before 2026-12-04 (MVAR_EW_KERNEL=scalar).
        if d.is_cuda() {
            let branch = randn(&[32, 255, 1024], DType::BF16, &d, 9);
            for (variant, value) in [("", "vector"), (" per-element", "scalar")] {
                with_kernel_env("MVAR_EW_KERNEL", value, || {
                    g.throughput(Throughput::Bytes(bytes(
                        2 * branch.elem_count(),
                        DType::BF16,
                    )));
                    bench(
                        &mut g,
                        &d,
                        format!("{t}/drop_path{variant} [32,255,1024] bf16"),
                        || {
                            ops::drop_path(&branch, 0.1, &mut mvar::engine::Generator::new(1))
                                .unwrap();
                        },
                    );
                });
            }
        }
        let logits = randn(&[2 * 680, 4096], DType::F32, &d, 2);
        let targets = Tensor::from_vec(
            (0..2 * 680)
                .map(|i| (i * 31 % 4096) as i64)
                .collect::<Vec<_>>(),
            [2 * 680],
            &d,
        )
        .expect("targets");
        g.throughput(Throughput::Bytes(bytes(logits.elem_count(), DType::F32)));
        bench(
            &mut g,
            &d,
            format!("{t}/cross_entropy [1360,4096] f32"),
            || {
                ops::cross_entropy(&logits, &targets, None, 0.0).unwrap();
            },
        );
        // VQVAE GroupNorm: 32 groups over [4, 128, 64, 64].
        let img = randn(&[4, 128, 64, 64], DType::F32, &d, 3);
        let (w, bias) = (
            randn(&[128], DType::F32, &d, 4),
            randn(&[128], DType::F32, &d, 5),
        );
        g.throughput(Throughput::Bytes(bytes(2 * img.elem_count(), DType::F32)));
        bench(
            &mut g,
            &d,
            format!("{t}/group_norm 32 groups [4,128,64,64] f32"),
            || {
                ops::group_norm(&img, 32, &w, &bias, 1e-6).unwrap();
            },
        );
    }
    // The cases below record the tape for their backward.
    drop(ng);
    // Softmax and cross-entropy on the GPU: the tuned kernels (a warp per row held in registers;
    // one pass with online sums, 16 bytes a thread) and the general ones they replaced where
    // they apply (MVAR_SOFTMAX_KERNEL=block), forward (block only: the tuned forward is the case
    // above) and forward + backward. Cross-entropy at VAR-d16's logits for batch 8 (5440 tokens,
    // 4096 codes).
    for d in devices().into_iter().filter(|d| d.is_cuda()) {
        let t = tag(&d);
        let x = randn(&[8 * 680, 1024], DType::F32, &d, 1);
        let x_leaf = x.with_grad().unwrap();
        let dy = randn(&[8 * 680, 1024], DType::F32, &d, 11);
        let logits = randn(&[2 * 680, 4096], DType::F32, &d, 2);
        let targets_of = |rows: usize| {
            Tensor::from_vec(
                (0..rows)
                    .map(|i| (i * 31 % 4096) as i64)
                    .collect::<Vec<_>>(),
                [rows],
                &d,
            )
            .expect("targets")
        };
        let targets = targets_of(2 * 680);
        let big = randn(&[8 * 680, 4096], DType::F32, &d, 12);
        let big_leaf = big.with_grad().unwrap();
        let big_targets = targets_of(8 * 680);
        let dloss = randn(&[8 * 680], DType::F32, &d, 13);
        for (variant, value) in [("", "auto"), (" block-per-row", "block")] {
            with_kernel_env("MVAR_SOFTMAX_KERNEL", value, || {
                if !variant.is_empty() {
                    g.throughput(Throughput::Bytes(bytes(2 * x.elem_count(), DType::F32)));
                    bench(
                        &mut g,
                        &d,
                        format!("{t}/softmax{variant} [5440,1024] f32"),
                        || {
                            mvar::engine::with_no_grad(|| ops::softmax(&x, -1).unwrap());
                        },
                    );
                    g.throughput(Throughput::Bytes(bytes(logits.elem_count(), DType::F32)));
                    bench(
                        &mut g,
                        &d,
                        format!("{t}/cross_entropy{variant} [1360,4096] f32"),
                        || {
                            mvar::engine::with_no_grad(|| {
                                ops::cross_entropy(&logits, &targets, None, 0.0).unwrap()
                            });
                        },
                    );
                }
                // Forward (read, write); backward (read y and dy, write dx).
                g.throughput(Throughput::Bytes(bytes(5 * x.elem_count(), DType::F32)));
                bench(
                    &mut g,
                    &d,
                    format!("{t}/softmax{variant} fwd+bwd [5440,1024] f32"),
                    || {
                        x_leaf.zero_grad();
                        ops::softmax(&x_leaf, -1)
                            .unwrap()
                            .backward_with(dy.clone())
                            .unwrap();
                    },
                );
                // Forward (read the logits); backward (read them, write their gradient).
                g.throughput(Throughput::Bytes(bytes(3 * big.elem_count(), DType::F32)));
                bench(
                    &mut g,
                    &d,
                    format!("{t}/cross_entropy{variant} fwd+bwd [5440,4096] f32"),
                    || {
                        big_leaf.zero_grad();
                        ops::cross_entropy(&big_leaf, &big_targets, None, 0.0)
                            .unwrap()
                            .backward_with(dloss.clone())
                            .unwrap();
                    },
                );
            });
        }
    }
    g.finish();
}

/// Forward and backward of attention: the fused CUDA kernels at VAR-d16's size, the CPU
/// references at a smaller one.
fn attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    // VAR's query/key normalisation at MVAR-d16's segment of scales 0..8, batch 32 (rows of one
    // 64-element head, bf16), forward and forward + backward, and beside them the block-per-row
    // kernel they ran in before 2026-12-04 (MVAR_LN_KERNEL=block).
    for d in devices().into_iter().filter(|d| d.is_cuda()) {
        let t = tag(&d);
        let heads = randn(&[32, 16, 255, 64], DType::BF16, &d, 7);
        let leaf = heads.with_grad().unwrap();
        let dy = randn(&[32, 16, 255, 64], DType::BF16, &d, 8);
        for (variant, value) in [("", "auto"), (" block-per-row", "block")] {
            with_kernel_env("MVAR_LN_KERNEL", value, || {
                g.throughput(Throughput::Bytes(bytes(
                    2 * heads.elem_count(),
                    DType::BF16,
                )));
                bench(
                    &mut g,
                    &d,
                    format!("{t}/l2_normalize heads{variant} fwd [32,16,255,64] bf16"),
                    || {
                        mvar::engine::with_no_grad(|| ops::l2_normalize(&heads, 1e-12).unwrap());
                    },
                );
                // Forward (read, write), backward (read x and dy, write dx).
                g.throughput(Throughput::Bytes(bytes(
                    5 * heads.elem_count(),
                    DType::BF16,
                )));
                bench(
                    &mut g,
                    &d,
                    format!("{t}/l2_normalize heads{variant} fwd+bwd [32,16,255,64] bf16"),
                    || {
                        leaf.zero_grad();
                        ops::l2_normalize(&leaf, 1e-12)
                            .unwrap()
                            .backward_with(dy.clone())
                            .unwrap();
                    },
                );
            });
        }
    }
    // The fused neighbourhood attention on the GPU at MVAR's shapes: [B, 16, X, X, 64] bf16,
    // k = 7. Bytes: q, k, v and out once for the forward; for forward + backward also dO, dq, dk
    // and dv once and q, k, v and out again (12 tensors), so GB/s against the HBM peak is the
    // share of the roofline. The kernel family comes from MVAR_NA_KERNEL (printed once).
    // The tokenizer's attention (one head over all 640 channels of its 16x16 map, batch 32,
    // f32): a head the fused kernels do not take, so matmul, softmax, matmul; beside it the
    // naive fused kernel that ran before (2026-12-04). FLOPs of the two products.
    for d in devices().into_iter().filter(|d| d.is_cuda()) {
        let _ng = no_grad();
        let qkv: Vec<Tensor> = (0..3)
            .map(|s| randn(&[32, 1, 256, 640], DType::F32, &d, 20 + s))
            .collect();
        g.throughput(Throughput::Elements(4 * 32 * 256 * 256 * 640));
        let run = || {
            ops::attention(
                &qkv[0],
                &qkv[1],
                &qkv[2],
                1.0 / 640f64.sqrt(),
                &ops::AttnMask::None,
            )
            .unwrap();
        };
        bench(
            &mut g,
            &d,
            "cuda/tokenizer attention [32,1,256,640] f32".into(),
            run,
        );
        with_kernel_env("MVAR_ATTN_KERNEL", "naive", || {
            bench(
                &mut g,
                &d,
                "cuda/naive tokenizer attention [32,1,256,640] f32".into(),
                run,
            );
        });
    }
    for d in devices().into_iter().filter(|d| d.is_cuda()) {
        for (b, side) in [(32, 13), (32, 16), (64, 13), (64, 16)] {
            let shape = [b, 16, side, side, 64];
            let na = |s| randn(&shape, DType::BF16, &d, s);
            let (q, k, v, dout) = (na(7), na(8), na(9), na(10));
            let id = |pass: &str| format!("cuda/na2d k7 {pass} [{b},16,{side},{side},64] bf16");
            if let Device::Cuda(dev) = &d {
                let s = mvar::cuda::ops::na2d::Na2dShape {
                    maps: b * 16,
                    x: side,
                    y: side,
                    d: 64,
                    kernel_size: 7,
                };
                let which = ops::NaKernel::from_env();
                let fam = |bwd| {
                    mvar::cuda::ops::na2d::na2d_family(
                        dev,
                        mvar::cuda::BufferKind::BF16,
                        &s,
                        which,
                        bwd,
                    )
                    .map(|f| f.name())
                    .unwrap_or("?")
                };
                eprintln!(
                    "{}: forward runs {}, backward {}",
                    id("*"),
                    fam(false),
                    fam(true)
                );
            }
            g.throughput(Throughput::Bytes(bytes(4 * q.elem_count(), DType::BF16)));
            bench(&mut g, &d, id("fwd"), || {
                mvar::engine::with_no_grad(|| ops::na2d(&q, &k, &v, 7, 0.125).unwrap());
            });
            let leaves = [&q, &k, &v].map(|t| t.with_grad().unwrap());
            let fwd_bwd = || {
                leaves.iter().for_each(|l| l.zero_grad());
                let [q, k, v] = &leaves;
                ops::na2d(q, k, v, 7, 0.125)
                    .unwrap()
                    .backward_with(dout.clone())
                    .unwrap();
            };
            let fwd_bwd_bytes = Throughput::Bytes(bytes(12 * q.elem_count(), DType::BF16));
            let time_fwd_bwd = |g: &mut BenchmarkGroup<'_, WallTime>, variant: &str| {
                g.throughput(fwd_bwd_bytes.clone());
                bench(g, &d, format!("{}{variant}", id("fwd+bwd")), fwd_bwd);
            };
            time_fwd_bwd(&mut g, "");
            // The tensor-core kernels compiled with their portable bf16 packing and 2^x instead
            // of cvt.rn.bf16x2 and ex2.approx (mma.cuh; 2026-12-05), at batch 64.
            if b == 64 {
                with_kernel_env("MVAR_MMA_PORTABLE", "1", || {
                    time_fwd_bwd(&mut g, " portable pack and exp2")
                });
                // Timing diagnostics (MVAR_NA_DIAG, wrong results by design): the mma kernels
                // without their chunk loops, and without their staging. Against the full
                // kernels they say what the loads and the arithmetic each add and how much
                // they overlap, where no profiler reads the counters.
                for diag in ["loads-only", "no-loads"] {
                    with_kernel_env("MVAR_NA_DIAG", diag, || {
                        g.throughput(Throughput::Bytes(bytes(4 * q.elem_count(), DType::BF16)));
                        bench(&mut g, &d, format!("{} diag {diag}", id("fwd")), || {
                            mvar::engine::with_no_grad(|| ops::na2d(&q, &k, &v, 7, 0.125).unwrap());
                        });
                        time_fwd_bwd(&mut g, &format!(" diag {diag}"));
                    });
                }
            }
            // The mma kernels staging through registers, as before cp.async (2026-12-04).
            with_kernel_env("MVAR_NA_STAGING", "registers", || {
                g.throughput(Throughput::Bytes(bytes(4 * q.elem_count(), DType::BF16)));
                bench(
                    &mut g,
                    &d,
                    format!("{} staged in registers", id("fwd")),
                    || {
                        mvar::engine::with_no_grad(|| ops::na2d(&q, &k, &v, 7, 0.125).unwrap());
                    },
                );
                time_fwd_bwd(&mut g, " staged in registers");
            });
            // The forward and dq walking each 16-column strip with a ring of rows, each row
            // staged once per work item and the next row group's rows prefetched (2026-12-05 (5);
            // dk/dv as above).
            with_kernel_env("MVAR_NA_STAGING", "ring", || {
                g.throughput(Throughput::Bytes(bytes(4 * q.elem_count(), DType::BF16)));
                bench(
                    &mut g,
                    &d,
                    format!("{} staged in a ring", id("fwd")),
                    || {
                        mvar::engine::with_no_grad(|| ops::na2d(&q, &k, &v, 7, 0.125).unwrap());
                    },
                );
                time_fwd_bwd(&mut g, " staged in a ring");
            });
        }
    }
    // CUDA: block-causal attention of VAR-d16 at batch 8 (16 heads over the 10-scale 256-px
    // pyramid, L = 680), forward (the kernels Auto picks: mma on sm_80+; also the f32 tiled and
    // the naive ones) and forward + backward (Auto and tiled), and one
    // KV-cache decode step (2 x 32 samples: 256 new tokens against 680 cached ones, no mask).
    // Throughput in useful FLOPs (criterion's elem/s): 4 * D per visible (query, key) pair
    // forward, 3.5 times that forward + backward, as `benches/torch_reference.py` counts them.
    for d in devices().into_iter().filter(|d| d.is_cuda()) {
        let lens: Vec<usize> = [1usize, 2, 3, 4, 5, 6, 8, 10, 13, 16]
            .iter()
            .map(|p| p * p)
            .collect();
        let l: usize = lens.iter().sum();
        // Query i of scale s sees the keys up to the end of s.
        let pairs: usize = lens
            .iter()
            .scan(0, |end, &n| {
                *end += n;
                Some(n * *end)
            })
            .sum();
        let (q, k, v) = (
            randn(&[8, 16, l, 64], DType::BF16, &d, 11),
            randn(&[8, 16, l, 64], DType::BF16, &d, 12),
            randn(&[8, 16, l, 64], DType::BF16, &d, 13),
        );
        let mask = ops::AttnMask::BlockCausal(lens.clone());
        let fwd_flops = (4 * 8 * 16 * 64 * pairs) as u64;
        g.throughput(Throughput::Elements(fwd_flops));
        let fwd = || {
            mvar::engine::with_no_grad(|| ops::attention(&q, &k, &v, 0.125, &mask).unwrap());
        };
        bench(
            &mut g,
            &d,
            format!("cuda/block-causal fwd [8,16,{l},64] bf16"),
            fwd,
        );
        // The f32 CUDA-core tiled kernels and the naive reference kernels on the same case
        // (selected by MVAR_ATTN_KERNEL; the unnamed case runs what Auto picks, printed here).
        if let Device::Cuda(dev) = &d {
            let shape = mvar::cuda::ops::attention::AttnShape {
                batch: 8,
                heads: 16,
                lq: l,
                lk: l,
                d: 64,
                dv: 64,
            };
            let fam = mvar::cuda::ops::attention::family(
                dev,
                mvar::cuda::BufferKind::BF16,
                &shape,
                &mvar::cuda::ops::attention::AttnMask::BlockCausal(&lens),
                mvar::cuda::ops::attention::AttnKernel::from_env(),
            );
            eprintln!("attention: bf16 [8,16,{l},64] block-causal runs {fam:?}");
        }
        with_kernel_env("MVAR_MMA_PORTABLE", "1", || {
            bench(
                &mut g,
                &d,
                format!("cuda/block-causal fwd [8,16,{l},64] bf16 portable pack and exp2"),
                fwd,
            );
        });
        for family in ["tiled", "naive"] {
            with_kernel_env("MVAR_ATTN_KERNEL", family, || {
                bench(
                    &mut g,
                    &d,
                    format!("cuda/{family} block-causal fwd [8,16,{l},64] bf16"),
                    fwd,
                );
            });
        }
        let (qg, kg, vg) = (
            q.with_grad().unwrap(),
            k.with_grad().unwrap(),
            v.with_grad().unwrap(),
        );
        // The output gradient is given (backward_with), not made by a sum: until 2026-12-04 a
        // sum_all in the timed region took most of this case's time on the GPU.
        let dout = randn(&[8, 16, l, 64], DType::BF16, &d, 13);
        let fwd_bwd = || {
            [&qg, &kg, &vg].iter().for_each(|t| t.zero_grad());
            ops::attention(&qg, &kg, &vg, 0.125, &mask)
                .unwrap()
                .backward_with(dout.clone())
                .unwrap();
        };
        g.throughput(Throughput::Elements(fwd_flops * 7 / 2));
        bench(
            &mut g,
            &d,
            format!("cuda/block-causal fwd+bwd [8,16,{l},64] bf16"),
            fwd_bwd,
        );
        with_kernel_env("MVAR_ATTN_KERNEL", "tiled", || {
            bench(
                &mut g,
                &d,
                format!("cuda/tiled block-causal fwd+bwd [8,16,{l},64] bf16"),
                fwd_bwd,
            );
        });
        let (dq, dk, dv) = (
            randn(&[64, 16, 256, 64], DType::BF16, &d, 14),
            randn(&[64, 16, l, 64], DType::BF16, &d, 15),
            randn(&[64, 16, l, 64], DType::BF16, &d, 16),
        );
        g.throughput(Throughput::Elements((4 * 64 * 16 * 64 * 256 * l) as u64));
        bench(
            &mut g,
            &d,
            format!("cuda/decode fwd q [64,16,256,64] kv {l} bf16"),
            || {
                mvar::engine::with_no_grad(|| {
                    ops::attention(&dq, &dk, &dv, 0.125, &ops::AttnMask::None).unwrap()
                });
            },
        );
    }
    let d = Device::Cpu;
    if !devices().contains(&d) {
        return;
    }
    // Block-causal (VAR) and block-diagonal (MVAR's scale-Markov) attention over the first 8
    // scales of the 256-px pyramid (L = 255), batch 2 x 16 heads; 7x7 neighbourhood attention
    // on MVAR's 16x16 and 13x13 maps. The CPU kernels compute only each scale's visible keys
    // (2026-12-06 (6)).
    let scales: Vec<usize> = [1usize, 2, 3, 4, 5, 6, 8, 10]
        .iter()
        .map(|p| p * p)
        .collect();
    let l: usize = scales.iter().sum();
    let (q, k, v) = (
        randn(&[2, 16, l, 64], DType::F32, &d, 1),
        randn(&[2, 16, l, 64], DType::F32, &d, 2),
        randn(&[2, 16, l, 64], DType::F32, &d, 3),
    );
    let (qg, kg, vg) = (
        q.with_grad().unwrap(),
        k.with_grad().unwrap(),
        v.with_grad().unwrap(),
    );
    for (name, mask) in [
        ("block-causal", ops::AttnMask::BlockCausal(scales.clone())),
        (
            "block-diagonal",
            ops::AttnMask::BlockDiagonal(scales.clone()),
        ),
    ] {
        g.throughput(Throughput::Bytes(bytes(4 * q.elem_count(), DType::F32)));
        bench(
            &mut g,
            &d,
            format!("cpu/{name} fwd [2,16,{l},64] f32"),
            || {
                mvar::engine::with_no_grad(|| ops::attention(&q, &k, &v, 1.0, &mask).unwrap());
            },
        );
        bench(
            &mut g,
            &d,
            format!("cpu/{name} fwd+bwd [2,16,{l},64] f32"),
            || {
                ops::sum_all(&ops::attention(&qg, &kg, &vg, 1.0, &mask).unwrap())
                    .unwrap()
                    .backward()
                    .unwrap();
            },
        );
    }
    // The tiled CPU variant (the default) and the naive one it is tested against, on MVAR's
    // 16x16 scale; 13x13 is MVAR's other neighbourhood scale.
    for side in [16, 13] {
        let na = |s| randn(&[2, 16, side, side, 64], DType::F32, &d, s);
        let (nq, nk, nv) = (na(4), na(5), na(6));
        g.throughput(Throughput::Bytes(bytes(4 * nq.elem_count(), DType::F32)));
        for (family, tag) in [(ops::NaKernel::Auto, ""), (ops::NaKernel::Naive, " naive")] {
            if side != 16 && matches!(family, ops::NaKernel::Naive) {
                continue;
            }
            bench(
                &mut g,
                &d,
                format!("cpu/na2d k7 fwd [2,16,{side},{side},64] f32{tag}"),
                || {
                    mvar::engine::with_no_grad(|| {
                        ops::na2d_with_kernel(&nq, &nk, &nv, 7, 1.0, family).unwrap()
                    });
                },
            );
            let (nqg, nkg, nvg) = (
                nq.with_grad().unwrap(),
                nk.with_grad().unwrap(),
                nv.with_grad().unwrap(),
            );
            bench(
                &mut g,
                &d,
                format!("cpu/na2d k7 fwd+bwd [2,16,{side},{side},64] f32{tag}"),
                || {
                    ops::sum_all(&ops::na2d_with_kernel(&nqg, &nkg, &nvg, 7, 1.0, family).unwrap())
                        .unwrap()
                        .backward()
                        .unwrap();
                },
            );
        }
    }
    g.finish();
}

fn spatial(c: &mut Criterion) {
    let ng = no_grad();
    let mut g = c.benchmark_group("spatial");
    // The tokenizer decoder's commonest convolution at full resolution (160 -> 160 channels, 3x3,
    // 256x256, bf16 as sampling runs it under autocast), batch 8, and its last one (160 -> 3,
    // "to rgb"), whose GEMM is thin enough that building the columns dominates; then forward +
    // backward at 64x64 (the gradient tiles and col2im). Each beside the per-element column
    // kernels (MVAR_EW_KERNEL=scalar), the reference variant of the vector ones (2026-12-05).
    // The input is filled on the device (168 MB).
    for d in devices().into_iter().filter(|d| d.is_cuda()) {
        let _ng = no_grad();
        let x = filled(&[8, 160, 256, 256], DType::BF16, &d, 0.5);
        let w = randn(&[160, 160, 3, 3], DType::BF16, &d, 5);
        let b = randn(&[160], DType::BF16, &d, 6);
        let w_rgb = randn(&[3, 160, 3, 3], DType::BF16, &d, 7);
        let b_rgb = randn(&[3], DType::BF16, &d, 8);
        for (variant, env) in [("", "vector"), (" per-element", "scalar")] {
            with_kernel_env("MVAR_EW_KERNEL", env, || {
                g.throughput(Throughput::Elements(2 * 8 * 160 * 160 * 9 * 256 * 256));
                bench(
                    &mut g,
                    &d,
                    format!("cuda/conv2d 3x3 [8,160,256,256] bf16 fwd{variant} (FLOPs)"),
                    || {
                        ops::conv2d(&x, &w, Some(&b), (1, 1), ops::Padding::same(1)).unwrap();
                    },
                );
                g.throughput(Throughput::Elements(2 * 8 * 3 * 160 * 9 * 256 * 256));
                bench(
                    &mut g,
                    &d,
                    format!(
                        "cuda/conv2d 3x3 to rgb [8,160,256,256] -> 3 bf16 fwd{variant} (FLOPs)"
                    ),
                    || {
                        ops::conv2d(&x, &w_rgb, Some(&b_rgb), (1, 1), ops::Padding::same(1))
                            .unwrap();
                    },
                );
            });
        }
    }
    for d in devices() {
        let t = tag(&d);
        // VQVAE-like convolutions: 3x3 same conv at 64 channels on 64x64, and the stride-2
        // downsampler with its right/bottom pad.
        let x = randn(&[2, 64, 64, 64], DType::F32, &d, 1);
        let w = randn(&[64, 64, 3, 3], DType::F32, &d, 2);
        let b = randn(&[64], DType::F32, &d, 3);
        g.throughput(Throughput::Elements(2 * 2 * 64 * 64 * 64 * 64 * 9));
        bench(
            &mut g,
            &d,
            format!("{t}/conv2d 3x3 [2,64,64,64] f32 (FLOPs)"),
            || {
                ops::conv2d(&x, &w, Some(&b), (1, 1), ops::Padding::same(1)).unwrap();
            },
        );
        let pad = ops::Padding {
            top: 0,
            bottom: 1,
            left: 0,
            right: 1,
        };
        g.throughput(Throughput::Elements(2 * 2 * 64 * 32 * 32 * 64 * 9));
        bench(
            &mut g,
            &d,
            format!("{t}/conv2d 3x3 stride 2 downsampler [2,64,64,64] f32 (FLOPs)"),
            || {
                ops::conv2d(&x, &w, Some(&b), (2, 2), pad).unwrap();
            },
        );
        // The quantizer's interpolations: batch 32 of 32-channel 16x16 latents <-> a 5x5 scale.
        let latents = randn(&[32, 32, 16, 16], DType::F32, &d, 4);
        let small = randn(&[32, 32, 5, 5], DType::F32, &d, 5);
        g.throughput(Throughput::Bytes(bytes(
            latents.elem_count() + small.elem_count(),
            DType::F32,
        )));
        bench(
            &mut g,
            &d,
            format!("{t}/area_downsample 16->5 [32,32] f32"),
            || {
                ops::area_downsample(&latents, 5, 5).unwrap();
            },
        );
        bench(
            &mut g,
            &d,
            format!("{t}/bicubic_upsample 5->16 [32,32] f32"),
            || {
                ops::bicubic_upsample(&small, 16, 16).unwrap();
            },
        );
        g.throughput(Throughput::Bytes(bytes(5 * x.elem_count(), DType::F32)));
        bench(
            &mut g,
            &d,
            format!("{t}/upsample_nearest x2 [2,64,64,64] f32"),
            || {
                ops::upsample_nearest(&x, 2).unwrap();
            },
        );
        if d.is_cuda() {
            with_kernel_env("MVAR_EW_KERNEL", "scalar", || {
                bench(
                    &mut g,
                    &d,
                    format!("{t}/upsample_nearest x2 per-element [2,64,64,64] f32"),
                    || {
                        ops::upsample_nearest(&x, 2).unwrap();
                    },
                );
            });
        }
    }
    drop(ng);
    for d in devices().into_iter().filter(|d| d.is_cuda()) {
        let x = randn(&[8, 160, 64, 64], DType::BF16, &d, 9)
            .with_grad()
            .unwrap();
        let w = randn(&[160, 160, 3, 3], DType::BF16, &d, 5)
            .with_grad()
            .unwrap();
        let b = randn(&[160], DType::BF16, &d, 6).with_grad().unwrap();
        for (variant, env) in [("", "vector"), (" per-element", "scalar")] {
            with_kernel_env("MVAR_EW_KERNEL", env, || {
                g.throughput(Throughput::Elements(3 * 2 * 8 * 160 * 160 * 9 * 64 * 64));
                bench(
                    &mut g,
                    &d,
                    format!("cuda/conv2d 3x3 [8,160,64,64] bf16 fwd+bwd{variant} (FLOPs)"),
                    || {
                        [&x, &w, &b].iter().for_each(|l| l.zero_grad());
                        ops::sum_all(
                            &ops::conv2d(&x, &w, Some(&b), (1, 1), ops::Padding::same(1)).unwrap(),
                        )
                        .unwrap()
                        .backward()
                        .unwrap();
                    },
                );
            });
        }
        // The decoder's nearest upsampling (160 channels, 128 -> 256, batch 8, bf16), forward and
        // forward + backward (the backward sums each 2 x 2 block), with the per-element kernels
        // beside (MVAR_EW_KERNEL=scalar). Bytes: read x, write 4x; backward read 4x, write x.
        let low = randn(&[8, 160, 128, 128], DType::BF16, &d, 10)
            .with_grad()
            .unwrap();
        let dup = randn(&[8, 160, 256, 256], DType::BF16, &d, 11);
        for (variant, env) in [("", "vector"), (" per-element", "scalar")] {
            with_kernel_env("MVAR_EW_KERNEL", env, || {
                g.throughput(Throughput::Bytes(bytes(5 * low.elem_count(), DType::BF16)));
                bench(
                    &mut g,
                    &d,
                    format!("cuda/upsample_nearest x2{variant} [8,160,128,128] bf16 fwd"),
                    || {
                        mvar::engine::with_no_grad(|| ops::upsample_nearest(&low, 2).unwrap());
                    },
                );
                g.throughput(Throughput::Bytes(bytes(10 * low.elem_count(), DType::BF16)));
                bench(
                    &mut g,
                    &d,
                    format!("cuda/upsample_nearest x2{variant} [8,160,128,128] bf16 fwd+bwd"),
                    || {
                        low.zero_grad();
                        ops::upsample_nearest(&low, 2)
                            .unwrap()
                            .backward_with(dup.clone())
                            .unwrap();
                    },
                );
            });
        }
    }
    // The demo tokenizer's commonest convolutions (32 channels at 32x32, 64 at 16x16 and 8x8), forward
    // and forward + backward (input, weight and bias gradients: 3x the forward's FLOPs). On the
    // CPU both algorithms: Winograd F(2x2, 3x3) (the default) and the im2col reference.
    for d in devices() {
        let t = tag(&d);
        let variants: &[(&str, bool)] = if d.is_cuda() {
            &[("", true)]
        } else {
            &[("", true), (" im2col", false)]
        };
        for &[n, c, s] in &[[32usize, 32, 32], [16, 64, 16], [16, 64, 8]] {
            let x = randn(&[n, c, s, s], DType::F32, &d, 6).with_grad().unwrap();
            let w = randn(&[c, c, 3, 3], DType::F32, &d, 7).with_grad().unwrap();
            let b = randn(&[c], DType::F32, &d, 8).with_grad().unwrap();
            let flops = (2 * n * c * c * s * s * 9) as u64;
            let shape = format!("[{n},{c},{s},{s}]");
            for &(variant, winograd) in variants {
                ops::set_cpu_winograd(winograd);
                g.throughput(Throughput::Elements(flops));
                bench(
                    &mut g,
                    &d,
                    format!("{t}/conv2d 3x3 {shape} f32 fwd{variant} (FLOPs)"),
                    || {
                        mvar::engine::with_no_grad(|| {
                            ops::conv2d(&x, &w, Some(&b), (1, 1), ops::Padding::same(1)).unwrap()
                        });
                    },
                );
                g.throughput(Throughput::Elements(3 * flops));
                bench(
                    &mut g,
                    &d,
                    format!("{t}/conv2d 3x3 {shape} f32 fwd+bwd{variant} (FLOPs)"),
                    || {
                        [&x, &w, &b].iter().for_each(|l| l.zero_grad());
                        ops::sum_all(
                            &ops::conv2d(&x, &w, Some(&b), (1, 1), ops::Padding::same(1)).unwrap(),
                        )
                        .unwrap()
                        .backward()
                        .unwrap();
                    },
                );
            }
            ops::set_cpu_winograd(true);
        }
        let y = randn(&[32, 32, 32, 32], DType::F32, &d, 9)
            .with_grad()
            .unwrap();
        g.throughput(Throughput::Bytes(bytes(2 * y.elem_count(), DType::F32)));
        bench(
            &mut g,
            &d,
            format!("{t}/silu [32,32,32,32] f32 fwd"),
            || {
                mvar::engine::with_no_grad(|| ops::silu(&y).unwrap());
            },
        );
        g.throughput(Throughput::Bytes(bytes(5 * y.elem_count(), DType::F32)));
        bench(
            &mut g,
            &d,
            format!("{t}/silu [32,32,32,32] f32 fwd+bwd"),
            || {
                y.zero_grad();
                ops::sum_all(&ops::silu(&y).unwrap())
                    .unwrap()
                    .backward()
                    .unwrap();
            },
        );
    }
    g.finish();
}

/// The nearest-code search of the VQVAE quantizer: a batch of 32 latents of 16x16 positions
/// (8192 rows of 32 channels), and the rows of the whole 10-scale pyramid (1..16, 680 positions
/// an image, 21760 rows), against 4096 codes. Throughput in FLOPs of the cross term
/// (2 * N * V * C).
fn quant(c: &mut Criterion) {
    let _ng = no_grad();
    let mut g = c.benchmark_group("quant");
    let (v, ch) = (4096usize, 32usize);
    for d in devices() {
        let t = tag(&d);
        for dt in float_dtypes(&d) {
            let codebook = randn(&[v, ch], dt, &d, 1);
            for (n, what) in [
                (32 * 16 * 16, "16x16 latents"),
                (32 * 680, "10-scale pyramid"),
            ] {
                let z = randn(&[n, ch], dt, &d, 2);
                g.throughput(Throughput::Elements((2 * n * v * ch) as u64));
                bench(
                    &mut g,
                    &d,
                    format!("{t}/nearest_code {what} [{n},{ch}] x [{v},{ch}] {dt}"),
                    || {
                        ops::nearest_code(&z, &codebook).unwrap();
                    },
                );
                // The reference variant: the whole codebook in one range, one block per 64 rows.
                if d.is_cuda() && dt == DType::F32 {
                    with_kernel_env("MVAR_NC_SPLITS", "1", || {
                        bench(
                            &mut g,
                            &d,
                            format!(
                                "{t}/nearest_code single-range {what} [{n},{ch}] x [{v},{ch}] {dt}"
                            ),
                            || {
                                ops::nearest_code(&z, &codebook).unwrap();
                            },
                        );
                    });
                }
            }
        }
        phi_step(&mut g, &d);
        quantizer(&mut g, &d);
    }
    g.finish();
}

/// One scale's f_hat / residual update (ops::phi_accumulate: look up the codes, bicubic-up to
/// 16x16, Phi with its 3x3 convolution, subtract from the residual) at the released shape,
/// batch 32, for a small scale (8x8) and the last one (16x16, no upsampling). On the GPU the
/// fused kernels and, with MVAR_FUSED_QUANT=0, the unfused ops they replace ("[unfused]"), in
/// f32; the CPU always runs the unfused ops. Throughput: the convolution's FLOPs.
fn phi_step(g: &mut BenchmarkGroup<'_, WallTime>, d: &Device) {
    let t = tag(d);
    let (b, c, v, full) = (32usize, 32usize, 4096usize, 16usize);
    let acc = randn(&[b, c, full, full], DType::F32, d, 5);
    let table = randn(&[v, c], DType::F32, d, 6);
    let weight = randn(&[c, c, 3, 3], DType::F32, d, 7);
    let bias = randn(&[c], DType::F32, d, 8);
    let phi = ops::Phi {
        weight: &weight,
        bias: Some(&bias),
        ratio: 0.5,
    };
    for pn in [8usize, 16] {
        let ids = Tensor::zeros([b, pn * pn], DType::I64, &Device::Cpu)
            .and_then(|z| z.to_device(d))
            .expect("token map");
        g.throughput(Throughput::Elements(
            (2 * b * c * c * 9 * full * full) as u64,
        ));
        let run = || {
            ops::phi_accumulate(
                &acc,
                &ids,
                (pn, pn),
                &table,
                Some(&phi),
                -1.0,
                ops::IndexOrigin::NearestCode,
            )
            .unwrap();
        };
        let id = format!("{t}/phi step [{b},{c},{full},{full}] scale {pn}x{pn} f32");
        bench(g, d, id.clone(), run);
        if d.is_cuda() {
            with_kernel_env("MVAR_FUSED_QUANT", "0", || {
                bench(g, d, format!("{id} [unfused]"), run)
            });
        }
    }
}

/// The tokenizer's whole multi-scale residual quantization (spec 1.4: for each of the 10 scales
/// area-down the residual, nearest codes, look them up, bicubic-up, Phi, subtract) of a batch of
/// 32 latents [32, 32, 16, 16] against 4096 codes, and the full 10-scale encode of images
/// (encoder, quant_conv, then that) with the released vae_ch160v4096z32 shape: batch 32 at
/// 256 px on the GPU, one image on the CPU (its f32 convolutions at 256 px take seconds per
/// image there). Random weights: the work does not depend on them. Throughput: the cross-term
/// FLOPs of the nearest-code searches (2 * rows * V * C over the pyramid), so that it compares
/// with the nearest_code cases above.
fn quantizer(g: &mut BenchmarkGroup<'_, WallTime>, d: &Device) {
    use mvar::models::{VqVae, VqVaeConfig};
    let t = tag(d);
    let released = VqVaeConfig::default();
    let (v, cz) = (released.vocab_size, released.z_channels);
    let tokens: usize = released.v_patch_nums.iter().map(|p| p * p).sum();
    // The quantizer does not depend on the encoder's width: a narrow one builds faster.
    let narrow = VqVae::new(
        VqVaeConfig {
            ch: 32,
            ..released.clone()
        },
        d,
        1,
    )
    .expect("tokenizer");
    let batch = 32;
    let f = randn(&[batch, cz, 16, 16], DType::F32, d, 3);
    g.throughput(Throughput::Elements((2 * batch * tokens * v * cz) as u64));
    bench(
        g,
        d,
        format!("{t}/residual quantize [{batch},{cz},16,16] x [{v},{cz}] f32"),
        || {
            narrow.f_to_idx(&f).unwrap();
        },
    );
    // The same with each scale's update as the unfused ops (the GPU's reference variant).
    if d.is_cuda() {
        with_kernel_env("MVAR_FUSED_QUANT", "0", || {
            bench(
                g,
                d,
                format!(
                    "{t}/residual quantize [{batch},{cz},16,16] x [{v},{cz}] f32 [unfused steps]"
                ),
                || {
                    narrow.f_to_idx(&f).unwrap();
                },
            )
        });
    }
    drop(narrow);
    let batch = if d.is_cuda() { 32 } else { 1 };
    let vae = VqVae::new(released, d, 2).expect("tokenizer");
    let img = randn(&[batch, 3, 256, 256], DType::F32, d, 4);
    g.throughput(Throughput::Elements((2 * batch * tokens * v * cz) as u64));
    bench(
        g,
        d,
        format!("{t}/10-scale encode [{batch},3,256,256] vae_ch160v4096z32 f32"),
        || {
            vae.img_to_idx(&img).unwrap();
        },
    );
}

/// Drawing tokens from the guided logits of VAR's last scale at batch 32 (32 x 16 x 16 = 8192
/// rows of 4096 codes) with the official evaluation filter (top-k 900, top-p 0.96). On the GPU:
/// the block-per-row kernel (rows read once and held), the same re-reading the row from memory in
/// every pass, the naive one (one thread per row), and what the sampler did
/// before the kernel existed ("via host": copy the logits to the host, run the CPU reference,
/// copy the tokens back). Throughput: the logits' bytes, read once. Also the filter alone
/// (`filter_top_k_top_p`, what more_smooth sampling reads).
fn sample(c: &mut Criterion) {
    let _ng = no_grad();
    let mut g = c.benchmark_group("sample");
    let (rows, v, top_k, top_p) = (32 * 16 * 16, 4096usize, 900usize, 0.96);
    let u = Generator::new(9).uniform(rows, 0.0, 1.0);
    for d in devices() {
        let t = tag(&d);
        for dt in float_dtypes(&d) {
            // Logits of a trained model's spread (std 3), so top-p cuts inside the top-k set.
            let x = ops::mul_scalar(&randn(&[rows, v], DType::F32, &Device::Cpu, 10), 3.0)
                .and_then(|x| x.to_dtype(dt))
                .and_then(|x| x.to_device(&d))
                .expect("logits");
            g.throughput(Throughput::Bytes(bytes(rows * v, dt)));
            let shape = format!("[{rows},{v}] top-k {top_k} top-p {top_p} {dt}");
            bench(&mut g, &d, format!("{t}/sample {shape}"), || {
                ops::sample_top_k_top_p(&x, &u, top_k, top_p).unwrap();
            });
            // The filter more_smooth sampling reads: the same planning, then a row written back.
            bench(&mut g, &d, format!("{t}/filter {shape}"), || {
                ops::filter_top_k_top_p(&x, top_k, top_p).unwrap();
            });
            if d.is_cuda() {
                // The block-per-row kernels re-reading the row in every pass (the variant
                // before rows were held, 2026-12-05).
                let mem = ops::SampleKernel::BlockPerRowFromMemory;
                bench(
                    &mut g,
                    &d,
                    format!("{t}/sample from memory {shape}"),
                    || {
                        ops::sample_top_k_top_p_with(&x, &u, top_k, top_p, mem).unwrap();
                    },
                );
                bench(
                    &mut g,
                    &d,
                    format!("{t}/filter from memory {shape}"),
                    || {
                        ops::filter_top_k_top_p_with(&x, top_k, top_p, mem).unwrap();
                    },
                );
                bench(&mut g, &d, format!("{t}/sample naive {shape}"), || {
                    ops::sample_top_k_top_p_with(&x, &u, top_k, top_p, ops::SampleKernel::Naive)
                        .unwrap();
                });
                bench(&mut g, &d, format!("{t}/sample via host {shape}"), || {
                    let host = x.to_device(&Device::Cpu).unwrap();
                    ops::sample_top_k_top_p(&host, &u, top_k, top_p)
                        .and_then(|tokens| tokens.to_device(&d))
                        .unwrap();
                });
            }
        }
    }
    g.finish();
}

/// The parameters of `blocks` transformer blocks of VAR-d16's width (C = 1024: qkv, proj, the
/// MLP's two layers and AdaLN's linear, weights and biases; 18.9 M per block), filled on the
/// device with gradients set (the update's cost does not depend on the values).
fn transformer_params(blocks: usize, d: &Device) -> mvar::engine::ParamStore {
    let c = 1024;
    let shapes = [
        ("attn.mat_qkv.weight", vec![3 * c, c]),
        ("attn.proj.weight", vec![c, c]),
        ("attn.proj.bias", vec![c]),
        ("ffn.fc1.weight", vec![4 * c, c]),
        ("ffn.fc1.bias", vec![4 * c]),
        ("ffn.fc2.weight", vec![c, 4 * c]),
        ("ffn.fc2.bias", vec![c]),
        ("ada_lin.1.weight", vec![6 * c, c]),
        ("ada_lin.1.bias", vec![6 * c]),
    ];
    let mut store = mvar::engine::ParamStore::new();
    for b in 0..blocks {
        for (name, shape) in &shapes {
            let p = store
                .insert(
                    format!("blocks.{b}.{name}"),
                    &filled(shape, DType::F32, d, 0.02),
                )
                .expect("parameter");
            p.set_grad(Some(filled(shape, DType::F32, d, 1e-3)))
                .expect("gradient");
        }
    }
    store
}

/// AdamW's step (VAR's betas, weight decay on all but the biases) and the global gradient clip
/// of the trainers, over one block of VAR-d16 on the CPU and all 16 on a GPU.
fn optim(c: &mut Criterion) {
    let _ng = no_grad();
    let mut g = c.benchmark_group("optim");
    for d in devices() {
        let t = tag(&d);
        let blocks = if d.is_cuda() { 16 } else { 1 };
        let store = transformer_params(blocks, &d);
        let n: usize = store.iter().map(|(_, p)| p.elem_count()).sum();
        let what = format!(
            "{blocks} block(s) of VAR-d16, {:.1} M parameters, f32",
            n as f64 / 1e6
        );
        let mut opt = ops::AdamW::new(
            &store,
            ops::AdamWConfig {
                lr: 1e-4,
                ..Default::default()
            },
            |name, _| name.ends_with(".bias"),
        )
        .expect("optimizer");
        // Parameter and both moments read and written, the gradient read.
        g.throughput(Throughput::Bytes(bytes(7 * n, DType::F32)));
        bench(&mut g, &d, format!("{t}/adamw step {what}"), || {
            opt.step(&store).unwrap();
        });
        // The norm's read of every gradient; the scaling is a no-op once the norm is under 2.
        g.throughput(Throughput::Bytes(bytes(n, DType::F32)));
        bench(&mut g, &d, format!("{t}/clip_grad_norm {what}"), || {
            ops::clip_grad_norm(&store, 2.0).unwrap();
        });
    }
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
    targets = matmul, elementwise, activations, reduce, layout, nn, attention, spatial, quant, sample, optim
}
criterion_main!(benches);

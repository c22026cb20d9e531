use mvar::engine::{no_grad, DType, Device, ParamStore, Tensor};
use mvar::ops::{self, TensorExt};

use crate::{t, t32};

#[test]
fn backward_fills_leaf_grads_and_accumulates_until_zeroed() {
    let x = t(&[1.0, 2.0, 3.0], &[3]).with_grad().unwrap();
    let loss = ops::sum_all(&ops::square(&x).unwrap()).unwrap();
    loss.backward().unwrap();
    assert_eq!(
        x.grad().unwrap().to_vec::<f64>().unwrap(),
        vec![2.0, 4.0, 6.0]
    );
    // A second forward/backward adds to the same slot.
    ops::sum_all(&ops::square(&x).unwrap())
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(
        x.grad().unwrap().to_vec::<f64>().unwrap(),
        vec![4.0, 8.0, 12.0]
    );
    x.zero_grad();
    assert!(x.grad().is_none());
}

#[test]
fn shared_subexpressions_get_the_sum_of_their_paths() {
    // y = a*b + a  ->  dy/da = b + 1, dy/db = a ; `a` reaches the loss by two paths.
    let a = t(&[3.0], &[1]).with_grad().unwrap();
    let b = t(&[5.0], &[1]).with_grad().unwrap();
    let y = a.mul(&b).unwrap().add(&a).unwrap();
    let y = ops::sum_all(&y).unwrap();
    y.backward().unwrap();
    assert_eq!(a.grad().unwrap().to_vec::<f64>().unwrap(), vec![6.0]);
    assert_eq!(b.grad().unwrap().to_vec::<f64>().unwrap(), vec![3.0]);
}

#[test]
fn a_deep_chain_does_not_overflow_the_stack() {
    let x = t(&[1.0], &[1]).with_grad().unwrap();
    let mut y = x.clone();
    for _ in 0..20_000 {
        y = ops::affine(&y, 1.0, 0.0).unwrap();
    }
    ops::sum_all(&y).unwrap().backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec::<f64>().unwrap(), vec![1.0]);
}

#[test]
fn no_grad_and_detach_stop_recording() {
    let x = t(&[1.0, 2.0], &[2]).with_grad().unwrap();
    {
        let _g = no_grad();
        let y = ops::square(&x).unwrap();
        assert!(!y.requires_grad());
    }
    assert!(ops::square(&x).unwrap().requires_grad());
    let d = x.detach();
    assert!(!d.requires_grad());
    assert!(d.same_storage(&x));
    let err = ops::sum_all(&ops::square(&d).unwrap())
        .unwrap()
        .backward()
        .unwrap_err();
    assert!(err.to_string().contains("does not require grad"), "{err}");
}

#[test]
fn backward_needs_a_scalar_and_a_graph_runs_once() {
    let x = t(&[1.0, 2.0], &[2]).with_grad().unwrap();
    let y = ops::square(&x).unwrap();
    let err = y.backward().unwrap_err().to_string();
    assert!(err.contains("one-element") && err.contains("[2]"), "{err}");
    let loss = ops::sum_all(&y).unwrap();
    loss.backward().unwrap();
    let err = loss.backward().unwrap_err().to_string();
    assert!(
        err.contains("already used") && err.contains("run the forward pass again"),
        "{err}"
    );
}

/// How many handles share `probe`'s storage, the probe's own left out (the tensor it was
/// detached from, and every copy the tape saved).
fn tape_handles(probe: &Tensor) -> usize {
    probe.storage_handle_count() - 1
}

#[test]
fn the_tape_keeps_only_what_each_backward_reads() {
    // Add and sub read no input in their backward; mul reads both. A transformer's bias and
    // residual adds would otherwise hold every matmul output of the forward until backward.
    let a = t(&[1.0, 2.0], &[2]).with_grad().unwrap();
    let b = t(&[3.0, 4.0], &[2]).with_grad().unwrap();
    let (pa, pb) = (a.detach(), b.detach());
    let base = (tape_handles(&pa), tape_handles(&pb));
    let sum = ops::sub(&ops::add(&a, &b).unwrap(), &b).unwrap();
    assert_eq!(
        (tape_handles(&pa), tape_handles(&pb)),
        base,
        "add/sub saved an input"
    );
    let prod = ops::mul(&a, &b).unwrap();
    assert_eq!(
        (tape_handles(&pa), tape_handles(&pb)),
        (base.0 + 1, base.1 + 1)
    );
    drop(prod);
    ops::sum_all(&sum).unwrap().backward().unwrap();
    assert_eq!(a.grad().unwrap().to_vec::<f64>().unwrap(), vec![1.0, 1.0]);
    assert_eq!(b.grad().unwrap().to_vec::<f64>().unwrap(), vec![0.0, 0.0]);

    // A matmul keeps A only for dB and B only for dA: against a frozen weight the activation
    // is not saved, and the weight is, for the activation's gradient.
    let x = t(&[1.0, 2.0, 3.0, 4.0], &[2, 2]).with_grad().unwrap();
    let frozen_w = t(&[1.0, 0.0, 0.0, 1.0], &[2, 2]);
    let (px, pw) = (x.detach(), frozen_w.detach());
    let (bx, bw) = (tape_handles(&px), tape_handles(&pw));
    let y = ops::matmul(&x, &frozen_w).unwrap();
    assert_eq!(
        tape_handles(&px),
        bx,
        "the activation was saved against a frozen weight"
    );
    assert_eq!(tape_handles(&pw), bw + 1, "dA needs the weight");
    ops::sum_all(&y).unwrap().backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec::<f64>().unwrap(), vec![1.0; 4]);
    assert_eq!(tape_handles(&pw), bw, "backward released the weight");

    // Layer norm and l2_normalize read their output in the backward, not their input: AdaLN's
    // scale multiply and the query's scale multiply keep that output anyway, so the input (the
    // residual stream, the raw query) is freed after the forward.
    for op in ["layer_norm", "l2_normalize"] {
        let x = t(&[1.0, -2.0, 0.5, 3.0, 0.0, -1.0], &[2, 3])
            .with_grad()
            .unwrap();
        let px = x.detach();
        let bx = tape_handles(&px);
        let y = match op {
            "layer_norm" => ops::layer_norm(&x, 1e-5),
            _ => ops::l2_normalize(&x, 1e-12),
        }
        .unwrap();
        let py = y.detach();
        assert_eq!(tape_handles(&px), bx, "{op} saved its input");
        assert_eq!(tape_handles(&py), 2, "{op}: y and the copy its node saved");
        let w = t(&[1.0, 2.0, 3.0, -1.0, 0.5, 2.0], &[2, 3]);
        ops::sum_all(&ops::mul(&y, &w).unwrap())
            .unwrap()
            .backward()
            .unwrap();
        drop(y);
        assert_eq!(tape_handles(&py), 0, "{op}: backward released its output");
    }
}

#[test]
fn activations_under_bf16_autocast_keep_their_input_in_bf16() {
    // VAR's FFN hidden layer: under autocast GELU keeps a bf16 copy of its f32 input (half the
    // bytes), not the input; its output is the f32 one, its gradient the f32 gradient at the
    // bf16-rounded input. Outside autocast, or for an op that is not an activation, nothing
    // changes.
    use mvar::engine::{autocast, Generator};
    use mvar::ops::UnaryOp;
    let x32 = Tensor::randn(
        [4, 24],
        0.0,
        2.0,
        DType::F32,
        &Device::Cpu,
        &mut Generator::new(7),
    )
    .unwrap();
    let w = Tensor::randn(
        [4, 24],
        0.0,
        1.0,
        DType::F32,
        &Device::Cpu,
        &mut Generator::new(8),
    )
    .unwrap();
    let rounded = x32
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert_ne!(
        rounded.to_vec::<f32>().unwrap(),
        x32.to_vec::<f32>().unwrap()
    );
    let grad_of = |x: &Tensor, op: UnaryOp, cast: bool| -> (Vec<f32>, Vec<f32>, usize) {
        let x = x.detach().with_grad().unwrap();
        let probe = x.detach();
        let before = tape_handles(&probe);
        let _scope = autocast(cast.then_some(DType::BF16)).unwrap();
        let y = ops::unary(&x, op).unwrap();
        let kept = tape_handles(&probe) - before;
        ops::sum_all(&ops::mul(&y, &w).unwrap())
            .unwrap()
            .backward()
            .unwrap();
        let g = x.grad().unwrap().to_vec::<f32>().unwrap();
        (y.to_vec::<f32>().unwrap(), g, kept)
    };
    for op in [UnaryOp::GeluTanh, UnaryOp::Silu, UnaryOp::Relu] {
        let (y, g, kept) = grad_of(&x32, op, true);
        assert_eq!(kept, 0, "{op:?} kept its f32 input under autocast");
        let (plain_y, plain_g, plain_kept) = grad_of(&x32, op, false);
        assert_eq!(plain_kept, 1, "{op:?} keeps its input outside autocast");
        assert_eq!(y, plain_y, "{op:?}: the output is the f32 one");
        let (_, at_rounded, _) = grad_of(&rounded, op, false);
        assert_eq!(
            g, at_rounded,
            "{op:?}: the gradient at the bf16-rounded input"
        );
        if op == UnaryOp::GeluTanh {
            assert_ne!(g, plain_g, "the test cannot tell the two gradients apart");
        }
    }
    // Not an activation: square keeps its f32 input even under autocast.
    let (_, _, kept) = grad_of(&x32, UnaryOp::Square, true);
    assert_eq!(kept, 1);
}

#[test]
fn saved_buffers_are_released_by_backward() {
    // exp saves its output for the backward. Hold a detached probe on that output's storage and
    // watch the number of handles: the node's saved copy must go away during backward.
    let x = t(&[0.5, -1.0], &[2]).with_grad().unwrap();
    let h = ops::exp(&x).unwrap();
    let probe = h.detach();
    let loss = ops::sum_all(&h).unwrap();
    drop(h);
    assert_eq!(
        probe.storage_handle_count(),
        2,
        "probe + the copy saved by exp's node"
    );
    loss.backward().unwrap();
    assert_eq!(
        probe.storage_handle_count(),
        1,
        "backward must drop what it saved"
    );
    let want: Vec<f64> = [0.5f64, -1.0].iter().map(|v| v.exp()).collect();
    assert_eq!(x.grad().unwrap().to_vec::<f64>().unwrap(), want);
}

#[test]
fn reshape_is_free_and_differentiable() {
    let x = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])
        .with_grad()
        .unwrap();
    let r = x.reshape([3, usize::MAX]).unwrap();
    assert_eq!(r.dims(), &[3, 2]);
    assert!(r.same_storage(&x));
    let w = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2]);
    ops::sum_all(&r.mul(&w).unwrap())
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(
        x.grad().unwrap().to_vec::<f64>().unwrap(),
        vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    );
    assert!(x.reshape([4, 2]).is_err());
}

#[test]
fn dtype_casts_are_differentiable() {
    let x = t(&[1.5, -2.0], &[2]).with_grad().unwrap();
    let y = x.to_dtype(DType::F32).unwrap();
    ops::sum_all(&ops::square(&y).unwrap())
        .unwrap()
        .backward()
        .unwrap();
    let g = x.grad().unwrap();
    assert_eq!(g.dtype(), DType::F64);
    assert_eq!(g.to_vec::<f64>().unwrap(), vec![3.0, -4.0]);
}

#[test]
fn named_parameters_keep_order_and_names() {
    let mut ps = ParamStore::new();
    let w = ps
        .insert(
            "blocks.0.attn.proj.weight",
            &Tensor::zeros([2, 2], DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
    ps.insert(
        "head.bias",
        &Tensor::zeros([2], DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    assert_eq!(w.name().as_deref(), Some("blocks.0.attn.proj.weight"));
    assert!(w.is_leaf());
    let names: Vec<&str> = ps.iter().map(|(n, _)| n).collect();
    assert_eq!(names, vec!["blocks.0.attn.proj.weight", "head.bias"]);
    assert_eq!(ps.num_elements(), 6);
    let err = ps
        .insert(
            "head.bias",
            &Tensor::zeros([2], DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("already registered"), "{err}");
}

#[test]
fn creation_functions() {
    let d = Device::Cpu;
    assert_eq!(
        Tensor::arange(0.0, 5.0, 2.0, DType::I64, &d)
            .unwrap()
            .to_vec::<i64>()
            .unwrap(),
        vec![0, 2, 4]
    );
    assert_eq!(
        Tensor::full(2.5, [2], DType::F32, &d)
            .unwrap()
            .to_vec::<f32>()
            .unwrap(),
        vec![2.5, 2.5]
    );
    assert!(Tensor::arange(0.0, 5.0, -1.0, DType::F32, &d).is_err());
    assert_eq!(
        Tensor::scalar(3.0, DType::F64, &d)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        3.0
    );
    let mut g1 = mvar::engine::Generator::new(5);
    let mut g2 = mvar::engine::Generator::new(5);
    let a = Tensor::randn([4, 4], 0.0, 1.0, DType::F32, &d, &mut g1).unwrap();
    let b = Tensor::randn([4, 4], 0.0, 1.0, DType::F32, &d, &mut g2).unwrap();
    assert_eq!(a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
    let u = Tensor::rand_uniform([100], 2.0, 3.0, DType::F64, &d, &mut g1)
        .unwrap()
        .to_vec::<f64>()
        .unwrap();
    assert!(u.iter().all(|&v| v > 2.0 && v < 3.0));
    assert!(Tensor::from_vec(vec![1.0f32; 5], [2, 3], &d).is_err());
    assert!(
        a.to_vec::<f64>().is_err(),
        "reading f32 as f64 must be a dtype error"
    );
}

/// y = sum(exp(x * w) * x): an input, a captured parameter, an intermediate that exp saves.
fn recompute_case(x: &Tensor, w: &Tensor) -> mvar::engine::Result<Tensor> {
    ops::mul(&ops::exp(&ops::mul(x, w)?)?, x)
}

#[test]
fn recomputed_gives_the_gradients_of_the_plain_graph_and_saves_only_its_inputs() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let xs = [0.5, -1.0, 2.0];
    let ws = [1.5, 0.25, -0.5];
    // The plain graph.
    let x = t(&xs, &[3]).with_grad().unwrap();
    let w = t(&ws, &[3]).with_grad().unwrap();
    let plain = ops::sum_all(&recompute_case(&x, &w).unwrap()).unwrap();
    plain.backward().unwrap();

    // The same through recomputed, with w captured rather than passed.
    let xr = t(&xs, &[3]).with_grad().unwrap();
    let wr = t(&ws, &[3]).with_grad().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (w_in, counter) = (wr.clone(), runs.clone());
    let probe = xr.detach();
    let before = tape_handles(&probe);
    let y = mvar::engine::recomputed(&[&xr], move |i| {
        counter.fetch_add(1, Ordering::SeqCst);
        recompute_case(&i[0], &w_in)
    })
    .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(y.requires_grad());
    assert_eq!(
        tape_handles(&probe),
        before + 1,
        "the node keeps its input, once (the inner mul and exp saved nothing)"
    );
    let loss = ops::sum_all(&y).unwrap();
    assert_eq!(
        loss.to_vec::<f64>().unwrap(),
        plain.to_vec::<f64>().unwrap()
    );
    loss.backward().unwrap();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "one recomputation in backward"
    );
    assert_eq!(
        tape_handles(&probe),
        before,
        "backward released the saved input"
    );
    for (got, want) in [(&xr, &x), (&wr, &w)] {
        assert_eq!(
            got.grad().unwrap().to_vec::<f64>().unwrap(),
            want.grad().unwrap().to_vec::<f64>().unwrap()
        );
    }

    // Without grad mode it is a plain call: no node, one run.
    let _ng = no_grad();
    let z = mvar::engine::recomputed(&[&xr], move |i| ops::exp(&i[0])).unwrap();
    assert!(!z.requires_grad());
}

#[test]
fn recomputed_only_captured_parameters_get_gradients_and_changes_between_runs_are_errors() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    // No input requires grad; the captured parameter still gets its gradient.
    let x = t(&[1.0, 2.0], &[2]);
    let w = t(&[3.0, 4.0], &[2]).with_grad().unwrap();
    let w_in = w.clone();
    let y = mvar::engine::recomputed(&[&x], move |i| ops::mul(&i[0], &w_in)).unwrap();
    ops::sum_all(&y).unwrap().backward().unwrap();
    assert_eq!(w.grad().unwrap().to_vec::<f64>().unwrap(), vec![1.0, 2.0]);

    // A function that gives another shape on its second run is named as the fault.
    let x = t(&[1.0, 2.0], &[2]).with_grad().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let y = mvar::engine::recomputed(&[&x], move |i| {
        if runs.fetch_add(1, Ordering::SeqCst) == 0 {
            ops::square(&i[0])
        } else {
            ops::sum_all(&i[0])
        }
    })
    .unwrap();
    let err = ops::sum_all(&y)
        .unwrap()
        .backward()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("second run") && err.contains("same thing"),
        "{err}"
    );
}

#[test]
fn recomputed_runs_again_under_the_autocast_state_of_its_forward() {
    use std::sync::{Arc, Mutex};

    let seen = Arc::new(Mutex::new(Vec::new()));
    let x = t32(&[1.0, 2.0], &[2]).with_grad().unwrap();
    let log = seen.clone();
    let y = {
        let _bf16 = mvar::engine::autocast(Some(DType::BF16)).unwrap();
        mvar::engine::recomputed(&[&x], move |i| {
            log.lock().unwrap().push(mvar::engine::autocast_dtype());
            ops::square(&i[0])
        })
        .unwrap()
    };
    // The backward runs outside the scope; the recomputation must not.
    ops::sum_all(&y).unwrap().backward().unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![Some(DType::BF16); 2]);
    assert_eq!(
        mvar::engine::autocast_dtype(),
        None,
        "the scope ended with backward"
    );
    assert_eq!(x.grad().unwrap().to_vec::<f32>().unwrap(), vec![2.0, 4.0]);
}

/// `x[.., start..start + len, ..]` along `axis` through index_select, whose backward (a
/// scatter-add into zeros) is not the tape's band path: the oracle for the narrows below.
fn band_by_index(x: &Tensor, axis: usize, start: usize, len: usize) -> Tensor {
    let idx: Vec<i64> = (start as i64..(start + len) as i64).collect();
    let idx = Tensor::from_vec(idx, len, &Device::Cpu).unwrap();
    ops::index_select(x, axis as isize, &idx).unwrap()
}

/// Gradients through narrows and splits of a computed tensor (so that the tape holds their
/// gradients back as bands of its node's): bands that tile it (concatenated), with a full-size
/// path beside them, with a gap (a part the loss does not use), overlapping, on two axes, a
/// narrow of a narrow, and the attention's qkv split after a permute; in f64 and bf16. Each
/// against the same graph with the bands taken by index_select.
#[test]
fn band_gradients_equal_the_padded_sum_however_the_bands_fall() {
    type Bands = &'static [(usize, usize, usize)];
    // (axis, start, len) of each band of y = 2 x, x of shape [4, 6, 3].
    let cases: [(&str, Bands, bool); 7] = [
        ("tiling", &[(1, 0, 2), (1, 2, 3), (1, 5, 1)], false),
        ("tiling beside a full path", &[(1, 2, 4), (1, 0, 2)], true),
        ("a gap", &[(1, 0, 2), (1, 5, 1)], false),
        ("overlapping", &[(1, 0, 4), (1, 2, 4)], true),
        ("two axes", &[(0, 0, 2), (1, 3, 3), (0, 2, 2)], false),
        ("one band of all", &[(2, 0, 3)], false),
        (
            "repeated band",
            &[(0, 1, 2), (0, 1, 2), (0, 0, 1), (0, 3, 1)],
            false,
        ),
    ];
    for dtype in [DType::F64, DType::BF16] {
        for (what, bands, full_path) in cases {
            let run = |by_index: bool| -> Vec<f64> {
                let vals: Vec<f64> = (0..72).map(|i| ((i * 7) % 11) as f64 - 5.0).collect();
                let x = t(&vals, &[4, 6, 3])
                    .to_dtype(dtype)
                    .unwrap()
                    .with_grad()
                    .unwrap();
                let y = ops::mul_scalar(&x, 2.0).unwrap();
                let mut loss = if full_path {
                    ops::sum_all(&ops::square(&y).unwrap()).unwrap()
                } else {
                    ops::sum_all(&ops::mul_scalar(&y, 0.0).unwrap()).unwrap()
                };
                for (i, &(axis, start, len)) in bands.iter().enumerate() {
                    let part = if by_index {
                        band_by_index(&y, axis, start, len)
                    } else {
                        ops::narrow(&y, axis as isize, start, len).unwrap()
                    };
                    let weights: Vec<f64> = (0..part.elem_count())
                        .map(|k| ((k + i) % 5) as f64 - 2.0)
                        .collect();
                    let w = t(&weights, part.dims()).to_dtype(dtype).unwrap();
                    let term = ops::sum_all(&part.mul(&w).unwrap()).unwrap();
                    loss = loss.add(&term).unwrap();
                }
                loss.backward().unwrap();
                let g = x.grad().unwrap();
                assert_eq!(g.dtype(), dtype, "{what}");
                g.to_vec_f64().unwrap()
            };
            assert_eq!(run(false), run(true), "{what} ({dtype:?})");
        }
    }

    // A narrow of a narrow, and q, k, v split from one tensor after a permute, as attention
    // does: [B, T, 3, H, D] -> [3, B, H, T, D] -> three [1, B, H, T, D].
    let vals: Vec<f64> = (0..2 * 5 * 3 * 2 * 4)
        .map(|i| ((i * 5) % 13) as f64 / 4.0 - 1.5)
        .collect();
    let run = |by_index: bool| -> Vec<f64> {
        let x = t(&vals, &[2, 5, 3, 2, 4]).with_grad().unwrap();
        let qkv = ops::permute(&ops::mul_scalar(&x, 3.0).unwrap(), &[2, 0, 3, 1, 4]).unwrap();
        let parts: Vec<Tensor> = if by_index {
            (0..3).map(|i| band_by_index(&qkv, 0, i, 1)).collect()
        } else {
            ops::split(&qkv, &[1, 1, 1], 0).unwrap()
        };
        let (q, k, v) = (&parts[0], &parts[1], &parts[2]);
        let inner = if by_index {
            band_by_index(&band_by_index(v, 4, 1, 3), 4, 1, 1)
        } else {
            ops::narrow(&ops::narrow(v, 4, 1, 3).unwrap(), 4, 1, 1).unwrap()
        };
        let loss = ops::sum_all(&q.mul(k).unwrap().add(&ops::square(v).unwrap()).unwrap())
            .unwrap()
            .add(&ops::sum_all(&ops::mul_scalar(&inner, 7.0).unwrap()).unwrap())
            .unwrap();
        loss.backward().unwrap();
        x.grad().unwrap().to_vec_f64().unwrap()
    };
    assert_eq!(run(false), run(true), "qkv split");
}

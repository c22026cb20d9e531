//! Bad input through the public API returns an error that names the op, the shapes and what was
//! expected.

use mvar::engine::{DType, Device, Tensor};
use mvar::ops;

use crate::{t, t32};

fn msg<T: std::fmt::Debug>(r: mvar::engine::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

fn assert_mentions(m: &str, parts: &[&str]) {
    for p in parts {
        assert!(m.contains(p), "error message {m:?} does not mention {p:?}");
    }
}

#[test]
fn shape_errors_name_op_shapes_and_expectation() {
    let a = t(&[0.0; 6], &[2, 3]);
    let b = t(&[0.0; 4], &[4]);
    assert_mentions(
        &msg(ops::add(&a, &b)),
        &["add", "[2, 3]", "[4]", "broadcast"],
    );
    assert_mentions(
        &msg(ops::matmul(&a, &a)),
        &["matmul", "[2, 3]", "inner dimensions", "3 vs 2"],
    );
    assert_mentions(&msg(ops::matmul(&b, &a)), &["matmul", "rank >= 2"]);
    assert_mentions(
        &msg(ops::linear(&a, &t(&[0.0; 8], &[2, 4]), None)),
        &["linear", "[2, 3]", "[2, 4]"],
    );
    assert_mentions(&msg(ops::concat(&[&a, &b], 0)), &["concat", "[2, 3], [4]"]);
    assert_mentions(
        &msg(ops::narrow(&a, 1, 2, 2)),
        &["narrow", "[2, 3]", "end <= 3"],
    );
    assert_mentions(&msg(ops::split(&a, &[1, 1], 1)), &["split", "add up to 3"]);
    assert_mentions(
        &msg(ops::permute(&a, &[0, 0])),
        &["permute", "[0, 0]", "exactly once"],
    );
    assert_mentions(&msg(ops::sum(&a, 2, false)), &["sum", "axis 2", "< 2"]);
    assert_mentions(
        &msg(ops::broadcast_to(&a, [3, 3])),
        &["broadcast_to", "[2, 3]", "[3, 3]"],
    );
    assert_mentions(
        &msg(a.reshape([4, 2])),
        &["reshape", "[2, 3]", "6 elements"],
    );
}

#[test]
fn dtype_errors() {
    let a = t(&[0.0; 2], &[2]);
    let b = t32(&[0.0; 2], &[2]);
    assert_mentions(&msg(ops::add(&a, &b)), &["add", "f64 and f32"]);
    let idx = Tensor::from_vec(vec![0i64, 1], [2], &Device::Cpu).unwrap();
    assert_mentions(&msg(ops::exp(&idx)), &["exp", "i64", "float"]);
    assert_mentions(
        &msg(ops::index_select(&a, 0, &b)),
        &["index_select", "f32", "i64"],
    );
    let mask = t(&[1.0, 0.0], &[2]);
    assert_mentions(
        &msg(ops::where_cond(&mask, &a, &a)),
        &["where_cond", "f64", "u8"],
    );
    assert_mentions(&msg(idx.with_grad()), &["with_grad", "i64", "float"]);
}

/// The quantizer's scale step and the search on maps name what is wrong with their inputs.
#[test]
fn quantizer_step_errors() {
    let acc = t32(&[0.0; 2 * 3 * 4 * 4], &[2, 3, 4, 4]);
    let table = t32(&[0.0; 5 * 3], &[5, 3]);
    let weight = t32(&[0.0; 3 * 3 * 9], &[3, 3, 3, 3]);
    let ids =
        |v: Vec<i64>, shape: &[usize]| Tensor::from_vec(v, shape.to_vec(), &Device::Cpu).unwrap();
    let phi = ops::Phi {
        weight: &weight,
        bias: None,
        ratio: 0.5,
    };
    let step = |acc: &Tensor, idx: &Tensor, scale, table: &Tensor, phi: Option<&ops::Phi>, sign| {
        ops::phi_accumulate(acc, idx, scale, table, phi, sign, ops::IndexOrigin::Caller)
    };
    let good = ids(vec![0; 8], &[2, 4]);
    assert!(step(&acc, &good, (2, 2), &table, Some(&phi), -1.0).is_ok());
    assert_mentions(
        &msg(step(
            &acc,
            &ids(vec![0; 6], &[2, 3]),
            (2, 2),
            &table,
            Some(&phi),
            1.0,
        )),
        &["phi_accumulate", "token map [2, 3]", "[2, 4]"],
    );
    assert_mentions(
        &msg(step(
            &acc,
            &ids(vec![0; 50], &[2, 25]),
            (5, 5),
            &table,
            None,
            1.0,
        )),
        &["phi_accumulate", "at most 4x4"],
    );
    assert_mentions(
        &msg(step(
            &acc,
            &good,
            (2, 2),
            &t32(&[0.0; 10], &[5, 2]),
            None,
            1.0,
        )),
        &["phi_accumulate", "[5, 2]", "[V, 3]"],
    );
    let bad_w = t32(&[0.0; 27], &[3, 1, 3, 3]);
    let bad_phi = ops::Phi {
        weight: &bad_w,
        bias: None,
        ratio: 0.5,
    };
    assert_mentions(
        &msg(step(&acc, &good, (2, 2), &table, Some(&bad_phi), 1.0)),
        &["phi_accumulate", "[3, 1, 3, 3]", "[3, 3, 3, 3]"],
    );
    assert_mentions(
        &msg(step(&acc, &good, (2, 2), &table, None, 2.0)),
        &["phi_accumulate", "sign 2", "1 or -1"],
    );
    let mut out_of_range = vec![0; 8];
    out_of_range[5] = 5;
    assert_mentions(
        &msg(step(
            &acc,
            &ids(out_of_range, &[2, 4]),
            (2, 2),
            &table,
            None,
            1.0,
        )),
        &["token id 5", "< 5"],
    );
    assert_mentions(
        &msg(step(
            &acc,
            &t32(&[0.0; 8], &[2, 4]),
            (2, 2),
            &table,
            None,
            1.0,
        )),
        &["phi_accumulate", "i64"],
    );
    let book = ops::Codebook::new(&table).unwrap();
    assert_mentions(
        &msg(ops::nearest_code_maps(&t32(&[0.0; 8], &[2, 4]), &book)),
        &["nearest_code", "[B, C, H, W]"],
    );
    assert_mentions(
        &msg(ops::Codebook::new(&t32(&[], &[0, 3]))),
        &["codebook", "non-empty"],
    );
}

#[test]
fn index_errors() {
    let table = t(&[0.0; 6], &[3, 2]);
    let ids = Tensor::from_vec(vec![0i64, 3], [2], &Device::Cpu).unwrap();
    assert_mentions(
        &msg(ops::embedding(&ids, &table)),
        &["embedding", "token id 3", "< 3"],
    );
    let neg = Tensor::from_vec(vec![-1i64], [1], &Device::Cpu).unwrap();
    assert_mentions(
        &msg(ops::index_select(&table, 0, &neg)),
        &["index_select", "-1", "< 3"],
    );
    let gidx = Tensor::from_vec(vec![0i64, 2, 1], [3, 1], &Device::Cpu).unwrap();
    assert_mentions(
        &msg(ops::gather(&table, 1, &gidx)),
        &["gather", "index 2", "< 2"],
    );
}

#[test]
fn device_mismatch_and_missing_gpu_are_errors() {
    // Without a GPU, asking for one is an error, never a panic.
    if !mvar::cuda::cuda_available() {
        assert!(Device::cuda(0).is_err());
        assert!(Tensor::zeros([2], DType::F32, &Device::Cpu).is_ok());
    }
    let e = Tensor::zeros([2], DType::F64, &Device::Cpu).unwrap();
    if let Ok(gpu) = Device::cuda(0) {
        assert_mentions(&msg(e.to_device(&gpu)), &["f64", "CPU only"]);
    }
}

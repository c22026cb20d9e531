use mvar::ops;
use proptest::prelude::*;

use crate::{config, parity, randn};

proptest! {
    #![proptest_config(config())]

    #[test]
    fn matmul_batched_transposed_and_broadcast(
        m in 1usize..9, k in 1usize..9, n in 1usize..9, batch in 1usize..4,
        ta in any::<bool>(), tb in any::<bool>(), b2d in any::<bool>(), seed in any::<u64>()
    ) {
        let a_shape = if ta { vec![batch, k, m] } else { vec![batch, m, k] };
        let b_core = if tb { vec![n, k] } else { vec![k, n] };
        let b_shape = if b2d { b_core } else { [vec![batch], b_core].concat() };
        parity("matmul", |_, x| ops::matmul_t(&x[0], &x[1], ta, tb), &[randn(&a_shape, seed), randn(&b_shape, seed ^ 1)])?;
    }

    #[test]
    fn linear(rows in 1usize..20, din in 1usize..40, dout in 1usize..40, seed in any::<u64>()) {
        let inputs = [randn(&[2, rows, din], seed), randn(&[dout, din], seed ^ 1), randn(&[dout], seed ^ 2)];
        parity("linear", |_, x| ops::linear(&x[0], &x[1], Some(&x[2])), &inputs)?;
    }

    #[test]
    fn matmul_partially_broadcast_batch(m in 1usize..5, k in 1usize..5, n in 1usize..5, seed in any::<u64>()) {
        parity("matmul", |_, x| ops::matmul(&x[0], &x[1]), &[randn(&[2, 1, m, k], seed), randn(&[1, 3, k, n], seed ^ 1)])?;
    }
}

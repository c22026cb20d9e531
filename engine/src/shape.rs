//! Shapes. Every tensor is dense and row-major (the last axis varies fastest), so a shape is all
//! the layout there is: the strides follow from it.

use std::fmt;

use crate::{Error, Result};

#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    pub fn new(dims: impl Into<Vec<usize>>) -> Self {
        Shape(dims.into())
    }

    pub fn scalar() -> Self {
        Shape(vec![])
    }

    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    pub fn elem_count(&self) -> usize {
        self.0.iter().product()
    }

    /// Row-major strides in elements.
    pub fn strides(&self) -> Vec<usize> {
        let mut strides = vec![1; self.0.len()];
        for i in (0..self.0.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * self.0[i + 1];
        }
        strides
    }

    /// Resolves a possibly negative axis (-1 = last) against this shape's rank.
    pub fn axis(&self, op: &'static str, axis: isize) -> Result<usize> {
        let rank = self.rank() as isize;
        let a = if axis < 0 { axis + rank } else { axis };
        if a < 0 || a >= rank {
            return Err(Error::IndexOutOfRange {
                op,
                what: "axis",
                index: axis as i64,
                size: self.rank(),
            });
        }
        Ok(a as usize)
    }

    /// (outer, size, inner) element counts around `axis`: the shape seen as
    /// [outer, size, inner], which is how every per-axis kernel walks its input.
    pub fn split_at_axis(&self, axis: usize) -> (usize, usize, usize) {
        let outer = self.0[..axis].iter().product();
        let inner = self.0[axis + 1..].iter().product();
        (outer, self.0[axis], inner)
    }

    /// NumPy broadcasting of two shapes.
    pub fn broadcast(op: &'static str, a: &Shape, b: &Shape) -> Result<Shape> {
        let rank = a.rank().max(b.rank());
        let mut out = vec![0; rank];
        for (i, slot) in out.iter_mut().enumerate() {
            let da = if i + a.rank() >= rank {
                a.0[i + a.rank() - rank]
            } else {
                1
            };
            let db = if i + b.rank() >= rank {
                b.0[i + b.rank() - rank]
            } else {
                1
            };
            *slot = if da == db || db == 1 {
                da
            } else if da == 1 {
                db
            } else {
                return Err(Error::shape(
                    op,
                    Error::shapes(&[a, b]),
                    format!("shapes that broadcast (axis {i} from the left of the broadcast shape: {da} vs {db})"),
                ));
            };
        }
        Ok(Shape(out))
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<Vec<usize>> for Shape {
    fn from(v: Vec<usize>) -> Self {
        Shape(v)
    }
}

impl From<&[usize]> for Shape {
    fn from(v: &[usize]) -> Self {
        Shape(v.to_vec())
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(v: [usize; N]) -> Self {
        Shape(v.to_vec())
    }
}

impl From<&Shape> for Shape {
    fn from(v: &Shape) -> Self {
        v.clone()
    }
}

impl From<()> for Shape {
    fn from(_: ()) -> Self {
        Shape(vec![])
    }
}

impl From<usize> for Shape {
    fn from(v: usize) -> Self {
        Shape(vec![v])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_are_row_major() {
        assert_eq!(Shape::new([2, 3, 4]).strides(), vec![12, 4, 1]);
        assert_eq!(Shape::scalar().strides(), Vec::<usize>::new());
    }

    #[test]
    fn broadcasting_follows_numpy() {
        let s = Shape::broadcast("t", &Shape::new([4, 1, 3]), &Shape::new([5, 1])).unwrap();
        assert_eq!(s.dims(), &[4, 5, 3]);
        let e = Shape::broadcast("add", &Shape::new([2, 3]), &Shape::new([4])).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("add") && m.contains("[2, 3]") && m.contains("[4]"),
            "{m}"
        );
    }

    #[test]
    fn negative_axes_resolve_from_the_end() {
        let s = Shape::new([2, 3, 4]);
        assert_eq!(s.axis("t", -1).unwrap(), 2);
        assert!(s.axis("t", 3).is_err());
        assert!(s.axis("t", -4).is_err());
    }
}

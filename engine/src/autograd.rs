//! The autograd tape.
//!
//! An op whose inputs require grad records a `Node` on its output: the op's name, one edge per
//! input (to the input's own node, or to the leaf slot that will receive its gradient), and the
//! op's [`Backward`] object, which holds exactly the buffers the backward needs (not the inputs
//! themselves: a node never keeps an input's storage alive unless its backward asked for it).
//! The nodes reachable from a loss, in reverse topological order, are the tape that
//! [`Tensor::backward`] replays.
//!
//! Rules:
//! - `backward()` needs a one-element tensor; it adds into the `.grad()` of every leaf that
//!   requires grad (accumulating across calls until [`Tensor::zero_grad`]).
//! - Each node's backward object is taken out and dropped as soon as it has run, so saved buffers
//!   are freed during the backward pass, not at its end; running backward twice through one graph
//!   is therefore an error that says so.
//! - Backward rules run in no-grad mode: gradients are not themselves differentiable.
//! - A node recorded with a [`GradBand`] (narrow, and so split) says that its output is a band of
//!   its input along one axis. Its gradient is held back as that band instead of being padded
//!   with zeros to the input's size; when the input's own node is reached, bands that tile the
//!   input exactly (q, k and v split from one qkv tensor) become one concatenation, and any other
//!   bands are padded by their own backward and added as before. The sum is the same either way
//!   (a band's gradient plus zeros elsewhere), without two full-size zero fills and adds per
//!   split.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::{DType, Error, Result, Shape, Tensor};

/// The backward half of an op. `grad` is the gradient of the loss with respect to the op's
/// output; the result holds one entry per input, in the order the op recorded them (`None` for
/// an input that gets no gradient, such as an index tensor).
pub trait Backward: Send + Sync {
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>>;
}

/// A closure is a backward too: handy for ops whose backward is a line of other ops.
impl<F> Backward for F
where
    F: FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync,
{
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        (*self)(grad)
    }
}

static NEXT_NODE_ID: AtomicU64 = AtomicU64::new(1);

/// Where the gradient of a tensor goes: into a leaf's slot or through an op's node.
#[derive(Clone)]
pub(crate) enum GradEdge {
    Leaf(Arc<Leaf>),
    Node(Arc<Node>),
}

pub(crate) struct Leaf {
    pub(crate) name: Mutex<Option<String>>,
    pub(crate) grad: Mutex<Option<Tensor>>,
}

pub(crate) struct Node {
    id: u64,
    op: &'static str,
    inputs: Vec<Option<(GradEdge, Shape, DType)>>,
    backward: Mutex<Option<Box<dyn Backward>>>,
    band: Option<GradBand>,
    /// The shape of the node's output (of the gradient it receives).
    out_shape: Shape,
}

/// A node's output is `input[.., start..start + len, ..]` along `axis` of its one input (see
/// [`Tensor::record_band`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GradBand {
    pub axis: usize,
    pub start: usize,
    pub len: usize,
}

/// The gradient gathered for a node before it runs: a full-size sum and the bands held back.
#[derive(Default)]
struct Pending {
    sum: Option<Tensor>,
    bands: Vec<HeldBand>,
}

/// A band node's gradient, with its backward (the zero padding) in case the bands do not tile.
struct HeldBand {
    band: GradBand,
    grad: Tensor,
    backward: Box<dyn Backward>,
    /// The band node's op and the dtype of its input (which its padded gradient must have).
    op: &'static str,
    dtype: DType,
}

impl Pending {
    fn add(&mut self, g: Tensor) -> Result<()> {
        self.sum = Some(match self.sum.take() {
            Some(old) => old.add_same_shape(&g)?,
            None => g,
        });
        Ok(())
    }

    /// The whole gradient of a tensor of `shape`: the bands, concatenated when they tile it
    /// along one axis (else each padded by its backward), plus the full-size sum.
    fn resolve(mut self, shape: &Shape) -> Result<Option<Tensor>> {
        if self.bands.is_empty() {
            return Ok(self.sum);
        }
        self.bands.sort_by_key(|b| (b.band.axis, b.band.start));
        let axis = self.bands[0].band.axis;
        let mut end = 0;
        let tiles = self.bands.iter().all(|b| {
            let mut part = shape.dims().to_vec();
            let fits = b.band.axis == axis
                && b.grad.dtype() == b.dtype
                && axis < part.len()
                && b.band.start == end
                && b.grad.dims().len() == part.len()
                && {
                    part[axis] = b.band.len;
                    b.grad.dims() == part.as_slice()
                };
            end += b.band.len;
            fits
        }) && shape.dims().get(axis) == Some(&end);
        if tiles {
            let parts: Vec<&Tensor> = self.bands.iter().map(|b| &b.grad).collect();
            let whole = Tensor::concat_for_grad(&parts, axis)?;
            self.add(whole)?;
            return Ok(self.sum);
        }
        for held in std::mem::take(&mut self.bands) {
            let padded = held.backward.backward(&held.grad)?;
            let [g] = <[Option<Tensor>; 1]>::try_from(padded).map_err(|v| {
                Error::Autograd(format!(
                    "`{}` backward returned {} gradients for its one input",
                    held.op,
                    v.len()
                ))
            })?;
            let Some(g) = g else { continue };
            if g.shape() != shape || g.dtype() != held.dtype {
                return Err(Error::Autograd(format!(
                    "`{}` backward gave its input a gradient of shape {} {}; expected {} {}",
                    held.op,
                    g.shape(),
                    g.dtype(),
                    shape,
                    held.dtype
                )));
            }
            self.add(g)?;
        }
        Ok(self.sum)
    }
}

/// Dropping a long chain of nodes recursively would overflow the stack (a transformer's graph is
/// tens of thousands of nodes deep through the residual stream), so a node hands the inputs it
/// owns alone to an explicit stack before it goes.
impl Drop for Node {
    fn drop(&mut self) {
        let mut stack: Vec<Arc<Node>> = take_node_inputs(&mut self.inputs);
        while let Some(node) = stack.pop() {
            if let Ok(mut owned) = Arc::try_unwrap(node) {
                stack.extend(take_node_inputs(&mut owned.inputs));
            }
        }
    }
}

fn take_node_inputs(inputs: &mut Vec<Option<(GradEdge, Shape, DType)>>) -> Vec<Arc<Node>> {
    inputs
        .drain(..)
        .filter_map(|e| match e {
            Some((GradEdge::Node(n), _, _)) => Some(n),
            _ => None,
        })
        .collect()
}

impl Leaf {
    pub(crate) fn new(name: Option<String>) -> Self {
        Leaf {
            name: Mutex::new(name),
            grad: Mutex::new(None),
        }
    }

    fn accumulate(&self, g: Tensor) -> Result<()> {
        let mut slot = self.grad.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some(match slot.take() {
            None => g,
            Some(old) => old.add_same_shape(&g)?,
        });
        Ok(())
    }
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// True unless inside a [`no_grad`] scope on this thread.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Restores the previous grad mode when dropped.
#[must_use = "the no-grad scope ends when this guard is dropped"]
pub struct NoGradGuard {
    previous: bool,
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.previous));
    }
}

/// Turns recording off on this thread until the guard is dropped.
pub fn no_grad() -> NoGradGuard {
    let previous = GRAD_ENABLED.with(|g| g.replace(false));
    NoGradGuard { previous }
}

/// Runs `f` with recording off.
pub fn with_no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _guard = no_grad();
    f()
}

impl Tensor {
    /// Attaches a backward node to `out` when grad mode is on and some input requires grad.
    /// `make_backward` runs only in that case, so an op saves buffers only when they will be
    /// used.
    pub fn record<B: Backward + 'static>(
        out: Tensor,
        op: &'static str,
        inputs: &[&Tensor],
        make_backward: impl FnOnce() -> B,
    ) -> Tensor {
        if !is_grad_enabled() || !inputs.iter().any(|t| t.requires_grad()) {
            return out;
        }
        attach_node(&out, op, inputs, Box::new(make_backward()), None)
    }

    /// [`Tensor::record`] for an op whose output is `band` of its one `input` (narrow): the
    /// tape may hold its gradient back as that band and concatenate it with the input's other
    /// bands instead of running `make_backward`'s (which must pad the band with zeros to the
    /// input's shape, and is run when the bands do not tile the input).
    pub fn record_band<B: Backward + 'static>(
        out: Tensor,
        op: &'static str,
        input: &Tensor,
        band: GradBand,
        make_backward: impl FnOnce() -> B,
    ) -> Tensor {
        if !is_grad_enabled() || !input.requires_grad() {
            return out;
        }
        attach_node(&out, op, &[input], Box::new(make_backward()), Some(band))
    }

    /// Back-propagates from this one-element tensor into every leaf that requires grad.
    pub fn backward(&self) -> Result<()> {
        if self.elem_count() != 1 {
            return Err(Error::Autograd(format!(
                "backward() needs a one-element tensor (a loss); got shape {}",
                self.shape()
            )));
        }
        let seed = Tensor::ones(self.shape().clone(), self.dtype(), self.device())?;
        self.backward_with(seed)
    }

    /// Back-propagates `grad` (same shape as this tensor) as the gradient of this tensor.
    pub fn backward_with(&self, grad: Tensor) -> Result<()> {
        if grad.shape() != self.shape() {
            return Err(Error::Autograd(format!(
                "backward_with: gradient of shape {} for a tensor of shape {}",
                grad.shape(),
                self.shape()
            )));
        }
        let root = match self.grad_edge() {
            None => {
                return Err(Error::Autograd(
                    "backward() on a tensor that does not require grad: no input of the \
                     computation required grad, or it ran in no-grad mode"
                        .into(),
                ))
            }
            Some(GradEdge::Leaf(leaf)) => return leaf.accumulate(grad),
            Some(GradEdge::Node(node)) => node,
        };
        let _guard = no_grad();
        let _phase = crate::profile::backward_phase();
        let _span = crate::profile::span(|| "backward".into());
        let order = topological_order(&root);
        let mut pending: HashMap<u64, Pending> = HashMap::new();
        pending.entry(root.id).or_default().add(grad)?;
        for node in order {
            // A node that no gradient reached (its consumers all returned None) has nothing to do.
            let Some(p) = pending.remove(&node.id) else {
                continue;
            };
            let Some(g) = p.resolve(&node.out_shape)? else {
                continue;
            };
            let backward = node
                .backward
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .ok_or_else(|| {
                    Error::Autograd(format!(
                        "the graph through `{}` was already used by an earlier backward() and its \
                         saved buffers are freed; run the forward pass again",
                        node.op
                    ))
                })?;
            // A band of a node's output: held back for that node (see the module's rules).
            if let (Some(band), [Some((GradEdge::Node(target), _, dtype))]) =
                (node.band, node.inputs.as_slice())
            {
                pending.entry(target.id).or_default().bands.push(HeldBand {
                    band,
                    grad: g,
                    backward,
                    op: node.op,
                    dtype: *dtype,
                });
                continue;
            }
            let grads = backward.backward(&g)?;
            if grads.len() != node.inputs.len() {
                return Err(Error::Autograd(format!(
                    "`{}` backward returned {} gradients for {} inputs",
                    node.op,
                    grads.len(),
                    node.inputs.len()
                )));
            }
            for (i, (edge, g)) in node.inputs.iter().zip(grads).enumerate() {
                let (Some((edge, shape, dtype)), Some(g)) = (edge, g) else {
                    continue;
                };
                if g.shape() != shape || g.dtype() != *dtype {
                    return Err(Error::Autograd(format!(
                        "`{}` backward gave input {i} a gradient of shape {} {}; expected {} {}",
                        node.op,
                        g.shape(),
                        g.dtype(),
                        shape,
                        dtype
                    )));
                }
                match edge {
                    GradEdge::Leaf(leaf) => leaf.accumulate(g)?,
                    GradEdge::Node(n) => pending.entry(n.id).or_default().add(g)?,
                }
            }
        }
        Ok(())
    }
}

/// Turns recording on until dropped (the inverse of [`no_grad`]): a recomputation inside a
/// backward pass, which itself runs in no-grad mode, needs its graph.
struct EnableGradGuard {
    previous: bool,
}

impl Drop for EnableGradGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.previous));
    }
}

fn enable_grad() -> EnableGradGuard {
    EnableGradGuard {
        previous: GRAD_ENABLED.with(|g| g.replace(true)),
    }
}

/// Activation recomputation (PyTorch's `torch.utils.checkpoint`): runs `f` on `inputs` without
/// recording, so that none of its intermediate tensors is kept for the backward, and records one
/// node that, when the backward reaches it, runs `f` again with recording on and
/// back-propagates through that second run. Memory: the inputs and the output, instead of
/// everything `f`'s ops save; time: one more forward of `f` per backward.
///
/// The contract on `f`: it computes the same thing both times. It may use parameters (leaves
/// that require grad) it captured, whose gradients the recomputation's backward adds into their
/// `.grad()` as an unrecomputed graph would, and randomness only from state it captured (a
/// generator snapshot it clones each call); the autocast state of the forward is restored for
/// the second run. The node is recorded whenever grad mode is on, even when no input requires
/// grad, since the captured parameters may.
pub fn recomputed<F>(inputs: &[&Tensor], f: F) -> Result<Tensor>
where
    F: Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
{
    let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    if !is_grad_enabled() {
        return f(&detached);
    }
    let out = {
        let _ng = no_grad();
        f(&detached)?
    };
    let (out_shape, out_dtype) = (out.shape().clone(), out.dtype());
    let wants_grad: Vec<bool> = inputs.iter().map(|t| t.requires_grad()).collect();
    let low = crate::autocast::autocast_dtype();
    let backward = move |g: &Tensor| -> Result<Vec<Option<Tensor>>> {
        let _recording = enable_grad();
        let _autocast = crate::autocast::autocast(low)?;
        let leaves: Vec<Tensor> = detached
            .iter()
            .zip(&wants_grad)
            .map(|(t, &w)| if w { t.with_grad() } else { Ok(t.clone()) })
            .collect::<Result<_>>()?;
        let again = {
            let _span = crate::profile::span(|| "recompute".into());
            f(&leaves)?
        };
        if again.shape() != &out_shape || again.dtype() != out_dtype {
            return Err(Error::Autograd(format!(
                "a recomputed function gave {} {} on its second run and {} {} on its first: \
                 it must compute the same thing both times",
                again.shape(),
                again.dtype(),
                out_shape,
                out_dtype
            )));
        }
        if again.requires_grad() {
            again.backward_with(g.clone())?;
        }
        Ok(leaves
            .iter()
            .zip(&wants_grad)
            .map(|(t, &w)| if w { t.grad() } else { None })
            .collect())
    };
    Ok(attach_node(
        &out,
        "recomputed",
        inputs,
        Box::new(backward),
        None,
    ))
}

/// `out` as the output of a new node `op` over `inputs` (one edge per input) with `backward`.
fn attach_node(
    out: &Tensor,
    op: &'static str,
    inputs: &[&Tensor],
    backward: Box<dyn Backward>,
    band: Option<GradBand>,
) -> Tensor {
    let edges = inputs
        .iter()
        .map(|t| t.grad_edge().map(|e| (e, t.shape().clone(), t.dtype())))
        .collect();
    let node = Node {
        id: NEXT_NODE_ID.fetch_add(1, Ordering::Relaxed),
        op,
        inputs: edges,
        backward: Mutex::new(Some(backward)),
        band,
        out_shape: out.shape().clone(),
    };
    out.with_grad_edge(GradEdge::Node(Arc::new(node)))
}

/// Nodes reachable from `root`, every node before the nodes it feeds on (so a node's gradient is
/// complete when it is reached). Iterative DFS: graphs of deep models would overflow a recursive
/// one.
fn topological_order(root: &Arc<Node>) -> Vec<Arc<Node>> {
    let mut post = Vec::new();
    let mut seen = HashSet::new();
    let mut stack: Vec<(Arc<Node>, usize)> = vec![(root.clone(), 0)];
    seen.insert(root.id);
    while let Some((node, next_input)) = stack.pop() {
        let child = node.inputs[next_input..]
            .iter()
            .enumerate()
            .find_map(|(offset, e)| match e {
                Some((GradEdge::Node(n), _, _)) if !seen.contains(&n.id) => {
                    Some((next_input + offset, n.clone()))
                }
                _ => None,
            });
        match child {
            Some((index, child)) => {
                seen.insert(child.id);
                stack.push((node, index + 1));
                stack.push((child, 0));
            }
            None => post.push(node),
        }
    }
    post.reverse();
    post
}

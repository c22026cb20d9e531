//! Named parameters: the leaves a model trains, in a fixed order, under the names checkpoints
//! use (the official PyTorch state-dict names for VQVAE, VAR and MVAR).

use std::collections::HashMap;

use crate::{Error, Result, Tensor};

#[derive(Default, Clone)]
pub struct ParamStore {
    params: Vec<(String, Tensor)>,
    index: HashMap<String, usize>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `value` as a trainable leaf named `name` and returns the leaf. Names are unique.
    pub fn insert(&mut self, name: impl Into<String>, value: &Tensor) -> Result<Tensor> {
        let name = name.into();
        if self.index.contains_key(&name) {
            return Err(Error::invalid(
                "ParamStore::insert",
                format!("parameter {name:?} is already registered"),
            ));
        }
        let leaf = value.detach().with_grad_named(Some(name.clone()))?;
        self.index.insert(name.clone(), self.params.len());
        self.params.push((name, leaf.clone()));
        Ok(leaf)
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.params[i].1)
    }

    /// The parameter named `name`, or an error that says which names exist.
    pub fn require(&self, name: &str) -> Result<&Tensor> {
        self.get(name).ok_or_else(|| Error::Format {
            what: format!("parameter {name:?}"),
            msg: format!("not registered; {} parameters exist", self.params.len()),
        })
    }

    /// (name, leaf) in registration order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.params.iter().map(|(n, t)| (n.as_str(), t))
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Total number of scalar parameters.
    pub fn num_elements(&self) -> usize {
        self.params.iter().map(|(_, t)| t.elem_count()).sum()
    }

    /// Clears every parameter's gradient.
    pub fn zero_grad(&self) {
        for (_, t) in &self.params {
            t.zero_grad();
        }
    }
}

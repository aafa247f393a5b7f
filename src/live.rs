//! A value that a configuration reload replaces while requests keep reading
//! it: readers take a cheap `Arc` snapshot, so a request in flight finishes
//! with the rules it started with.

use std::sync::{Arc, RwLock};

/// A swappable, shared value.
#[derive(Debug)]
pub struct Live<T>(RwLock<Arc<T>>);

impl<T> Live<T> {
    /// Starts with `value`.
    pub fn new(value: T) -> Live<T> {
        Live(RwLock::new(Arc::new(value)))
    }

    /// The current value.
    pub fn get(&self) -> Arc<T> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the value for every later `get`.
    pub fn set(&self, value: T) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
    }
}

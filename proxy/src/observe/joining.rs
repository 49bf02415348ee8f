//! Whether this node is still joining the cluster, and how far it is: set by the join
//! (`membership::join`), read by `/readyz`, which says "not ready: joining ..." meanwhile, so
//! that nothing routes clients to a node whose data is not all there.

use std::sync::{Arc, Mutex};

/// One per node, cheap to clone; `None` when not joining.
#[derive(Debug, Clone, Default)]
pub struct Joining(Arc<Mutex<Option<String>>>);

impl Joining {
    /// Records what the join is doing, as the readiness answer gives it.
    pub fn set(&self, what: impl Into<String>) {
        *self.0.lock().expect("joining lock") = Some(what.into());
    }

    /// The join is over (or was never needed).
    pub fn clear(&self) {
        *self.0.lock().expect("joining lock") = None;
    }

    pub fn get(&self) -> Option<String> {
        self.0.lock().expect("joining lock").clone()
    }
}

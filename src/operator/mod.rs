//! The Kubernetes controller for `Space`: load -> validate -> render (pure) -> apply -> status.

pub mod placement;
pub mod render;
pub mod sleep;
pub mod status;

//! The Kubernetes controller for `Space`: load -> validate -> render (pure) -> apply -> status.

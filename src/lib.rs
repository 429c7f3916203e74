//! hangar: host ML demo apps ("Spaces") on Kubernetes or on one Docker engine.
#![deny(warnings)]
#![forbid(unsafe_code)]

pub mod cli;
pub mod error;
pub mod space;
pub mod telemetry;

pub use error::{Error, Result};

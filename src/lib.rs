//! hangar: host ML demo apps ("Spaces") on Kubernetes or on one Docker engine.
#![deny(warnings)]
#![forbid(unsafe_code)]

pub mod builder;
pub mod cli;
pub mod error;
pub mod http_server;
pub mod local;
pub mod node_agent;
pub mod operator;
pub mod proxy;
pub mod runtime;
pub mod shutdown;
pub mod space;
pub mod telemetry;
pub mod webhook;

pub use error::{Error, Result};

//! Routes each Space's traffic, counts activity, and holds requests while a Space wakes.
//!
//! - [`route`]: the route table and matching (pure)
//! - [`forward`]: the upstream client, header rewriting, WebSocket splicing
//! - `h1_forward`: the HTTP/1.1 fast path (plain requests to running public Spaces), `rewind`: its hand-off to hyper
//! - [`activity`]: throttled activity records
//! - [`wake`]: one wake per sleeping Space, held requests; [`thaw`]: node agents thaw frozen ones
//! - [`auth`]: private Spaces' bearer tokens
//! - [`metrics`], [`loading`]: `/metrics`, the loading page
//! - [`source`]: the [`RouteSource`] trait and [`MemorySource`]; [`kubernetes`]: [`KubeSource`]
//! - [`server`]: the listener, per-request decisions, graceful shutdown; [`cli`]: `hangar proxy`

pub mod activity;
pub mod auth;
pub mod cli;
pub mod forward;
mod h1_forward;
pub mod kubernetes;
pub mod loading;
pub mod metrics;
mod rewind;
pub mod route;
pub mod server;
pub mod source;
pub mod thaw;
pub mod wake;

pub use cli::{ProxyArgs, run as cli_run};
pub use kubernetes::{KubeSource, KubeSourceConfig};
pub use route::{Access, Disposition, RouteTable, SpaceKey, SpaceRoute};
pub use server::{ProxyConfig, ProxyHandle, run, start};
pub use source::{MemorySource, RouteSource, SourceError, WakeHandler};

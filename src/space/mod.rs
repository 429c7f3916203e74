//! The Space API: the custom resource, the hardware catalog, README front
//! matter and the merge of both into an [`AppConfig`]. Pure: no I/O here.

pub mod access_token;
pub mod app_config;
pub mod custom_headers;
pub mod duration;
pub mod front_matter;
pub mod hardware;
pub mod host_claim;
pub mod naming;
pub mod resource;
pub mod sleep_tier;

pub use app_config::{AppConfig, ConfigError, resolve};
pub use front_matter::{FrontMatter, FrontMatterError};
pub use hardware::Flavor;
pub use resource::{
    BuildStatus, BuiltConfig, BuiltStatus, GitSource, HardwareStatus, ReplicaStatus, Sdk, SecretKeyRef, SleepStatus,
    Space, SpaceSecret, SpaceSpec, SpaceStatus, Stage, Visibility, crd_yaml,
};
pub use sleep_tier::{FreezeAfter, SleepPolicy, SleepTier, SleepTimes};

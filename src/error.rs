//! The crate's one error type.

/// Everything that can go wrong in hangar, by origin.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("YAML: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    FrontMatter(#[from] crate::space::FrontMatterError),
    #[error("invalid configuration: {0}")]
    Config(#[from] crate::space::ConfigError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

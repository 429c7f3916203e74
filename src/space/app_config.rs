//! Merges a Space's spec with its repository's front matter (the spec wins)
//! into the one configuration every component works from.

use std::collections::BTreeMap;
use std::time::Duration;

use super::custom_headers;
use super::duration;
use super::front_matter::FrontMatter;
use super::hardware::{self, Flavor};
use super::resource::{BuiltConfig, Sdk, SpaceSpec};
use super::sleep_tier::FreezeAfter;

pub const DEFAULT_PYTHON_VERSION: &str = "3.10";
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The effective configuration of a Space.
#[derive(Debug, Clone, PartialEq)]
pub struct AppConfig {
    pub sdk: Sdk,
    pub sdk_version: Option<String>,
    pub python_version: String,
    /// Entry file; `None` for docker Spaces (the Dockerfile decides).
    pub app_file: Option<String>,
    pub app_port: u16,
    pub base_path: String,
    pub flavor: &'static Flavor,
    /// `None`: never sleeps.
    pub sleep_after: Option<Duration>,
    /// The spec's `freezeAfter`; [`SleepPolicy::times`](super::SleepPolicy::times) resolves it.
    pub freeze_after: FreezeAfter,
    pub startup_timeout: Duration,
    pub title: Option<String>,
    pub custom_headers: BTreeMap<String, String>,
    pub preload_from_hub: Vec<String>,
}

/// A spec or front matter that cannot run; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// `spec.hardware`, `README.md sdk`, ...
    pub field: String,
    pub message: String,
}

impl ConfigError {
    fn new(field: &str, message: impl ToString) -> Self {
        Self { field: field.to_owned(), message: message.to_string() }
    }
}

/// Default listening port per SDK: what the hub's runtime expects.
pub fn default_port(sdk: Sdk) -> u16 {
    match sdk {
        Sdk::Streamlit => 8501,
        Sdk::Gradio | Sdk::Docker | Sdk::Static => 7860,
    }
}

/// Resolves the effective configuration. `front_matter` is `None` for a
/// Space that runs a prebuilt image (or before its repository is read):
/// then the spec alone decides, and `sdk` defaults to `docker` for images.
pub fn resolve(spec: &SpaceSpec, front_matter: Option<&FrontMatter>) -> Result<AppConfig, ConfigError> {
    let fm = front_matter.cloned().unwrap_or_default();
    let sdk = match (spec.sdk, fm.sdk) {
        (Some(sdk), _) | (None, Some(sdk)) => sdk,
        (None, None) if spec.image.is_some() => Sdk::Docker,
        (None, None) => {
            return Err(ConfigError::new(
                "spec.sdk",
                "not set, and the repository's README.md front matter has no `sdk`",
            ));
        }
    };
    let runtime = runtime_spec(spec)?;
    let app_port = match spec.app_port {
        Some(p) => u16::try_from(p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| ConfigError::new("spec.appPort", format!("{p} is not a port (1-65535)")))?,
        None => fm.app_port.map_or(default_port(sdk), u16::from),
    };
    let startup_timeout = match (runtime.startup_timeout, &fm.startup_duration_timeout) {
        (Some(t), _) => t,
        (None, Some(s)) => duration::parse(s).map_err(|e| ConfigError::new("README.md startup_duration_timeout", e))?,
        (None, None) => DEFAULT_STARTUP_TIMEOUT,
    };
    let base_path = spec.base_path.clone().or(fm.base_path).unwrap_or_else(|| "/".to_owned());
    check_base_path(&base_path).map_err(|e| ConfigError::new("base_path", format!("{base_path:?} {e}")))?;
    let custom_headers =
        custom_headers::validate(&fm.custom_headers).map_err(|e| ConfigError::new("README.md custom_headers", e))?;
    let app_file = spec.app_file.clone().or(fm.app_file).or_else(|| match sdk {
        Sdk::Gradio | Sdk::Streamlit => Some("app.py".to_owned()),
        Sdk::Static => Some("index.html".to_owned()),
        Sdk::Docker => None,
    });
    if let Some(file) = &app_file
        && (file.starts_with('/') || file.split('/').any(|part| part == ".."))
    {
        return Err(ConfigError::new("app_file", format!("{file:?} must be a relative path inside the repository")));
    }
    Ok(AppConfig {
        sdk,
        sdk_version: spec.sdk_version.clone().or(fm.sdk_version),
        python_version: spec
            .python_version
            .clone()
            .or(fm.python_version)
            .unwrap_or_else(|| DEFAULT_PYTHON_VERSION.to_owned()),
        app_file,
        app_port,
        base_path,
        flavor: runtime.flavor,
        sleep_after: runtime.sleep_after,
        freeze_after: runtime.freeze_after,
        startup_timeout,
        title: fm.title,
        custom_headers,
        preload_from_hub: fm.preload_from_hub,
    })
}

/// A base path is where the proxy redirects a Space's root: a path of this
/// site only (`//host` or `/\\host` would send visitors elsewhere).
pub fn check_base_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("must start with '/'");
    }
    if path.starts_with("//") || path.contains('\\') {
        return Err("must be a path on the Space's own site, not start with '//' or contain '\\'");
    }
    if !path.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'?' | b'#' | b'"' | b'<' | b'>' | b'`')) {
        return Err("must be a plain URL path (printable ASCII, no spaces, '?' or '#')");
    }
    Ok(())
}

/// The spec fields that do not change the image: hardware, sleep and startup times.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeSpec {
    pub flavor: &'static Flavor,
    pub sleep_after: Option<Duration>,
    pub freeze_after: FreezeAfter,
    /// `None`: the front matter's (or the default) applies.
    pub startup_timeout: Option<Duration>,
}

/// Validates the spec's runtime fields; needs no repository.
pub fn runtime_spec(spec: &SpaceSpec) -> Result<RuntimeSpec, ConfigError> {
    let flavor = hardware::lookup(&spec.hardware).map_err(|e| ConfigError::new("spec.hardware", e))?;
    let sleep_after = match &spec.sleep_after {
        Some(s) => duration::parse_sleep(s).map_err(|e| ConfigError::new("spec.sleepAfter", e))?,
        None => flavor.default_sleep_after,
    };
    let freeze_after =
        FreezeAfter::parse(spec.freeze_after.as_deref()).map_err(|e| ConfigError::new("spec.freezeAfter", e))?;
    let startup_timeout = match &spec.startup_timeout {
        Some(s) => Some(duration::parse(s).map_err(|e| ConfigError::new("spec.startupTimeout", e))?),
        None => None,
    };
    Ok(RuntimeSpec { flavor, sleep_after, freeze_after, startup_timeout })
}

impl AppConfig {
    /// Re-applies the spec's runtime fields to a configuration resolved at
    /// build time, so changing them needs no rebuild.
    pub fn with_runtime_spec(mut self, spec: &SpaceSpec) -> Result<Self, ConfigError> {
        let runtime = runtime_spec(spec)?;
        self.flavor = runtime.flavor;
        self.sleep_after = runtime.sleep_after;
        self.freeze_after = runtime.freeze_after;
        self.startup_timeout = runtime.startup_timeout.unwrap_or(self.startup_timeout);
        Ok(self)
    }
}

impl AppConfig {
    /// What of this configuration came with the build, for `status.built`.
    pub fn built(&self) -> BuiltConfig {
        BuiltConfig {
            sdk: self.sdk,
            sdk_version: self.sdk_version.clone(),
            python_version: self.python_version.clone(),
            app_file: self.app_file.clone(),
            app_port: self.app_port,
            base_path: self.base_path.clone(),
            startup_timeout_seconds: self.startup_timeout.as_secs(),
            title: self.title.clone(),
            custom_headers: self.custom_headers.clone(),
            preload_from_hub: self.preload_from_hub.clone(),
        }
    }

    /// The configuration of a recorded build, with the spec's runtime fields
    /// applied as [`AppConfig::with_runtime_spec`] does: what the build gave.
    pub fn from_built(built: &BuiltConfig, spec: &SpaceSpec) -> Result<Self, ConfigError> {
        let runtime = runtime_spec(spec)?;
        Ok(AppConfig {
            sdk: built.sdk,
            sdk_version: built.sdk_version.clone(),
            python_version: built.python_version.clone(),
            app_file: built.app_file.clone(),
            app_port: built.app_port,
            base_path: built.base_path.clone(),
            flavor: runtime.flavor,
            sleep_after: runtime.sleep_after,
            freeze_after: runtime.freeze_after,
            startup_timeout: runtime.startup_timeout.unwrap_or(Duration::from_secs(built.startup_timeout_seconds)),
            title: built.title.clone(),
            custom_headers: built.custom_headers.clone(),
            preload_from_hub: built.preload_from_hub.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::resource::GitSource;

    fn git_spec() -> SpaceSpec {
        SpaceSpec {
            source: Some(GitSource { git: "file:///repo".into(), revision: "main".into(), credentials_secret: None }),
            hardware: "cpu-basic".into(),
            ..Default::default()
        }
    }

    #[test]
    fn spec_wins_over_front_matter() {
        let fm = FrontMatter {
            sdk: Some(Sdk::Gradio),
            sdk_version: Some("4.36.1".into()),
            app_file: Some("main.py".into()),
            app_port: std::num::NonZeroU16::new(9000),
            startup_duration_timeout: Some("1h".into()),
            ..Default::default()
        };
        let spec = SpaceSpec {
            sdk_version: Some("5.0.0".into()),
            app_port: Some(7000),
            hardware: "t4-small".into(),
            sleep_after: Some("15m".into()),
            ..git_spec()
        };
        let cfg = resolve(&spec, Some(&fm)).expect("valid");
        assert_eq!(cfg.sdk, Sdk::Gradio);
        assert_eq!(cfg.sdk_version.as_deref(), Some("5.0.0"));
        assert_eq!(cfg.app_file.as_deref(), Some("main.py"));
        assert_eq!(cfg.app_port, 7000);
        assert_eq!(cfg.flavor.name, "t4-small");
        assert_eq!(cfg.sleep_after, Some(Duration::from_secs(900)));
        assert_eq!(cfg.startup_timeout, Duration::from_secs(3600));
        assert_eq!(cfg.python_version, "3.10");
        assert_eq!(cfg.base_path, "/");
    }

    #[test]
    fn defaults_per_sdk_and_flavor() {
        let streamlit = FrontMatter { sdk: Some(Sdk::Streamlit), ..Default::default() };
        let cfg = resolve(&git_spec(), Some(&streamlit)).expect("valid");
        assert_eq!((cfg.app_port, cfg.app_file.as_deref()), (8501, Some("app.py")));
        assert_eq!(cfg.sleep_after, Some(Duration::from_secs(48 * 3600)));
        assert_eq!(cfg.startup_timeout, DEFAULT_STARTUP_TIMEOUT);
        let image = SpaceSpec {
            source: None,
            image: Some("r/app:1".into()),
            hardware: "cpu-upgrade".into(),
            ..Default::default()
        };
        let cfg = resolve(&image, None).expect("valid");
        assert_eq!((cfg.sdk, cfg.app_port, cfg.app_file, cfg.sleep_after), (Sdk::Docker, 7860, None, None));
    }

    #[test]
    fn runtime_fields_follow_the_spec_without_a_rebuild() {
        let fm =
            FrontMatter { sdk: Some(Sdk::Gradio), startup_duration_timeout: Some("1h".into()), ..Default::default() };
        let built = resolve(&git_spec(), Some(&fm)).expect("valid");
        let spec = SpaceSpec {
            hardware: "a10g-large".into(),
            sleep_after: Some("never".into()),
            freeze_after: Some("10m".into()),
            ..git_spec()
        };
        let now = built.clone().with_runtime_spec(&spec).expect("valid");
        assert_eq!(now.freeze_after, FreezeAfter::After(Duration::from_secs(600)));
        assert_eq!(
            (now.flavor.name, now.sleep_after, now.startup_timeout),
            ("a10g-large", None, Duration::from_secs(3600))
        );
        assert_eq!(now.app_port, built.app_port);
        let bad = SpaceSpec { hardware: "nope".into(), ..git_spec() };
        assert_eq!(built.with_runtime_spec(&bad).expect_err("unknown flavor").field, "spec.hardware");
    }

    #[test]
    fn a_recorded_build_gives_back_its_configuration() {
        let fm = FrontMatter {
            sdk: Some(Sdk::Gradio),
            title: Some("Demo".into()),
            base_path: Some("/ui".into()),
            startup_duration_timeout: Some("1h".into()),
            custom_headers: BTreeMap::from([("cross-origin-opener-policy".to_owned(), "same-origin".to_owned())]),
            preload_from_hub: vec!["org/model".into()],
            ..Default::default()
        };
        let built = resolve(&git_spec(), Some(&fm)).expect("valid");
        let record: BuiltConfig =
            serde_json::from_value(serde_json::to_value(built.built()).expect("serializes")).expect("reads back");
        assert_eq!(AppConfig::from_built(&record, &git_spec()).expect("valid"), built);
        // The spec's runtime fields apply on top, as after a build.
        let spec = SpaceSpec { hardware: "t4-small".into(), startup_timeout: Some("5m".into()), ..git_spec() };
        assert_eq!(
            AppConfig::from_built(&record, &spec).expect("valid"),
            built.clone().with_runtime_spec(&spec).expect("valid")
        );
        let bad = SpaceSpec { hardware: "nope".into(), ..git_spec() };
        assert_eq!(AppConfig::from_built(&record, &bad).expect_err("unknown flavor").field, "spec.hardware");
    }

    #[test]
    fn errors_name_the_field() {
        let err = |spec: SpaceSpec, fm: Option<FrontMatter>| resolve(&spec, fm.as_ref()).expect_err("invalid").field;
        let gradio = Some(FrontMatter { sdk: Some(Sdk::Gradio), ..Default::default() });
        assert_eq!(err(git_spec(), None), "spec.sdk");
        assert_eq!(err(SpaceSpec { hardware: "h100".into(), ..git_spec() }, gradio.clone()), "spec.hardware");
        assert_eq!(
            err(SpaceSpec { sleep_after: Some("soon".into()), ..git_spec() }, gradio.clone()),
            "spec.sleepAfter"
        );
        assert_eq!(
            err(SpaceSpec { startup_timeout: Some("1x".into()), ..git_spec() }, gradio.clone()),
            "spec.startupTimeout"
        );
        assert_eq!(
            err(SpaceSpec { freeze_after: Some("later".into()), ..git_spec() }, gradio.clone()),
            "spec.freezeAfter"
        );
        assert_eq!(err(SpaceSpec { app_port: Some(70000), ..git_spec() }, gradio.clone()), "spec.appPort");
        assert_eq!(err(SpaceSpec { app_file: Some("../etc/passwd".into()), ..git_spec() }, gradio.clone()), "app_file");
        assert_eq!(err(SpaceSpec { base_path: Some("docs".into()), ..git_spec() }, gradio.clone()), "base_path");
        for open_redirect in ["//evil.example", "/\\evil.example", "/a b", "/a?b"] {
            let spec = SpaceSpec { base_path: Some(open_redirect.into()), ..git_spec() };
            assert_eq!(err(spec, gradio.clone()), "base_path", "{open_redirect}");
        }
        let framing = FrontMatter {
            custom_headers: [("content-length".to_owned(), "0".to_owned())].into(),
            ..gradio.clone().unwrap_or_default()
        };
        let e = resolve(&git_spec(), Some(&framing)).expect_err("refused");
        assert_eq!(e.field, "README.md custom_headers");
        assert!(e.message.contains("\"content-length\" is not allowed"), "{e}");
        let msg = resolve(&SpaceSpec { sdk: Some(Sdk::Gradio), hardware: "h100".into(), ..git_spec() }, None)
            .expect_err("invalid");
        assert!(msg.to_string().starts_with("spec.hardware: unknown hardware flavor \"h100\""), "{msg}");
    }
}

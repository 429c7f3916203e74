//! The `Space` custom resource (group `hangar.dev`, version `v1alpha1`).
//!
//! The schema is structural and carries the validation the apiserver can
//! enforce itself (enums, patterns, ranges, CEL), so most bad manifests are
//! refused by `kubectl apply` before the operator ever sees them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

use super::hardware::DEFAULT_FLAVOR;
use super::sleep_tier::SleepTier;

/// The desired state of a Space, written by its owner (or the hub webhook).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "hangar.dev",
    version = "v1alpha1",
    kind = "Space",
    plural = "spaces",
    shortname = "space",
    category = "hangar",
    namespaced,
    status = "SpaceStatus",
    derive = "PartialEq",
    doc = "A Space: an ML demo app (Gradio, Streamlit, Docker or static) built from a git repository or run from an image.",
    // Raw JSON columns: the structured form repeats `type_`, which clippy flags.
    printcolumn = r#"{"name": "Stage", "type": "string", "jsonPath": ".status.stage"}"#,
    printcolumn = r#"{"name": "Hardware", "type": "string", "jsonPath": ".spec.hardware"}"#,
    printcolumn = r#"{"name": "URL", "type": "string", "jsonPath": ".status.url"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("has(self.source) != has(self.image)").message("exactly one of spec.source or spec.image must be set"))]
#[serde(rename_all = "camelCase")]
pub struct SpaceSpec {
    /// Git repository holding the Space (README.md front matter + app files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<GitSource>,
    /// A prebuilt image to run instead of building a repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,
    /// SDK; when absent, the repository's front matter decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdk: Option<Sdk>,
    /// Version of the SDK package (gradio, streamlit) to install.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9A-Za-z.+!*-]+$"))]
    pub sdk_version: Option<String>,
    /// Python version of the generated image, e.g. `3.10`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^3\.[0-9]+$"))]
    pub python_version: Option<String>,
    /// Entry file (`app.py` for gradio/streamlit, an HTML file for static).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub app_file: Option<String>,
    /// Port the app listens on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub app_port: Option<i32>,
    /// Path the app is first opened at, e.g. `/docs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"))]
    pub base_path: Option<String>,
    /// Hardware flavor (see the catalog), default `cpu-basic`. Kept a free
    /// string so an unknown flavor ends in a `CONFIG_ERROR` status that names
    /// it, rather than a bare schema refusal.
    #[serde(default = "default_hardware")]
    #[schemars(regex(pattern = r"^[a-z0-9][a-z0-9-]*$"))]
    pub hardware: String,
    /// Idle time before the Space sleeps (`15m`, `48h`, `never`); absent means the flavor's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(never|([0-9]+(ms|s|m|h|d))+)$"))]
    pub sleep_after: Option<String>,
    /// Idle time before the Space is frozen (processes stopped in place, memory
    /// kept, woken in milliseconds), shorter than `sleepAfter`; `never` skips
    /// the tier; absent means the operator's default for the flavor (CPU
    /// flavors freeze, GPU flavors do not: a frozen pod keeps its GPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(never|([0-9]+(ms|s|m|h|d))+)$"))]
    pub freeze_after: Option<String>,
    /// How long the app may take to become ready (default `30m`, or the front matter's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub startup_timeout: Option<String>,
    /// Variables, visible at build and run time.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Secrets, injected at run time from Kubernetes Secrets (never copied).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub secrets: Vec<SpaceSecret>,
    /// Stopped by its owner: no replica, and traffic does not wake it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub paused: bool,
    /// `private` Spaces require a token at the proxy.
    #[serde(default)]
    pub visibility: Visibility,
}

fn default_hardware() -> String {
    DEFAULT_FLAVOR.to_owned()
}

fn is_false(b: &bool) -> bool {
    !b
}

/// Where the Space's repository lives.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitSource {
    /// Clone URL: `https://...`, `file://...` or a local path.
    #[schemars(length(min = 1))]
    pub git: String,
    /// Branch, tag or commit sha (default `main`).
    #[serde(default = "default_revision")]
    #[schemars(length(min = 1))]
    pub revision: String,
    /// Secret with `username`/`password` (or `token`) for private repositories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

fn default_revision() -> String {
    "main".to_owned()
}

/// The app framework of a Space.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Sdk {
    Gradio,
    Streamlit,
    Docker,
    Static,
}

impl Sdk {
    pub fn as_str(self) -> &'static str {
        match self {
            Sdk::Gradio => "gradio",
            Sdk::Streamlit => "streamlit",
            Sdk::Docker => "docker",
            Sdk::Static => "static",
        }
    }
}

/// Who may reach the Space through the proxy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    #[default]
    Public,
    Private,
}

/// A secret variable of the Space, read from a Kubernetes Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpaceSecret {
    /// Name of the environment variable.
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub name: String,
    pub secret_key_ref: SecretKeyRef,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct SecretKeyRef {
    #[schemars(length(min = 1))]
    pub name: String,
    #[schemars(length(min = 1))]
    pub key: String,
}

/// Where a Space stands, as the hub names it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Stage {
    NoAppFile,
    ConfigError,
    Building,
    BuildError,
    AppStarting,
    Running,
    RunningBuilding,
    RunningAppStarting,
    RuntimeError,
    Sleeping,
    Paused,
    Stopped,
    Deleting,
}

impl Stage {
    /// The hub's name of the stage (`RUNNING`, `BUILD_ERROR`...), as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::NoAppFile => "NO_APP_FILE",
            Stage::ConfigError => "CONFIG_ERROR",
            Stage::Building => "BUILDING",
            Stage::BuildError => "BUILD_ERROR",
            Stage::AppStarting => "APP_STARTING",
            Stage::Running => "RUNNING",
            Stage::RunningBuilding => "RUNNING_BUILDING",
            Stage::RunningAppStarting => "RUNNING_APP_STARTING",
            Stage::RuntimeError => "RUNTIME_ERROR",
            Stage::Sleeping => "SLEEPING",
            Stage::Paused => "PAUSED",
            Stage::Stopped => "STOPPED",
            Stage::Deleting => "DELETING",
        }
    }

    /// Whether the Space serves traffic in this stage.
    pub fn is_serving(self) -> bool {
        matches!(self, Stage::Running | Stage::RunningBuilding | Stage::RunningAppStarting)
    }

    /// Whether the stage is an error the owner must act on.
    pub fn is_error(self) -> bool {
        matches!(self, Stage::NoAppFile | Stage::ConfigError | Stage::BuildError | Stage::RuntimeError)
    }
}

/// What the operator observed; written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpaceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    /// Human-readable reason for the stage (what is wrong, what it waits for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The image the Space runs (or will run once built).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<HardwareStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<ReplicaStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildStatus>,
    /// While `SLEEPING`: which tier, since when, what it keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep: Option<SleepStatus>,
    /// A private Space's token as a keyed hash (`hmac-sha256:<key id>:<hex>`),
    /// what the proxy checks requests against: it reads no Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_hmac: Option<String>,
    /// The last successful build of a source Space.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built: Option<BuiltStatus>,
    /// When the Space last began to serve, after its start or a wake: its
    /// idle time counts from then at the earliest (kept while it sleeps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_since: Option<Time>,
}

/// The last successful build of a source Space: what it runs while a newer
/// build runs or has failed, and what a restarted (or newly elected) operator
/// takes up instead of building the same inputs again.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuiltStatus {
    /// Digest of the build inputs the image was made from: source, pushed
    /// commit, SDK and the spec fields that change the image.
    pub inputs: String,
    /// The image, pinned by digest.
    pub image: String,
    /// The commit built.
    pub revision: String,
    /// The configuration the build resolved from the repository's README
    /// front matter and the spec (the spec's runtime fields apply on top).
    pub config: BuiltConfig,
}

/// The part of a Space's configuration that comes with its build.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuiltConfig {
    pub sdk: Sdk,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdk_version: Option<String>,
    pub python_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_file: Option<String>,
    pub app_port: u16,
    pub base_path: String,
    pub startup_timeout_seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom_headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preload_from_hub: Vec<String>,
}

/// The sleep of a `SLEEPING` Space.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SleepStatus {
    /// `Frozen` (pod kept, processes frozen) or `Stopped` (no pod).
    pub tier: SleepTier,
    /// When the operator decided this tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Memory the frozen pod still holds, as its node agent measured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<i64>,
}

/// `requested` differs from `current` while a hardware change rolls out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
pub struct HardwareStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
pub struct ReplicaStatus {
    #[serde(default)]
    pub requested: i32,
    #[serde(default)]
    pub current: i32,
}

/// The last build of the Space's repository.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildStatus {
    /// Resolved commit sha.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// On failure, the last lines of the build log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The CRD as YAML, exactly what `hangar crd` prints and `crds/space.yaml` holds.
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    serde_yaml_ng::to_string(&Space::crd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> serde_json::Value {
        let crd = serde_json::to_value(Space::crd()).expect("CRD serializes");
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }

    #[test]
    fn crd_names_and_columns() {
        let crd = Space::crd();
        assert_eq!(crd.spec.group, "hangar.dev");
        assert_eq!(crd.spec.names.plural, "spaces");
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
        let columns: Vec<_> = version.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
        assert_eq!(columns, ["Stage", "Hardware", "URL", "Age"]);
    }

    #[test]
    fn schema_is_structural_and_validating() {
        let s = schema();
        let spec = &s["properties"]["spec"];
        assert_eq!(spec["x-kubernetes-validations"][0]["rule"], json!("has(self.source) != has(self.image)"));
        // kube lists `null` among the values of an optional enum (it is nullable).
        assert_eq!(spec["properties"]["sdk"]["enum"], json!(["gradio", "streamlit", "docker", "static", null]));
        assert_eq!(spec["properties"]["visibility"]["enum"], json!(["public", "private"]));
        assert_eq!(spec["properties"]["appPort"]["maximum"].as_f64(), Some(65535.0));
        assert_eq!(spec["properties"]["hardware"]["default"], json!("cpu-basic"));
        let conditions = &s["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], json!("map"));
        assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
        // Structural schemas forbid these constructs anywhere.
        let text = s.to_string();
        for forbidden in ["\"anyOf\"", "\"oneOf\"", "\"$ref\"", "\"additionalProperties\":true"] {
            assert!(!text.contains(forbidden), "schema contains {forbidden}");
        }
    }

    #[test]
    fn spec_defaults_and_round_trip() {
        let spec: SpaceSpec = serde_json::from_value(json!({"image": "registry/app:1"})).expect("valid spec");
        assert_eq!(spec.hardware, "cpu-basic");
        assert_eq!(spec.visibility, Visibility::Public);
        assert!(!spec.paused);
        assert_eq!(
            serde_json::to_value(&spec).expect("serializes"),
            json!({"image": "registry/app:1", "hardware": "cpu-basic", "visibility": "public"})
        );
        assert_eq!(serde_json::to_value(Stage::RunningBuilding).expect("serializes"), json!("RUNNING_BUILDING"));
        use Stage::*;
        for stage in [
            NoAppFile,
            ConfigError,
            Building,
            BuildError,
            AppStarting,
            Running,
            RunningBuilding,
            RunningAppStarting,
            RuntimeError,
            Sleeping,
            Paused,
            Stopped,
            Deleting,
        ] {
            assert_eq!(serde_json::to_value(stage).expect("serializes"), json!(stage.as_str()));
        }
        let src: GitSource = serde_json::from_value(json!({"git": "file:///r"})).expect("valid source");
        assert_eq!(src.revision, "main");
    }
}

//! The operator's side of builds: which revision each Space wants, the build
//! running for it, and the outcome. Builds run in background tasks; when one
//! ends, the Space is reconciled again through `triggers`.
//!
//! A successful build is recorded in the Space's status (`status.built`:
//! inputs, image by digest, the configuration it resolved), so a restarted or
//! newly elected operator takes it up from the cluster: a Space whose wanted
//! inputs are already built keeps running and is not built again, and without
//! a builder the last built image keeps serving.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::builder::{BuildFailure, BuildOutput, BuildRequest, BuildSecrets, Builder, GitCredentials};
use crate::space::naming::HEAD_SHA_ANNOTATION;
use crate::space::{BuildStatus, BuiltStatus, Space};

/// What a Space asks to be built: a digest of everything that changes the image.
fn wanted(space: &Space) -> String {
    let spec = &space.spec;
    let head = space.annotations().get(HEAD_SHA_ANNOTATION).cloned();
    let inputs = serde_json::json!([
        spec.source,
        head,
        spec.sdk,
        spec.sdk_version,
        spec.python_version,
        spec.app_file,
        spec.app_port,
        spec.env,
        // Secret refs (not values): the build offers them to secret mounts.
        spec.secrets
    ]);
    hex::encode(Sha256::digest(inputs.to_string().as_bytes()))
}

#[derive(Debug, Clone)]
enum Entry {
    Running { wanted: String, started: Timestamp, cancel: CancellationToken },
    Done { wanted: String, record: BuildStatus, result: Box<Result<BuiltStatus, BuildFailure>> },
}

impl Entry {
    fn wanted(&self) -> &str {
        match self {
            Entry::Running { wanted, .. } | Entry::Done { wanted, .. } => wanted,
        }
    }

    fn state(&self) -> BuildState {
        match self {
            Entry::Running { started, .. } => BuildState::Running { started: *started },
            Entry::Done { record, result, .. } => match result.as_ref() {
                Ok(built) => BuildState::Built { built: Box::new(built.clone()), record: record.clone() },
                Err(failure) => BuildState::Failed { failure: failure.clone(), record: record.clone() },
            },
        }
    }
}

/// Where a Space's build stands.
#[derive(Debug, Clone)]
pub enum BuildState {
    /// The operator runs without a builder.
    Unavailable,
    Running {
        started: Timestamp,
    },
    Built {
        built: Box<BuiltStatus>,
        record: BuildStatus,
    },
    Failed {
        failure: BuildFailure,
        record: BuildStatus,
    },
}

/// What [`Builds::ensure`] does for a Space.
#[derive(Debug, PartialEq)]
enum Step {
    /// This process knows the build of the wanted inputs (running or done).
    Known,
    /// The cluster records a build of the wanted inputs (an operator before
    /// this one made it): take it up, build nothing.
    TakeUp,
    /// No builder: nothing to start.
    Unavailable,
    /// Build the wanted inputs (superseding a build of other inputs).
    Build,
}

/// The pure decision behind [`Builds::ensure`].
fn step(known: Option<&str>, recorded: Option<&BuiltStatus>, wanted: &str, can_build: bool) -> Step {
    if known == Some(wanted) {
        Step::Known
    } else if recorded.is_some_and(|r| r.inputs == wanted) {
        Step::TakeUp
    } else if !can_build {
        Step::Unavailable
    } else {
        Step::Build
    }
}

pub struct Builds {
    builder: Option<Builder>,
    client: Client,
    entries: Mutex<HashMap<String, Entry>>,
    /// The last successful build of each Space: what serves while a newer one builds or fails.
    last_success: Mutex<HashMap<String, BuiltStatus>>,
    triggers: UnboundedSender<ObjectRef<Space>>,
    /// Builds this process asked its builder for.
    pub started: Counter,
    /// Builds this process took up from a Space's `status.built` instead of building.
    pub taken_up: Counter,
}

fn seconds(t: Timestamp) -> Time {
    Time(Timestamp::from_second(t.as_second()).unwrap_or(t))
}

impl Builds {
    pub fn new(builder: Option<Builder>, client: Client, triggers: UnboundedSender<ObjectRef<Space>>) -> Self {
        Self {
            builder,
            client,
            entries: Mutex::new(HashMap::new()),
            last_success: Mutex::new(HashMap::new()),
            triggers,
            started: Counter::default(),
            taken_up: Counter::default(),
        }
    }

    pub fn builder(&self) -> Option<&Builder> {
        self.builder.as_ref()
    }

    /// The build state of a source Space, starting (or restarting) its build
    /// when what it wants changed and is not built yet. Never waits for a build.
    pub fn ensure(self: &Arc<Self>, space: &Space) -> BuildState {
        let Some(source) = space.spec.source.clone() else { return BuildState::Unavailable };
        let key = format!("{}/{}", space.namespace().unwrap_or_default(), space.name_any());
        let wanted = wanted(space);
        let status = space.status.as_ref();
        let recorded = status.and_then(|s| s.built.as_ref());
        let Ok(mut entries) = self.entries.lock() else { return BuildState::Unavailable };
        match step(entries.get(&key).map(Entry::wanted), recorded, &wanted, self.builder.is_some()) {
            Step::Known => return entries.get(&key).map_or(BuildState::Unavailable, Entry::state),
            Step::Unavailable => return BuildState::Unavailable,
            Step::TakeUp => {
                let Some(built) = recorded.cloned() else { return BuildState::Unavailable };
                if let Some(Entry::Running { cancel, .. }) = entries.get(&key) {
                    cancel.cancel();
                }
                // The record of that build as the status kept it, unless a later build's replaced it.
                let record = status
                    .and_then(|s| s.build.clone())
                    .filter(|b| b.revision.as_ref() == Some(&built.revision) && b.message.is_none())
                    .unwrap_or_else(|| BuildStatus { revision: Some(built.revision.clone()), ..Default::default() });
                tracing::info!(space = %key, image = %built.image, "build taken up from the Space's status");
                self.taken_up.inc();
                let entry = Entry::Done { wanted, record, result: Box::new(Ok(built.clone())) };
                let state = entry.state();
                entries.insert(key.clone(), entry);
                drop(entries);
                // The build log of this process says where the image came from.
                if let Some(builder) = &self.builder {
                    let id = crate::space::naming::space_id(&space.namespace().unwrap_or_default(), &space.name_any());
                    let log = builder.logs().start(&id, crate::builder::LogKind::Build, Vec::new());
                    log.line(&format!(
                        "[hangar] {} (commit {}) was built before this operator started: taken up, nothing to build",
                        built.image, built.revision
                    ));
                    log.close();
                }
                if let Ok(mut last) = self.last_success.lock() {
                    last.insert(key, built);
                }
                return state;
            }
            Step::Build => {
                if let Some(Entry::Running { cancel, .. }) = entries.get(&key) {
                    cancel.cancel();
                }
            }
        }
        let Some(builder) = &self.builder else { return BuildState::Unavailable };
        // A new build: the previous one (if any) is superseded.
        self.started.inc();
        let cancel = CancellationToken::new();
        let started = Timestamp::now();
        entries.insert(key.clone(), Entry::Running { wanted: wanted.clone(), started, cancel: cancel.clone() });
        drop(entries);

        let mut request =
            BuildRequest::new(space.namespace().unwrap_or_default(), space.name_any(), source, space.spec.clone());
        if let Some(head) = space.annotations().get(HEAD_SHA_ANNOTATION) {
            // The webhook saw this commit on the tracked branch: build exactly it.
            request.source.revision = head.clone();
        }
        request.cancel = cancel;
        let this = Arc::clone(self);
        let builder = builder.clone();
        let object = ObjectRef::from_obj(space);
        tokio::spawn(async move {
            if let Some(secret) = request.source.credentials_secret.clone() {
                match this.git_credentials(&request.namespace, &secret).await {
                    Ok(credentials) => request.git_credentials = credentials,
                    Err(e) => tracing::warn!(space = %key, error = %e, "could not read git credentials"),
                }
            }
            request.secrets = this.secret_values(&request.namespace, &request.spec.secrets).await;
            tracing::info!(space = %key, revision = %request.source.revision, "build started");
            let result = builder.build(request).await;
            match &result {
                Ok(out) => tracing::info!(space = %key, image = %out.image, reused = out.reused, "build done"),
                Err(f) => tracing::warn!(space = %key, stage = ?f.stage, kind = ?f.kind, "build failed"),
            }
            if let (Ok(out), Ok(mut last)) = (&result, this.last_success.lock()) {
                last.insert(key.clone(), built_status(&wanted, out));
            }
            if let Ok(mut entries) = this.entries.lock() {
                // Only record it if no newer build replaced this one meanwhile.
                if entries.get(&key).is_some_and(|e| e.wanted() == wanted) {
                    let (revision, message) = match &result {
                        Ok(out) => (Some(out.commit.clone()), None),
                        Err(f) => (f.commit.clone(), Some(f.message.clone())),
                    };
                    let record = BuildStatus {
                        revision,
                        started_at: Some(seconds(started)),
                        finished_at: Some(seconds(Timestamp::now())),
                        message,
                    };
                    let result = result.map(|out| built_status(&wanted, &out));
                    entries.insert(key, Entry::Done { wanted, record, result: Box::new(result) });
                }
            }
            let _ = this.triggers.send(object);
        });
        BuildState::Running { started }
    }

    /// `username`/`password`, or `token`, from the Space's credentials Secret.
    async fn git_credentials(&self, namespace: &str, name: &str) -> crate::Result<Option<GitCredentials>> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let Some(secret) = secrets.get_opt(name).await? else { return Ok(None) };
        let data = secret.data.unwrap_or_default();
        let text = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.0.clone()).ok());
        Ok(match (text("username"), text("password"), text("token")) {
            (Some(username), Some(password), _) => Some(GitCredentials { username, password }),
            (username, _, Some(token)) => {
                Some(GitCredentials { username: username.unwrap_or_else(|| "token".into()), password: token })
            }
            _ => None,
        })
    }

    /// The values of the Space's secrets that can be read now, for the
    /// build's secret mounts (one missing is left out; the build log lists
    /// what is offered, and the pod itself waits for it at run time).
    async fn secret_values(&self, namespace: &str, refs: &[crate::space::SpaceSecret]) -> BuildSecrets {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let mut read: HashMap<String, Option<Secret>> = HashMap::new();
        let mut values = BuildSecrets::default();
        for r in refs {
            let name = &r.secret_key_ref.name;
            if !read.contains_key(name) {
                let got = api.get_opt(name).await.unwrap_or_else(|e| {
                    tracing::warn!(namespace, secret = %name, error = %e, "could not read a Space secret for its build");
                    None
                });
                read.insert(name.clone(), got);
            }
            let value = read
                .get(name)
                .and_then(Option::as_ref)
                .and_then(|s| s.data.as_ref())
                .and_then(|d| d.get(&r.secret_key_ref.key))
                .and_then(|v| String::from_utf8(v.0.clone()).ok());
            if let Some(value) = value {
                values.0.insert(r.name.clone(), value);
            }
        }
        values
    }

    /// The last image built successfully for the Space, if any: this
    /// process's, else the one the Space's status records.
    pub fn last_success(&self, space: &Space) -> Option<BuiltStatus> {
        let key = format!("{}/{}", space.namespace().unwrap_or_default(), space.name_any());
        let known = self.last_success.lock().ok().and_then(|last| last.get(&key).cloned());
        known.or_else(|| space.status.as_ref()?.built.clone())
    }

    /// Forgets a deleted Space (stops its build, drops its build and run logs).
    pub fn forget(&self, namespace: &str, name: &str) {
        let key = format!("{namespace}/{name}");
        if let Some(builder) = &self.builder {
            builder.logs().remove(&crate::space::naming::space_id(namespace, name));
        }
        if let Ok(mut last) = self.last_success.lock() {
            last.remove(&key);
        }
        if let Ok(mut entries) = self.entries.lock()
            && let Some(Entry::Running { cancel, .. }) = entries.remove(&key)
        {
            cancel.cancel();
        }
    }
}

/// The record of a successful build of the `wanted` inputs, for `status.built`.
fn built_status(wanted: &str, out: &BuildOutput) -> BuiltStatus {
    BuiltStatus {
        inputs: wanted.to_owned(),
        image: out.image.clone(),
        revision: out.commit.clone(),
        config: out.app_config.built(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::{GitSource, SpaceSpec};

    fn space(revision: &str) -> Space {
        Space::new(
            "demo",
            SpaceSpec {
                source: Some(GitSource {
                    git: "file:///r".into(),
                    revision: revision.into(),
                    credentials_secret: None,
                }),
                ..Default::default()
            },
        )
    }

    fn recorded(inputs: &str) -> BuiltStatus {
        BuiltStatus {
            inputs: inputs.into(),
            image: "reg/demo@sha256:1".into(),
            revision: "abc".into(),
            config: crate::space::BuiltConfig {
                sdk: crate::space::Sdk::Docker,
                sdk_version: None,
                python_version: "3.11".into(),
                app_file: None,
                app_port: 7860,
                base_path: "/".into(),
                startup_timeout_seconds: 60,
                title: None,
                custom_headers: Default::default(),
                preload_from_hub: vec![],
            },
        }
    }

    #[test]
    fn a_recorded_build_of_the_wanted_inputs_is_taken_up_not_built_again() {
        let a = recorded("a");
        // A restarted operator (nothing known) with the build recorded: taken up, builder or not.
        assert_eq!(step(None, Some(&a), "a", true), Step::TakeUp);
        assert_eq!(step(None, Some(&a), "a", false), Step::TakeUp);
        // What this process knows wins.
        assert_eq!(step(Some("a"), Some(&a), "a", true), Step::Known);
        assert_eq!(step(Some("b"), Some(&recorded("x")), "b", false), Step::Known);
        // Other inputs wanted: built (the recorded image keeps serving meanwhile), or not without a builder.
        assert_eq!(step(None, Some(&a), "b", true), Step::Build);
        assert_eq!(step(Some("a"), Some(&a), "b", true), Step::Build);
        assert_eq!(step(None, None, "a", true), Step::Build);
        assert_eq!(step(None, Some(&a), "b", false), Step::Unavailable);
        // Back to inputs already built while another build runs: taken up, that build superseded.
        assert_eq!(step(Some("b"), Some(&a), "a", true), Step::TakeUp);
    }

    #[tokio::test]
    async fn an_operator_without_a_builder_keeps_serving_what_the_status_records() {
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
        let client = Client::try_from(config).expect("client");
        let (triggers, _triggered) = tokio::sync::mpsc::unbounded_channel();
        let builds = Arc::new(Builds::new(None, client, triggers));
        let mut s = space("main");
        s.metadata.namespace = Some("ns".into());
        assert!(matches!(builds.ensure(&s), BuildState::Unavailable), "nothing built, nothing recorded");
        assert!(builds.last_success(&s).is_none());

        let built = BuiltStatus { inputs: wanted(&s), ..recorded("") };
        s.status = Some(crate::space::SpaceStatus { built: Some(built.clone()), ..Default::default() });
        let BuildState::Built { built: got, record } = builds.ensure(&s) else { panic!("taken up as built") };
        assert_eq!((*got, record.revision.as_deref()), (built.clone(), Some("abc")));
        assert_eq!((builds.started.get(), builds.taken_up.get()), (0, 1));
        // Asked again: known now, not taken up twice.
        assert!(matches!(builds.ensure(&s), BuildState::Built { .. }));
        assert_eq!(builds.taken_up.get(), 1);

        // A new commit wanted and no builder: the recorded image still serves.
        s.annotations_mut().insert(HEAD_SHA_ANNOTATION.into(), "def".into());
        assert!(matches!(builds.ensure(&s), BuildState::Unavailable));
        assert_eq!(builds.last_success(&s), Some(built));
        assert_eq!(builds.started.get(), 0);
    }

    #[test]
    fn wanted_changes_with_build_inputs_only() {
        let a = space("main");
        let mut b = space("main");
        b.spec.hardware = "t4-small".into();
        b.spec.sleep_after = Some("5m".into());
        assert_eq!(wanted(&a), wanted(&b), "hardware and sleep time do not rebuild");
        let mut c = space("main");
        c.annotations_mut().insert(HEAD_SHA_ANNOTATION.into(), "abc".into());
        assert_ne!(wanted(&a), wanted(&c), "a pushed commit rebuilds");
        let mut d = space("main");
        d.spec.env.insert("MODEL".into(), "x".into());
        assert_ne!(wanted(&a), wanted(&d), "variables are build args");
        assert_ne!(wanted(&a), wanted(&space("v2")));
        let mut e = space("main");
        e.spec.secrets = vec![crate::space::SpaceSecret {
            name: "HF_TOKEN".into(),
            secret_key_ref: crate::space::SecretKeyRef { name: "s".into(), key: "token".into() },
        }];
        assert_ne!(wanted(&a), wanted(&e), "a new secret is offered to the build's secret mounts");
    }
}

//! The operator's side of builds: which revision each Space wants, the build
//! running for it, and the outcome. Builds run in background tasks; when one
//! ends, the Space is reconciled again through `triggers`.
//!
//! Nothing here is persisted: after a restart the operator asks for the same
//! build again, and the builder's key lookup in the registry answers it
//! without building (`BuildOutput::reused`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, ResourceExt};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::builder::{BuildFailure, BuildOutput, BuildRequest, BuildSecrets, Builder, GitCredentials};
use crate::space::naming::HEAD_SHA_ANNOTATION;
use crate::space::{BuildStatus, Space};

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
    Done { wanted: String, started: Timestamp, finished: Timestamp, result: Box<Result<BuildOutput, BuildFailure>> },
}

impl Entry {
    fn wanted(&self) -> &str {
        match self {
            Entry::Running { wanted, .. } | Entry::Done { wanted, .. } => wanted,
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
        output: Box<BuildOutput>,
        record: BuildStatus,
    },
    Failed {
        failure: BuildFailure,
        record: BuildStatus,
    },
}

pub struct Builds {
    builder: Option<Builder>,
    client: Client,
    entries: Mutex<HashMap<String, Entry>>,
    /// The last successful build of each Space: what serves while a newer one builds or fails.
    last_success: Mutex<HashMap<String, BuildOutput>>,
    triggers: UnboundedSender<ObjectRef<Space>>,
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
        }
    }

    pub fn builder(&self) -> Option<&Builder> {
        self.builder.as_ref()
    }

    /// The build state of a source Space, starting (or restarting) its build
    /// when what it wants changed. Never waits for a build.
    pub fn ensure(self: &Arc<Self>, space: &Space) -> BuildState {
        let Some(builder) = &self.builder else { return BuildState::Unavailable };
        let Some(source) = space.spec.source.clone() else { return BuildState::Unavailable };
        let key = format!("{}/{}", space.namespace().unwrap_or_default(), space.name_any());
        let wanted = wanted(space);
        let Ok(mut entries) = self.entries.lock() else { return BuildState::Unavailable };
        match entries.get(&key) {
            Some(Entry::Running { wanted: w, started, .. }) if *w == wanted => {
                return BuildState::Running { started: *started };
            }
            Some(Entry::Done { wanted: w, started, finished, result }) if *w == wanted => {
                let (revision, message) = match result.as_ref() {
                    Ok(out) => (Some(out.commit.clone()), None),
                    Err(f) => (f.commit.clone(), Some(f.message.clone())),
                };
                let record = BuildStatus {
                    revision,
                    started_at: Some(seconds(*started)),
                    finished_at: Some(seconds(*finished)),
                    message,
                };
                return match result.as_ref() {
                    Ok(out) => BuildState::Built { output: Box::new(out.clone()), record },
                    Err(failure) => BuildState::Failed { failure: failure.clone(), record },
                };
            }
            Some(Entry::Running { cancel, .. }) => cancel.cancel(),
            _ => {}
        }
        // A new build: the previous one (if any) is superseded.
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
                last.insert(key.clone(), out.clone());
            }
            if let Ok(mut entries) = this.entries.lock() {
                // Only record it if no newer build replaced this one meanwhile.
                if entries.get(&key).is_some_and(|e| e.wanted() == wanted) {
                    let done = Entry::Done { wanted, started, finished: Timestamp::now(), result: Box::new(result) };
                    entries.insert(key, done);
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

    /// The last image built successfully for the Space, if any.
    pub fn last_success(&self, space: &Space) -> Option<BuildOutput> {
        let key = format!("{}/{}", space.namespace().unwrap_or_default(), space.name_any());
        self.last_success.lock().ok()?.get(&key).cloned()
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

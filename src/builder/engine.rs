//! The Docker engine side of a build, through bollard: look an image up,
//! build a context, push, read the digest.
//!
//! Builds use the engine's BuildKit (see [`super::buildkit`]), whose session
//! serves the Space's secrets to `RUN --mount=type=secret` steps. An engine
//! without BuildKit sessions (found out once, at connect) gets the classic
//! builder: its builds say so in their log and receive no secrets (a
//! Dockerfile that mounts one fails there, as it would with `docker build`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::models::{BuildInfoAux, ImageId};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, BuilderVersion, PushImageOptionsBuilder, TagImageOptionsBuilder,
};
use futures::StreamExt;
use tokio_util::io::ReaderStream;

use super::buildkit::{self, BuildSpec, EngineAddr, Session};

/// Registry login for pushes.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// An engine call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EngineError(pub String);

impl From<bollard::errors::Error> for EngineError {
    fn from(e: bollard::errors::Error) -> Self {
        EngineError(e.to_string())
    }
}

/// A build that failed: the engine's message and the step it failed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepFailure {
    /// `[3/9] RUN pip install ...` (BuildKit) or `Step 3/9 : RUN ...` (classic), when known.
    pub step: Option<String>,
    pub message: String,
}

/// Connection to one engine (and the registry it pushes to).
#[derive(Clone)]
pub struct Engine {
    docker: Docker,
    credentials: Option<DockerCredentials>,
    /// The engine's address and API version, for BuildKit's raw connections.
    addr: EngineAddr,
    api: String,
    /// `Err(why)`: the engine has no BuildKit sessions; builds are classic.
    buildkit: Result<(), String>,
    /// `networkmode` of builds; `None`: the engine's default (its bridge).
    build_network: Option<String>,
}

impl Engine {
    /// Connects to `docker_host` (`unix://...`, `tcp://...`; `None`: `DOCKER_HOST`
    /// or the default socket) and negotiates the API version (Engine 20.10
    /// speaks 1.41, older than bollard's default). `request_timeout` bounds
    /// every call, builds included.
    pub async fn connect(
        docker_host: Option<&str>,
        request_timeout: Duration,
        credentials: Option<&RegistryCredentials>,
    ) -> Result<Self, EngineError> {
        let host = match docker_host {
            Some(h) => h.to_owned(),
            None => std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".to_owned()),
        };
        let secs = request_timeout.as_secs().max(1);
        let addr = EngineAddr::parse(&host)
            .ok_or_else(|| EngineError(format!("unsupported DOCKER_HOST {host:?} (use unix:// or tcp://)")))?;
        let docker = match &addr {
            EngineAddr::Unix(path) => {
                Docker::connect_with_unix(&path.to_string_lossy(), secs, bollard::API_DEFAULT_VERSION)?
            }
            EngineAddr::Tcp(_) => Docker::connect_with_http(&host, secs, bollard::API_DEFAULT_VERSION)?,
        };
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| EngineError(format!("cannot reach the Docker engine at {host}: {e}")))?;
        let credentials = credentials.map(|c| DockerCredentials {
            username: Some(c.username.clone()),
            password: Some(c.password.clone()),
            ..Default::default()
        });
        let version = docker.client_version();
        let api = format!("{}.{}", version.major_version, version.minor_version);
        // A session opened and dropped at once: proof the engine speaks BuildKit.
        let buildkit = Session::open(&addr, &api, HashMap::new()).await.map(drop);
        Ok(Self { docker, credentials, addr, api, buildkit, build_network: None })
    }

    /// Runs the RUN steps of builds in network mode `mode` (`none`, `host`, or
    /// for the classic builder a network name; `None`: the engine's default).
    pub fn set_build_network(&mut self, mode: Option<String>) {
        self.build_network = mode;
    }

    /// `Ok`: builds run on the engine's BuildKit; `Err(why)`: classic builder.
    pub fn buildkit(&self) -> Result<(), &str> {
        self.buildkit.as_ref().map(|_| ()).map_err(String::as_str)
    }

    /// The bollard client (for the caller's own engine calls, e.g. run logs).
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// The digest (`sha256:...`) of `repository:tag` if the registry has it.
    /// The registry, not the engine's memory of a push, is asked: pods pull
    /// from there, and a registry may have been wiped since.
    pub async fn pushed_digest(&self, repository: &str, tag: &str) -> Option<String> {
        let reference = format!("{repository}:{tag}");
        let found = self.docker.inspect_registry_image(&reference, self.credentials.clone()).await.ok()?;
        found.descriptor.digest
    }

    /// The id (`sha256:...`) of a local image, if the engine has it.
    pub async fn local_image_id(&self, reference: &str) -> Option<String> {
        self.docker.inspect_image(reference).await.ok()?.id
    }

    /// Builds `context_tar` (streamed from disk) into `tag`; every output
    /// line goes to `on_line`. Returns the image id. With BuildKit, `secrets`
    /// (id -> value) are offered to the build's secret mounts; the classic
    /// builder gets none.
    #[allow(clippy::too_many_arguments)]
    pub async fn build(
        &self,
        context_tar: &Path,
        dockerfile: &str,
        tag: &str,
        build_args: &HashMap<String, String>,
        labels: &HashMap<String, String>,
        secrets: &BTreeMap<String, String>,
        on_line: impl FnMut(&str),
    ) -> Result<String, StepFailure> {
        if self.buildkit.is_err() {
            return self.classic_build(context_tar, dockerfile, tag, build_args, labels, on_line).await;
        }
        let values = secrets.iter().map(|(k, v)| (k.clone(), v.clone().into_bytes())).collect();
        let session = Session::open(&self.addr, &self.api, values)
            .await
            .map_err(|e| StepFailure { step: None, message: format!("cannot open a BuildKit session: {e}") })?;
        let spec =
            BuildSpec { context_tar, dockerfile, tag, build_args, labels, network: self.build_network.as_deref() };
        buildkit::build(&self.addr, &self.api, &session, &spec, on_line).await
    }

    async fn classic_build(
        &self,
        context_tar: &Path,
        dockerfile: &str,
        tag: &str,
        build_args: &HashMap<String, String>,
        labels: &HashMap<String, String>,
        mut on_line: impl FnMut(&str),
    ) -> Result<String, StepFailure> {
        let file = tokio::fs::File::open(context_tar)
            .await
            .map_err(|e| StepFailure { step: None, message: format!("cannot read the build context: {e}") })?;
        let options = BuildImageOptionsBuilder::default()
            .dockerfile(dockerfile)
            .t(tag)
            .buildargs(build_args)
            .labels(labels)
            .rm(true)
            .forcerm(true)
            .networkmode(self.build_network.as_deref().unwrap_or("default"))
            .version(BuilderVersion::BuilderV1)
            .build();
        let body = bollard::body_try_stream(ReaderStream::new(file));
        let mut stream = self.docker.build_image(options, None, Some(body));
        let mut step: Option<String> = None;
        let mut image_id: Option<String> = None;
        let mut partial = String::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(text) = info.stream.as_deref() {
                        partial.push_str(text);
                        while let Some(nl) = partial.find('\n') {
                            let line: String = partial.drain(..=nl).collect();
                            let line = strip_ansi(line.trim_end());
                            let line = line.as_str();
                            if line.starts_with("Step ") {
                                step = Some(line.to_owned());
                            }
                            on_line(line);
                        }
                    }
                    if let Some(status) = info.status.as_deref() {
                        on_line(status);
                    }
                    if let Some(BuildInfoAux::Default(ImageId { id: Some(id) })) = info.aux {
                        image_id = Some(id);
                    }
                }
                Err(e) => {
                    if !partial.trim().is_empty() {
                        on_line(partial.trim_end());
                    }
                    let message = match e {
                        bollard::errors::Error::DockerStreamError { error } => error,
                        other => other.to_string(),
                    };
                    on_line(&message);
                    return Err(StepFailure { step, message });
                }
            }
        }
        if !partial.trim().is_empty() {
            on_line(partial.trim_end());
        }
        match image_id {
            Some(id) => Ok(id),
            // Engines that omit the aux id still tagged the image: ask for it.
            None => match self.docker.inspect_image(tag).await {
                Ok(image) => Ok(image.id.unwrap_or_default()),
                Err(e) => Err(StepFailure { step, message: format!("the build produced no image: {e}") }),
            },
        }
    }

    /// Adds `repository:new_tag` to an existing image.
    pub async fn tag(&self, image: &str, repository: &str, new_tag: &str) -> Result<(), EngineError> {
        let options = TagImageOptionsBuilder::default().repo(repository).tag(new_tag).build();
        Ok(self.docker.tag_image(image, Some(options)).await?)
    }

    /// Follows a container's stdout and stderr into `space`'s run log until
    /// the container stops (local mode's `.../logs/run`).
    pub async fn follow_container_logs(
        &self,
        container: &str,
        store: &super::LogStore,
        space: &str,
    ) -> Result<(), EngineError> {
        let options =
            bollard::query_parameters::LogsOptionsBuilder::default().follow(true).stdout(true).stderr(true).build();
        let mut stream = self.docker.logs(container, Some(options));
        let mut partial = String::new();
        while let Some(item) = stream.next().await {
            partial.push_str(&item?.to_string());
            while let Some(nl) = partial.find('\n') {
                let line: String = partial.drain(..=nl).collect();
                store.append(space, super::LogKind::Run, &strip_ansi(line.trim_end()));
            }
        }
        if !partial.is_empty() {
            store.append(space, super::LogKind::Run, &strip_ansi(&partial));
        }
        Ok(())
    }

    /// Pushes `repository:tag`; returns its digest (`sha256:...`).
    pub async fn push(
        &self,
        repository: &str,
        tag: &str,
        mut on_line: impl FnMut(&str),
    ) -> Result<String, EngineError> {
        let options = PushImageOptionsBuilder::default().tag(tag).build();
        let mut stream = self.docker.push_image(repository, Some(options), self.credentials.clone());
        let mut last_status = String::new();
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| EngineError(format!("push of {repository}:{tag} failed: {e}")))?;
            if let Some(status) = info.status {
                // Progress lines repeat per layer; keep the log readable.
                if status != last_status {
                    on_line(&status);
                    last_status = status;
                }
            }
        }
        let image = self.docker.inspect_image(&format!("{repository}:{tag}")).await?;
        repo_digest(image.repo_digests.as_deref().unwrap_or_default(), repository)
            .ok_or_else(|| EngineError(format!("pushed {repository}:{tag} but the engine recorded no digest")))
    }
}

/// `text` without terminal escape sequences (the classic builder colours
/// a RUN step's stderr), so stored lines are plain text.
pub(super) fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters up to a final byte in '@'..='~'.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The digest of `repository` among an image's `RepoDigests` (`repo@sha256:...`).
fn repo_digest(repo_digests: &[String], repository: &str) -> Option<String> {
    repo_digests.iter().find_map(|d| {
        let (repo, digest) = d.rsplit_once('@')?;
        (repo == repository).then(|| digest.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_stripped() {
        assert_eq!(strip_ansi("\u{1b}[91mERROR: no\u{1b}[0m"), "ERROR: no");
        assert_eq!(strip_ansi("plain [91m"), "plain [91m");
    }

    #[test]
    fn repo_digest_picks_the_repository() {
        let d = ["other/x@sha256:aa".to_owned(), "127.0.0.1:5000/a/b@sha256:bb".to_owned()];
        assert_eq!(repo_digest(&d, "127.0.0.1:5000/a/b").as_deref(), Some("sha256:bb"));
        assert_eq!(repo_digest(&d, "127.0.0.1:5000/a/c"), None);
    }
}

//! Checks a Space repository out at a revision with the `git` CLI.
//!
//! Why the CLI and not `gix`: git is on every builder host and image anyway,
//! it speaks every transport (https with proxies and custom CAs, ssh, file://,
//! plain paths) exactly as users' own git does, and fetching a single revision
//! shallowly is one command; `gix` would add a large dependency tree (minutes
//! of compile time on small CI machines) for no capability we use.
//!
//! Credentials never appear on a command line or in a URL: they are passed as
//! an `Authorization` header through `GIT_CONFIG_*` environment variables, and
//! any `user:password@` in a user-supplied URL is redacted from messages.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::process::Stdio;

use base64::Engine as _;
use tokio::process::Command;

use super::key::is_commit_sha;
use super::plan::RepoView;
use super::repo_tree::{EntryKind, RepoTree, TreeError};

/// Username and password (or token) for a private repository over https.
#[derive(Clone, PartialEq, Eq)]
pub struct GitCredentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for GitCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitCredentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

impl GitCredentials {
    /// From the data of the Secret named by `spec.source.credentialsSecret`:
    /// `username` + `password`, or a `token` (sent as the password, with
    /// `username` if set, else `hangar`: token hosts ignore the user name).
    pub fn from_secret_data(data: &BTreeMap<String, k8s_openapi::ByteString>) -> Result<Self, SourceError> {
        let text = |key: &str| -> Result<Option<String>, SourceError> {
            data.get(key)
                .map(|v| {
                    String::from_utf8(v.0.clone())
                        .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
                        .map_err(|_| SourceError(format!("credentials secret key {key:?} is not UTF-8")))
                })
                .transpose()
        };
        let username = text("username")?;
        let password = match (text("password")?, text("token")?) {
            (Some(p), _) | (None, Some(p)) if !p.is_empty() => p,
            _ => {
                return Err(SourceError("credentials secret needs `password` (with `username`) or `token`".to_owned()));
            }
        };
        Ok(Self { username: username.unwrap_or_else(|| "hangar".to_owned()), password })
    }
}

/// A checkout failed; the message is safe to show (no credentials).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// Schemes a cluster's builder fetches from. A `file://` URL, a plain path
/// (or scp-like `host:path`) or a `transport::` helper would read the
/// builder's own disk (or run a command): a Space's owner must not point the
/// operator at its files.
pub const REMOTE_SCHEMES: [&str; 4] = ["https", "http", "ssh", "git"];

/// `Err(why)` unless `url` names a remote repository by one of
/// [`REMOTE_SCHEMES`] (cluster mode; local mode builds folders and paths). Pure.
pub fn check_remote_url(url: &str) -> Result<(), String> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme {
        Some(s) if REMOTE_SCHEMES.contains(&s.as_str()) => Ok(()),
        _ => Err(format!(
            "source.git {:?} is not a remote repository: this cluster builds from {} URLs only \
             (file:// URLs and local paths are refused)",
            redact_url(url),
            REMOTE_SCHEMES.map(|s| format!("{s}://")).join(", ")
        )),
    }
}

/// Fetches `revision` (branch, tag or commit sha) of `url` into the empty or
/// new directory `dir` and checks it out; returns the resolved commit sha.
pub async fn checkout(
    url: &str,
    revision: &str,
    credentials: Option<&GitCredentials>,
    dir: &Path,
) -> Result<String, SourceError> {
    let shown = redact_url(url);
    if revision.starts_with('-') || revision.is_empty() {
        return Err(SourceError(format!("invalid revision {revision:?}")));
    }
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| SourceError(format!("cannot create checkout directory {}: {e}", dir.display())))?;
    git(dir, credentials, &["init", "-q", "."]).await?;
    // A shallow fetch of just the revision: fast, and enough to build.
    let shallow = git(dir, credentials, &["fetch", "-q", "--depth", "1", "--no-tags", "--", url, revision]).await;
    let target = match shallow {
        Ok(_) => "FETCH_HEAD".to_owned(),
        Err(shallow_err) => {
            // Servers without shallow support (dumb http): the revision's full history.
            match git(dir, credentials, &["fetch", "-q", "--no-tags", "--", url, revision]).await {
                Ok(_) => "FETCH_HEAD".to_owned(),
                // Servers that refuse unadvertised shas in `want` (protocol v0/v1
                // without allowAnySHA1InWant): fetch every branch and tag, pick the commit.
                Err(_) if is_commit_sha(revision) => {
                    git(
                        dir,
                        credentials,
                        &["fetch", "-q", "--", url, "+refs/heads/*:refs/remotes/src/*", "+refs/tags/*:refs/tags/*"],
                    )
                    .await
                    .map_err(|e| SourceError(format!("cannot fetch {shown}: {e}")))?;
                    revision.to_owned()
                }
                Err(_) => {
                    return Err(SourceError(format!("cannot fetch revision {revision:?} of {shown}: {shallow_err}")));
                }
            }
        }
    };
    git(dir, None, &["-c", "advice.detachedHead=false", "checkout", "-q", "--detach", &format!("{target}^{{commit}}")])
        .await
        .map_err(|e| SourceError(format!("revision {revision:?} of {shown} is not a commit: {e}")))?;
    let sha = git(dir, None, &["rev-parse", "HEAD"]).await?.trim().to_owned();
    if !is_commit_sha(&sha) {
        return Err(SourceError(format!("git rev-parse HEAD gave {sha:?}")));
    }
    if is_commit_sha(revision) && !sha.eq_ignore_ascii_case(revision) {
        return Err(SourceError(format!("asked for commit {revision} of {shown} but got {sha}")));
    }
    Ok(sha)
}

/// Runs git in `dir` with a clean, non-interactive environment.
async fn git(dir: &Path, credentials: Option<&GitCredentials>, args: &[&str]) -> Result<String, SourceError> {
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "true")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(c) = credentials {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password));
        cmd.env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env("GIT_CONFIG_VALUE_0", format!("Authorization: Basic {token}"));
    }
    let out = cmd.output().await.map_err(|e| SourceError(format!("cannot run git: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut msg = redact_url(stderr.trim());
        if let Some(c) = credentials
            && !c.password.is_empty()
        {
            msg = msg.replace(&c.password, "<redacted>");
        }
        Err(SourceError(format!("git {} failed ({}): {msg}", args.first().unwrap_or(&""), out.status)))
    }
}

/// Removes `user:password@` from every URL in `text`.
pub fn redact_url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail.find(|c: char| c.is_whitespace() || c == '/' || c == '\'' || c == '"').unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("<redacted>@");
                rest = &tail[at + 1..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// Reads what the build plan needs from a checkout: README.md, the file list
/// (without `.git`), `.dockerignore`. Refuses a checkout with a symlink that
/// leaves it, and reads nothing outside it (see [`super::repo_tree`]).
/// Blocking: call from `spawn_blocking`.
pub fn read_repo(root: &Path) -> Result<RepoView, TreeError> {
    let tree = RepoTree::open(root)?;
    let files: BTreeSet<String> =
        tree.walk(&[])?.into_iter().filter(|(_, kind)| *kind != EntryKind::Dir).map(|(rel, _)| rel).collect();
    let read_opt = |name: &str| -> Result<Option<String>, TreeError> {
        if !files.contains(name) {
            return Ok(None);
        }
        Ok(tree.read(name)?.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    };
    Ok(RepoView { readme: read_opt("README.md")?, dockerignore: read_opt(".dockerignore")?, files })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(
            redact_url("fatal: unable to access 'https://bob:s3cret@git.example.com/r.git/': 403"),
            "fatal: unable to access 'https://<redacted>@git.example.com/r.git/': 403"
        );
        assert_eq!(redact_url("file:///tmp/x and https://h/p"), "file:///tmp/x and https://h/p");
        assert_eq!(redact_url("no url"), "no url");
    }

    #[test]
    fn only_remote_urls_pass_the_cluster_check() {
        for ok in ["https://h/r.git", "HTTP://h/r", "ssh://git@h/r", "git://h/r"] {
            assert_eq!(check_remote_url(ok), Ok(()), "{ok}");
        }
        for bad in ["file:///etc", "/var/run/secrets", "../r", "host:path/r.git", "ext::sh -c id", "fd::3", ""] {
            let e = check_remote_url(bad).expect_err(bad);
            assert!(e.contains("is not a remote repository") && e.contains("https://"), "{e}");
        }
        let e = check_remote_url("file://bob:pw@h/r").expect_err("file");
        assert!(!e.contains("pw"), "{e}");
    }

    #[test]
    fn credentials_from_secret_data() {
        use k8s_openapi::ByteString;
        let data = |pairs: &[(&str, &str)]| -> BTreeMap<String, ByteString> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec()))).collect()
        };
        let c = GitCredentials::from_secret_data(&data(&[("username", "bob"), ("password", "pw\n")])).expect("ok");
        assert_eq!((c.username.as_str(), c.password.as_str()), ("bob", "pw"));
        let c = GitCredentials::from_secret_data(&data(&[("token", "hf_abc")])).expect("ok");
        assert_eq!((c.username.as_str(), c.password.as_str()), ("hangar", "hf_abc"));
        let err = GitCredentials::from_secret_data(&data(&[("username", "bob")])).expect_err("no password");
        assert!(err.0.contains("`token`"), "{err}");
        let mut bad = data(&[]);
        bad.insert("token".into(), ByteString(vec![0xff]));
        assert!(GitCredentials::from_secret_data(&bad).is_err());
    }

    #[test]
    fn credentials_debug_is_redacted() {
        let c = GitCredentials { username: "bob".into(), password: "hunter2".into() };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}

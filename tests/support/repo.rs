//! Space repositories for tests: fixtures (tests/fixtures/spaces) committed
//! into real git repositories in temp dirs.

use std::path::Path;
use std::process::Command;

/// Runs git in `dir` with a fixed identity; panics with git's message on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("fixture dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A git repository (branch main) holding fixture `name`, with `MARKER`
/// replaced by `marker` so every test run builds a commit of its own.
pub fn fixture_repo(name: &str, marker: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&super::repo_root().join("tests/fixtures/spaces").join(name), dir.path());
    let index = dir.path().join("index.html");
    if let Ok(text) = std::fs::read_to_string(&index) {
        std::fs::write(&index, text.replace("MARKER", marker)).expect("write");
    }
    git(dir.path(), &["init", "-q", "-b", "main"]);
    git(dir.path(), &["add", "-A"]);
    git(dir.path(), &["commit", "-q", "-m", "fixture"]);
    dir
}

/// Writes `file` and commits it; returns the new commit sha.
pub fn commit_file(repo: &Path, file: &str, content: &str) -> String {
    std::fs::write(repo.join(file), content).expect("write");
    git(repo, &["add", "-A"]);
    git(repo, &["commit", "-q", "-m", &format!("edit {file}")]);
    git(repo, &["rev-parse", "HEAD"])
}

/// A bare clone of `work` at `bare`, ready to be served over dumb HTTP.
pub fn bare_clone(work: &Path, bare: &Path) {
    let out = Command::new("git").args(["clone", "-q", "--bare"]).arg(work).arg(bare).output().expect("git clone");
    assert!(out.status.success(), "git clone --bare: {}", String::from_utf8_lossy(&out.stderr));
    git(bare, &["update-server-info"]);
}

/// Pushes `work`'s main to the bare remote (what `git push` to a hub does).
pub fn publish(work: &Path, bare: &Path) {
    let target = bare.to_str().expect("utf-8 path");
    git(work, &["push", "-q", "--force", target, "main:main"]);
    git(bare, &["update-server-info"]);
}

/// Serves the directory `root` (bare repositories) over git's dumb HTTP protocol on
/// loopback, behind Basic auth when `user_pass` is given; returns `http://host:port`.
pub async fn serve_dumb_http(root: std::path::PathBuf, user_pass: Option<&'static str>) -> String {
    serve_dumb_http_on(std::net::Ipv4Addr::LOCALHOST, root, user_pass).await
}

/// [`serve_dumb_http`] on the address `ip` (e.g. the host's address on the pod network,
/// for clients in pods).
pub async fn serve_dumb_http_on(
    ip: std::net::Ipv4Addr,
    root: std::path::PathBuf,
    user_pass: Option<&'static str>,
) -> String {
    use axum::extract::{Path as UrlPath, State};
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::IntoResponse;
    use base64::Engine as _;
    let expected = user_pass.map(|up| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(up)));
    let app = axum::Router::new()
        .route(
            "/{*path}",
            axum::routing::get(
                |State((root, expected)): State<(std::path::PathBuf, Option<String>)>,
                 UrlPath(path): UrlPath<String>,
                 headers: HeaderMap| async move {
                    let authorized = expected.as_ref().is_none_or(|e| {
                        headers.get(header::AUTHORIZATION).is_some_and(|v| v.as_bytes() == e.as_bytes())
                    });
                    if !authorized {
                        return (
                            StatusCode::UNAUTHORIZED,
                            [(header::WWW_AUTHENTICATE, "Basic realm=\"git\"")],
                            Vec::new(),
                        )
                            .into_response();
                    }
                    if path.split('/').any(|p| p == "..") {
                        return StatusCode::BAD_REQUEST.into_response();
                    }
                    match std::fs::read(root.join(&path)) {
                        Ok(bytes) => bytes.into_response(),
                        Err(_) => StatusCode::NOT_FOUND.into_response(),
                    }
                },
            ),
        )
        .with_state((root, expected));
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// The example Spaces `names` (examples/spaces), each committed into a git repository under
/// `dir` and served over dumb HTTP on loopback; returns the base URL (`{base}/{name}.git`).
pub async fn serve_examples(dir: &Path, names: &[&str]) -> String {
    let remotes = dir.join("remotes");
    for name in names {
        let work = dir.join(name);
        copy_dir(&super::repo_root().join("examples/spaces").join(name), &work);
        git(&work, &["init", "-q", "-b", "main"]);
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", name]);
        bare_clone(&work, &remotes.join(format!("{name}.git")));
    }
    serve_dumb_http(remotes, None).await
}

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

//! A folder's working tree as a git commit the builder can check out.
//!
//! The builder builds git revisions (that is what the cluster does), while
//! local mode builds folders as they are on disk, committed or not, git
//! repositories or not. So each folder gets a bare repository of its own in
//! the state directory, and its tree is committed there with a fixed author
//! and date and no parent: the same files give the same commit sha, hence the
//! same build key, and an unchanged Space is reused instead of rebuilt, also
//! across restarts. The folder itself is never written to; its `.gitignore`
//! is honoured. Symlinks are committed as symlinks (git reads no target), and
//! the builder refuses a snapshot with one that leaves the folder, naming it
//! (`crate::builder::repo_tree`), as it does any checkout.

use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

/// The branch the snapshot is stored under.
pub const BRANCH: &str = "main";

/// Commits `folder`'s files into the bare repository `repo` (made if
/// missing) as [`BRANCH`]; returns the commit sha.
pub async fn snapshot(folder: &Path, repo: &Path) -> Result<String, String> {
    if !repo.join("HEAD").is_file() {
        tokio::fs::create_dir_all(repo).await.map_err(|e| format!("cannot create {}: {e}", repo.display()))?;
        git(repo, None, &["init", "-q", "--bare"]).await?;
    }
    let index = repo.join("hangar-index");
    git(repo, Some((folder, &index)), &["add", "-A", "--", "."]).await?;
    let tree = git(repo, Some((folder, &index)), &["write-tree"]).await?;
    let commit = git(repo, None, &["commit-tree", tree.trim(), "-m", "hangar up: working tree snapshot"]).await?;
    let commit = commit.trim().to_owned();
    git(repo, None, &["update-ref", &format!("refs/heads/{BRANCH}"), &commit]).await?;
    Ok(commit)
}

/// Runs git on `repo` (optionally with `folder` as its work tree and its own
/// index file), with a fixed identity and date so commits are reproducible.
async fn git(repo: &Path, work: Option<(&Path, &Path)>, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("git");
    cmd.arg("--git-dir").arg(repo);
    if let Some((folder, index)) = work {
        cmd.arg("--work-tree").arg(folder).current_dir(folder).env("GIT_INDEX_FILE", index);
    }
    cmd.args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "hangar")
        .env("GIT_AUTHOR_EMAIL", "hangar@localhost")
        .env("GIT_COMMITTER_NAME", "hangar")
        .env("GIT_COMMITTER_EMAIL", "hangar@localhost")
        .env("GIT_AUTHOR_DATE", "@0 +0000")
        .env("GIT_COMMITTER_DATE", "@0 +0000")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = cmd.output().await.map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("git {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn same_files_same_commit_and_changes_show() {
        let tmp = tempfile::tempdir().expect("tmp");
        let folder = tmp.path().join("app");
        std::fs::create_dir_all(folder.join("sub")).expect("mkdir");
        std::fs::write(folder.join("README.md"), "---\nsdk: static\n---\n").expect("write");
        std::fs::write(folder.join("sub/index.html"), "hi").expect("write");
        std::fs::write(folder.join(".gitignore"), "*.log\n").expect("write");
        std::fs::write(folder.join("debug.log"), "noise").expect("write");
        let (r1, r2) = (tmp.path().join("r1.git"), tmp.path().join("r2.git"));
        let a = snapshot(&folder, &r1).await.expect("snapshot");
        assert_eq!(a.len(), 40);
        assert_eq!(snapshot(&folder, &r1).await.expect("again"), a, "unchanged files, same commit");
        assert_eq!(snapshot(&folder, &r2).await.expect("other repo"), a, "reproducible anywhere");
        let files = git(&r1, None, &["ls-tree", "-r", "--name-only", &a]).await.expect("ls-tree");
        assert_eq!(files.lines().collect::<Vec<_>>(), [".gitignore", "README.md", "sub/index.html"]);
        std::fs::write(folder.join("sub/index.html"), "changed").expect("write");
        let b = snapshot(&folder, &r1).await.expect("changed");
        assert_ne!(a, b);
        std::fs::remove_file(folder.join("sub/index.html")).expect("rm");
        let c = snapshot(&folder, &r1).await.expect("removed");
        let files = git(&r1, None, &["ls-tree", "-r", "--name-only", &c]).await.expect("ls-tree");
        assert!(!files.contains("index.html"), "{files}");
        assert!(!folder.join(".git").exists(), "the folder is not written to");
    }
}

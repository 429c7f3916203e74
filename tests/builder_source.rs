//! Checkout of Space repositories with the git CLI: real repositories made in
//! temp dirs, fetched by branch, tag and sha over file:// and plain paths.

mod support;

use hangar::builder::source::{checkout, read_repo};
use support::repo::git;

/// A repo with three commits on main (tagged v1 at the first), one on `dev`.
fn repo() -> (tempfile::TempDir, Vec<String>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    git(d, &["init", "-q", "-b", "main"]);
    let mut shas = Vec::new();
    for i in 0..3 {
        std::fs::write(d.join("README.md"), format!("---\nsdk: static\n---\nversion {i}\n")).expect("write");
        std::fs::create_dir_all(d.join("sub")).expect("mkdir");
        std::fs::write(d.join("sub/index.html"), format!("<p>{i}</p>")).expect("write");
        git(d, &["add", "-A"]);
        git(d, &["commit", "-q", "-m", &format!("c{i}")]);
        shas.push(git(d, &["rev-parse", "HEAD"]));
        if i == 0 {
            git(d, &["tag", "-a", "v1", "-m", "v1"]);
        }
    }
    git(d, &["checkout", "-q", "-b", "dev"]);
    std::fs::write(d.join("dev.txt"), "dev").expect("write");
    git(d, &["add", "-A"]);
    git(d, &["commit", "-q", "-m", "dev"]);
    let dev = git(d, &["rev-parse", "HEAD"]);
    git(d, &["checkout", "-q", "main"]);
    (dir, shas, dev)
}

async fn readme_at(url: &str, revision: &str) -> (String, String) {
    let out = tempfile::tempdir().expect("tempdir");
    let sha = checkout(url, revision, None, &out.path().join("co")).await.unwrap_or_else(|e| panic!("{revision}: {e}"));
    let view = read_repo(&out.path().join("co")).expect("read");
    assert!(!view.files.iter().any(|f| f.starts_with(".git")), "{:?}", view.files);
    (sha, view.readme.unwrap_or_default())
}

#[tokio::test]
async fn branch_tag_and_sha_over_file_url_and_path() {
    let (dir, shas, dev) = repo();
    let path = dir.path().to_str().expect("utf-8 path").to_owned();
    let url = format!("file://{path}");
    for source in [&url, &path] {
        let (sha, readme) = readme_at(source, "main").await;
        assert_eq!(sha, shas[2]);
        assert!(readme.contains("version 2"));
        let (sha, readme) = readme_at(source, "v1").await;
        assert_eq!(sha, shas[0], "an annotated tag resolves to its commit");
        assert!(readme.contains("version 0"));
        // A commit that is no branch tip.
        let (sha, readme) = readme_at(source, &shas[1]).await;
        assert_eq!(sha, shas[1]);
        assert!(readme.contains("version 1"));
        let (sha, _) = readme_at(source, "dev").await;
        assert_eq!(sha, dev);
    }
    let out = tempfile::tempdir().expect("tempdir");
    let view_dir = out.path().join("co");
    checkout(&url, "main", None, &view_dir).await.expect("checkout");
    let view = read_repo(&view_dir).expect("read");
    assert_eq!(view.files.iter().map(String::as_str).collect::<Vec<_>>(), ["README.md", "sub/index.html"]);
}

#[tokio::test]
async fn unknown_revisions_and_remotes_fail_with_the_reason() {
    let (dir, _, _) = repo();
    let url = format!("file://{}", dir.path().display());
    let out = tempfile::tempdir().expect("tempdir");
    let err = checkout(&url, "no-such-branch", None, &out.path().join("a")).await.expect_err("unknown branch");
    assert!(err.0.contains("no-such-branch"), "{err}");
    let err = checkout(&url, &"e".repeat(40), None, &out.path().join("b")).await.expect_err("unknown sha");
    assert!(err.0.contains("eeee"), "{err}");
    let err = checkout(&url, "--upload-pack=touch /tmp/x", None, &out.path().join("c")).await.expect_err("option");
    assert!(err.0.contains("invalid revision"), "{err}");
    let err = checkout("file:///nonexistent/repo", "main", None, &out.path().join("d")).await.expect_err("no repo");
    assert!(err.0.contains("/nonexistent/repo"), "{err}");
    // Credentials in a URL never reach the message.
    let err = checkout("http://bob:hunter2@127.0.0.1:9/r.git", "main", None, &out.path().join("e"))
        .await
        .expect_err("nothing listens on port 9");
    assert!(!err.0.contains("hunter2"), "{err}");
}

#[tokio::test]
async fn private_repositories_over_http_use_the_credentials_and_never_show_them() {
    let (dir, shas, _) = repo();
    let bare = tempfile::tempdir().expect("tempdir");
    support::repo::bare_clone(dir.path(), &bare.path().join("repo.git"));
    let url = format!("{}/repo.git", support::repo::serve_dumb_http(bare.path().to_owned(), Some("bob:hunter2")).await);

    let work = tempfile::tempdir().expect("tempdir");
    let good = hangar::builder::GitCredentials { username: "bob".into(), password: "hunter2".into() };
    let sha = checkout(&url, "main", Some(&good), &work.path().join("ok")).await.expect("authorized checkout");
    assert_eq!(sha, shas[2]);
    let view = read_repo(&work.path().join("ok")).expect("read");
    assert!(view.readme.expect("README").contains("version 2"));

    let err = checkout(&url, "main", None, &work.path().join("anon")).await.expect_err("no credentials");
    assert!(err.0.contains("cannot fetch revision \"main\""), "{err}");
    let bad = hangar::builder::GitCredentials { username: "bob".into(), password: "wrong-password".into() };
    let err = checkout(&url, "main", Some(&bad), &work.path().join("bad")).await.expect_err("wrong password");
    assert!(!err.0.contains("wrong-password"), "{err}");
    assert!(!format!("{bad:?}").contains("wrong-password"));
}

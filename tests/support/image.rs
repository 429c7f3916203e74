//! The hangar image, built from the repository's Dockerfile around the test's own binary.

use std::process::Command;
use std::time::Instant;

use super::{TestEnv, repo_root, run_ok};

/// Builds the hangar image (the Dockerfile, as the README does it: the binary built on the
/// host, the test bed's Debian base as `BASE_IMAGE`) and pushes it to the test registry;
/// returns (reference, size in bytes).
pub fn build_and_push_hangar(env: &TestEnv, tag: &str) -> (String, u64) {
    let context = tempfile::tempdir().expect("tempdir");
    std::fs::copy(repo_root().join("Dockerfile"), context.path().join("Dockerfile")).expect("copy Dockerfile");
    let binary = context.path().join("hangar");
    std::fs::copy(env!("CARGO_BIN_EXE_hangar"), &binary).expect("copy binary");
    run_ok(Command::new("strip").arg(&binary));
    let image = format!("{}/hangar:{tag}", env.registry);
    let started = Instant::now();
    run_ok(
        env.docker()
            .args(["build", "-q", "-t", &image, "--build-arg", "HANGAR_BINARY=hangar"])
            .arg("--build-arg")
            .arg(format!("BASE_IMAGE={}", env.python_image))
            .arg(context.path()),
    );
    eprintln!("hangar image {image} built in {:.1}s", started.elapsed().as_secs_f64());
    // The image runs on its own (loader and libraries are all in it), git included.
    let version = run_ok(env.docker().args(["run", "--rm", &image, "--version"]));
    assert!(version.starts_with("hangar "), "{version}");
    let git = run_ok(env.docker().args(["run", "--rm", "--entrypoint", "git", &image, "--version"]));
    assert!(git.starts_with("git version "), "{git}");
    let size: u64 =
        run_ok(env.docker().args(["image", "inspect", "-f", "{{.Size}}", &image])).trim().parse().expect("image size");
    let started = Instant::now();
    run_ok(env.docker().args(["push", "-q", &image]));
    eprintln!("pushed in {:.1}s; hangar image: {:.1} MB", started.elapsed().as_secs_f64(), size as f64 / 1e6);
    (image, size)
}

//! The `hangar` binary itself: the committed CRD is its output, and the CLI explains itself.

use std::process::Command;

fn hangar(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hangar")).args(args).output().expect("run the hangar binary")
}

#[test]
fn committed_crd_is_the_generated_one() {
    let out = hangar(&["crd"]);
    assert!(out.status.success(), "hangar crd failed: {}", String::from_utf8_lossy(&out.stderr));
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/space.yaml"))
        .expect("crds/space.yaml is committed");
    assert!(
        String::from_utf8_lossy(&out.stdout) == committed,
        "crds/space.yaml is stale: regenerate it with `cargo run -- crd > crds/space.yaml`"
    );
}

#[test]
fn help_lists_every_command() {
    let out = hangar(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for command in ["operator", "proxy", "webhook", "up", "crd"] {
        assert!(help.lines().any(|l| l.trim_start().starts_with(command)), "--help lacks {command}:\n{help}");
    }
}

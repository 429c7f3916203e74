//! Build keys and image names: the same key means the same image, so a key
//! whose image is already in the registry is reused instead of rebuilt.

use sha2::{Digest, Sha256};

use super::plan::BuildPlan;

/// Bumped whenever the builder changes what it makes from the same inputs.
const KEY_VERSION: &str = "hangar-build-v1";

/// The key of a build: everything that decides the image's content. The repo
/// Dockerfile (docker sdk) and every file are covered by the commit sha.
pub fn build_key(commit: &str, plan: &BuildPlan, extra_ca_sha256: Option<&str>) -> String {
    let mut h = Sha256::new();
    // Length-prefixed fields so no two different inputs serialize alike.
    let mut field = |name: &str, value: &str| {
        h.update(format!("{name}:{}:", value.len()));
        h.update(value.as_bytes());
        h.update(b"\n");
    };
    field("version", KEY_VERSION);
    field("commit", commit);
    field("sdk", plan.app_config.sdk.as_str());
    field("dockerfile_path", &plan.dockerfile_path);
    field("dockerfile", plan.dockerfile.as_deref().unwrap_or(""));
    field("dockerignore", plan.dockerignore.as_deref().unwrap_or(""));
    field("base_image", plan.base_image.as_deref().unwrap_or(""));
    field("extra_ca", extra_ca_sha256.unwrap_or(""));
    for (name, value) in &plan.build_args {
        field("arg", name);
        field("value", value);
    }
    // Names only: a changed value does not rebuild (values never reach the image).
    for name in &plan.secrets {
        field("secret", name);
    }
    hex::encode(h.finalize())
}

/// `<registry>/<namespace>/<space>`: one image repository per Space.
pub fn repository(registry: &str, namespace: &str, space: &str) -> String {
    format!("{}/{namespace}/{space}", registry.trim_end_matches('/'))
}

/// The tag that names one build: the commit plus a prefix of the key, so a
/// change of variables or SDK version at the same commit gets an image of its own.
pub fn keyed_tag(commit: &str, key: &str) -> String {
    format!("{commit}-{}", &key[..key.len().min(16)])
}

/// Whether `s` is a full hex commit sha (40: SHA-1, 64: SHA-256 repositories).
pub fn is_commit_sha(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::plan::{PlanSettings, RepoView, StaticServer, plan};
    use crate::space::{GitSource, SpaceSpec};
    use std::collections::BTreeMap;

    fn a_plan(readme: &str, vars: &[(&str, &str)]) -> BuildPlan {
        let spec = SpaceSpec {
            source: Some(GitSource { git: "file:///r".into(), revision: "main".into(), credentials_secret: None }),
            hardware: "cpu-basic".into(),
            ..Default::default()
        };
        let repo = RepoView {
            readme: Some(readme.into()),
            files: ["README.md", "app.py", "index.html"].map(str::to_owned).into(),
            dockerignore: None,
        };
        let settings = PlanSettings {
            python_base_image: "py:{python_version}".into(),
            python_images: Default::default(),
            static_server: StaticServer::busybox("st:1"),
            extra_ca: false,
            buildkit: true,
        };
        let vars: BTreeMap<String, String> = vars.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        plan(&spec, &repo, &vars, &settings).expect("plan")
    }

    #[test]
    fn same_inputs_same_key_and_any_change_changes_it() {
        let sha = "a".repeat(40);
        let base = a_plan("---\nsdk: gradio\nsdk_version: 4.0.0\n---\n", &[("A", "1")]);
        let k = build_key(&sha, &base, None);
        assert_eq!(k, build_key(&sha, &a_plan("---\nsdk: gradio\nsdk_version: 4.0.0\n---\n", &[("A", "1")]), None));
        assert_eq!(k.len(), 64);
        let others = [
            build_key(&"b".repeat(40), &base, None),
            build_key(&sha, &a_plan("---\nsdk: gradio\nsdk_version: 4.0.1\n---\n", &[("A", "1")]), None),
            build_key(&sha, &a_plan("---\nsdk: gradio\nsdk_version: 4.0.0\n---\n", &[("A", "2")]), None),
            build_key(&sha, &a_plan("---\nsdk: gradio\nsdk_version: 4.0.0\n---\n", &[("A1", "")]), None),
            build_key(&sha, &a_plan("---\nsdk: static\n---\n", &[("A", "1")]), None),
            build_key(&sha, &base, Some("cafe")),
        ];
        for (i, o) in others.iter().enumerate() {
            assert_ne!(&k, o, "variant {i} must change the key");
        }
    }

    #[test]
    fn names() {
        assert_eq!(repository("127.0.0.1:5000/", "alice", "demo"), "127.0.0.1:5000/alice/demo");
        let sha = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(keyed_tag(sha, &"f".repeat(64)), format!("{sha}-ffffffffffffffff"));
        assert!(is_commit_sha(sha));
        assert!(!is_commit_sha("main") && !is_commit_sha(&"g".repeat(40)));
    }
}

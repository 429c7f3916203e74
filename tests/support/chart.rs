//! Components run as processes with the chart's permissions: the chart installed for
//! one namespace (its RBAC, components scaled to 0) and kubeconfigs holding its
//! ServiceAccounts' tokens.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::{TestNamespace, repo_root, run_ok};

/// `helm install <release>` of the chart in the test namespace, watching it only, with
/// `values` merged over "no component pods" (their RBAC, Secrets and policies only).
pub fn install(ns: &TestNamespace, release: &str, dir: &Path, values: serde_json::Value) {
    let mut all = json!({
        "domain": "hf.test", "urlScheme": "http", "watchNamespace": ns.name,
        "operator": {"replicas": 0}, "proxy": {"replicas": 0}, "webhook": {"replicas": 0},
        // No agent pods: tests run the agent as a process where they need one.
        "nodeAgent": {"nodeSelector": {"hangar.dev/test-node": "none"}},
    });
    merge(&mut all, values);
    let values_file = dir.join(format!("{release}-values.yaml"));
    std::fs::write(&values_file, serde_yaml_ng::to_string(&all).expect("values yaml")).expect("write values");
    run_ok(
        ns.env
            .helm(&dir.join("helm"))
            .args(["install", release, "-n", &ns.name, "--skip-crds"])
            .arg(repo_root().join("charts/hangar"))
            .arg("-f")
            .arg(&values_file),
    );
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    match (into, from) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

/// A kubeconfig for the chart's ServiceAccount `sa`: the test bed's cluster, the SA's token.
pub fn service_account_kubeconfig(ns: &TestNamespace, sa: &str, dir: &Path) -> PathBuf {
    let token = run_ok(ns.kubectl().args(["create", "token", sa, "--duration=2h"]));
    token_kubeconfig(ns, sa, token.trim(), dir)
}

/// A kubeconfig for the test bed's cluster that authenticates with `token` (as `user`).
pub fn token_kubeconfig(ns: &TestNamespace, user: &str, token: &str, dir: &Path) -> PathBuf {
    let field = |path: &str| run_ok(ns.env.kubectl().args(["config", "view", "--raw", "--minify", "-o"]).arg(path));
    let server = field("jsonpath={.clusters[0].cluster.server}");
    let ca = field("jsonpath={.clusters[0].cluster.certificate-authority-data}");
    assert!(!server.is_empty() && !ca.is_empty(), "the test bed's kubeconfig names its server and CA");
    let config = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": user,
        "clusters": [{"name": "testbed", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "testbed", "user": user, "namespace": ns.name}}],
    });
    let path = dir.join(format!("{user}.kubeconfig"));
    std::fs::write(&path, serde_yaml_ng::to_string(&config).expect("kubeconfig yaml")).expect("write kubeconfig");
    path
}

/// A kube client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> kube::Client {
    let config = kube::config::Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(config, &Default::default()).await.expect("kube config");
    kube::Client::try_from(config).expect("kube client")
}

/// A token key file (the chart's `tokenKey` Secret, as the operator and proxy see it mounted).
pub fn token_key_file(dir: &Path) -> PathBuf {
    let path = dir.join("token-key");
    std::fs::write(&path, format!("{}\n", super::unique_name("test-token-key-0123456789abcdefghijklmnopqrstuv")))
        .expect("write token key");
    path
}

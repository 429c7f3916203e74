//! `hangar operator` as a separate process, the way the chart runs it.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::TestNamespace;

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

/// `hangar operator` watching one namespace; killed on drop, log printed on panic.
pub struct Operator {
    child: Child,
    log: PathBuf,
    /// `host:port` of its /healthz, /metrics and logs API.
    pub http: String,
}

impl Operator {
    /// Starts the operator on the test namespace with a hardware `mapping`
    /// and extra arguments (e.g. the builder's `--registry`).
    pub fn start(ns: &TestNamespace, mapping: &str, extra: &[&str]) -> Self {
        Self::spawn(ns, mapping, &["--namespace", &ns.name], extra)
    }

    /// Starts the operator on every namespace, reconciling only the Spaces
    /// `selector` selects (for Spaces of several test namespaces at once).
    pub fn start_selecting(ns: &TestNamespace, selector: &str) -> Self {
        Self::spawn(ns, "{}", &["--space-selector", selector], &[])
    }

    fn spawn(ns: &TestNamespace, mapping: &str, scope: &[&str], extra: &[&str]) -> Self {
        let dir = ns.env.state.join("operator-tests");
        std::fs::create_dir_all(&dir).expect("operator test dir");
        let mapping_file = dir.join(format!("{}-mapping.yaml", ns.name));
        std::fs::write(&mapping_file, mapping).expect("write mapping");
        let log = dir.join(format!("{}.log", super::unique_name(&ns.name)));
        let out = std::fs::File::create(&log).expect("operator log");
        let err = out.try_clone().expect("operator log");
        let http = format!("127.0.0.1:{}", free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_hangar"))
            .arg("operator")
            .args(scope)
            .args(["--domain", "hf.test", "--url-scheme", "http"])
            .arg("--hardware-mapping")
            .arg(&mapping_file)
            .args(["--http-addr", &http])
            .args(extra)
            .env("KUBECONFIG", &ns.env.kubeconfig)
            .env("RUST_LOG", "info,hangar=debug")
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("start hangar operator");
        Self { child, log, http }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("----- tail of operator log {} -----", self.log.display());
            eprintln!("{}", lines[lines.len().saturating_sub(60)..].join("\n"));
        }
    }
}

/// `hangar operator`'s builder arguments for the test bed: its registry, base images,
/// Docker engine and (when set) the extra CA bundle builds trust.
pub fn builder_args(env: &super::TestEnv) -> Vec<String> {
    let mut args = vec![
        "--registry".to_owned(),
        env.registry.clone(),
        "--python-image".to_owned(),
        env.python_image.clone(),
        "--static-image".to_owned(),
        env.static_image.clone(),
        "--docker-host".to_owned(),
        env.docker_host.clone(),
        // Test repositories live in temp dirs on this machine (file:// URLs).
        "--allow-local-git".to_owned(),
    ];
    if let Ok(ca) = std::env::var("HANGAR_EXTRA_CA_FILE")
        && !ca.is_empty()
    {
        args.extend(["--extra-ca-file".to_owned(), ca]);
    }
    args
}

//! A `hangar` subcommand run as a separate process (the way the chart runs the
//! components), restartable, with its log kept in the test bed's state dir.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// `hangar <args>` with its own environment; killed on drop, log tail printed on panic.
pub struct Component {
    name: String,
    args: Vec<OsString>,
    env: Vec<(String, OsString)>,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Component {
    /// Starts `hangar <args>`; `env` is added to the test's environment; output goes to
    /// `<dir>/<name>.log` (appended across restarts).
    pub fn start(name: &str, dir: &Path, args: &[OsString], env: &[(&str, OsString)]) -> Self {
        std::fs::create_dir_all(dir).expect("component log dir");
        let mut this = Self {
            name: name.to_owned(),
            args: args.to_vec(),
            env: env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
            child: None,
            log: dir.join(format!("{name}.log")),
        };
        this.spawn();
        this
    }

    fn spawn(&mut self) {
        let out = OpenOptions::new().create(true).append(true).open(&self.log).expect("component log");
        let err = out.try_clone().expect("component log");
        let child = Command::new(env!("CARGO_BIN_EXE_hangar"))
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("starting hangar {}: {e}", self.name));
        self.child = Some(child);
    }

    /// SIGKILL, the way a node loss or an OOM kill ends a process: no graceful shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Killed (if running) and started again with the same arguments.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- tail of hangar {} log {} -----", self.name, self.log.display());
            eprintln!("{}", self.log_tail(80));
        }
    }
}

/// Arguments as the `OsString`s `Component::start` takes.
pub fn args<I, S>(items: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    items.into_iter().map(Into::into).collect()
}

//! What `hangar up` knows about its Spaces, kept in one JSON file in the
//! state directory (rewritten atomically on every change) so that
//! `hangar ls` / `hangar up --status`, another process, can show it.
//! Containers themselves are found again by their Docker labels, not here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::space::{SleepTier, Stage};

/// The state file's name inside the state directory.
pub const FILE: &str = "up.json";

/// One Space as `hangar ls` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpaceState {
    /// `owner/name`.
    pub id: String,
    pub stage: Stage,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// While `SLEEPING`: frozen (container paused) or stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<SleepTier>,
    /// When the tier was entered (Unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier_since_ms: Option<u64>,
    /// The last request seen before the Space went to sleep (Unix
    /// milliseconds): a restarted `hangar up` re-derives the tier from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since_ms: Option<u64>,
    /// Memory a frozen container holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
}

impl SpaceState {
    /// Awake (or not running at all): no tier.
    pub fn clear_sleep(&mut self) {
        self.tier = None;
        self.tier_since_ms = None;
        self.idle_since_ms = None;
        self.memory_bytes = None;
    }
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpState {
    /// The `hangar up` process that writes it.
    pub pid: u32,
    pub dir: PathBuf,
    /// The proxy's address.
    pub listen: String,
    pub spaces: Vec<SpaceState>,
}

impl UpState {
    pub fn read(state_dir: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(state_dir.join(FILE))?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }

    /// Whether the process that wrote the file still runs (a crashed or
    /// killed `hangar up` leaves its last state behind).
    pub fn writer_alive(&self) -> bool {
        std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains("hangar"))
    }
}

/// The live book: updated by the Space supervisors, written through to disk.
#[derive(Clone)]
pub struct Book {
    inner: Arc<Mutex<UpState>>,
    path: PathBuf,
}

impl Book {
    pub fn new(state_dir: &Path, dir: PathBuf, listen: String) -> Self {
        let state = UpState { pid: std::process::id(), dir, listen, spaces: Vec::new() };
        Self { inner: Arc::new(Mutex::new(state)), path: state_dir.join(FILE) }
    }

    /// Changes one Space (added if new) and writes the file.
    pub fn update(&self, id: &str, url: &str, f: impl FnOnce(&mut SpaceState)) {
        // Written under the lock: writers share one temporary file, and the
        // file must end with the newest state.
        let mut state = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let i = match state.spaces.iter().position(|s| s.id == id) {
            Some(i) => i,
            None => {
                state.spaces.push(SpaceState {
                    id: id.to_owned(),
                    stage: Stage::Building,
                    url: url.to_owned(),
                    message: None,
                    image: None,
                    container: None,
                    tier: None,
                    tier_since_ms: None,
                    idle_since_ms: None,
                    memory_bytes: None,
                });
                state.spaces.len() - 1
            }
        };
        f(&mut state.spaces[i]);
        if let Err(e) = write_atomic(&self.path, &state) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the state file");
        }
    }

    pub fn stages(&self) -> BTreeMap<String, Stage> {
        let state = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        state.spaces.iter().map(|s| (s.id.clone(), s.stage)).collect()
    }

    /// Removes the file (on a clean exit: nothing runs any more).
    pub fn remove_file(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn write_atomic(path: &Path, state: &UpState) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, path)
}

/// `hangar ls`'s table at time `now_ms` (Unix milliseconds).
pub fn render_table(state: &UpState, alive: bool, now_ms: u64) -> String {
    let mut out = String::new();
    let width = state.spaces.iter().map(|s| s.id.len()).max().unwrap_or(5).max(5);
    out.push_str(&format!("{:<width$}  {:<22}  {:<20}  URL\n", "SPACE", "STAGE", "TIER"));
    for s in &state.spaces {
        // A dead writer means nothing serves: say so rather than repeat its last word.
        let stage = if alive { s.stage.as_str() } else { Stage::Stopped.as_str() };
        let tier = if alive && s.stage == Stage::Sleeping { tier_text(s, now_ms) } else { "-".to_owned() };
        out.push_str(&format!("{:<width$}  {:<22}  {:<20}  {}\n", s.id, stage, tier, s.url));
        if let Some(m) = s.message.as_deref().filter(|_| alive && s.stage.is_error()) {
            let first = m.lines().next().unwrap_or_default();
            out.push_str(&format!("{:<width$}    {first}\n", ""));
        }
    }
    out
}

/// `frozen 3m, 113 MiB`, `stopped 2h`: the tier, for how long, what it holds.
fn tier_text(s: &SpaceState, now_ms: u64) -> String {
    let Some(tier) = s.tier else {
        return "-".to_owned();
    };
    let mut text = tier.as_str().to_ascii_lowercase();
    if let Some(since) = s.tier_since_ms {
        text.push(' ');
        text.push_str(&short_duration(now_ms.saturating_sub(since) / 1000));
    }
    if let (SleepTier::Frozen, Some(bytes)) = (tier, s.memory_bytes) {
        text.push_str(", ");
        text.push_str(&mib(bytes));
    }
    text
}

/// `42s`, `3m`, `5h`, `2d` (the largest whole unit).
fn short_duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// Milliseconds since the Unix epoch (0 for a clock before it).
pub fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The inverse of [`unix_ms`].
pub fn from_unix_ms(ms: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn book_writes_through_and_reads_back() {
        let tmp = tempfile::tempdir().expect("tmp");
        let book = Book::new(tmp.path(), "/x".into(), "127.0.0.1:8080".into());
        book.update("local/a", "http://local-a.localhost:8080/", |s| s.stage = Stage::Running);
        book.update("local/b", "http://local-b.localhost:8080/", |s| {
            s.stage = Stage::BuildError;
            s.message = Some("step 2 failed\nmore".into());
        });
        let state = UpState::read(tmp.path()).expect("readable");
        assert_eq!(state.pid, std::process::id());
        assert_eq!(state.spaces.len(), 2);
        assert!(state.writer_alive(), "this test process runs (its name contains hangar)");
        let table = render_table(&state, true, 0);
        assert!(table.contains("local/a  RUNNING"), "{table}");
        assert!(table.contains("BUILD_ERROR") && table.contains("step 2 failed") && !table.contains("more"), "{table}");
        assert!(render_table(&state, false, 0).contains("local/a  STOPPED"));
        book.update("local/a", "http://local-a.localhost:8080/", |s| {
            s.stage = Stage::Sleeping;
            s.tier = Some(SleepTier::Frozen);
            s.tier_since_ms = Some(1_000_000);
            s.memory_bytes = Some(113 << 20);
        });
        book.update("local/b", "http://local-b.localhost:8080/", |s| {
            s.stage = Stage::Sleeping;
            s.tier = Some(SleepTier::Stopped);
        });
        let state = UpState::read(tmp.path()).expect("readable");
        assert_eq!(state.spaces[0].tier, Some(SleepTier::Frozen));
        let table = render_table(&state, true, 1_000_000 + 185_000);
        assert!(
            table.lines().any(|l| l.starts_with("local/a  SLEEPING") && l.contains("frozen 3m, 113 MiB")),
            "{table}"
        );
        assert!(table.lines().any(|l| l.starts_with("local/b  SLEEPING") && l.contains("stopped")), "{table}");
        assert_eq!(
            [0, 59, 60, 3599, 3600, 86_399, 86_400 * 3].map(short_duration),
            ["0s", "59s", "1m", "59m", "1h", "23h", "3d"]
        );
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(from_unix_ms(unix_ms(at)), at);
        assert_eq!(book.stages()["local/b"], Stage::Sleeping);
        book.remove_file();
        assert!(UpState::read(tmp.path()).is_err());
    }
}

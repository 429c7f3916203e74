//! Build and run logs: a bounded in-memory store per Space, live
//! subscriptions, and the hub-shaped SSE endpoints
//! `GET /api/spaces/{owner}/{name}/logs/build` and `.../logs/run`.
//!
//! A reader first gets the lines kept so far, then follows new ones; a build
//! log's stream ends when its build ends, a run log's stream never does.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::Stream;
use http::{HeaderMap, StatusCode};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::space::naming::space_id;

/// Which log of a Space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogKind {
    /// Output of the image build.
    Build,
    /// The app's own output.
    Run,
}

/// One line, as the hub's logs API sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    pub data: String,
    /// RFC 3339.
    pub timestamp: String,
}

#[derive(Debug)]
struct Log {
    lines: VecDeque<LogLine>,
    tx: broadcast::Sender<LogLine>,
    /// A finished build: readers stop after the kept lines.
    closed: bool,
    /// Values (Space secrets) that must never be shown; replaced on append.
    redact: Vec<String>,
    /// Which `start` made this log: writers of an older one are ignored.
    generation: u64,
}

/// The log store; clones share it.
#[derive(Debug, Clone)]
pub struct LogStore {
    inner: Arc<Mutex<HashMap<(String, LogKind), Log>>>,
    capacity: usize,
    generations: Arc<std::sync::atomic::AtomicU64>,
}

/// Writes one started log; once the log is restarted (a newer build), its
/// lines and close are dropped, so a superseded build cannot pollute the new log.
#[derive(Debug, Clone)]
pub struct LogWriter {
    store: LogStore,
    space: String,
    kind: LogKind,
    generation: u64,
    /// This writer's own last lines (redacted), whatever became of the log.
    recent: Arc<Mutex<VecDeque<String>>>,
}

/// Lines a [`LogWriter`] remembers for [`LogWriter::tail`].
const WRITER_TAIL: usize = 200;

impl LogWriter {
    pub fn line(&self, line: &str) {
        let data = self.store.append_gen(&self.space, self.kind, Some(self.generation), line);
        let data = data.unwrap_or_else(|| line.trim_end_matches(['\r', '\n']).to_owned());
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == WRITER_TAIL {
            recent.pop_front();
        }
        recent.push_back(data);
    }

    /// The last `n` lines written through this writer.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().skip(recent.len().saturating_sub(n)).cloned().collect()
    }

    /// Ends the log: live readers stop after the last line.
    pub fn close(&self) {
        self.store.close_gen(&self.space, self.kind, Some(self.generation));
    }
}

impl Default for LogStore {
    fn default() -> Self {
        Self::new(5000)
    }
}

/// What a reader gets: the kept lines, then live ones (if still open).
pub struct Subscription {
    pub backlog: Vec<LogLine>,
    pub live: Option<broadcast::Receiver<LogLine>>,
}

impl LogStore {
    /// Keeps the last `capacity` lines of each log.
    pub fn new(capacity: usize) -> Self {
        Self { inner: Arc::default(), capacity: capacity.max(1), generations: Arc::default() }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(String, LogKind), Log>> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_log(redact: Vec<String>, generation: u64) -> Log {
        let (tx, _) = broadcast::channel(1024);
        Log { lines: VecDeque::new(), tx, closed: false, redact, generation }
    }

    /// Starts a fresh log (a new build): earlier lines are dropped, readers
    /// of the old one see it end. `redact` lists values never to show.
    pub fn start(&self, space: &str, kind: LogKind, redact: Vec<String>) -> LogWriter {
        let redact = redact.into_iter().filter(|s| !s.is_empty()).collect();
        let generation = self.generations.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        // Dropping the old log's sender ends its live readers.
        self.lock().insert((space.to_owned(), kind), Self::new_log(redact, generation));
        LogWriter { store: self.clone(), space: space.to_owned(), kind, generation, recent: Arc::default() }
    }

    /// Appends one line (secrets redacted), stamped now.
    pub fn append(&self, space: &str, kind: LogKind, line: &str) {
        self.append_gen(space, kind, None, line);
    }

    /// Appends unless `generation` is stale; returns the line as stored.
    fn append_gen(&self, space: &str, kind: LogKind, generation: Option<u64>, line: &str) -> Option<String> {
        let mut logs = self.lock();
        let log = logs.entry((space.to_owned(), kind)).or_insert_with(|| Self::new_log(Vec::new(), 0));
        if generation.is_some_and(|g| g != log.generation) {
            return None;
        }
        let mut data = line.trim_end_matches(['\r', '\n']).to_owned();
        for secret in &log.redact {
            if data.contains(secret.as_str()) {
                data = data.replace(secret.as_str(), "***");
            }
        }
        let entry = LogLine { data, timestamp: k8s_openapi::jiff::Timestamp::now().to_string() };
        if log.lines.len() == self.capacity {
            log.lines.pop_front();
        }
        log.lines.push_back(entry.clone());
        let data = entry.data.clone();
        // No receivers is fine: nobody is watching right now.
        let _ = log.tx.send(entry);
        Some(data)
    }

    /// Marks a log finished: live readers end after the last line.
    pub fn close(&self, space: &str, kind: LogKind) {
        self.close_gen(space, kind, None);
    }

    fn close_gen(&self, space: &str, kind: LogKind, generation: Option<u64>) {
        let mut logs = self.lock();
        if let Some(log) = logs.get_mut(&(space.to_owned(), kind))
            && generation.is_none_or(|g| g == log.generation)
        {
            log.closed = true;
            // Replacing the sender drops the old one: receivers see `Closed`.
            log.tx = broadcast::channel(1).0;
        }
    }

    /// Drops both logs of a Space (it was deleted): live readers end.
    pub fn remove(&self, space: &str) {
        let mut logs = self.lock();
        logs.remove(&(space.to_owned(), LogKind::Build));
        logs.remove(&(space.to_owned(), LogKind::Run));
    }

    /// The last `n` lines (for a failure message or a status tail).
    pub fn tail(&self, space: &str, kind: LogKind, n: usize) -> Vec<String> {
        let logs = self.lock();
        logs.get(&(space.to_owned(), kind))
            .map(|l| l.lines.iter().skip(l.lines.len().saturating_sub(n)).map(|l| l.data.clone()).collect())
            .unwrap_or_default()
    }

    /// The kept lines and, for an open log, a live receiver; `None`: no such log.
    pub fn subscribe(&self, space: &str, kind: LogKind) -> Option<Subscription> {
        let logs = self.lock();
        let log = logs.get(&(space.to_owned(), kind))?;
        // Subscribing under the lock: no line falls between backlog and live.
        Some(Subscription {
            backlog: log.lines.iter().cloned().collect(),
            live: (!log.closed).then(|| log.tx.subscribe()),
        })
    }
}

/// The longest log line kept whole; a longer one is cut into pieces of this size.
pub const MAX_LINE: usize = 16 * 1024;

/// Splits output into lines of at most [`MAX_LINE`] bytes: an app's output
/// is untrusted, and a line that never ends must not grow memory.
#[derive(Debug, Default)]
pub struct Lines {
    pending: Vec<u8>,
}

impl Lines {
    /// Takes the next bytes; `line` gets each line they complete.
    pub fn feed(&mut self, mut data: &[u8], mut line: impl FnMut(&str)) {
        while let Some(end) = data.iter().position(|&b| b == b'\n') {
            self.push(&data[..end], &mut line);
            Self::emit(&mut self.pending, &mut line);
            data = &data[end + 1..];
        }
        self.push(data, &mut line);
    }

    /// The last line, if the output did not end with a newline.
    pub fn finish(mut self, mut line: impl FnMut(&str)) {
        if !self.pending.is_empty() {
            Self::emit(&mut self.pending, &mut line);
        }
    }

    fn push(&mut self, mut data: &[u8], line: &mut impl FnMut(&str)) {
        while self.pending.len() + data.len() >= MAX_LINE {
            let (piece, rest) = data.split_at(MAX_LINE - self.pending.len());
            self.pending.extend_from_slice(piece);
            Self::emit(&mut self.pending, line);
            data = rest;
        }
        self.pending.extend_from_slice(data);
    }

    fn emit(pending: &mut Vec<u8>, line: &mut impl FnMut(&str)) {
        let text = pending.strip_suffix(b"\r").unwrap_or(pending);
        line(&String::from_utf8_lossy(text));
        pending.clear();
    }
}

/// Appends every line read from `reader` (a pod's log stream, a process's
/// output) to `space`'s `kind` log until it ends.
pub async fn pump_lines(
    store: &LogStore,
    space: &str,
    kind: LogKind,
    mut reader: impl tokio::io::AsyncBufRead + Unpin,
) -> std::io::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let mut lines = Lines::default();
    loop {
        let data = reader.fill_buf().await?;
        if data.is_empty() {
            break;
        }
        lines.feed(data, |line| store.append(space, kind, line));
        let n = data.len();
        reader.consume(n);
    }
    lines.finish(|line| store.append(space, kind, line));
    Ok(())
}

/// `GET /api/spaces/{owner}/{name}/logs/{build|run}` over `store`.
/// Who may read a Space's logs, given `(owner, name, request headers)`:
/// `None` for a Space that does not exist, else whether the request may see it
/// (a private Space's logs want its token, as its traffic does).
pub type LogAccess = Arc<dyn Fn(&str, &str, &HeaderMap) -> Option<bool> + Send + Sync>;

#[derive(Clone)]
struct LogsState {
    store: LogStore,
    access: LogAccess,
}

pub fn router(store: LogStore, access: LogAccess) -> Router {
    Router::new().route("/api/spaces/{owner}/{name}/logs/{kind}", get(logs)).with_state(LogsState { store, access })
}

async fn logs(
    State(LogsState { store, access }): State<LogsState>,
    Path((owner, name, kind)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let id = space_id(&owner, &name);
    match access(&owner, &name, &headers) {
        Some(true) => {}
        // The same answer for no Space and a Space without its logs: nothing to see either way.
        None => {
            return (StatusCode::NOT_FOUND, Json(serde_json::json!({"error": format!("no Space {id}")})))
                .into_response();
        }
        Some(false) => {
            return (
                StatusCode::UNAUTHORIZED,
                [(http::header::WWW_AUTHENTICATE, "Bearer")],
                Json(serde_json::json!({"error": format!("{id} is private: send Authorization: Bearer <its token>")})),
            )
                .into_response();
        }
    }
    let kind = match kind.as_str() {
        "build" => LogKind::Build,
        "run" => LogKind::Run,
        other => {
            return (
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({"error": format!("no {other:?} logs: use build or run")})),
            )
                .into_response();
        }
    };
    let Some(sub) = store.subscribe(&id, kind) else {
        return (StatusCode::NOT_FOUND, Json(serde_json::json!({"error": format!("no {kind:?} logs for {id}")})))
            .into_response();
    };
    Sse::new(events(sub)).keep_alive(KeepAlive::default()).into_response()
}

fn event(line: &LogLine) -> Event {
    // Serializing two strings cannot fail; an empty event is the harmless fallback.
    Event::default().data(serde_json::to_string(line).unwrap_or_default())
}

fn events(sub: Subscription) -> impl Stream<Item = Result<Event, Infallible>> {
    let backlog = futures::stream::iter(sub.backlog.into_iter().map(|l| Ok(event(&l))));
    let live = futures::stream::unfold(sub.live, |rx| async move {
        let mut rx = rx?;
        match rx.recv().await {
            Ok(line) => Some((Ok(event(&line)), Some(rx))),
            // A slow reader lost lines; say so in the stream and go on.
            Err(broadcast::error::RecvError::Lagged(n)) => {
                let gap = LogLine {
                    data: format!("[hangar] {n} log lines skipped (reader too slow)"),
                    timestamp: k8s_openapi::jiff::Timestamp::now().to_string(),
                };
                Some((Ok(event(&gap)), Some(rx)))
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    });
    futures::StreamExt::chain(backlog, live)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_keeps_the_last_lines_and_redacts() {
        let s = LogStore::new(3);
        s.start("a/b", LogKind::Build, vec!["hunter2".into(), String::new()]);
        for i in 0..5 {
            s.append("a/b", LogKind::Build, &format!("line {i} hunter2\n"));
        }
        assert_eq!(s.tail("a/b", LogKind::Build, 2), ["line 3 ***", "line 4 ***"]);
        let sub = s.subscribe("a/b", LogKind::Build).expect("log");
        assert_eq!(sub.backlog.len(), 3);
        assert!(sub.live.is_some());
        s.close("a/b", LogKind::Build);
        assert!(s.subscribe("a/b", LogKind::Build).expect("log").live.is_none());
        assert!(s.subscribe("a/b", LogKind::Run).is_none());
        // A new build starts empty, and the old build's writer no longer reaches it.
        let old = s.start("a/b", LogKind::Build, vec![]);
        let new = s.start("a/b", LogKind::Build, vec![]);
        assert!(s.tail("a/b", LogKind::Build, 10).is_empty());
        old.line("stale");
        old.close();
        new.line("fresh");
        assert_eq!(s.tail("a/b", LogKind::Build, 10), ["fresh"]);
        assert!(s.subscribe("a/b", LogKind::Build).expect("log").live.is_some(), "still open");
        new.close();
        assert!(s.subscribe("a/b", LogKind::Build).expect("log").live.is_none());
    }

    #[tokio::test]
    async fn pumped_lines_land_in_the_log() {
        let s = LogStore::new(10);
        let input: &[u8] = b"one\ntwo\r\nthree";
        pump_lines(&s, "a/b", LogKind::Run, input).await.expect("pump");
        assert_eq!(s.tail("a/b", LogKind::Run, 10), ["one", "two", "three"]);
    }

    #[tokio::test]
    async fn live_readers_end_when_the_log_closes() {
        use futures::StreamExt;
        let s = LogStore::new(10);
        s.start("a/b", LogKind::Build, vec![]);
        s.append("a/b", LogKind::Build, "first");
        let stream = events(s.subscribe("a/b", LogKind::Build).expect("log"));
        s.append("a/b", LogKind::Build, "second");
        s.close("a/b", LogKind::Build);
        let all: Vec<_> = stream.collect().await;
        assert_eq!(all.len(), 2);
    }

    #[test]
    fn lines_are_bounded_and_split_anywhere() {
        let mut out = Vec::new();
        let mut lines = Lines::default();
        lines.feed(b"one\r\ntw", |l| out.push(l.to_owned()));
        lines.feed(b"o\n", |l| out.push(l.to_owned()));
        let endless = vec![b'x'; MAX_LINE * 2 + 5];
        lines.feed(&endless, |l| out.push(l.to_owned()));
        lines.finish(|l| out.push(l.to_owned()));
        assert_eq!(&out[..2], ["one", "two"]);
        assert_eq!(out[2..].iter().map(String::len).collect::<Vec<_>>(), [MAX_LINE, MAX_LINE, 5]);
    }
}

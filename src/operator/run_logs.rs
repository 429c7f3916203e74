//! Run logs in cluster mode: the operator follows the app container's log of
//! each Space's current pod into the log store behind
//! `GET /api/spaces/{owner}/{name}/logs/run`.
//!
//! One follower per Space, on its newest pod whose app container has started
//! (a crash-looping one included: its last run's output says why). A
//! rollout's new pod takes over once its container starts; a Space that
//! sleeps or is deleted has no such pod, which stops the follower and ends
//! live readers (the kept lines stay readable). Memory is bounded: the store
//! keeps the last lines of each log, only a summary of each Space pod is
//! held, followers exist only for Spaces with a started pod, and a deleted
//! Space's logs are dropped ([`super::builds::Builds::forget`]).

use std::collections::HashMap;
use std::time::Duration;

use futures::{AsyncBufRead, AsyncBufReadExt, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::LogParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

use super::render::APP_CONTAINER;
use crate::builder::logs::Lines;
use crate::builder::{LogKind, LogStore};
use crate::space::naming::{SPACE_LABEL, space_id};

/// Lines read back when following starts (the store keeps no more anyway).
const TAIL_LINES: i64 = 5000;
/// Pause before following again once a stream ended (a restarted container,
/// an apiserver hiccup); the pod is still the Space's current one.
const RETRY: Duration = Duration::from_secs(2);

/// `(namespace, Space name)`.
type SpaceKey = (String, String);

/// What the follower needs of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodView {
    name: String,
    uid: String,
    created: Option<Timestamp>,
    /// The app container has run (running now, or terminated at least once).
    started: bool,
    terminating: bool,
    /// `(Secret, key)` of the app's secret env vars: their values are masked.
    secret_refs: Vec<(String, String)>,
}

impl PodView {
    fn of(pod: &Pod) -> Option<(SpaceKey, Self)> {
        let key = (pod.namespace()?, pod.labels().get(SPACE_LABEL)?.clone());
        let status = pod.status.as_ref().and_then(|s| s.container_statuses.as_ref());
        let app = status.and_then(|s| s.iter().find(|c| c.name == APP_CONTAINER));
        let started = app.is_some_and(|c| {
            let state = c.state.as_ref();
            state.is_some_and(|s| s.running.is_some() || s.terminated.is_some())
                || c.last_state.as_ref().is_some_and(|s| s.terminated.is_some())
        });
        let secret_refs = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter().filter(|c| c.name == APP_CONTAINER))
            .flat_map(|c| c.env.iter().flatten())
            .filter_map(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
            .map(|r| (r.name.clone(), r.key.clone()))
            .collect();
        let view = PodView {
            name: pod.name_any(),
            uid: pod.uid().unwrap_or_default(),
            created: pod.creation_timestamp().map(|t| t.0),
            started,
            terminating: pod.metadata.deletion_timestamp.is_some(),
            secret_refs,
        };
        Some((key, view))
    }
}

/// The pod whose log is the Space's run log: the newest started one.
fn current<'a>(pods: impl Iterator<Item = &'a PodView>) -> Option<&'a PodView> {
    pods.filter(|p| p.started && !p.terminating).max_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)))
}

/// Follows the Spaces' pods (all namespaces, or `namespace`) into `store`
/// until the returned task is aborted.
pub fn spawn(client: Client, namespace: Option<String>, store: LogStore) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(client, namespace, store))
}

/// A running follower; aborted when dropped.
struct Follower {
    uid: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(client: Client, namespace: Option<String>, store: LogStore) {
    let pods: Api<Pod> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let events = watcher(pods, watcher::Config::default().labels(SPACE_LABEL)).default_backoff();
    futures::pin_mut!(events);
    let mut known: HashMap<SpaceKey, HashMap<String, PodView>> = HashMap::new();
    let mut relist: HashMap<SpaceKey, HashMap<String, PodView>> = HashMap::new();
    let mut followers: HashMap<SpaceKey, Follower> = HashMap::new();
    while let Some(event) = events.next().await {
        let touched: Vec<SpaceKey> = match event {
            Ok(watcher::Event::Apply(pod)) => match PodView::of(&pod) {
                Some((key, view)) => {
                    known.entry(key.clone()).or_default().insert(view.name.clone(), view);
                    vec![key]
                }
                None => continue,
            },
            Ok(watcher::Event::Delete(pod)) => match PodView::of(&pod) {
                Some((key, view)) => {
                    if let Some(pods) = known.get_mut(&key) {
                        pods.remove(&view.name);
                        if pods.is_empty() {
                            known.remove(&key);
                        }
                    }
                    vec![key]
                }
                None => continue,
            },
            Ok(watcher::Event::Init) => {
                relist.clear();
                continue;
            }
            Ok(watcher::Event::InitApply(pod)) => {
                if let Some((key, view)) = PodView::of(&pod) {
                    relist.entry(key).or_default().insert(view.name.clone(), view);
                }
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                known = std::mem::take(&mut relist);
                known.keys().chain(followers.keys()).cloned().collect()
            }
            Err(e) => {
                tracing::debug!(error = %e, "run logs: pod watch error (retrying)");
                continue;
            }
        };
        for key in touched {
            let pod = known.get(&key).and_then(|pods| current(pods.values()));
            match (pod, followers.get(&key)) {
                (Some(pod), Some(f)) if f.uid == pod.uid => {}
                (Some(pod), _) => {
                    let task = tokio::spawn(follow(client.clone(), key.clone(), pod.clone(), store.clone()));
                    followers.insert(key, Follower { uid: pod.uid.clone(), task });
                }
                (None, Some(_)) => {
                    followers.remove(&key);
                    store.close(&space_id(&key.0, &key.1), LogKind::Run);
                }
                (None, None) => {}
            }
        }
    }
}

/// The values of the app's secret env vars (masked in its run log).
async fn secret_values(client: &Client, namespace: &str, refs: &[(String, String)]) -> Vec<String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut values = Vec::new();
    let mut read: HashMap<&str, Option<Secret>> = HashMap::new();
    for (name, key) in refs {
        if !read.contains_key(name.as_str()) {
            read.insert(name, api.get_opt(name).await.ok().flatten());
        }
        let value = read
            .get(name.as_str())
            .and_then(Option::as_ref)
            .and_then(|s| s.data.as_ref()?.get(key))
            .and_then(|v| String::from_utf8(v.0.clone()).ok());
        values.extend(value);
    }
    values
}

/// `2026-11-26T00:55:01.123456789Z text` (a `timestamps=true` log line).
fn split_timestamp(line: &str) -> (Option<Timestamp>, &str) {
    match line.split_once(' ') {
        Some((ts, rest)) => match ts.parse::<Timestamp>() {
            Ok(ts) => (Some(ts), rest),
            Err(_) => (None, line),
        },
        None => match line.parse::<Timestamp>() {
            Ok(ts) => (Some(ts), ""),
            Err(_) => (None, line),
        },
    }
}

/// Follows `pod`'s app container into the Space's run log (restarted with
/// this pod), again after each end of stream; lines already taken (by their
/// kubelet timestamp) are skipped, so a re-follow repeats nothing.
async fn follow(client: Client, key: SpaceKey, pod: PodView, store: LogStore) {
    let (namespace, name) = &key;
    let redact = secret_values(&client, namespace, &pod.secret_refs).await;
    let log = store.start(&space_id(namespace, name), LogKind::Run, redact);
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let mut last: Option<Timestamp> = None;
    loop {
        let params = LogParams {
            container: Some(APP_CONTAINER.to_owned()),
            follow: true,
            timestamps: true,
            tail_lines: Some(TAIL_LINES),
            // Again: only from the last line taken (a crash-looping app's ended
            // log would otherwise be read whole every time).
            since_time: last,
            ..Default::default()
        };
        match pods.log_stream(&pod.name, &params).await {
            Ok(stream) => {
                // The app's output: bounded lines, whatever it prints.
                let mut stream = std::pin::pin!(stream);
                let mut lines = Lines::default();
                let mut take = |line: &str| {
                    let (ts, text) = split_timestamp(line);
                    if let Some(ts) = ts {
                        if last.is_some_and(|l| ts <= l) {
                            return;
                        }
                        last = Some(ts);
                    }
                    log.line(text);
                };
                while let Ok(data) = stream.as_mut().fill_buf().await {
                    if data.is_empty() {
                        break;
                    }
                    lines.feed(data, &mut take);
                    let n = data.len();
                    stream.as_mut().consume(n);
                }
                lines.finish(&mut take);
            }
            Err(e) => tracing::debug!(space = %key.1, pod = %pod.name, error = %e, "run log not readable yet"),
        }
        tokio::time::sleep(RETRY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(name: &str, created: i64, started: bool, terminating: bool) -> PodView {
        PodView {
            name: name.into(),
            uid: format!("uid-{name}"),
            created: Timestamp::from_second(created).ok(),
            started,
            terminating,
            secret_refs: Vec::new(),
        }
    }

    #[test]
    fn the_newest_started_pod_that_is_not_going_away_is_current() {
        let old = view("a", 10, true, false);
        let new_pending = view("b", 20, false, false);
        assert_eq!(current([&old, &new_pending].into_iter()).map(|p| &p.name[..]), Some("a"), "until b starts");
        let new = view("b", 20, true, false);
        assert_eq!(current([&old, &new].into_iter()).map(|p| &p.name[..]), Some("b"), "a rollout's new pod");
        let leaving = view("b", 20, true, true);
        assert_eq!(current([&old, &leaving].into_iter()).map(|p| &p.name[..]), Some("a"));
        assert_eq!(current([&view("a", 10, true, true)].into_iter()), None, "asleep: no pod to follow");
    }

    #[test]
    fn pods_are_read_for_their_space_state_and_secret_refs() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "app-1", "namespace": "ns", "uid": "u1", "labels": {SPACE_LABEL: "demo"},
                         "creationTimestamp": "2026-11-26T00:00:00Z"},
            "spec": {"containers": [{"name": APP_CONTAINER, "env": [
                {"name": "PLAIN", "value": "x"},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}}
            ]}]},
            "status": {"containerStatuses": [{"name": APP_CONTAINER, "ready": false, "restartCount": 2, "image": "i",
                "imageID": "", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 1}}}]}
        }))
        .expect("pod");
        let (key, v) = PodView::of(&pod).expect("a Space pod");
        assert_eq!(key, ("ns".to_owned(), "demo".to_owned()));
        assert!(v.started, "a crash-looping app has output to show");
        assert!(!v.terminating);
        assert_eq!(v.secret_refs, [("s".to_owned(), "token".to_owned())]);
        let mut waiting = pod.clone();
        waiting.status = None;
        assert!(!PodView::of(&waiting).expect("view").1.started);
    }

    #[test]
    fn kubelet_timestamps_are_split_off() {
        let (ts, text) = split_timestamp("2026-11-26T00:55:01.123456789Z hello world");
        assert_eq!(text, "hello world");
        assert_eq!(ts.map(|t| t.subsec_nanosecond()), Some(123_456_789));
        assert_eq!(split_timestamp("no timestamp here"), (None, "no timestamp here"));
        assert_eq!(split_timestamp("2026-11-26T00:55:01Z").1, "", "an empty line");
    }
}

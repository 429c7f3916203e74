//! Driving a Gradio Space the way its users do: the real `gradio_client` (PyPI, in the test
//! bed's venv) through hangar's proxy, a client that sends without pause, and the hub's
//! webhook delivery for a push.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;

/// What the Python client saw: `/greet`'s answer and `/count`'s values with arrival times.
#[derive(serde::Deserialize, Debug)]
pub struct ClientRun {
    pub greet: String,
    pub stream: Vec<(String, f64)>,
}

/// Runs the real `gradio_client` against `url` (through the proxy), streaming `count` values.
/// Host names ending in `suffix` resolve to `address` (where the proxy listens: the stand-in
/// for the DNS record a real install points at it).
pub async fn gradio_client(url: &str, count: u32, suffix: &str, address: &str) -> ClientRun {
    let python = std::env::var("HANGAR_GRADIO_CLIENT_PYTHON").unwrap_or_else(|_| {
        panic!("the end-to-end tier needs the test bed's gradio_client venv: HANGAR_GRADIO_CLIENT_PYTHON is unset (scripts/testenv install + up)")
    });
    let script = super::repo_root().join("tests/fixtures/clients/gradio_client_check.py");
    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg(&script).arg(url).arg(count.to_string()).arg(format!(".{suffix}")).arg(address);
    // Loopback and the pod network only: no proxies, no telemetry, no hub look-ups.
    for var in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"] {
        cmd.env_remove(var);
    }
    cmd.env("NO_PROXY", "*").env("HF_HUB_OFFLINE", "1").env("GRADIO_ANALYTICS_ENABLED", "False");
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("gradio_client against {url} did not finish in 180 s"))
        .unwrap_or_else(|e| panic!("running {python}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "gradio_client against {url} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("gradio_client printed no result ({e}): {stdout}"))
}

/// Asserts the streamed values are 1..=count and arrived over time, not in one burst.
pub fn assert_streamed(run: &ClientRun, count: u32) {
    let values: Vec<&str> = run.stream.iter().map(|(v, _)| v.as_str()).collect();
    let expected: Vec<String> = (1..=count).map(|i| i.to_string()).collect();
    assert_eq!(values, expected, "the streamed values");
    let times: Vec<f64> = run.stream.iter().map(|(_, t)| *t).collect();
    // The app yields every 0.4 s: consecutive arrivals are spread, not bunched at the end.
    let spread = times[times.len() - 1] - times[0];
    assert!(spread >= 0.3 * f64::from(count - 1), "values arrived in a burst: {times:?}");
    let gaps = times.windows(2).filter(|w| w[1] - w[0] > 0.2).count();
    assert!(gaps >= (count as usize - 1) / 2, "too few separate arrivals: {times:?}");
}

/// One hub webhook delivery (payload version 3) for a push to main.
pub fn push_delivery(namespace: &str, name: &str, old: &str, new: &str) -> serde_json::Value {
    json!({
        "event": {"action": "update", "scope": "repo.content"},
        "repo": {"type": "space", "name": format!("{namespace}/{name}"), "id": "1", "private": false,
                 "subdomain": format!("{namespace}-{name}"), "url": {"web": "w", "api": "a"}, "headSha": new,
                 "owner": {"id": "o"}},
        "updatedRefs": [{"ref": "refs/heads/main", "oldSha": old, "newSha": new}],
        "webhook": {"id": "e2e", "version": 3}
    })
}

/// Sends `GET /config` for the Space served at `host` through the proxy at `proxy_addr`
/// (`127.0.0.1:port`) without pause until `stop`; counts sent requests and returns failures.
pub fn steady_client(
    proxy_addr: &str,
    host: String,
    stop: Arc<AtomicBool>,
) -> (Arc<AtomicU64>, tokio::task::JoinHandle<Vec<String>>) {
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let url = format!("http://{proxy_addr}/config");
    let task = tokio::spawn(async move {
        let http = super::held_client();
        let mut failures = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let outcome = http.get(&url).header("host", &host).timeout(Duration::from_secs(30)).send().await;
            counter.fetch_add(1, Ordering::Relaxed);
            match outcome {
                Ok(r) if r.status().is_success() => {
                    if let Err(e) = r.bytes().await {
                        failures.push(format!("body: {e}"));
                    }
                }
                Ok(r) => failures.push(format!("HTTP {}", r.status())),
                Err(e) => failures.push(format!("error: {e}")),
            }
        }
        failures
    });
    (sent, task)
}

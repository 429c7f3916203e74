//! Cluster + engine tiers together: the operator builds a Space from git with
//! the real Docker engine, pushes to the local registry, and the real node
//! runs it; a new commit rolls out while the old version serves; broken
//! repositories end in a status that says why.

mod support;

use std::time::Duration;

use hangar::space::naming::{self, HEAD_SHA_ANNOTATION};
use hangar::space::{GitSource, Space, SpaceSpec, Stage};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::operator::Operator;
use support::repo::{commit_file, fixture_repo};
use support::space::{stage_of, wait_stage};
use support::{TestNamespace, http_client, http_get, wait_for};

/// CPU Spaces on the real node, which pulls from the test registry.
const MAPPING: &str = "\
requests: {cpu: 10m, memory: 32Mi}
flavors:
  cpu-basic:
    nodeSelector: {hangar.dev/test-node: real}
";

async fn setup(prefix: &str) -> (TestNamespace, Operator) {
    let ns = TestNamespace::new(prefix, &["kubelet", "containerd", "kube-controller-manager"]).await;
    ns.install_crd().await;
    let builder = support::operator::builder_args(&ns.env);
    let args: Vec<&str> = builder.iter().map(String::as_str).collect();
    let operator = Operator::start(&ns, MAPPING, &args);
    (ns, operator)
}

fn source_space(name: &str, repo: &std::path::Path, env: &[(&str, &str)]) -> Space {
    let source =
        GitSource { git: format!("file://{}", repo.display()), revision: "main".into(), credentials_secret: None };
    let mut spec = SpaceSpec { source: Some(source), hardware: "cpu-basic".into(), ..Default::default() };
    spec.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Space::new(name, spec)
}

/// Body of `GET /` from the Space's ready pod of the given image, by pod IP.
async fn answer(ns: &TestNamespace, name: &str, image: &str) -> String {
    answer_at(ns, name, image, "/").await
}

/// Body of `GET {path}` from the Space's ready pod of the given image, by pod IP.
async fn answer_at(ns: &TestNamespace, name: &str, image: &str, path: &str) -> String {
    let pods: Api<Pod> = ns.api();
    let http = http_client();
    wait_for(&format!("{name}'s pod of {image} to answer"), Duration::from_secs(60), || async {
        let list = pods.list(&ListParams::default().labels(&format!("{}={name}", naming::SPACE_LABEL))).await?;
        for pod in list.items {
            let spec_image = pod.spec.as_ref().map(|s| s.containers[0].image.clone().unwrap_or_default());
            let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
            if let (Some(true), Some(ip)) = (spec_image.map(|i| i == image), ip)
                && let Ok((200, body)) = http_get(&http, &format!("http://{ip}:7860{path}")).await
            {
                return Ok(Some(body));
            }
        }
        Ok(None)
    })
    .await
}

#[tokio::test]
async fn a_space_builds_runs_on_the_real_node_and_rolls_out_a_new_commit() {
    let (ns, _operator) = setup("op-build").await;
    let marker = support::unique_name("v1");
    let repo = fixture_repo("docker", &marker);
    let readme = std::fs::read_to_string(repo.path().join("README.md")).expect("README");
    let readme = readme.replacen(
        "app_port: 7860\n",
        "app_port: 7860\nbase_path: /docs\ncustom_headers:\n  cross-origin-opener-policy: same-origin\n",
        1,
    );
    let first = commit_file(repo.path(), "README.md", &readme);
    let spaces: Api<Space> = ns.api();
    let space = source_space("app", repo.path(), &[("BASE_IMAGE", &ns.env.python_image), ("GREETING", "hi")]);
    spaces.create(&PostParams::default(), &space).await.expect("create space");

    let running = wait_stage(&spaces, "app", Stage::Running, Duration::from_secs(300)).await;
    let status = running.status.clone().expect("status");
    let image = status.image.expect("status.image");
    assert!(image.starts_with(&format!("{}/{}/app:", ns.env.registry, ns.name)), "{image}");
    assert!(image.contains("@sha256:"), "the image is pinned by digest: {image}");
    let build = status.build.expect("status.build");
    assert_eq!(build.revision.as_deref(), Some(first.as_str()));
    assert!(build.started_at.is_some() && build.finished_at.is_some() && build.message.is_none());
    // The proxy learns the front matter's custom headers from the Space.
    assert_eq!(
        running.metadata.annotations.as_ref().and_then(|a| a.get("hangar.dev/custom-headers")).map(String::as_str),
        Some(r#"{"cross-origin-opener-policy":"same-origin"}"#)
    );
    // And its base path (the proxy redirects a Space's root there).
    assert_eq!(
        running.metadata.annotations.as_ref().and_then(|a| a.get(naming::BASE_PATH_ANNOTATION)).map(String::as_str),
        Some("/docs")
    );
    let body = answer(&ns, "app", &image).await;
    assert!(body.contains(&marker) && body.contains("hi"), "{body}");

    // A push: the webhook's annotation names the new commit. The old version
    // serves while the new one builds, then the new one takes over.
    let marker2 = support::unique_name("v2");
    let index = std::fs::read_to_string(repo.path().join("index.html")).expect("index");
    let second = commit_file(repo.path(), "index.html", &index.replace(&marker, &marker2));
    let patch = json!({"metadata": {"annotations": {HEAD_SHA_ANNOTATION: second}}});
    spaces.patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("annotate");
    let during = wait_for("RUNNING_BUILDING or the new version", Duration::from_secs(120), || async {
        Ok(stage_of(&spaces, "app").await.map(|(s, _)| s).filter(|s| *s != Stage::Running))
    })
    .await;
    assert!(matches!(during, Stage::RunningBuilding | Stage::RunningAppStarting), "{during:?}");
    let rolled = wait_for("the new commit running", Duration::from_secs(300), || async {
        let Some((stage, space)) = stage_of(&spaces, "app").await else { return Ok(None) };
        let revision = space.status.as_ref().and_then(|s| s.build.as_ref()).and_then(|b| b.revision.clone());
        Ok((stage == Stage::Running && revision.as_deref() == Some(second.as_str())).then_some(space))
    })
    .await;
    let image2 = rolled.status.and_then(|s| s.image).expect("image");
    assert_ne!(image, image2);
    assert!(answer(&ns, "app", &image2).await.contains(&marker2));
}

/// A counter or gauge's value in Prometheus text (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0.0)
}

/// Restarts cost nothing: an operator SIGKILLed and started again (with its
/// builder, then without one) takes up the build its predecessor recorded.
/// A client sending to the pod without pause sees no failure, the pod is the
/// same, the Deployment is not touched and nothing is built again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_operator_takes_up_what_was_built_without_a_restart_or_a_rebuild() {
    let (ns, mut operator) = setup("op-restart").await;
    let marker = support::unique_name("kept");
    let repo = fixture_repo("docker", &marker);
    let spaces: Api<Space> = ns.api();
    let space = source_space("app", repo.path(), &[("BASE_IMAGE", &ns.env.python_image)]);
    spaces.create(&PostParams::default(), &space).await.expect("create space");
    let running = wait_stage(&spaces, "app", Stage::Running, Duration::from_secs(300)).await;
    let image = running.status.and_then(|s| s.image).expect("status.image");
    assert!(answer(&ns, "app", &image).await.contains(&marker));
    let pods: Api<Pod> = ns.api();
    let selector = ListParams::default().labels(&format!("{}=app", naming::SPACE_LABEL));
    let pod = pods.list(&selector).await.expect("pods").items.remove(0);
    let uid = pod.metadata.uid.clone().expect("uid");
    let ip = pod.status.and_then(|s| s.pod_ip).expect("pod IP");
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = ns.api();
    let workload = naming::workload_name("app");
    let generation = deployments.get(&workload).await.expect("deployment").metadata.generation;

    // A client sending without pause, straight to the pod.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let steady = tokio::spawn({
        let (stop, url) = (stop.clone(), format!("http://{ip}:7860/"));
        async move {
            let http = http_client();
            let (mut sent, mut failures) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sent += 1;
                match http_get(&http, &url).await {
                    Ok((200, _)) => {}
                    other => failures.push(format!("{other:?}")),
                }
            }
            (sent, failures)
        }
    });

    let builder = support::operator::builder_args(&ns.env);
    let with_builder: Vec<&str> = builder.iter().map(String::as_str).collect();
    for extra in [with_builder.as_slice(), &[]] {
        operator.kill();
        operator = Operator::start(&ns, MAPPING, extra);
        let url = format!("http://{}/metrics", operator.http);
        // Reconciled: the Spaces-by-stage gauge counts the Space.
        let text = wait_for("the new operator to reconcile the Space", Duration::from_secs(120), || async {
            let (_, text) = http_get(&http_client(), &url).await?;
            let counted = text.lines().any(|l| l.starts_with("hangar_operator_spaces{") && l.ends_with(" 1"));
            Ok(counted.then_some(text))
        })
        .await;
        let builder = if extra.is_empty() { "without a builder" } else { "with a builder" };
        assert_eq!(metric(&text, r#"hangar_operator_spaces{stage="RUNNING"}"#), 1.0, "{builder}: {text}");
        assert_eq!(metric(&text, "hangar_operator_builds_started_total"), 0.0, "{builder}: built again");
        assert_eq!(metric(&text, "hangar_operator_builds_taken_up_total"), 1.0, "{builder}: {text}");
        let (stage, _) = stage_of(&spaces, "app").await.expect("current status");
        assert_eq!(stage, Stage::Running, "{builder}");
        if !extra.is_empty() {
            // Its build log says where the image came from.
            let log = format!("http://{}/api/spaces/{}/app/logs/build", operator.http, ns.name);
            sse_until(&log, Duration::from_secs(30), |l| l.iter().any(|l| l.contains("taken up, nothing to build")))
                .await;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, failures) = steady.await.expect("steady client");
    eprintln!("{sent} requests across two operator restarts, {} failed", failures.len());
    assert!(failures.is_empty(), "{} of {sent} requests failed: {failures:?}", failures.len());
    let now: Vec<Option<String>> =
        pods.list(&selector).await.expect("pods").items.into_iter().map(|p| p.metadata.uid).collect();
    assert_eq!(now, vec![Some(uid)], "the same pod, never restarted");
    let after = deployments.get(&workload).await.expect("deployment").metadata.generation;
    assert_eq!(after, generation, "the Deployment was not touched (no scale-down, no rollout)");
    let status = spaces.get("app").await.expect("space").status.expect("status");
    assert_eq!(status.image, Some(image.clone()));
    assert_eq!(status.built.map(|b| b.image), Some(image));
}

#[tokio::test]
async fn broken_repositories_end_in_a_status_that_says_why() {
    let (ns, _operator) = setup("op-broken").await;
    let spaces: Api<Space> = ns.api();
    let broken = fixture_repo("docker-broken", "x");
    let space = source_space("broken", broken.path(), &[("BASE_IMAGE", &ns.env.python_image)]);
    spaces.create(&PostParams::default(), &space).await.expect("create");

    // A gradio Space whose app file is not in the repository.
    let missing = fixture_repo("docker", "y");
    let readme = "---\ntitle: Missing app\nsdk: gradio\napp_file: missing.py\n---\n";
    commit_file(missing.path(), "README.md", readme);
    spaces.create(&PostParams::default(), &source_space("noapp", missing.path(), &[])).await.expect("create");

    let failed = wait_stage(&spaces, "broken", Stage::BuildError, Duration::from_secs(180)).await;
    let status = failed.status.expect("status");
    let message = status.message.expect("message");
    assert!(message.contains("this step fails on purpose"), "the log tail is in the status: {message}");
    assert_eq!(status.build.and_then(|b| b.message), Some(message));

    let noapp = wait_stage(&spaces, "noapp", Stage::NoAppFile, Duration::from_secs(120)).await;
    let message = noapp.status.clone().and_then(|s| s.message).expect("message");
    assert!(message.contains("missing.py"), "{message}");
    assert!(noapp.annotations().get(HEAD_SHA_ANNOTATION).is_none());
}

/// Issue 18: an operator as the chart runs it (no `--allow-local-git`) refuses
/// a Space whose source is a `file://` URL or a path on its own machine: a
/// CONFIG_ERROR that says which URLs it builds, and nothing is fetched.
#[tokio::test]
async fn local_git_sources_are_refused_unless_the_admin_allows_them() {
    let ns = TestNamespace::new("op-local-git", &["kube-controller-manager"]).await;
    ns.install_crd().await;
    let builder: Vec<String> =
        support::operator::builder_args(&ns.env).into_iter().filter(|a| a != "--allow-local-git").collect();
    let args: Vec<&str> = builder.iter().map(String::as_str).collect();
    let _operator = Operator::start(&ns, MAPPING, &args);
    let spaces: Api<Space> = ns.api();
    let repo = fixture_repo("static", "x");
    spaces.create(&PostParams::default(), &source_space("by-url", repo.path(), &[])).await.expect("create");
    let mut by_path = source_space("by-path", repo.path(), &[]);
    if let Some(source) = by_path.spec.source.as_mut() {
        source.git = repo.path().display().to_string();
    }
    spaces.create(&PostParams::default(), &by_path).await.expect("create");
    for name in ["by-url", "by-path"] {
        let refused = wait_stage(&spaces, name, Stage::ConfigError, Duration::from_secs(120)).await;
        let message = refused.status.clone().and_then(|s| s.message).unwrap_or_default();
        assert!(message.contains("is not a remote repository") && message.contains("https://"), "{name}: {message}");
        assert!(refused.annotations().get(HEAD_SHA_ANNOTATION).is_none(), "{name}: nothing was fetched");
    }
}

/// Reads `url`'s SSE stream until `done` holds for the events' `data` so far;
/// every event must be `data: {"data": ..., "timestamp": ...}`.
async fn sse_until(url: &str, timeout: Duration, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let http = http_client();
    let mut resp = wait_for(&format!("{url} to answer"), Duration::from_secs(60), || async {
        let resp = http.get(url).send().await?;
        Ok((resp.status() == 200).then_some(resp))
    })
    .await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    let mut data = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while !done(&data) {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .unwrap_or_else(|_| panic!("{url}: no matching lines within {timeout:?}: {data:?}"))
            .expect("read the stream")
            .unwrap_or_else(|| panic!("{url}: the stream ended: {data:?}"));
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            for payload in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                let v: serde_json::Value = serde_json::from_str(payload).expect("each event is JSON");
                let ts = v["timestamp"].as_str().expect("timestamp");
                assert!(ts.parse::<k8s_openapi::jiff::Timestamp>().is_ok(), "RFC 3339: {ts}");
                data.push(v["data"].as_str().expect("data").to_owned());
            }
        }
    }
    data
}

#[tokio::test]
async fn build_secrets_stay_out_of_status_events_and_logs_and_run_logs_follow_the_current_pod() {
    let (ns, operator) = setup("op-runlogs").await;
    let secret = format!("s3cr3t-{}", support::unique_name("v"));
    let secrets: Api<Secret> = ns.api();
    let mut data = std::collections::BTreeMap::new();
    data.insert("token".to_owned(), secret.clone());
    let object = Secret {
        metadata: kube::api::ObjectMeta { name: Some("app-secrets".into()), ..Default::default() },
        string_data: Some(data),
        ..Default::default()
    };
    secrets.create(&PostParams::default(), &object).await.expect("create Secret");

    // The docker fixture plus a build step that needs the secret, prints it and keeps its hash.
    let repo = fixture_repo("docker", &support::unique_name("m"));
    let dockerfile = std::fs::read_to_string(repo.path().join("Dockerfile")).expect("Dockerfile");
    let step = "RUN --mount=type=secret,id=API_TOKEN test -s /run/secrets/API_TOKEN \
        && echo \"token: $(cat /run/secrets/API_TOKEN)\" \
        && sha256sum /run/secrets/API_TOKEN | cut -d' ' -f1 > secret.sha256\n";
    commit_file(repo.path(), "Dockerfile", &dockerfile.replacen("USER 1000\n", &format!("{step}USER 1000\n"), 1));
    let mut space = source_space("app", repo.path(), &[("BASE_IMAGE", &ns.env.python_image)]);
    space.spec.secrets = vec![
        serde_json::from_value(json!({"name": "API_TOKEN", "secretKeyRef": {"name": "app-secrets", "key": "token"}}))
            .expect("secret ref"),
    ];
    let spaces: Api<Space> = ns.api();
    spaces.create(&PostParams::default(), &space).await.expect("create space");
    let running = wait_stage(&spaces, "app", Stage::Running, Duration::from_secs(300)).await;
    let image = running.status.clone().and_then(|s| s.image).expect("status.image");
    // Each GET makes the app log a request line (http.server logs to stderr).
    answer(&ns, "app", &image).await;

    // Run logs: the pod's output, as the hub's SSE events, from the operator.
    let base = format!("http://{}/api/spaces/{}/app/logs", operator.http, ns.name);
    let run = sse_until(&format!("{base}/run"), Duration::from_secs(60), |lines| {
        lines.iter().any(|l| l == "listening on 0.0.0.0:7860")
            && lines.iter().any(|l| l.contains("\"GET / HTTP/1.1\" 200"))
    })
    .await;
    assert!(!run.iter().any(|l| l.contains(&secret)), "{run:?}");

    // The build got the secret (the step ran), and it is nowhere to be read.
    let build = sse_until(&format!("{base}/build"), Duration::from_secs(10), |lines| {
        lines.iter().any(|l| l.contains("[hangar] pushed"))
    })
    .await;
    assert!(build.iter().any(|l| l.ends_with("token: ***")), "the printed secret is masked: {build:?}");
    assert!(!build.iter().any(|l| l.contains(&secret)), "secret in the build log");
    let space = spaces.get("app").await.expect("space");
    let status = serde_json::to_string(&space.status).expect("status");
    assert!(!status.contains(&secret), "secret in the status: {status}");
    let events: Api<k8s_openapi::api::events::v1::Event> = ns.api();
    let events =
        serde_json::to_string(&events.list(&ListParams::default()).await.expect("events").items).expect("json");
    assert!(events.contains("app"), "the Space has events: {events}");
    assert!(!events.contains(&secret), "secret in an Event");
    let saved = ns.env.docker().args(["save", &image]).output().expect("docker save");
    assert!(saved.status.success(), "{}", String::from_utf8_lossy(&saved.stderr));
    assert!(!saved.stdout.windows(secret.len()).any(|w| w == secret.as_bytes()), "secret in the pushed image");

    // A rollout: the run log follows the new pod (a fresh log, its own lines only).
    let old_request = support::unique_name("old-pod");
    answer_at(&ns, "app", &image, &format!("/{old_request}")).await;
    sse_until(&format!("{base}/run"), Duration::from_secs(30), |l| l.iter().any(|l| l.contains(&old_request))).await;
    let index = std::fs::read_to_string(repo.path().join("index.html")).expect("index");
    let second = commit_file(repo.path(), "index.html", &format!("{index}<!-- v2 -->\n"));
    let patch = json!({"metadata": {"annotations": {HEAD_SHA_ANNOTATION: second}}});
    spaces.patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("annotate");
    let image2 = wait_for("the new commit running", Duration::from_secs(300), || async {
        let Some((stage, space)) = stage_of(&spaces, "app").await else { return Ok(None) };
        let image = space.status.and_then(|s| s.image).filter(|i| *i != image);
        Ok(image.filter(|_| stage == Stage::Running))
    })
    .await;
    let new_request = support::unique_name("new-pod");
    answer_at(&ns, "app", &image2, &format!("/{new_request}")).await;
    let run =
        sse_until(&format!("{base}/run"), Duration::from_secs(60), |l| l.iter().any(|l| l.contains(&new_request)))
            .await;
    assert!(run.iter().any(|l| l == "listening on 0.0.0.0:7860"), "the new pod's start: {run:?}");
    assert!(!run.iter().any(|l| l.contains(&old_request)), "the old pod's lines are not in the new run log: {run:?}");

    // A deleted Space's logs go: a live reader of its run log sees the stream end.
    let http = http_client();
    let mut reader = http.get(format!("{base}/run")).send().await.expect("GET run");
    spaces.delete("app", &Default::default()).await.expect("delete");
    let ended =
        tokio::time::timeout(Duration::from_secs(60), async { while let Ok(Some(_)) = reader.chunk().await {} }).await;
    assert!(ended.is_ok(), "the run log stream of a deleted Space ends");
}

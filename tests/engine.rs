//! Engine tier: Docker engine + local registry of `scripts/testenv up`.
//! Without that environment every test here fails with the reason.

mod support;

use std::time::Duration;

use support::{Container, LogsOnPanic, TestEnv, body_when_ok, http_client, http_get, run, run_ok, unique_name};

#[tokio::test]
async fn python_image_runs_in_docker_and_round_trips_the_registry() {
    let env = TestEnv::engine();
    let _logs = LogsOnPanic::new(&env, &["dockerd", "registry"]);
    let marker = unique_name("served-by-docker");
    let tag = unique_name("t");
    let local = format!("hangar-test/pyhttp:{tag}");
    support::build_python_app(&env, &local, &marker);

    // Runs as a plain container answering on loopback.
    let c = Container::run(&env, &["-p", "127.0.0.1::7860", &local]);
    let addr = c.published("7860/tcp");
    let body = body_when_ok("the container to answer HTTP", &format!("http://{addr}/"), Duration::from_secs(30)).await;
    assert!(body.contains(&marker), "{body}");

    // Push to the local registry, drop the local copy, pull it back.
    let remote = format!("{}/hangar-test/pyhttp:{tag}", env.registry);
    let id = run_ok(env.docker().args(["image", "inspect", "-f", "{{.Id}}", &local]));
    run_ok(env.docker().args(["tag", &local, &remote]));
    run_ok(env.docker().args(["push", "-q", &remote]));
    let http = http_client();
    let (status, tags) = http_get(&http, &format!("http://{}/v2/hangar-test/pyhttp/tags/list", env.registry))
        .await
        .expect("registry tags list");
    assert_eq!(status, 200, "{tags}");
    assert!(tags.contains(&tag), "{tags}");
    run_ok(env.docker().args(["rmi", &remote]));
    assert!(run(env.docker().args(["image", "inspect", &remote])).is_err(), "{remote} should be gone locally");
    run_ok(env.docker().args(["pull", "-q", &remote]));
    let pulled = run_ok(env.docker().args(["image", "inspect", "-f", "{{.Id}}", &remote]));
    assert_eq!(pulled, id, "the pulled image is the pushed one");
    drop(c);
    let _ = run(env.docker().args(["rmi", &local, &remote]));
}

#[tokio::test]
async fn static_image_serves_a_site() {
    let env = TestEnv::engine();
    let _logs = LogsOnPanic::new(&env, &["dockerd", "registry"]);
    let marker = unique_name("static-site");
    let tag = format!("hangar-test/static:{}", unique_name("t"));
    let dir = tempfile::tempdir().expect("build context");
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!("FROM {}\nCOPY index.html /www/index.html\n", env.static_image),
    )
    .expect("Dockerfile");
    std::fs::write(dir.path().join("index.html"), format!("<p>{marker}</p>\n")).expect("index");
    run_ok(env.docker().args(["build", "-q", "-t", &tag]).arg(dir.path()));
    let c = Container::run(&env, &["-p", "127.0.0.1::8080", &tag]);
    let addr = c.published("8080/tcp");
    let body = body_when_ok("the static site to answer", &format!("http://{addr}/"), Duration::from_secs(20)).await;
    assert!(body.contains(&marker), "{body}");
    drop(c);
    let _ = run(env.docker().args(["rmi", &tag]));
}

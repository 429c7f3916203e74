//! Engine tier: a real app container on the test bed's Docker engine behind
//! the proxy, put to sleep (`docker stop`) and woken by traffic (`docker
//! start`), the way local mode runs Spaces. The test plays local mode's part
//! in the wake handler; the proxy's part is what is under test.

mod proxy_support;
mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hangar::proxy::{MemorySource, SourceError, SpaceRoute};
use hangar::space::Stage;
use proxy_support::{DOMAIN, client, key, proxy, running, url};
use support::{Container, TestEnv, build_python_app, run_ok, unique_name};

/// Polls the app directly until it answers, every 5 ms.
async fn until_answers(addr: SocketAddr, timeout: Duration) -> Result<(), SourceError> {
    let c = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(1))
        .build()
        .map_err(|e| SourceError::Other(e.to_string()))?;
    let deadline = Instant::now() + timeout;
    loop {
        if c.get(format!("http://{addr}/")).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(SourceError::Other(format!("{addr} did not answer within {timeout:?}")));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn published(env: &TestEnv, id: &str) -> SocketAddr {
    let out = run_ok(env.docker().args(["port", id, "7860/tcp"]));
    out.lines()
        .find(|l| l.starts_with("127.0.0.1:"))
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no loopback port for 7860/tcp: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_container_sleeps_and_wakes_once_for_a_hundred_requests() {
    let env = TestEnv::engine();
    let tag = format!("hangar-test/proxy-app:{}", unique_name("t"));
    build_python_app(&env, &tag, "served-through-hangar");
    let container = Container::run(&env, &["-p", "127.0.0.1::7860", &tag]);
    let addr = published(&env, &container.id);
    until_answers(addr, Duration::from_secs(30)).await.expect("the app container answers");

    let source = MemorySource::new(DOMAIN);
    source.upsert(running("local", "app", addr));
    let p = proxy(&source, |_| {}).await;
    let c = client();
    let r = c.get(url(&p, "local", "app", "/")).send().await.expect("request");
    assert_eq!(r.status(), 200);
    assert!(r.text().await.expect("body").contains("served-through-hangar"));

    // Local mode's part: start the container, wait until it answers, publish the endpoint.
    // It records when `docker start` began and when the app first answered.
    let app_times = Arc::new(Mutex::new(None::<(Instant, Instant)>));
    let (weak, id, env2, times2) = (Arc::downgrade(&source), container.id.clone(), env.clone(), Arc::clone(&app_times));
    source.set_wake_handler(Arc::new(move |k| {
        let (weak, id, env, times) = (weak.clone(), id.clone(), env2.clone(), Arc::clone(&times2));
        Box::pin(async move {
            let source = weak.upgrade().ok_or_else(|| SourceError::Other("source gone".into()))?;
            source.update(&k, |r| r.stage = Some(Stage::AppStarting));
            let started = Instant::now();
            let out = tokio::process::Command::from(env.docker()).args(["start", &id]).output().await;
            if !out.as_ref().is_ok_and(|o| o.status.success()) {
                return Err(SourceError::Other(format!("docker start failed: {out:?}")));
            }
            let addr = tokio::task::spawn_blocking(move || published(&env, &id))
                .await
                .map_err(|e| SourceError::Other(e.to_string()))?;
            until_answers(addr, Duration::from_secs(30)).await?;
            *times.lock().unwrap_or_else(|e| e.into_inner()) = Some((started, Instant::now()));
            source.update(&k, |r| {
                r.stage = Some(Stage::Running);
                r.endpoints = vec![addr];
            });
            Ok(())
        })
    }));
    let put_to_sleep = || {
        run_ok(env.docker().args(["stop", "-t", "1", &container.id]));
        source.update(&key("local", "app"), |r: &mut SpaceRoute| {
            r.stage = Some(Stage::Sleeping);
            r.endpoints.clear();
        });
    };

    // 1. Wake overhead: one request's time to first byte minus the container's
    //    own start-to-listening time.
    put_to_sleep();
    let sent = Instant::now();
    let r = c.get(url(&p, "local", "app", "/")).send().await.expect("request");
    let first_byte = Instant::now();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.expect("body").contains("served-through-hangar"));
    let (started, listening) = app_times.lock().unwrap_or_else(|e| e.into_inner()).expect("the wake handler ran");
    let ttfb = first_byte - sent;
    let app_start = listening - started;
    let overhead = ttfb.saturating_sub(app_start);
    eprintln!("wake: time to first byte {ttfb:?}; container start-to-listening {app_start:?}; overhead {overhead:?}");
    assert!(overhead < Duration::from_millis(100), "wake overhead {overhead:?} (target < 100 ms)");
    assert_eq!(source.wakes(&key("local", "app")), 1);

    // 2. A hundred concurrent requests to the sleeping Space: all served, one more wake.
    put_to_sleep();
    let requests: Vec<_> = (0..100)
        .map(|_| {
            let (c, u) = (c.clone(), url(&p, "local", "app", "/"));
            tokio::spawn(async move {
                let r = c.get(u).send().await.expect("request");
                (r.status().as_u16(), r.text().await.expect("body"))
            })
        })
        .collect();
    for (i, r) in futures::future::join_all(requests).await.into_iter().enumerate() {
        let (status, body) = r.expect("task");
        assert_eq!(status, 200, "request {i}: {body}");
        assert!(body.contains("served-through-hangar"), "request {i}: {body}");
    }
    assert_eq!(source.wakes(&key("local", "app")), 2, "exactly one wake for the hundred");
    p.shutdown().await.expect("clean shutdown");
    drop(container);
    let _ = env.docker().args(["rmi", "-f", &tag]).output();
}

//! Serving HTTP on sockets anyone may reach.
//!
//! Every hangar listener (the proxy's public and admin ports, the webhook,
//! the operator's logs and metrics API, the node agents' API, local mode's
//! logs API) is bounded the same way here:
//! - a request head must arrive within the header timeout (hyper's own for
//!   HTTP/1.1, which also closes idle keep-alive connections), and so must a
//!   new connection's first request whatever its protocol: hyper has no
//!   timeout for the HTTP/2 preface or the protocol sniffing before it;
//! - a connection with no request in flight (HTTP/2 included) is closed
//!   after the idle timeout;
//! - request heads are at most [`MAX_REQUEST_HEAD`] bytes (431 beyond);
//!   bodies are streamed, or limited where a handler reads them whole.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The largest request head (request line and headers) any listener reads.
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// After an idle connection is told to close (HTTP/2: GOAWAY), how long it may take.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

fn duration(s: &str) -> Result<Duration, String> {
    crate::space::duration::parse(s).map_err(|e| e.to_string())
}

/// Timeouts of a listener's client connections (the same flags on every command).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::Args)]
pub struct Limits {
    /// How long a client may take to send a request head (a new connection:
    /// its first one, whatever the protocol); slower connections are closed.
    #[arg(long, env = "HANGAR_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub header_read_timeout: Duration,
    /// How long a connection may stay open with no request in flight.
    #[arg(long, env = "HANGAR_IDLE_TIMEOUT", default_value = "75s", value_parser = duration)]
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self { header_read_timeout: Duration::from_secs(30), idle_timeout: Duration::from_secs(75) }
    }
}

/// A connection builder (HTTP/1.1 and h2c) with the limits above.
pub fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_REQUEST_HEAD.max(8192));
    builder.http2().timer(TokioTimer::new()).max_header_list_size(u32::try_from(MAX_REQUEST_HEAD).unwrap_or(u32::MAX));
    builder
}

/// A connection's requests in flight, and when that last changed.
struct Activity {
    born: Instant,
    open: AtomicUsize,
    requests: AtomicU64,
    /// Milliseconds after `born`.
    last_change: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            born: Instant::now(),
            open: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            last_change: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_change.store(ms, Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InFlight(Arc::clone(self))
    }

    /// When the connection is due to close if nothing happens; `None` while a request is in flight.
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        if self.open.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let limit =
            if self.requests.load(Ordering::Relaxed) == 0 { limits.header_read_timeout } else { limits.idle_timeout };
        Some(self.born + Duration::from_millis(self.last_change.load(Ordering::Relaxed)) + limit)
    }
}

/// One request in flight: from its head until its response body ends.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request in flight until it ends.
pub struct Tracked<B> {
    body: B,
    in_flight: Option<InFlight>,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Serves one client connection with `handler` until it ends, it stays idle
/// past its limit, or `shutdown` (then open requests finish first).
pub async fn serve_connection<I, H, Fut, B>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    limits: Limits,
    shutdown: &CancellationToken,
    handler: H,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Activity::new();
    let in_flight = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |req| {
        let in_flight = in_flight.begin();
        let response = handler(req);
        async move { Ok::<_, Infallible>(response.await.map(|body| Tracked { body, in_flight: Some(in_flight) })) }
    });
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        // While requests are in flight, look again after an idle period.
        let check_at = activity.deadline(&limits).unwrap_or_else(|| Instant::now() + limits.idle_timeout);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(check_at) => {
                if activity.deadline(&limits).is_some_and(|due| due <= Instant::now()) {
                    tracing::debug!("closing a connection: no request within its timeout");
                    break;
                }
            }
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
    conn.as_mut().graceful_shutdown();
    // Dropping the connection closes it, whatever it was waiting for.
    let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
}

/// Serves `router` on `listener` until `shutdown` completes, then lets open
/// requests finish.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let builder = Arc::new(builder(&limits));
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (builder, router, stop) = (Arc::clone(&builder), router.clone(), stop.clone());
        connections.spawn(async move {
            let handler = move |req: Request<Incoming>| {
                let mut router = router.clone();
                async move {
                    match tower_service::Service::call(&mut router, req).await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    }
                }
            };
            serve_connection(&builder, TokioIo::new(stream), limits, &stop, handler).await;
        });
    }
    drop(listener);
    stop.cancel();
    connections.close();
    connections.wait().await;
    Ok(())
}

//! The HTTP/1.1 fast path: the proxy's own keep-alive loop for plain requests
//! to public, running Spaces, forwarded on raw pooled upstream connections.
//!
//! hyper's server and client dispatch (tasks and channels between the two
//! connections, header maps, timers) cost more CPU per request than the rest
//! of the proxy together (benches/README.md, "Proxy"). This loop parses heads
//! with `httparse`, rewrites them into a buffer and copies bodies as they
//! arrive. Whatever it does not take (HTTP/2, upgrades, chunked or `Expect`
//! requests, anything ambiguous, waking and holding, private Spaces,
//! redirects, the proxy's own pages) it hands to hyper with the bytes read so
//! far replayed, so all of that keeps running on the one tested code path.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::HeaderValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use super::forward::{self, ForwardError, POOL_IDLE_TIMEOUT};
use super::route::{Access, Disposition, Match, Resolution};
use super::server::{self, Worker};
use crate::space::custom_headers;

/// A request head that does not fit goes to hyper (which answers 431).
const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// An upstream response head larger than this is a 502.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Headers per head, as hyper's limit: more is hyper's business (a request) or a 502 (a response).
const MAX_HEADERS: usize = 100;
/// Read size, and the buffers' initial capacity.
const CHUNK: usize = 16 * 1024;
/// Extensions and trailers of a chunked body, in all: bounded like hyper bounds them.
const MAX_CHUNK_METADATA: usize = 16 * 1024;

/// How a client connection left the fast path.
pub enum Served {
    /// Finished: closed by either side, timed out, or shut down.
    Closed,
    /// For hyper, which reads `replay` (a request head and what followed it) first.
    HandOff(TcpStream, Vec<u8>),
}

/// Serves `client` until it closes or sends something for hyper.
pub async fn serve(
    worker: &Worker,
    mut client: TcpStream,
    peer: &forward::Client,
    shutdown: &CancellationToken,
) -> Served {
    let mut conn = Conn { buf: Vec::with_capacity(CHUNK), out: Vec::with_capacity(1024), head: Vec::new() };
    let limits = worker.inner().config.limits;
    // One timer per connection, re-armed per request head: a new connection
    // and a started head get the header timeout, a kept-alive one the idle timeout.
    let timer = tokio::time::sleep(limits.header_read_timeout);
    tokio::pin!(timer);
    let mut served = false;
    loop {
        let mut armed = false;
        let mut taken = loop {
            if !conn.buf.is_empty() {
                match take(worker, &conn.buf, &mut conn.out, peer) {
                    Step::Take(taken) => break taken,
                    Step::HandOff => return Served::HandOff(client, conn.buf),
                    Step::Partial if conn.buf.len() >= MAX_REQUEST_HEAD => {
                        return Served::HandOff(client, conn.buf);
                    }
                    Step::Partial => {}
                }
            }
            let idle = conn.buf.is_empty();
            if !armed {
                let limit = if served && idle { limits.idle_timeout } else { limits.header_read_timeout };
                timer.as_mut().reset(tokio::time::Instant::now() + limit);
                armed = true;
            }
            conn.buf.reserve(CHUNK);
            tokio::select! {
                biased;
                read = client.read_buf(&mut conn.buf) => match read {
                    Ok(0) | Err(_) => return Served::Closed,
                    // The first bytes of a head on a kept-alive connection: the head's own timeout from now.
                    Ok(_) if served && idle => {
                        timer.as_mut().reset(tokio::time::Instant::now() + limits.header_read_timeout);
                    }
                    Ok(_) => {}
                },
                () = &mut timer => return Served::Closed,
                // Between requests only: a request on its way is served.
                () = shutdown.cancelled(), if idle => return Served::Closed,
            }
        };
        // Shutting down: this request is served, with `Connection: close`. (One
        // that starts waiting afterwards sees the cancellation above.)
        taken.close |= shutdown.is_cancelled();
        let keep = forward_one(worker, &mut client, &mut conn, taken, timer.as_mut()).await;
        served = true;
        if !keep {
            let _ = client.shutdown().await;
            return Served::Closed;
        }
    }
}

/// A client connection's buffers, reused for every request.
struct Conn {
    /// Bytes read from the client and not yet forwarded: always starts at a request head.
    buf: Vec<u8>,
    /// The rewritten request head (and its body, when it was read with the head).
    out: Vec<u8>,
    /// The response head for the client.
    head: Vec<u8>,
}

enum Step {
    Partial,
    HandOff,
    Take(Taken),
}

/// A request the fast path forwards; its rewritten head is in `Conn::out`.
struct Taken {
    head_len: usize,
    content_length: u64,
    close: bool,
    is_head: bool,
    replayable: bool,
    m: Match,
    upstream: SocketAddr,
}

/// Parses the head in `buf`; when the fast path takes the request, writes its upstream head into `out`.
fn take(worker: &Worker, buf: &[u8], out: &mut Vec<u8>, client: &forward::Client) -> Step {
    if buf.starts_with(b"PRI ") {
        // HTTP/2 prior knowledge.
        return Step::HandOff;
    }
    let mut headers = uninit_headers();
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Step::Partial,
        Err(_) => return Step::HandOff,
    };
    let Some(facts) = request_facts(&req) else { return Step::HandOff };
    let m = match worker.table().resolve(Some(facts.host), facts.target) {
        Resolution::Space(m) if forwardable(&m) => m,
        _ => return Step::HandOff,
    };
    let inner = worker.inner();
    let endpoints = &m.route.endpoints;
    // Round robin as the hyper path does it.
    let n = if endpoints.len() > 1 { inner.next_endpoint.fetch_add(1, Ordering::Relaxed) } else { 0 };
    let Some(&upstream) = endpoints.get(n % endpoints.len().max(1)) else { return Step::HandOff };
    out.clear();
    let rewrite = Rewrite { upstream_path: &m.upstream_path, client, prefix: &m.prefix };
    write_request_head(out, &req, &facts, &rewrite);
    Step::Take(Taken {
        head_len,
        content_length: facts.content_length,
        close: facts.close,
        is_head: facts.is_head,
        replayable: facts.replayable,
        m,
        upstream,
    })
}

/// Forwards one request and its response. Whether the client connection stays open.
/// `timer` (the connection's) bounds the wait for the response head.
async fn forward_one(
    worker: &Worker,
    client: &mut TcpStream,
    conn: &mut Conn,
    taken: Taken,
    timer: Pin<&mut Sleep>,
) -> bool {
    let start = Instant::now();
    let inner = worker.inner();
    let route = Arc::clone(&taken.m.route);
    let space = worker.space(&route.key);
    // The body: what came with the head goes out with it; the rest is streamed.
    let in_buf = usize::try_from(taken.content_length).unwrap_or(usize::MAX).min(conn.buf.len() - taken.head_len);
    let body_end = taken.head_len + in_buf;
    conn.out.extend_from_slice(&conn.buf[taken.head_len..body_end]);
    conn.buf.drain(..body_end);
    let streamed = taken.content_length - in_buf as u64;
    let _activity = inner.activity.open_entry(Arc::clone(&space.activity));
    let ctx = Exchange {
        is_head: taken.is_head,
        replayable: taken.replayable,
        close: taken.close,
        custom_headers: &route.custom_headers,
        header_timeout: inner.config.header_timeout,
        connect_timeout: inner.config.connect_timeout,
    };
    let pool = worker.h1_pool();
    let exchange = exchange(pool, taken.upstream, client, conn, streamed, &ctx, timer);
    let (mut up, head) = match exchange.await {
        Ok(ok) => ok,
        Err((e, body_pending)) => {
            inner.metrics.upstream_error(&route.key);
            tracing::warn!(space = %route.key, error = %e, "upstream failed");
            let (status, body) = server::upstream_failure(&route.key, &e);
            let close = taken.close || body_pending;
            space.metrics.request(status.as_u16(), start.elapsed().as_secs_f64());
            write_error(&mut conn.head, status, &body, close);
            return client.write_all(&conn.head).await.is_ok() && !close;
        }
    };
    space.metrics.request(head.status, start.elapsed().as_secs_f64());
    match relay_body(client, &mut up, &mut conn.head, head.framing).await {
        Ok(clean) => {
            if clean && head.reusable {
                pool.put(taken.upstream, up);
            }
            !(taken.close || head.body_pending)
        }
        // The upstream died mid-body or the client went away: as hyper does, end the client connection.
        Err(()) => false,
    }
}

/// Room for a head's headers, left uninitialised: httparse fills what it uses.
fn uninit_headers<'b>() -> [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS] {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

/// A pooled raw upstream connection and its read buffer.
pub struct Upstream {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// One worker's idle upstream connections, per endpoint, most recently used last.
#[derive(Default)]
pub struct Pool {
    /// Worker-local: never contended, the lock only makes the pool `Sync`.
    idle: Mutex<HashMap<SocketAddr, Vec<(Upstream, Instant)>>>,
}

impl Pool {
    /// Must be created on the worker's runtime: it sweeps idle connections from there until dropped.
    pub fn new() -> Arc<Self> {
        let pool = Arc::new(Self::default());
        forward::sweep_idle(&pool, Self::sweep);
        pool
    }

    fn checkout(&self, upstream: SocketAddr) -> Option<Upstream> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(&upstream)?;
        let (conn, since) = list.pop()?;
        if since.elapsed() >= POOL_IDLE_TIMEOUT {
            // The most recent is too old: so are the others.
            list.clear();
            return None;
        }
        Some(conn)
    }

    fn put(&self, upstream: SocketAddr, mut conn: Upstream) {
        conn.buf.clear();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.entry(upstream).or_default().push((conn, Instant::now()));
    }

    fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        for list in idle.values_mut() {
            list.retain(|(_, since)| since.elapsed() < POOL_IDLE_TIMEOUT);
        }
        idle.retain(|_, list| !list.is_empty());
    }
}

/// What the response head said, once it has been written for the client.
struct Head {
    status: u16,
    framing: Framing,
    /// The upstream connection may carry another request after this body.
    reusable: bool,
    /// The request body was not all sent (the upstream answered early): the client connection must close.
    body_pending: bool,
}

/// What one exchange needs to know besides the bytes.
struct Exchange<'a> {
    connect_timeout: Duration,
    is_head: bool,
    /// May be sent again when a reused connection closes under it.
    replayable: bool,
    close: bool,
    custom_headers: &'a [(http::HeaderName, HeaderValue)],
    header_timeout: Duration,
}

/// Why an attempt got no response head.
enum Failed {
    /// Closed or reset before a single response byte: a stale pooled connection, if it was one.
    BeforeResponse(String),
    Other(ForwardError),
}

/// Sends the request (head in `conn.out`, then `streamed` body bytes from the
/// client) and reads the final response head, writing it into `conn.head` and
/// relaying any 1xx. A request on a reused connection that was closed under
/// it is sent once more on a new connection when it can be (a safe method, its body all in `conn.out`).
async fn exchange(
    pool: &Pool,
    upstream: SocketAddr,
    client: &mut TcpStream,
    conn: &mut Conn,
    streamed: u64,
    ctx: &Exchange<'_>,
    mut timer: Pin<&mut Sleep>,
) -> Result<(Upstream, Head), (ForwardError, bool)> {
    let attempts = async {
        let mut pooled = pool.checkout(upstream);
        if (streamed > 0 || !ctx.replayable) && pooled.as_mut().is_some_and(|up| !looks_open(up)) {
            // A request that cannot be sent again needs a connection known to be open.
            pooled = None;
        }
        let reused = pooled.is_some();
        let mut up = match pooled {
            Some(up) => up,
            None => fresh(upstream, ctx.connect_timeout).await.map_err(|e| (e, streamed > 0))?,
        };
        match attempt(&mut up, client, conn, streamed, ctx, upstream).await {
            Ok(head) => return Ok((up, head)),
            // Only a safe method: the upstream may have acted on anything else before
            // it closed (the rule of Go's and hyper's clients; nginx's default too).
            Err((Failed::BeforeResponse(_), _)) if reused && streamed == 0 && ctx.replayable => {}
            Err((Failed::BeforeResponse(reason), pending)) => {
                return Err((ForwardError::Upstream { upstream, reason }, pending));
            }
            Err((Failed::Other(e), pending)) => return Err((e, pending)),
        }
        let mut up = fresh(upstream, ctx.connect_timeout).await.map_err(|e| (e, false))?;
        match attempt(&mut up, client, conn, 0, ctx, upstream).await {
            Ok(head) => Ok((up, head)),
            Err((Failed::BeforeResponse(reason), pending)) => {
                Err((ForwardError::Upstream { upstream, reason }, pending))
            }
            Err((Failed::Other(e), pending)) => Err((e, pending)),
        }
    };
    // The connection's timer, not one more per request.
    timer.as_mut().reset(tokio::time::Instant::now() + ctx.header_timeout);
    tokio::select! {
        biased;
        result = attempts => result,
        () = timer => Err((ForwardError::Timeout { upstream, timeout: ctx.header_timeout }, streamed > 0)),
    }
}

/// Whether an idle pooled connection still looks open (no EOF, no stray bytes waiting).
fn looks_open(up: &mut Upstream) -> bool {
    let mut probe = [0u8; 1];
    matches!(up.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

async fn fresh(upstream: SocketAddr, connect_timeout: Duration) -> Result<Upstream, ForwardError> {
    let stream = forward::connect_tcp(upstream, connect_timeout).await?;
    Ok(Upstream { stream, buf: Vec::with_capacity(CHUNK) })
}

/// One try on one connection. The `bool` of an error: request body bytes are still unread from the client.
async fn attempt(
    up: &mut Upstream,
    client: &mut TcpStream,
    conn: &mut Conn,
    streamed: u64,
    ctx: &Exchange<'_>,
    upstream: SocketAddr,
) -> Result<Head, (Failed, bool)> {
    up.buf.clear();
    let stale = |e: std::io::Error| Failed::BeforeResponse(e.to_string());
    if let Err(e) = up.stream.write_all(&conn.out).await {
        return Err((stale(e), streamed > 0));
    }
    let (mut client_read, mut client_write) = client.split();
    let (mut up_read, mut up_write) = up.stream.split();
    let head = read_head(&mut up_read, &mut up.buf, &mut client_write, &mut conn.head, ctx, upstream);
    if streamed == 0 {
        return head.await.map_err(|e| (e, false));
    }
    // Upload while waiting for the head: an app may answer (413, 401...) before reading it all.
    let upload = copy_body(&mut client_read, &mut up_write, streamed, &mut conn.buf);
    tokio::pin!(upload, head);
    tokio::select! {
        biased;
        head = &mut head => {
            // Answered before the body was all sent: the rest of it is never read.
            return head
                .map(|mut h| {
                    h.body_pending = true;
                    h.reusable = false;
                    h
                })
                .map_err(|e| (e, true));
        }
        uploaded = &mut upload => {
            if let Err(reason) = uploaded {
                return Err((Failed::Other(ForwardError::Upstream { upstream, reason }), true));
            }
        }
    }
    head.await.map_err(|e| (e, false))
}

/// Copies exactly `n` request body bytes from the client to the upstream. Errors name the side that failed.
async fn copy_body(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    mut n: u64,
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    buf.clear();
    buf.resize(CHUNK * 4, 0);
    while n > 0 {
        let want = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
        let got = match from.read(&mut buf[..want]).await {
            Ok(0) => return Err("the client closed before sending its whole request body".to_owned()),
            Ok(got) => got,
            Err(e) => return Err(format!("reading the request body: {e}")),
        };
        to.write_all(&buf[..got]).await.map_err(|e| format!("sending the request body: {e}"))?;
        n -= got as u64;
    }
    buf.clear();
    Ok(())
}

/// Reads response heads until a final one, relaying 1xx heads to the client;
/// the final head is left in `head` for the caller to send with the body's start.
async fn read_head(
    from: &mut ReadHalf<'_>,
    buf: &mut Vec<u8>,
    client: &mut WriteHalf<'_>,
    head: &mut Vec<u8>,
    ctx: &Exchange<'_>,
    upstream: SocketAddr,
) -> Result<Head, Failed> {
    let invalid = |reason: String| Failed::Other(ForwardError::Upstream { upstream, reason });
    let mut any_byte = false;
    loop {
        if !buf.is_empty() {
            head.clear();
            match response_head(buf, head, ctx) {
                Ok(Some((parsed, len))) => {
                    buf.drain(..len);
                    if (100..200).contains(&parsed.status) {
                        client.write_all(head).await.map_err(|e| invalid(format!("relaying a 1xx: {e}")))?;
                        continue;
                    }
                    return Ok(parsed);
                }
                Ok(None) if buf.len() >= MAX_RESPONSE_HEAD => {
                    return Err(invalid(format!("response head larger than {MAX_RESPONSE_HEAD} bytes")));
                }
                Ok(None) => {}
                Err(e) => return Err(invalid(format!("invalid response head: {e}"))),
            }
        }
        buf.reserve(CHUNK);
        match from.read_buf(buf).await {
            Ok(0) if !any_byte => {
                return Err(Failed::BeforeResponse("connection closed before message completed".to_owned()));
            }
            Ok(0) => return Err(invalid("connection closed in the middle of the response head".to_owned())),
            Ok(_) => any_byte = true,
            Err(e) if !any_byte => return Err(Failed::BeforeResponse(e.to_string())),
            Err(e) => return Err(invalid(e.to_string())),
        }
    }
}

/// Parses a response head in `buf`; when complete, writes the client's head
/// into `out` and returns what it says and its length.
fn response_head(buf: &[u8], out: &mut Vec<u8>, ctx: &Exchange<'_>) -> Result<Option<(Head, usize)>, String> {
    let mut headers = uninit_headers();
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut res, buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let status = res.code.unwrap_or(0);
    if status == 101 {
        return Err("101 Switching Protocols to a request that did not ask to upgrade".to_owned());
    }
    let facts = response_facts(&res, ctx.is_head)?;
    write_response_head(out, &res, &facts, ctx.custom_headers, ctx.close);
    let head = Head { status, framing: facts.framing, reusable: facts.reusable, body_pending: false };
    Ok(Some((head, len)))
}

/// Sends the response head (in `head`) and body to the client. `Ok(true)`:
/// the body ended where its framing said and nothing followed it, so the
/// upstream connection can be reused.
async fn relay_body(
    client: &mut TcpStream,
    up: &mut Upstream,
    head: &mut Vec<u8>,
    framing: Framing,
) -> Result<bool, ()> {
    let mut body = Body::new(framing);
    // The head leaves with whatever part of the body came with it: one write for small responses.
    let (used, done) = body.frame(&up.buf, head).map_err(|_| ())?;
    let mut clean = used == up.buf.len();
    client.write_all(head).await.map_err(|_| ())?;
    if done {
        return Ok(clean);
    }
    loop {
        up.buf.clear();
        up.buf.reserve(CHUNK);
        let n = up.stream.read_buf(&mut up.buf).await.map_err(|_| ())?;
        if n == 0 {
            if body.framing != Framing::Close {
                return Err(());
            }
            client.write_all(b"0\r\n\r\n").await.map_err(|_| ())?;
            return Ok(false);
        }
        head.clear();
        let (used, done) = body.frame(&up.buf, head).map_err(|_| ())?;
        clean = used == up.buf.len();
        client.write_all(head).await.map_err(|_| ())?;
        if done {
            return Ok(clean);
        }
    }
}

/// A response body in progress.
struct Body {
    framing: Framing,
    /// Bytes still to come, for `Content-Length`.
    remaining: u64,
    chunks: ChunkedState,
}

impl Body {
    fn new(framing: Framing) -> Self {
        let remaining = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        Self { framing, remaining, chunks: ChunkedState::new() }
    }

    /// Appends to `out` what of `data` belongs to the body (re-framed if
    /// close-delimited). Returns how many bytes of `data` were the body's and
    /// whether it ended.
    fn frame(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(usize, bool), ChunkError> {
        match self.framing {
            Framing::None => Ok((0, true)),
            Framing::Length(_) => {
                let n = usize::try_from(self.remaining).unwrap_or(usize::MAX).min(data.len());
                out.extend_from_slice(&data[..n]);
                self.remaining -= n as u64;
                Ok((n, self.remaining == 0))
            }
            Framing::Chunked => {
                let (n, done) = self.chunks.feed(data)?;
                out.extend_from_slice(&data[..n]);
                Ok((n, done))
            }
            Framing::Close => {
                if !data.is_empty() {
                    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                    out.extend_from_slice(data);
                    out.extend_from_slice(b"\r\n");
                }
                Ok((data.len(), false))
            }
        }
    }
}

fn write_error(out: &mut Vec<u8>, status: http::StatusCode, body: &str, close: bool) {
    out.clear();
    let reason = status.canonical_reason().unwrap_or("");
    out.extend_from_slice(format!("HTTP/1.1 {} {reason}\r\n", status.as_u16()).as_bytes());
    out.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\ncache-control: no-store\r\n");
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    push_date(out);
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
}

fn push_date(out: &mut Vec<u8>) {
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    out.extend_from_slice(b"\r\n");
}

// ---- The pure parts: what the fast path takes, and how heads and bodies are rewritten. ----

/// What the fast path needs from a request head it takes.
#[derive(Debug, PartialEq, Eq)]
struct RequestFacts<'b> {
    host: &'b str,
    /// Origin form, checked as `http::uri::PathAndQuery` would.
    target: &'b str,
    content_length: u64,
    /// `Connection: close`: close after the response (and drop a header named `close`).
    close: bool,
    is_head: bool,
    /// A safe method (RFC 9110 9.2.1): sending it twice is harmless.
    replayable: bool,
}

/// The request's facts if the fast path can forward it unchanged in meaning;
/// `None` (hand it to hyper) for anything else, and for anything ambiguous.
fn request_facts<'b>(req: &httparse::Request<'_, 'b>) -> Option<RequestFacts<'b>> {
    if req.version != Some(1) {
        return None;
    }
    let method = req.method?;
    if method == "CONNECT" {
        return None;
    }
    let target = req.path?;
    if !origin_form(target.as_bytes()) {
        return None;
    }
    let (mut host, mut content_length, mut close) = (None, None, false);
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() || h.value.is_empty() || !h.value.iter().all(|&b| (0x21..0x7f).contains(&b)) {
                return None;
            }
            host = std::str::from_utf8(h.value).ok();
        } else if name.eq_ignore_ascii_case("content-length") {
            if content_length.is_some() {
                return None;
            }
            content_length = Some(decimal(h.value)?);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return None;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !(token.is_empty() || token.eq_ignore_ascii_case(b"keep-alive")) {
                    return None;
                }
            }
        }
    }
    Some(RequestFacts {
        host: host?,
        target,
        content_length: content_length.unwrap_or(0),
        close,
        is_head: method == "HEAD",
        replayable: matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE"),
    })
}

/// Only Spaces a request goes straight to: running, public, nothing to redirect.
fn forwardable(m: &Match) -> bool {
    m.redirect.is_none()
        && m.route.access == Access::Public
        && m.route.disposition() == Disposition::Forward
        && !m.route.endpoints.is_empty()
}

/// A `Content-Length` value: digits only, no sign, no list, no overflow.
fn decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// A request target `http::uri::PathAndQuery` accepts as is: `/`, then path
/// bytes, then optionally `?` and query bytes (its tables; no fragment, no non-ASCII).
fn origin_form(target: &[u8]) -> bool {
    const fn path_byte(b: u8) -> bool {
        matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x40..=0x5F | 0x61..=0x7A | 0x7C | 0x7E | b'"' | b'{' | b'}')
    }
    const fn query_byte(b: u8) -> bool {
        matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x3F..=0x7E)
    }
    let Some(rest) = target.strip_prefix(b"/") else { return false };
    let (path, query) = match rest.iter().position(|&b| b == b'?') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    path.iter().all(|&b| path_byte(b)) && query.iter().all(|&b| query_byte(b))
}

/// Headers that describe one hop (forward.rs `HOP_BY_HOP`).
fn hop_by_hop(name: &str) -> bool {
    const NAMES: [&str; 9] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ];
    NAMES.iter().any(|n| n.len() == name.len() && n.eq_ignore_ascii_case(name))
}

/// What a forwarded request's head gets from the proxy.
struct Rewrite<'a> {
    upstream_path: &'a str,
    client: &'a forward::Client,
    /// `X-Forwarded-Prefix` (path routing), or empty.
    prefix: &'a str,
}

/// The upstream request head, as `forward::prepare_request` makes it for a
/// public Space: hop-by-hop headers dropped, `X-Forwarded-*` set, the path
/// rewritten; other headers in their order and spelling.
fn write_request_head(out: &mut Vec<u8>, req: &httparse::Request<'_, '_>, facts: &RequestFacts<'_>, r: &Rewrite<'_>) {
    let method = req.method.unwrap_or("GET");
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(r.upstream_path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // The first X-Forwarded-For, as `HeaderMap::get` finds it; only trusted ones are extended.
    let mut first_for: Option<Option<&[u8]>> = None;
    let trusted = r.client.trusted;
    let (mut kept_proto, mut kept_host, mut kept_real_ip, mut kept_forwarded) = (false, false, false, false);
    for h in req.headers.iter() {
        let name = h.name;
        if hop_by_hop(name) || (facts.close && name.eq_ignore_ascii_case("close")) {
            continue;
        }
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            first_for.get_or_insert(visible(h.value).then_some(h.value));
            continue;
        }
        let keep = if name.eq_ignore_ascii_case("x-forwarded-proto") {
            kept_proto |= trusted;
            trusted
        } else if name.eq_ignore_ascii_case("x-forwarded-host") {
            kept_host |= trusted;
            trusted
        } else if name.eq_ignore_ascii_case("x-forwarded-prefix") {
            trusted && r.prefix.is_empty()
        } else if name.eq_ignore_ascii_case("x-real-ip") {
            kept_real_ip |= trusted;
            trusted
        } else if name.eq_ignore_ascii_case("forwarded") {
            kept_forwarded |= trusted;
            trusted
        } else {
            true
        };
        if keep {
            push_header(out, name.as_bytes(), h.value);
        }
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(Some(prior)) = first_for.filter(|_| trusted) {
        out.extend_from_slice(prior);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(r.client.ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    if !kept_real_ip {
        push_header(out, b"x-real-ip", r.client.ip.as_bytes());
    }
    if !kept_forwarded {
        push_header(out, b"forwarded", r.client.forwarded.as_bytes());
    }
    if !kept_proto {
        out.extend_from_slice(b"x-forwarded-proto: http\r\n");
    }
    if !kept_host {
        push_header(out, b"x-forwarded-host", facts.host.as_bytes());
    }
    if !r.prefix.is_empty() {
        push_header(out, b"x-forwarded-prefix", r.prefix.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// `HeaderValue::to_str` would accept it.
fn visible(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How a response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    /// Relayed as is; its chunk framing tracked to find the end.
    Chunked,
    /// Until the upstream closes: re-framed as chunked for the client.
    Close,
}

#[derive(Debug, PartialEq, Eq)]
struct ResponseFacts<'b> {
    framing: Framing,
    /// The upstream connection may be reused after the body (HTTP/1.1, no `Connection: close`).
    reusable: bool,
    /// The upstream's `Transfer-Encoding`, relayed with a chunked body.
    transfer_encoding: Option<&'b [u8]>,
}

/// Framing and reuse of a response. Anything ambiguous (`Content-Length`
/// with `Transfer-Encoding`, two lengths, a coding that does not end in
/// chunked) is an error: a 502, never a guess.
fn response_facts<'b>(res: &httparse::Response<'_, 'b>, is_head: bool) -> Result<ResponseFacts<'b>, String> {
    let status = res.code.unwrap_or(0);
    let (mut length, mut te, mut close) = (None, None, false);
    for h in res.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = decimal(h.value).ok_or("invalid content-length")?;
            if length.is_some_and(|m| m != n) {
                return Err("conflicting content-length headers".to_owned());
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if te.is_some() {
                return Err("several transfer-encoding headers".to_owned());
            }
            te = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= h.value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    let bodiless = is_head || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = match (te, length) {
        (Some(_), Some(_)) => return Err("both content-length and transfer-encoding".to_owned()),
        (Some(te), None) => {
            let last = te.rsplit(|&b| b == b',').next().map(<[u8]>::trim_ascii).unwrap_or_default();
            if !last.eq_ignore_ascii_case(b"chunked") {
                return Err("a transfer-encoding that does not end in chunked".to_owned());
            }
            Framing::Chunked
        }
        (None, Some(n)) => Framing::Length(n),
        (None, None) => Framing::Close,
    };
    let framing = if bodiless { Framing::None } else { framing };
    let reusable = res.version == Some(1) && !close && framing != Framing::Close;
    Ok(ResponseFacts { framing, reusable, transfer_encoding: te.filter(|_| framing == Framing::Chunked) })
}

/// The client's response head: status line, the upstream's headers minus
/// hop-by-hop ones and those the Space sets itself, the framing, the Space's
/// custom headers, a `Date` if the upstream sent none.
fn write_response_head(
    out: &mut Vec<u8>,
    res: &httparse::Response<'_, '_>,
    facts: &ResponseFacts<'_>,
    custom: &[(http::HeaderName, HeaderValue)],
    close: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    let status = res.code.unwrap_or(0);
    // httparse reads exactly three digits.
    out.extend_from_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]);
    out.push(b' ');
    out.extend_from_slice(res.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // Names the `Connection` header lists are hop-by-hop too.
    let named: Vec<&[u8]> = res
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .collect();
    // Never framing or hop-by-hop, whatever reached the route.
    let custom = || custom.iter().filter(|(name, _)| custom_headers::is_allowed_name(name.as_str()));
    let mut dated = false;
    for h in res.headers.iter() {
        let name = h.name;
        if hop_by_hop(name)
            || named.iter().any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
            || custom().any(|(c, _)| c.as_str().eq_ignore_ascii_case(name))
        {
            continue;
        }
        dated |= name.eq_ignore_ascii_case("date");
        push_header(out, name.as_bytes(), h.value);
    }
    let informational = (100..200).contains(&status);
    match (facts.framing, facts.transfer_encoding) {
        (Framing::Chunked, Some(te)) => push_header(out, b"transfer-encoding", te),
        (Framing::Close, _) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if !informational {
        for (name, value) in custom() {
            push_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
        if !dated {
            push_date(out);
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// Why a chunked body cannot be relayed.
#[derive(Debug, PartialEq, Eq)]
struct ChunkError(&'static str);

/// Where a chunked body's framing stands, byte by byte (RFC 9112 7.1): just
/// enough to find where it ends, strictly (CRLF only, bounded sizes and metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Hex digits of a chunk size (`digits` so far).
    Size {
        digits: u8,
        size: u64,
    },
    /// Spaces after the size.
    SizeSpace {
        size: u64,
    },
    Extension {
        size: u64,
    },
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line, or of the final empty line.
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

#[derive(Debug, Clone, Copy)]
struct ChunkedState {
    at: Chunk,
    /// Extension and trailer bytes so far.
    metadata: usize,
}

impl ChunkedState {
    fn new() -> Self {
        Self { at: Chunk::Size { digits: 0, size: 0 }, metadata: 0 }
    }

    /// Consumes `data` up to the end of the body. Returns the bytes that
    /// belong to the body and whether it ended there.
    fn feed(&mut self, data: &[u8]) -> Result<(usize, bool), ChunkError> {
        let mut i = 0;
        while i < data.len() {
            if let Chunk::Data { left } = self.at {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len() - i);
                i += n;
                let left = left - n as u64;
                self.at = if left == 0 { Chunk::DataCr } else { Chunk::Data { left } };
                continue;
            }
            let b = data[i];
            i += 1;
            self.at = match (self.at, b) {
                (Chunk::Size { digits, size }, b) if b.is_ascii_hexdigit() => {
                    if digits >= 16 {
                        return Err(ChunkError("chunk size too large"));
                    }
                    let d = u64::from(char::from(b).to_digit(16).unwrap_or(0));
                    Chunk::Size { digits: digits + 1, size: size << 4 | d }
                }
                (Chunk::Size { digits: 0, .. }, _) => return Err(ChunkError("chunk size expected")),
                (Chunk::Size { size, .. } | Chunk::SizeSpace { size }, b' ' | b'\t') => Chunk::SizeSpace { size },
                (Chunk::Size { size, .. } | Chunk::SizeSpace { size }, b';') => Chunk::Extension { size },
                (Chunk::Size { size, .. } | Chunk::SizeSpace { size } | Chunk::Extension { size }, b'\r') => {
                    Chunk::SizeLf { size }
                }
                (Chunk::Size { .. } | Chunk::SizeSpace { .. }, _) => return Err(ChunkError("invalid chunk size")),
                (Chunk::Extension { .. }, b'\n') => return Err(ChunkError("bare LF in a chunk extension")),
                (Chunk::Extension { size }, _) => {
                    self.metadata += 1;
                    Chunk::Extension { size }
                }
                (Chunk::SizeLf { size: 0 }, b'\n') => Chunk::TrailerStart,
                (Chunk::SizeLf { size }, b'\n') => Chunk::Data { left: size },
                (Chunk::DataCr, b'\r') => Chunk::DataLf,
                (Chunk::DataLf, b'\n') => Chunk::Size { digits: 0, size: 0 },
                (Chunk::TrailerStart, b'\r') => Chunk::EndLf,
                (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
                (Chunk::TrailerStart | Chunk::Trailer, b'\n') => return Err(ChunkError("bare LF in a trailer")),
                (Chunk::TrailerStart | Chunk::Trailer, _) => {
                    self.metadata += 1;
                    Chunk::Trailer
                }
                (Chunk::TrailerLf, b'\n') => Chunk::TrailerStart,
                (Chunk::EndLf, b'\n') => Chunk::Done,
                _ => return Err(ChunkError("invalid chunk framing")),
            };
            if self.metadata > MAX_CHUNK_METADATA {
                return Err(ChunkError("chunk extensions or trailers too large"));
            }
            if self.at == Chunk::Done {
                return Ok((i, true));
            }
        }
        Ok((i, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts_of(head: &[u8]) -> Option<(usize, bool)> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return None,
        }
        request_facts(&req).map(|f| (usize::try_from(f.content_length).unwrap_or(usize::MAX), f.close))
    }

    #[test]
    fn takes_plain_requests() {
        assert_eq!(facts_of(b"GET /a?b=c HTTP/1.1\r\nHost: x\r\n\r\n"), Some((0, false)));
        assert_eq!(facts_of(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n"), Some((12, false)));
        assert_eq!(facts_of(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Close\r\n\r\n"), Some((0, true)));
    }

    #[test]
    fn hands_off_anything_else_and_anything_ambiguous() {
        for head in [
            // HTTP/1.0, HTTP/2's preface, CONNECT, absolute and asterisk forms.
            &b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            // Smuggling: TE with CL, TE alone, two lengths (even equal), signs and lists.
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +4\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\n",
            // obs-fold (httparse rejects it in requests: never parsed here).
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n",
            // Expect, upgrades, other connection options, Host missing, doubled or odd.
            b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: x-hop\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            // Targets http's URI parser would change or refuse.
            b"GET /a#frag HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a<b HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            assert_eq!(facts_of(head), None, "{}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn origin_form_matches_http() {
        for b in 0x21u8..0x7f {
            for target in [format!("/a{}b", char::from(b)), format!("/a?x{}y", char::from(b))] {
                let ours = origin_form(target.as_bytes());
                let http = http::uri::PathAndQuery::try_from(target.as_str()).is_ok_and(|pq| pq.as_str() == target);
                assert_eq!(ours, http, "{target}");
            }
        }
    }

    fn rewrite(head: &[u8], prefix: &str, trust: bool) -> String {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        assert!(matches!(req.parse(head), Ok(httparse::Status::Complete(_))));
        let facts = request_facts(&req).expect("taken");
        let mut out = Vec::new();
        let nets: Vec<ipnet::IpNet> = if trust { vec!["192.168.0.0/16".parse().expect("cidr")] } else { Vec::new() };
        let client = forward::Client::new(std::net::SocketAddr::from(([192, 168, 1, 9], 50000)), &nets);
        let r = Rewrite { upstream_path: "/queue/join?x=1", client: &client, prefix };
        write_request_head(&mut out, &req, &facts, &r);
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn rewrites_the_head_as_prepare_request_does() {
        let head = b"GET /spaces/a/b/queue/join?x=1 HTTP/1.1\r\nHost: proxy.example.com\r\n\
            Connection: keep-alive, close\r\nKeep-Alive: timeout=5\r\nClose: x\r\nTE: trailers\r\n\
            Authorization: Bearer t\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\n\
            X-Forwarded-Prefix: /evil\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n\
            Accept: text/event-stream\r\n\r\n";
        assert_eq!(
            rewrite(head, "/spaces/a/b", false),
            "GET /queue/join?x=1 HTTP/1.1\r\nHost: proxy.example.com\r\nAuthorization: Bearer t\r\n\
             Accept: text/event-stream\r\nx-forwarded-for: 192.168.1.9\r\nx-real-ip: 192.168.1.9\r\n\
             forwarded: for=192.168.1.9;proto=http\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: proxy.example.com\r\nx-forwarded-prefix: /spaces/a/b\r\n\r\n"
        );
        let head = b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\n\
            X-Forwarded-Proto: https\r\nX-Forwarded-Prefix: /lb\r\nX-Real-IP: 1.2.3.4\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            rewrite(head, "", true),
            "GET /queue/join?x=1 HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Prefix: /lb\r\n\
             X-Real-IP: 1.2.3.4\r\nContent-Length: 0\r\nx-forwarded-for: 1.2.3.4, 192.168.1.9\r\n\
             forwarded: for=192.168.1.9;proto=http\r\nx-forwarded-host: h\r\n\r\n"
        );
    }

    fn response(head: &[u8], is_head: bool) -> Result<(ResponseFacts<'_>, String), String> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut headers);
        match res.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            other => return Err(format!("{other:?}")),
        }
        let facts = response_facts(&res, is_head)?;
        let custom = [
            ("cross-origin-opener-policy".parse().expect("name"), HeaderValue::from_static("same-origin")),
            // Not a header a Space may set: never written, even if it reached the route.
            ("content-length".parse().expect("name"), HeaderValue::from_static("0")),
            ("connection".parse().expect("name"), HeaderValue::from_static("close")),
        ];
        let mut out = Vec::new();
        write_response_head(&mut out, &res, &facts, &custom, false);
        Ok((facts, String::from_utf8(out).expect("utf-8")))
    }

    #[test]
    fn response_framing() {
        let framing = |head: &[u8], is_head| response(head, is_head).map(|(f, _)| (f.framing, f.reusable));
        let date = "Date: Thu, 26 Nov 2026 03:00:00 GMT\r\n";
        let h = |s: &str| format!("{s}{date}\r\n").into_bytes();
        assert_eq!(framing(&h("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"), false), Ok((Framing::Length(5), true)));
        assert_eq!(framing(&h("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"), true), Ok((Framing::None, true)));
        assert_eq!(framing(&h("HTTP/1.1 304 Not Modified\r\n"), false), Ok((Framing::None, true)));
        assert_eq!(
            framing(&h("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"), false),
            Ok((Framing::Chunked, true))
        );
        assert_eq!(framing(&h("HTTP/1.1 200 OK\r\n"), false), Ok((Framing::Close, false)));
        assert_eq!(framing(&h("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n"), false), Ok((Framing::Length(1), false)));
        assert_eq!(
            framing(&h("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n"), false),
            Ok((Framing::Length(1), false))
        );
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n",
        ] {
            assert!(framing(&h(bad), false).is_err(), "{bad}");
        }
    }

    #[test]
    fn response_head_for_the_client() {
        let head = b"HTTP/1.1 200 Fine\r\nConnection: keep-alive, x-hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\n\
            Cross-Origin-Opener-Policy: unsafe-none\r\nDate: Thu, 26 Nov 2026 03:00:00 GMT\r\n\r\n";
        let (_, out) = response(head, false).expect("valid");
        assert_eq!(
            out,
            "HTTP/1.1 200 Fine\r\nDate: Thu, 26 Nov 2026 03:00:00 GMT\r\ntransfer-encoding: chunked\r\n\
             cross-origin-opener-policy: same-origin\r\n\r\n"
        );
        let (_, out) = response(b"HTTP/1.1 204 No Content\r\n\r\n", false).expect("valid");
        assert!(
            out.starts_with("HTTP/1.1 204 No Content\r\ncross-origin-opener-policy: same-origin\r\ndate: "),
            "{out}"
        );
        let (_, out) = response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", false).expect("valid");
        assert!(out.contains("Content-Length: 2\r\n") && !out.contains("content-length: 0"), "{out}");
        assert!(!out.contains("connection: close"), "{out}");
        assert!(!out.contains("transfer-encoding"), "{out}");
    }

    /// Feeds `body` in pieces of `step` bytes; returns where it ended.
    fn chunked_end(body: &[u8], step: usize) -> Result<Option<usize>, ChunkError> {
        let mut state = ChunkedState::new();
        let mut at = 0;
        for piece in body.chunks(step) {
            let (n, done) = state.feed(piece)?;
            at += n;
            if done {
                return Ok(Some(at));
            }
        }
        Ok(None)
    }

    #[test]
    fn chunked_framing_finds_the_end_in_any_split() {
        let body = b"5\r\nhello\r\na;ext=\"x\"\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        for step in 1..body.len() {
            assert_eq!(chunked_end(body, step), Ok(Some(body.len() - 4)), "step {step}");
        }
        assert_eq!(chunked_end(b"0\r\n\r\n", 5), Ok(Some(5)));
        assert_eq!(chunked_end(b"5 \r\nhello\r\n", 64), Ok(None));
    }

    #[test]
    fn bad_chunk_framing_is_an_error() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"-1\r\n",
            b"11111111111111111\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"0\r\nX: 1\n\r\n",
            b"0\r\n\n",
            b"5 x\r\n",
        ] {
            assert!(chunked_end(bad, 64).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let mut huge = b"1;".to_vec();
        huge.resize(MAX_CHUNK_METADATA + 10, b'a');
        assert!(chunked_end(&huge, 64).is_err());
    }

    /// A request head from parts the generators pick, some of them hostile.
    fn head_of(method: &str, target: &str, headers: &[(String, String)]) -> Vec<u8> {
        let mut head = format!("{method} {target} HTTP/1.1\r\n").into_bytes();
        for (name, value) in headers {
            head.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        head
    }

    fn header_name() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::prop_oneof![
            proptest::sample::select(vec![
                "Host",
                "Content-Length",
                "Transfer-Encoding",
                "Connection",
                "Keep-Alive",
                "Upgrade",
                "Expect",
                "X-Forwarded-For",
                "X-Forwarded-Host",
                "X-Forwarded-Proto",
                "X-Forwarded-Prefix",
                "X-Real-IP",
                "Forwarded",
                "TE",
                "Trailer",
                "Close",
                "Authorization",
                "Accept",
            ])
            .prop_map(str::to_owned),
            "[A-Za-z][A-Za-z0-9-]{0,12}",
        ]
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Arbitrary bytes: parsing and rewriting never panic.
        #[test]
        fn request_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(_)) = req.parse(&bytes)
                && let Some(facts) = request_facts(&req)
            {
                let client = forward::Client::new(std::net::SocketAddr::from(([10, 0, 0, 1], 1)), &[]);
                let mut out = Vec::new();
                let r = Rewrite { upstream_path: facts.target, client: &client, prefix: "" };
                write_request_head(&mut out, &req, &facts, &r);
            }
            let mut state = ChunkedState::new();
            let _ = state.feed(&bytes);
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut res = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(_)) = res.parse(&bytes)
                && let Ok(facts) = response_facts(&res, false)
            {
                let mut out = Vec::new();
                write_response_head(&mut out, &res, &facts, &[], false);
            }
        }

        /// Whatever a client sends, a head the fast path takes is rewritten
        /// into one complete, well-framed head: the same method, the proxy's
        /// path, the proxy's own forwarding headers (once each), no hop-by-hop
        /// header, and a body length exactly when the client gave one.
        #[test]
        fn taken_heads_are_rewritten_into_one_clean_head(
            method in proptest::sample::select(vec!["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "CONNECT"]),
            target in "/[ -~]{0,40}",
            headers in proptest::collection::vec((header_name(), "[ -~]{0,24}"), 0..10),
            upstream_path in "/[a-z0-9/?=&]{0,20}",
        ) {
            // A Host first, so that most heads get past the first check.
            let head = head_of(method, &target, &[&[("Host".to_owned(), "a-b.d".to_owned())][..], &headers].concat());
            let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut parsed);
            let Ok(httparse::Status::Complete(_)) = req.parse(&head) else { return Ok(()) };
            let Some(facts) = request_facts(&req) else { return Ok(()) };
            prop_assert!(method != "CONNECT");
            let client = forward::Client::new(std::net::SocketAddr::from(([10, 0, 0, 1], 1)), &[]);
            let mut out = Vec::new();
            let r = Rewrite { upstream_path: &upstream_path, client: &client, prefix: "/spaces/a/b" };
            write_request_head(&mut out, &req, &facts, &r);

            let mut again = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut rewritten = httparse::Request::new(&mut again);
            prop_assert_eq!(rewritten.parse(&out), Ok(httparse::Status::Complete(out.len())));
            prop_assert_eq!(rewritten.method, Some(method));
            prop_assert_eq!(rewritten.path, Some(upstream_path.as_str()));
            let count = |name: &str| rewritten.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).count();
            for own in ["x-forwarded-for", "x-real-ip", "forwarded", "x-forwarded-proto", "x-forwarded-prefix"] {
                prop_assert_eq!(count(own), 1, "{}", own);
            }
            for hop in ["connection", "transfer-encoding", "upgrade", "keep-alive", "te", "trailer", "expect"] {
                prop_assert_eq!(count(hop), 0, "{}", hop);
            }
            let lengths: Vec<&[u8]> = rewritten.headers.iter()
                .filter(|h| h.name.eq_ignore_ascii_case("content-length")).map(|h| h.value).collect();
            prop_assert!(lengths.len() <= 1);
            prop_assert_eq!(lengths.first().and_then(|v| decimal(v)).unwrap_or(0), facts.content_length);
            let forwarded_for = rewritten.headers.iter().find(|h| h.name.eq_ignore_ascii_case("x-forwarded-for"));
            prop_assert_eq!(forwarded_for.map(|h| h.value), Some(&b"10.0.0.1"[..]), "an untrusted client's XFF is replaced");
        }

        /// A chunked body ends at the same byte however it is split.
        #[test]
        fn chunked_framing_does_not_depend_on_reads(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..5),
            step in 1usize..64,
        ) {
            let mut body = Vec::new();
            for c in chunks.iter().filter(|c| !c.is_empty()) {
                body.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                body.extend_from_slice(c);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n\r\nNEXT");
            prop_assert_eq!(chunked_end(&body, step), Ok(Some(body.len() - 4)));
            prop_assert_eq!(chunked_end(&body, body.len()), Ok(Some(body.len() - 4)));
        }
    }

    #[test]
    fn close_delimited_bodies_are_rechunked() {
        let mut body = Body::new(Framing::Close);
        let mut out = Vec::new();
        assert_eq!(body.frame(b"hello", &mut out), Ok((5, false)));
        assert_eq!(out, b"5\r\nhello\r\n");
        let mut body = Body::new(Framing::Length(3));
        out.clear();
        assert_eq!(body.frame(b"abcdef", &mut out), Ok((3, true)));
        assert_eq!(out, b"abc");
    }
}

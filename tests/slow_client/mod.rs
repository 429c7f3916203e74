//! Clients that attack a listener with slowness or size: a slowloris that
//! sends part of a head and stalls, and oversized heads.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Far above any timeout a test configures: only a listener that never
/// closes the connection gets here.
const NEVER: Duration = Duration::from_secs(60);

/// Connects, sends `partial` (a head that never ends) and waits for the
/// listener to close the connection. Returns how long that took and what it
/// answered meanwhile (an error response, or nothing).
pub async fn stall(addr: SocketAddr, partial: &[u8]) -> (Duration, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let start = Instant::now();
    stream.write_all(partial).await.expect("send the partial head");
    let mut answered = Vec::new();
    let closed = tokio::time::timeout(NEVER, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answered.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "{addr} kept a stalled connection open for {NEVER:?} ({:?})",
        String::from_utf8_lossy(partial)
    );
    (start.elapsed(), answered)
}

/// Checks that a stalled head is cut off, and not before `timeout`.
pub async fn assert_cut_off(addr: SocketAddr, partial: &[u8], timeout: Duration) {
    let (after, _) = stall(addr, partial).await;
    assert!(after >= timeout, "{addr} closed after {after:?}, before its {timeout:?} header timeout");
}

/// An idle connection (nothing sent at all) is closed too.
pub async fn assert_idle_closed(addr: SocketAddr, timeout: Duration) {
    assert_cut_off(addr, b"", timeout).await;
}

/// Sends a request whose head is larger than any listener reads; returns the status line.
pub async fn oversized_head(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(80 * 1024));
    // The listener may answer and close before reading it all.
    let _ = stream.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(NEVER, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).lines().next().unwrap_or_default().to_owned()
}

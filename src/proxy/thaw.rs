//! Thawing a frozen Space: the proxy asks the node agent of each of its
//! pods' nodes directly (`POST /thaw`, bearer token), not the apiserver, so
//! the wake path has no watch latency. An agent listens on its node's
//! address at the chart's fixed port: the proxy takes the Node's
//! `InternalIP` (written by the node's kubelet, which no agent can change)
//! and never a URL an agent could set. Looked up once per node, and again
//! after a failure.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};
use serde_json::json;

use super::route::{Frozen, FrozenPod, RouteTable};
use super::source::SourceError;

/// One thaw call may take this long (the agent answers once the cgroup is THAWED).
const THAW_TIMEOUT: Duration = Duration::from_secs(10);

/// The node agents of the cluster, as the proxy reaches them.
pub struct NodeAgents {
    client: Client,
    http: HttpClient<HttpConnector, Full<Bytes>>,
    /// `Bearer <token>`; `None`: no agents are deployed, nothing is ever frozen.
    authorization: Option<String>,
    /// The port every agent listens on, on its node's address.
    port: u16,
    urls: Mutex<HashMap<String, String>>,
}

impl NodeAgents {
    pub fn new(client: Client, token: Option<String>, port: u16) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        Self {
            client,
            http: HttpClient::builder(TokioExecutor::new()).build(connector),
            authorization: token.map(|t| format!("Bearer {t}")),
            port,
            urls: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, node: &str) -> Option<String> {
        self.urls.lock().unwrap_or_else(PoisonError::into_inner).get(node).cloned()
    }

    /// The agent URL of `node`, from the cache or its Node's address; `None`:
    /// the Node has no internal address (so no agent can be reached there).
    async fn url(&self, node: &str, refresh: bool) -> Result<Option<String>, SourceError> {
        if !refresh && let Some(url) = self.cached(node) {
            return Ok(Some(url));
        }
        let nodes: Api<Node> = Api::all(self.client.clone());
        let found = nodes.get(node).await?;
        let url = agent_url(&found, self.port);
        if let Some(url) = &url {
            self.urls.lock().unwrap_or_else(PoisonError::into_inner).insert(node.to_owned(), url.clone());
        }
        Ok(url)
    }

    /// Looks up, ahead of any request, the agents of the nodes frozen Spaces
    /// run on: a thaw then costs one loopback-or-pod-network round trip.
    pub fn prepare(self: &Arc<Self>, table: &RouteTable) {
        if self.authorization.is_none() {
            return;
        }
        let nodes: HashSet<String> = table
            .routes()
            .filter_map(|r| r.frozen.as_ref())
            .flat_map(|f| f.pods.iter().filter_map(|p| p.node.clone()))
            .filter(|node| self.cached(node).is_none())
            .collect();
        for node in nodes {
            let this = Arc::clone(self);
            tokio::spawn(async move {
                if let Err(e) = this.url(&node, false).await {
                    tracing::debug!(%node, error = %e, "cannot read the node's agent URL");
                }
            });
        }
    }

    /// Thaws every pod of a frozen Space; returns once all are THAWED.
    pub async fn thaw(&self, frozen: &Frozen) -> Result<(), SourceError> {
        let Some(authorization) = &self.authorization else {
            // No agents configured: nothing could have frozen the pods.
            return Ok(());
        };
        let calls = frozen.pods.iter().map(|pod| self.thaw_pod(authorization, pod, frozen.decision));
        futures::future::try_join_all(calls).await?;
        Ok(())
    }

    async fn thaw_pod(&self, authorization: &str, pod: &FrozenPod, decision: i64) -> Result<(), SourceError> {
        let Some(node) = &pod.node else {
            return Err(SourceError::Other(format!("pod at {} has no node in its EndpointSlice", pod.addr)));
        };
        let body = json!({"uid": pod.uid, "decision": decision}).to_string();
        let mut last = None;
        // Once from the cache; again with the Node's current URL if that failed.
        for refresh in [false, true] {
            let url = match self.url(node, refresh).await {
                Ok(Some(url)) => url,
                Ok(None) => {
                    return Err(SourceError::Other(format!("node {node} has no InternalIP to reach its agent at")));
                }
                Err(e) => return Err(last.unwrap_or(e)),
            };
            match self.post(&url, authorization, body.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| SourceError::Other("thaw failed".into())))
    }

    async fn post(&self, base: &str, authorization: &str, body: String) -> Result<(), SourceError> {
        let fail = |what: String| SourceError::Other(format!("node agent {base}: {what}"));
        let request = Request::post(format!("{}/thaw", base.trim_end_matches('/')))
            .header(AUTHORIZATION, authorization)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| fail(e.to_string()))?;
        let response = tokio::time::timeout(THAW_TIMEOUT, self.http.request(request))
            .await
            .map_err(|_| fail(format!("no answer within {THAW_TIMEOUT:?}")))?
            .map_err(|e| fail(e.to_string()))?;
        let status = response.status();
        tracing::debug!(agent = base, %status, "thaw answered");
        // Only what an error message needs, however much the other end sends, and not for ever.
        let body = http_body_util::Limited::new(response.into_body(), 16 * 1024).collect();
        let text = match tokio::time::timeout(THAW_TIMEOUT, body).await {
            Ok(Ok(body)) => body.to_bytes(),
            _ => Bytes::new(),
        };
        match status {
            StatusCode::OK => Ok(()),
            // The agent does not know the pod: gone, or not on that node any more.
            StatusCode::NOT_FOUND => Ok(()),
            other => Err(fail(format!("{other}: {}", String::from_utf8_lossy(&text).trim()))),
        }
    }
}

/// `http://<the Node's InternalIP>:<port>`: the address comes from the Node's
/// status (its kubelet's), never from anything an agent writes.
pub fn agent_url(node: &Node, port: u16) -> Option<String> {
    let addresses = node.status.as_ref()?.addresses.as_ref()?;
    let ip: IpAddr = addresses.iter().filter(|a| a.type_ == "InternalIP").find_map(|a| a.address.parse().ok())?;
    Some(format!("http://{}", SocketAddr::new(ip, port)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_agent_is_reached_at_the_nodes_internal_ip_and_the_fixed_port() {
        let node = |addresses: serde_json::Value| -> Node {
            serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "n", "annotations": {"hangar.dev/node-agent": "http://evil.example:1"}},
                "status": {"addresses": addresses}}))
            .expect("node")
        };
        let n = node(json!([{"type": "Hostname", "address": "n"}, {"type": "InternalIP", "address": "10.0.0.7"}]));
        assert_eq!(agent_url(&n, 9450).as_deref(), Some("http://10.0.0.7:9450"), "never the annotation");
        let v6 = node(json!([{"type": "InternalIP", "address": "fd00::7"}]));
        assert_eq!(agent_url(&v6, 9450).as_deref(), Some("http://[fd00::7]:9450"));
        assert_eq!(agent_url(&node(json!([{"type": "ExternalIP", "address": "203.0.113.1"}])), 9450), None);
        assert_eq!(agent_url(&node(json!([])), 9450), None);
    }
}

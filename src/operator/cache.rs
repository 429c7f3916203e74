//! What a reconcile reads, from memory: reflector caches of the Deployments,
//! Services, activity Leases and pods of Spaces, fed by the same watches that
//! trigger reconciles. A reconcile then costs API calls only for what it writes.
//!
//! The caches hold only what the operator reads: managed fields are stripped
//! everywhere, Services are watched as metadata, Deployments lose their pod
//! template (the operator compares its own render by hash) and their status,
//! pods their spec.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use futures::TryStreamExt;
use futures::stream::{BoxStream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use tokio::sync::watch;

use super::applied::Written;
use crate::space::naming::{MANAGED_BY, MANAGED_BY_LABEL, SPACE_LABEL};

/// Kinds as [`Written`] files them.
pub const DEPLOYMENT: &str = "Deployment";
pub const SERVICE: &str = "Service";

type Trigger<K> = BoxStream<'static, Result<K, watcher::Error>>;

/// The read side: what reconciles look up.
#[derive(Clone)]
pub struct Caches {
    deployments: Store<Deployment>,
    services: Store<PartialObjectMeta<Service>>,
    leases: Store<Lease>,
    pods: PodIndex,
    /// What this process applied and the caches may not show yet.
    pub written: Written,
    listed: Listed,
}

/// Which watches have delivered their first full list (one bit each). Not
/// `Store::wait_until_ready`: its future wakes only the last of several
/// concurrent waiters, and every reconcile waits here at start.
#[derive(Clone)]
struct Listed(Arc<watch::Sender<u8>>);

const DEPLOYMENTS_LISTED: u8 = 1;
const SERVICES_LISTED: u8 = 2;
const LEASES_LISTED: u8 = 4;
const PODS_LISTED: u8 = 8;
const ALL_LISTED: u8 = 15;

impl Listed {
    fn hook<K>(&self, bit: u8) -> impl Fn(&watcher::Event<K>) + Send + 'static {
        let listed = self.0.clone();
        move |event| {
            if matches!(event, watcher::Event::InitDone) {
                listed.send_modify(|l| *l |= bit);
            }
        }
    }
}

/// The watch side: streams the controller drives (each one also fills its cache).
pub struct Triggers {
    pub deployments: Trigger<Deployment>,
    pub services: Trigger<PartialObjectMeta<Service>>,
    pub leases: Trigger<Lease>,
    pub pods: Trigger<Pod>,
}

/// Managed fields are the largest part of most objects and nobody here reads them.
pub fn strip_managed_fields<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// Starts the watches of objects the operator makes (or, for Leases and pods,
/// that carry a Space's label), in one namespace or all.
pub fn watches(
    deployments: Api<Deployment>,
    services: Api<PartialObjectMeta<Service>>,
    leases: Api<Lease>,
    pods: Api<Pod>,
) -> (Caches, Triggers) {
    let ours = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let of_a_space = watcher::Config::default().labels(SPACE_LABEL);

    let written = Written::default();
    let listed = Listed(Arc::new(watch::Sender::new(0)));
    let (deployment_store, writer) = reflector::store();
    let seen = written.clone();
    let deployment_trigger = watcher(deployments, ours.clone())
        .default_backoff()
        .modify(|d: &mut Deployment| {
            strip_managed_fields(d);
            // Compared through the rendered hash annotation, never read.
            d.spec.template = Default::default();
            // Nor is its status (readiness is read from the pods).
            d.status = None;
        })
        .reflect(writer)
        .inspect_ok(move |event| forget_written(&seen, DEPLOYMENT, event))
        .inspect_ok(listed.hook(DEPLOYMENTS_LISTED))
        .touched_objects()
        .boxed();

    let (service_store, writer) = reflector::store();
    let seen = written.clone();
    let service_trigger = watcher(services, ours)
        .default_backoff()
        .modify(strip_managed_fields)
        .reflect(writer)
        .inspect_ok(move |event| forget_written(&seen, SERVICE, event))
        .inspect_ok(listed.hook(SERVICES_LISTED))
        .touched_objects()
        .boxed();

    let (lease_store, writer) = reflector::store();
    let lease_trigger = watcher(leases, of_a_space.clone())
        .default_backoff()
        .modify(strip_managed_fields)
        .reflect(writer)
        .inspect_ok(listed.hook(LEASES_LISTED))
        .touched_objects()
        .boxed();

    let index = PodIndex::default();
    let writer = index.clone();
    let pod_trigger = watcher(pods, of_a_space)
        .default_backoff()
        .modify(|p: &mut Pod| {
            strip_managed_fields(p);
            p.spec = None;
        })
        .inspect_ok(move |event| writer.apply(event))
        .inspect_ok(listed.hook(PODS_LISTED))
        .touched_objects()
        .boxed();

    let caches = Caches {
        deployments: deployment_store,
        services: service_store,
        leases: lease_store,
        pods: index,
        written,
        listed,
    };
    let triggers = Triggers {
        deployments: deployment_trigger,
        services: service_trigger,
        leases: lease_trigger,
        pods: pod_trigger,
    };
    (caches, triggers)
}

/// Deletes (and relists, which may hide deletes) end what [`Written`] remembers.
fn forget_written<K: Resource>(written: &Written, kind: &'static str, event: &watcher::Event<K>) {
    match event {
        watcher::Event::Delete(object) => {
            written.deleted(kind, (object.meta().namespace.as_deref().unwrap_or_default(), &object.name_any()))
        }
        watcher::Event::Init => written.relisted(kind),
        _ => {}
    }
}

impl Caches {
    /// Waits until every cache holds its first full list (at start only; at
    /// once afterwards), so a reconcile never takes "not listed yet" for "absent".
    pub async fn ready(&self) -> crate::Result<()> {
        let mut listed = self.listed.0.subscribe();
        listed.wait_for(|l| *l == ALL_LISTED).await.map_err(|_| crate::Error::Invalid("watches ended".into()))?;
        Ok(())
    }

    pub fn deployment(&self, namespace: &str, name: &str) -> Option<Arc<Deployment>> {
        self.deployments.get(&ObjectRef::new(name).within(namespace))
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<Arc<PartialObjectMeta<Service>>> {
        self.services.get(&ObjectRef::new(name).within(namespace))
    }

    pub fn lease(&self, namespace: &str, name: &str) -> Option<Arc<Lease>> {
        self.leases.get(&ObjectRef::new(name).within(namespace))
    }

    /// The pods labelled with the Space's name.
    pub fn pods(&self, namespace: &str, space: &str) -> Vec<Pod> {
        self.pods.of(namespace, space)
    }
}

/// `(namespace, Space name)`.
type SpaceKey = (String, String);
/// Pods by Space, then by pod name.
type PodsBySpace = HashMap<SpaceKey, BTreeMap<String, Arc<Pod>>>;

/// Pods indexed by the Space they belong to (their `hangar.dev/space` label):
/// a reconcile looks up its own pods without scanning every pod of the cluster.
#[derive(Clone, Default)]
pub struct PodIndex {
    inner: Arc<RwLock<IndexState>>,
}

#[derive(Default)]
struct IndexState {
    pods: PodsBySpace,
    /// The relist in progress: swapped in whole at its end.
    relist: Option<PodsBySpace>,
}

fn pod_key(pod: &Pod) -> Option<(SpaceKey, String)> {
    let space = pod.labels().get(SPACE_LABEL)?.clone();
    Some(((pod.namespace()?, space), pod.name_any()))
}

fn insert(map: &mut PodsBySpace, pod: &Pod) {
    if let Some((space, name)) = pod_key(pod) {
        map.entry(space).or_default().insert(name, Arc::new(pod.clone()));
    }
}

impl PodIndex {
    pub fn apply(&self, event: &watcher::Event<Pod>) {
        let Ok(mut state) = self.inner.write() else { return };
        match event {
            // The Space label comes from the Deployment's pod template and does not change.
            watcher::Event::Apply(pod) => insert(&mut state.pods, pod),
            watcher::Event::Delete(pod) => remove(&mut state.pods, pod),
            watcher::Event::Init => state.relist = Some(HashMap::new()),
            watcher::Event::InitApply(pod) => insert(state.relist.get_or_insert_default(), pod),
            watcher::Event::InitDone => state.pods = state.relist.take().unwrap_or_default(),
        }
    }

    pub fn of(&self, namespace: &str, space: &str) -> Vec<Pod> {
        let Ok(state) = self.inner.read() else { return Vec::new() };
        state
            .pods
            .get(&(namespace.to_owned(), space.to_owned()))
            .map(|pods| pods.values().map(|p| Pod::clone(p)).collect())
            .unwrap_or_default()
    }
}

fn remove(map: &mut PodsBySpace, pod: &Pod) {
    let Some((space, name)) = pod_key(pod) else { return };
    if let Some(pods) = map.get_mut(&space) {
        pods.remove(&name);
        if pods.is_empty() {
            map.remove(&space);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, space: &str) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.into());
        pod.metadata.namespace = Some("alice".into());
        pod.metadata.labels = Some(BTreeMap::from([(SPACE_LABEL.to_owned(), space.to_owned())]));
        pod
    }

    fn names(index: &PodIndex, space: &str) -> Vec<String> {
        index.of("alice", space).iter().map(|p| p.name_any()).collect()
    }

    #[test]
    fn pods_are_found_by_their_space_through_relists_and_deletes() {
        use watcher::Event::*;
        let index = PodIndex::default();
        index.apply(&Init);
        index.apply(&InitApply(pod("a-1", "a")));
        index.apply(&InitApply(pod("b-1", "b")));
        assert!(names(&index, "a").is_empty(), "a relist shows only when complete");
        index.apply(&InitDone);
        assert_eq!(names(&index, "a"), ["a-1"]);
        index.apply(&Apply(pod("a-2", "a")));
        assert_eq!(names(&index, "a"), ["a-1", "a-2"]);
        index.apply(&Delete(pod("a-1", "a")));
        assert_eq!(names(&index, "a"), ["a-2"]);
        // A relist replaces everything: pods deleted meanwhile disappear.
        index.apply(&Init);
        index.apply(&InitApply(pod("b-1", "b")));
        index.apply(&InitDone);
        assert!(names(&index, "a").is_empty());
        assert_eq!(names(&index, "b"), ["b-1"]);
        assert!(index.of("bob", "b").is_empty());
    }
}

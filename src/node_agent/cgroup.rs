//! A pod's cgroup: find it, freeze and thaw it, read its memory. Plain file
//! I/O under a cgroup root (`/sys/fs/cgroup`, or a temp dir in tests), for
//! cgroup v1 (`freezer.state`) and v2 (`cgroup.freeze` + `cgroup.events`).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

/// Which cgroup hierarchy the node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// One hierarchy per controller: `<root>/freezer/...`, `<root>/memory/...`.
    V1,
    /// The unified hierarchy: `<root>/...` with `cgroup.freeze`.
    V2,
}

/// The freezer state of a cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezerState {
    Thawed,
    /// v1 only: freezing is under way (some task not stopped yet).
    Freezing,
    Frozen,
}

/// Parses v1 `freezer.state`.
pub fn parse_v1_state(text: &str) -> Option<FreezerState> {
    match text.trim() {
        "THAWED" => Some(FreezerState::Thawed),
        "FREEZING" => Some(FreezerState::Freezing),
        "FROZEN" => Some(FreezerState::Frozen),
        _ => None,
    }
}

/// Parses v2 `cgroup.events` (`populated 1\nfrozen 0\n`): the effective state.
pub fn parse_v2_events(text: &str) -> Option<FreezerState> {
    text.lines().find_map(|line| match line.trim().split_once(' ')? {
        ("frozen", "1") => Some(FreezerState::Frozen),
        ("frozen", "0") => Some(FreezerState::Thawed),
        _ => None,
    })
}

/// Where the kubelet puts a pod's cgroup, relative to a hierarchy's root, in
/// the order to try: cgroupfs driver (`kubepods/<qos>/pod<uid>`, Guaranteed
/// pods directly under `kubepods`), then the systemd driver's slices (uid
/// dashes become underscores).
pub fn pod_candidates(uid: &str) -> Vec<PathBuf> {
    let mut out = Vec::with_capacity(6);
    for qos in ["burstable", "besteffort", ""] {
        let base = Path::new("kubepods");
        out.push(if qos.is_empty() {
            base.join(format!("pod{uid}"))
        } else {
            base.join(qos).join(format!("pod{uid}"))
        });
    }
    let slice_uid = uid.replace('-', "_");
    for qos in ["burstable", "besteffort", ""] {
        let base = Path::new("kubepods.slice");
        out.push(if qos.is_empty() {
            base.join(format!("kubepods-pod{slice_uid}.slice"))
        } else {
            base.join(format!("kubepods-{qos}.slice")).join(format!("kubepods-{qos}-pod{slice_uid}.slice"))
        });
    }
    out
}

/// The cgroup hierarchy of this node.
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
    version: Version,
}

/// One pod's cgroup, found under [`Cgroups`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    /// Relative to the hierarchy's root (and, on v1, to each controller's).
    pub relative: PathBuf,
}

/// How often a freeze or thaw in progress is looked at: the kernel usually
/// settles within a few milliseconds.
const SETTLE_POLL: Duration = Duration::from_millis(1);

impl Cgroups {
    /// Detects the hierarchy under `root`: v2 has `cgroup.controllers` at its
    /// root, v1 a `freezer` controller directory.
    pub fn detect(root: &Path) -> io::Result<Self> {
        let version = if root.join("cgroup.controllers").is_file() {
            Version::V2
        } else if root.join("freezer").is_dir() {
            Version::V1
        } else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: neither a cgroup v2 root nor a v1 root with a freezer controller", root.display()),
            ));
        };
        Ok(Self { root: root.to_owned(), version })
    }

    pub fn version(&self) -> Version {
        self.version
    }

    fn freezer_dir(&self, pod: &PodCgroup) -> PathBuf {
        match self.version {
            Version::V1 => self.root.join("freezer").join(&pod.relative),
            Version::V2 => self.root.join(&pod.relative),
        }
    }

    fn memory_dir(&self, pod: &PodCgroup) -> PathBuf {
        match self.version {
            Version::V1 => self.root.join("memory").join(&pod.relative),
            Version::V2 => self.root.join(&pod.relative),
        }
    }

    /// The pod's cgroup, `None` when the node has none for `uid` (not started, gone).
    pub fn find(&self, uid: &str) -> Option<PodCgroup> {
        pod_candidates(uid)
            .into_iter()
            .map(|relative| PodCgroup { relative })
            .find(|pod| self.freezer_dir(pod).is_dir())
    }

    /// The effective freezer state.
    pub async fn state(&self, pod: &PodCgroup) -> io::Result<FreezerState> {
        let dir = self.freezer_dir(pod);
        let (file, parse): (_, fn(&str) -> Option<FreezerState>) = match self.version {
            Version::V1 => (dir.join("freezer.state"), parse_v1_state),
            Version::V2 => (dir.join("cgroup.events"), parse_v2_events),
        };
        let text = tokio::fs::read_to_string(&file).await?;
        parse(&text).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{}: unexpected content {text:?}", file.display()))
        })
    }

    async fn request(&self, pod: &PodCgroup, frozen: bool) -> io::Result<()> {
        let dir = self.freezer_dir(pod);
        match self.version {
            Version::V1 => tokio::fs::write(dir.join("freezer.state"), if frozen { "FROZEN" } else { "THAWED" }).await,
            Version::V2 => tokio::fs::write(dir.join("cgroup.freeze"), if frozen { "1" } else { "0" }).await,
        }
    }

    /// Freezes every process of the pod and returns once the kernel reports
    /// the cgroup `Frozen` (at most `timeout`).
    pub async fn freeze(&self, pod: &PodCgroup, timeout: Duration) -> io::Result<()> {
        self.settle(pod, true, timeout).await
    }

    /// Thaws the pod and returns once the cgroup reports `Thawed`.
    pub async fn thaw(&self, pod: &PodCgroup, timeout: Duration) -> io::Result<()> {
        self.settle(pod, false, timeout).await
    }

    async fn settle(&self, pod: &PodCgroup, frozen: bool, timeout: Duration) -> io::Result<()> {
        let want = if frozen { FreezerState::Frozen } else { FreezerState::Thawed };
        let deadline = Instant::now() + timeout;
        self.request(pod, frozen).await?;
        loop {
            let state = self.state(pod).await?;
            if state == want {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{}: still {state:?} after {timeout:?}", self.freezer_dir(pod).display()),
                ));
            }
            // v1 may stay FREEZING while a task is in an uninterruptible
            // sleep: asking again is how the freezer is told to retry.
            if frozen && state == FreezerState::Freezing {
                self.request(pod, true).await?;
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }

    /// Memory the pod's cgroup is charged for, in bytes.
    pub async fn memory_bytes(&self, pod: &PodCgroup) -> io::Result<u64> {
        let file = match self.version {
            Version::V1 => self.memory_dir(pod).join("memory.usage_in_bytes"),
            Version::V2 => self.memory_dir(pod).join("memory.current"),
        };
        let text = tokio::fs::read_to_string(&file).await?;
        text.trim().parse().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", file.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b1c2d3e-aaaa-bbbb-cccc-123456789abc";

    #[test]
    fn parses_states() {
        assert_eq!(parse_v1_state("FROZEN\n"), Some(FreezerState::Frozen));
        assert_eq!(parse_v1_state("FREEZING\n"), Some(FreezerState::Freezing));
        assert_eq!(parse_v1_state("THAWED\n"), Some(FreezerState::Thawed));
        assert_eq!(parse_v1_state("frozen"), None);
        assert_eq!(parse_v2_events("populated 1\nfrozen 1\n"), Some(FreezerState::Frozen));
        assert_eq!(parse_v2_events("populated 1\nfrozen 0\n"), Some(FreezerState::Thawed));
        assert_eq!(parse_v2_events("populated 1\n"), None);
    }

    #[test]
    fn candidate_paths_cover_both_drivers_and_every_qos() {
        let c = pod_candidates(UID);
        assert_eq!(c[0], Path::new("kubepods/burstable/pod0b1c2d3e-aaaa-bbbb-cccc-123456789abc"));
        assert_eq!(c[1], Path::new("kubepods/besteffort/pod0b1c2d3e-aaaa-bbbb-cccc-123456789abc"));
        assert_eq!(c[2], Path::new("kubepods/pod0b1c2d3e-aaaa-bbbb-cccc-123456789abc"));
        assert_eq!(
            c[3],
            Path::new(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b1c2d3e_aaaa_bbbb_cccc_123456789abc.slice"
            )
        );
        assert_eq!(c[5], Path::new("kubepods.slice/kubepods-pod0b1c2d3e_aaaa_bbbb_cccc_123456789abc.slice"));
    }

    #[tokio::test]
    async fn v1_freeze_thaw_and_memory_on_a_fake_hierarchy() {
        let root = tempfile::tempdir().expect("temp dir");
        let rel = Path::new("kubepods/besteffort").join(format!("pod{UID}"));
        let freezer = root.path().join("freezer").join(&rel);
        let memory = root.path().join("memory").join(&rel);
        std::fs::create_dir_all(&freezer).expect("freezer dir");
        std::fs::create_dir_all(&memory).expect("memory dir");
        std::fs::write(freezer.join("freezer.state"), "THAWED\n").expect("state");
        std::fs::write(memory.join("memory.usage_in_bytes"), "11534336\n").expect("usage");
        let cg = Cgroups::detect(root.path()).expect("v1 root");
        assert_eq!(cg.version(), Version::V1);
        assert_eq!(cg.find("someone-else"), None);
        let pod = cg.find(UID).expect("pod cgroup");
        assert_eq!(pod.relative, rel);
        assert_eq!(cg.state(&pod).await.expect("state"), FreezerState::Thawed);
        // A plain file takes the write as the kernel would settle it.
        cg.freeze(&pod, Duration::from_secs(1)).await.expect("freeze");
        assert_eq!(std::fs::read_to_string(freezer.join("freezer.state")).expect("state"), "FROZEN");
        assert_eq!(cg.memory_bytes(&pod).await.expect("memory"), 11_534_336);
        cg.thaw(&pod, Duration::from_secs(1)).await.expect("thaw");
        assert_eq!(cg.state(&pod).await.expect("state"), FreezerState::Thawed);
    }

    #[tokio::test]
    async fn v2_reads_the_effective_state_from_events() {
        let root = tempfile::tempdir().expect("temp dir");
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory\n").expect("controllers");
        let slice_uid = UID.replace('-', "_");
        let dir = root.path().join(format!("kubepods.slice/kubepods-pod{slice_uid}.slice"));
        std::fs::create_dir_all(&dir).expect("pod dir");
        std::fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").expect("events");
        std::fs::write(dir.join("memory.current"), "4096\n").expect("memory");
        let cg = Cgroups::detect(root.path()).expect("v2 root");
        assert_eq!(cg.version(), Version::V2);
        let pod = cg.find(UID).expect("pod cgroup");
        assert_eq!(cg.state(&pod).await.expect("state"), FreezerState::Thawed);
        assert_eq!(cg.memory_bytes(&pod).await.expect("memory"), 4096);
        // The kernel never flips `cgroup.events` in a temp dir: the freeze times out, having asked.
        let err = cg.freeze(&pod, Duration::from_millis(20)).await.expect_err("no kernel here");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(std::fs::read_to_string(dir.join("cgroup.freeze")).expect("freeze"), "1");
        assert!(Cgroups::detect(&root.path().join("nothing")).is_err());
    }
}

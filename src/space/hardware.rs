//! The hardware catalog: the flavors of SPACES.md as data. How a flavor is
//! placed on a cluster (node selectors, tolerations, resource names) is
//! configuration and lives with the operator, not here.

use std::fmt;
use std::time::Duration;

/// A GPU attached to a flavor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gpu {
    pub count: u32,
    /// Short accelerator name, as Spaces expose it in `ACCELERATOR` (e.g. `t4`).
    pub accelerator: &'static str,
    /// Marketing model name, for humans.
    pub model: &'static str,
    /// Memory of one GPU, in GB.
    pub memory_gb: u32,
}

/// One hardware flavor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flavor {
    pub name: &'static str,
    pub vcpu: u32,
    /// Memory in GB, as the catalog states it (rendered as `Gi` for Kubernetes).
    pub memory_gb: u32,
    pub gpu: Option<Gpu>,
    /// Sleep time when a Space does not set one: the free tier sleeps after
    /// 48 h, paid hardware never sleeps by default (as on the hub).
    pub default_sleep_after: Option<Duration>,
}

impl Flavor {
    /// Kubernetes quantity for the memory limit, e.g. `16Gi`.
    pub fn memory_quantity(&self) -> String {
        format!("{}Gi", self.memory_gb)
    }

    /// Value of the `ACCELERATOR` variable inside the Space (`none` on CPU flavors).
    pub fn accelerator(&self) -> &'static str {
        self.gpu.map_or("none", |g| g.accelerator)
    }

    pub fn gpu_count(&self) -> u32 {
        self.gpu.map_or(0, |g| g.count)
    }
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// The flavor used when a Space names none.
pub const DEFAULT_FLAVOR: &str = "cpu-basic";

const FREE_TIER_SLEEP: Option<Duration> = Some(Duration::from_secs(48 * 3600));

const fn gpu(count: u32, accelerator: &'static str, model: &'static str, memory_gb: u32) -> Option<Gpu> {
    Some(Gpu { count, accelerator, model, memory_gb })
}

const fn flavor(name: &'static str, vcpu: u32, memory_gb: u32, gpu: Option<Gpu>) -> Flavor {
    Flavor { name, vcpu, memory_gb, gpu, default_sleep_after: None }
}

/// Every flavor of SPACES.md, in the order the hub lists them.
pub const CATALOG: &[Flavor] = &[
    Flavor { default_sleep_after: FREE_TIER_SLEEP, ..flavor("cpu-basic", 2, 16, None) },
    flavor("cpu-upgrade", 8, 32, None),
    flavor("t4-small", 4, 15, gpu(1, "t4", "NVIDIA T4", 16)),
    flavor("t4-medium", 8, 30, gpu(1, "t4", "NVIDIA T4", 16)),
    flavor("l4x1", 8, 30, gpu(1, "l4", "NVIDIA L4", 24)),
    flavor("l4x4", 48, 186, gpu(4, "l4", "NVIDIA L4", 24)),
    flavor("l40sx1", 8, 62, gpu(1, "l40s", "NVIDIA L40S", 48)),
    flavor("l40sx4", 48, 382, gpu(4, "l40s", "NVIDIA L40S", 48)),
    flavor("l40sx8", 192, 1534, gpu(8, "l40s", "NVIDIA L40S", 48)),
    flavor("a10g-small", 4, 15, gpu(1, "a10g", "NVIDIA A10G", 24)),
    flavor("a10g-large", 12, 46, gpu(1, "a10g", "NVIDIA A10G", 24)),
    flavor("a10g-largex2", 24, 92, gpu(2, "a10g", "NVIDIA A10G", 24)),
    flavor("a10g-largex4", 48, 184, gpu(4, "a10g", "NVIDIA A10G", 24)),
    flavor("a100-large", 12, 142, gpu(1, "a100", "NVIDIA A100", 80)),
    flavor("a100x4", 48, 568, gpu(4, "a100", "NVIDIA A100", 80)),
    flavor("a100x8", 96, 1136, gpu(8, "a100", "NVIDIA A100", 80)),
];

/// A flavor name that is not in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown hardware flavor {name:?} (known: {known})")]
pub struct UnknownFlavor {
    pub name: String,
    pub known: String,
}

/// Looks a flavor up by name; unknown names are an error that lists the known ones.
pub fn lookup(name: &str) -> Result<&'static Flavor, UnknownFlavor> {
    CATALOG.iter().find(|f| f.name == name).ok_or_else(|| UnknownFlavor {
        name: name.to_owned(),
        known: CATALOG.iter().map(|f| f.name).collect::<Vec<_>>().join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flavor_of_spaces_md_is_known() {
        for name in [
            "cpu-basic",
            "cpu-upgrade",
            "t4-small",
            "t4-medium",
            "l4x1",
            "l4x4",
            "l40sx1",
            "l40sx4",
            "l40sx8",
            "a10g-small",
            "a10g-large",
            "a10g-largex2",
            "a10g-largex4",
            "a100-large",
            "a100x4",
            "a100x8",
        ] {
            assert_eq!(lookup(name).map(|f| f.name), Ok(name));
        }
        assert_eq!(CATALOG.len(), 16);
    }

    #[test]
    fn flavor_facts() {
        let t4 = lookup("t4-small").expect("t4-small is in the catalog");
        assert_eq!((t4.vcpu, t4.memory_quantity(), t4.gpu_count(), t4.accelerator()), (4, "15Gi".into(), 1, "t4"));
        let a100x8 = lookup("a100x8").expect("a100x8 is in the catalog");
        assert_eq!((a100x8.vcpu, a100x8.memory_gb, a100x8.gpu_count()), (96, 1136, 8));
        let cpu = lookup(DEFAULT_FLAVOR).expect("default flavor is in the catalog");
        assert_eq!(cpu.accelerator(), "none");
        assert_eq!(cpu.default_sleep_after, Some(Duration::from_secs(172_800)));
        assert_eq!(lookup("cpu-upgrade").map(|f| f.default_sleep_after), Ok(None));
    }

    #[test]
    fn unknown_flavor_is_rejected_with_the_known_list() {
        let err = lookup("h100x1").expect_err("h100x1 is not a flavor");
        assert_eq!(err.name, "h100x1");
        assert!(
            err.to_string().starts_with("unknown hardware flavor \"h100x1\" (known: cpu-basic, cpu-upgrade, t4-small")
        );
    }
}

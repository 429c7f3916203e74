//! How hardware flavors land on a cluster: node selectors, tolerations, the
//! GPU resource name, runtime class. Configuration (a YAML file or the Helm
//! chart's ConfigMap), with defaults that follow NVIDIA GPU feature discovery.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use serde::Deserialize;

use crate::space::hardware::{CATALOG, Flavor};

pub const NVIDIA_GPU_RESOURCE: &str = "nvidia.com/gpu";
/// GPU feature discovery's product label.
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";

/// Where and how a flavor runs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Placement {
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    /// Extended resource that counts this flavor's GPUs.
    #[serde(default = "default_gpu_resource")]
    pub gpu_resource: String,
    #[serde(default)]
    pub runtime_class_name: Option<String>,
    /// Requests, when they should be lower than the flavor's limits
    /// (overcommitted CPU pools, test clusters). Absent: requests = limits.
    #[serde(default)]
    pub requests: Option<Requests>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requests {
    pub cpu: String,
    pub memory: String,
}

fn default_gpu_resource() -> String {
    NVIDIA_GPU_RESOURCE.to_owned()
}

/// The `nvidia.com/gpu.product` value GPU feature discovery reports for an accelerator.
fn gpu_product(accelerator: &str) -> &'static str {
    match accelerator {
        "t4" => "Tesla-T4",
        "a10g" => "NVIDIA-A10G",
        "a100" => "NVIDIA-A100-SXM4-80GB",
        "l4" => "NVIDIA-L4",
        "l40s" => "NVIDIA-L40S",
        _ => "unknown",
    }
}

/// The default placement: CPU flavors anywhere; GPU flavors on nodes of the
/// right product, tolerating the usual `nvidia.com/gpu` taint.
pub fn default_placement(flavor: &Flavor) -> Placement {
    let mut placement = Placement {
        node_selector: BTreeMap::new(),
        tolerations: Vec::new(),
        gpu_resource: default_gpu_resource(),
        runtime_class_name: None,
        requests: None,
    };
    if let Some(gpu) = flavor.gpu {
        placement.node_selector.insert(GPU_PRODUCT_LABEL.to_owned(), gpu_product(gpu.accelerator).to_owned());
        placement.tolerations.push(Toleration {
            key: Some(NVIDIA_GPU_RESOURCE.to_owned()),
            operator: Some("Exists".to_owned()),
            effect: Some("NoSchedule".to_owned()),
            ..Default::default()
        });
    }
    placement
}

/// Flavor name -> placement. A flavor named in the file replaces its default whole.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareMapping {
    /// Requests for every flavor that sets none of its own (overcommit).
    #[serde(default)]
    pub requests: Option<Requests>,
    #[serde(default)]
    pub flavors: BTreeMap<String, Placement>,
}

#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("hardware mapping: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
    #[error("hardware mapping names flavor {0:?}, which is not in the catalog")]
    UnknownFlavor(String),
}

impl HardwareMapping {
    pub fn from_yaml(text: &str) -> Result<Self, MappingError> {
        let mapping: Self = serde_yaml_ng::from_str(text)?;
        if let Some(unknown) = mapping.flavors.keys().find(|name| !CATALOG.iter().any(|f| f.name == *name)) {
            return Err(MappingError::UnknownFlavor(unknown.clone()));
        }
        Ok(mapping)
    }

    pub fn placement(&self, flavor: &Flavor) -> Placement {
        let mut placement = self.flavors.get(flavor.name).cloned().unwrap_or_else(|| default_placement(flavor));
        if placement.requests.is_none() {
            placement.requests = self.requests.clone();
        }
        placement
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::hardware::lookup;

    fn flavor(name: &str) -> &'static Flavor {
        lookup(name).expect("catalog flavor")
    }

    #[test]
    fn defaults_follow_gpu_feature_discovery() {
        let mapping = HardwareMapping::default();
        let t4 = mapping.placement(flavor("t4-small"));
        assert_eq!(t4.node_selector.get(GPU_PRODUCT_LABEL).map(String::as_str), Some("Tesla-T4"));
        assert_eq!(t4.tolerations[0].key.as_deref(), Some("nvidia.com/gpu"));
        assert_eq!(mapping.placement(flavor("a10g-large")).node_selector[GPU_PRODUCT_LABEL], "NVIDIA-A10G");
        assert_eq!(mapping.placement(flavor("a100x8")).node_selector[GPU_PRODUCT_LABEL], "NVIDIA-A100-SXM4-80GB");
        let cpu = mapping.placement(flavor("cpu-basic"));
        assert!(cpu.node_selector.is_empty() && cpu.tolerations.is_empty() && cpu.requests.is_none());
    }

    #[test]
    fn file_overrides_a_flavor() {
        let mapping = HardwareMapping::from_yaml(
            "flavors:\n  cpu-basic:\n    nodeSelector: {hangar.dev/test-node: real}\n    requests: {cpu: 100m, memory: 128Mi}\n",
        )
        .expect("valid mapping");
        let cpu = mapping.placement(flavor("cpu-basic"));
        assert_eq!(cpu.node_selector["hangar.dev/test-node"], "real");
        assert_eq!(cpu.requests, Some(Requests { cpu: "100m".into(), memory: "128Mi".into() }));
        assert_eq!(mapping.placement(flavor("t4-small")), default_placement(flavor("t4-small")));
    }

    #[test]
    fn global_requests_fill_in_for_every_flavor() {
        let mapping = HardwareMapping::from_yaml(
            "requests: {cpu: 50m, memory: 32Mi}\nflavors:\n  cpu-basic: {requests: {cpu: 1, memory: 1Gi}}\n",
        )
        .expect("valid mapping");
        assert_eq!(
            mapping.placement(flavor("a10g-large")).requests,
            Some(Requests { cpu: "50m".into(), memory: "32Mi".into() })
        );
        assert_eq!(mapping.placement(flavor("a10g-large")).node_selector[GPU_PRODUCT_LABEL], "NVIDIA-A10G");
        assert_eq!(
            mapping.placement(flavor("cpu-basic")).requests,
            Some(Requests { cpu: "1".into(), memory: "1Gi".into() })
        );
    }

    #[test]
    fn bad_mappings_are_refused() {
        let err = HardwareMapping::from_yaml("flavors:\n  h100: {}\n").expect_err("unknown flavor");
        assert_eq!(err.to_string(), "hardware mapping names flavor \"h100\", which is not in the catalog");
        assert!(HardwareMapping::from_yaml("flavors:\n  cpu-basic: {nodeSelectr: {}}\n").is_err());
    }
}

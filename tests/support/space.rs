//! Reading a Space's stage the way a user trusts it: only once the operator has
//! observed the Space's current generation.

use std::time::Duration;

use hangar::space::{Space, Stage};
use kube::Api;

/// The Space's stage (and the Space) when its status is current.
pub async fn stage_of(api: &Api<Space>, name: &str) -> Option<(Stage, Space)> {
    let space = api.get(name).await.ok()?;
    let status = space.status.clone()?;
    (status.observed_generation == space.metadata.generation).then_some((status.stage?, space))
}

/// Waits for the Space to reach `stage` (with a current status); panics after `timeout`.
pub async fn wait_stage(api: &Api<Space>, name: &str, stage: Stage, timeout: Duration) -> Space {
    super::wait_for(&format!("{name} in {stage:?}"), timeout, || async {
        Ok(stage_of(api, name).await.filter(|(s, _)| *s == stage).map(|(_, space)| space))
    })
    .await
}

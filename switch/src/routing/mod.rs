//! Routing to upstream issuer hosts and the resilience around it (SPEC §6): the links, their
//! circuit breakers and reconnect schedule, and the store-and-forward drainer.

pub mod backoff;
pub mod breaker;
pub mod drainer;
pub mod link;

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use link::{LinkAnswer, LinkConfigError, LinkDeps, LinkError, UpstreamLink};

use crate::settings::UpstreamSettings;

/// Every configured upstream of this switch, by name.
#[derive(Debug, Default)]
pub struct Upstreams {
    links: BTreeMap<String, Arc<UpstreamLink>>,
}

impl Upstreams {
    /// Builds one link per `[[upstreams]]` entry (reads their TMK files); connects nothing yet.
    pub fn new(settings: &[UpstreamSettings], deps: &LinkDeps) -> Result<Self, LinkConfigError> {
        let mut links = BTreeMap::new();
        for s in settings {
            links.insert(s.name.clone(), UpstreamLink::new(s.clone(), deps.clone())?);
        }
        Ok(Self { links })
    }

    /// The link named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<UpstreamLink>> {
        self.links.get(name)
    }

    /// Every link.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<UpstreamLink>> {
        self.links.values()
    }

    /// Whether none is configured.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Starts every link's connect/heartbeat/reconnect task until `stop`.
    pub fn spawn(&self, stop: &CancellationToken) -> Vec<JoinHandle<()>> {
        self.links
            .values()
            .map(|link| tokio::spawn(link.clone().run(stop.clone())))
            .collect()
    }
}

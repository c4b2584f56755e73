//! Routing to upstream issuer hosts and the resilience around it (SPEC §6): the links, their
//! circuit breakers and reconnect schedule, the store-and-forward drainer, and the reversal
//! advices held in memory while the store refuses them.

pub mod backoff;
pub mod breaker;
pub mod drainer;
pub mod held;
pub mod link;

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use link::{LinkAnswer, LinkConfigError, LinkDeps, LinkError, UpstreamLink};

use crate::settings::UpstreamSettings;
use drainer::Drainer;

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

    /// Starts every link's connect/heartbeat/reconnect task, and `drainer` if given.
    pub fn start(&self, drainer: Option<Drainer>) -> UpstreamTasks {
        let stop_links = CancellationToken::new();
        let links = self
            .links
            .values()
            .map(|link| tokio::spawn(link.clone().run(stop_links.clone())))
            .collect();
        let stop_drainer = CancellationToken::new();
        let drainer = drainer.map(|d| tokio::spawn(d.run(stop_drainer.clone())));
        UpstreamTasks {
            stop_links,
            links,
            stop_drainer,
            drainer,
        }
    }
}

/// The running link tasks (and drainer) of a process, stopped in order at shutdown.
#[derive(Debug)]
pub struct UpstreamTasks {
    stop_links: CancellationToken,
    links: Vec<JoinHandle<()>>,
    stop_drainer: CancellationToken,
    drainer: Option<JoinHandle<()>>,
}

impl UpstreamTasks {
    /// No new work to the upstreams: the drainer settles the batch it holds and stops.
    pub async fn stop_drainer(&mut self) {
        self.stop_drainer.cancel();
        if let Some(drainer) = self.drainer.take() {
            let _ = drainer.await;
        }
    }

    /// Stops the drainer, then signs off and closes every link.
    pub async fn stop(mut self) {
        self.stop_drainer().await;
        self.stop_links.cancel();
        for link in self.links {
            let _ = link.await;
        }
    }
}

//! A fleet of SIMULATED devices for rollout tests and benchmarks at fleet
//! scale on one machine. The devices are NOT agents: each is a light MQTT
//! client (rumqttc, one tokio task) that follows the sync protocol as the
//! edge-agent does, in front of a simulated runtime that runs nothing. It
//! starts, confirms, fails and rolls back deployment revisions as the agent
//! does, and a `FailureScript` says which revisions fail on which devices.
//! The hub they talk to is the real one.

mod device;
pub mod runtime;
pub mod script;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use outpost_proto::sync::{Topics, WorkloadReport};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use device::{Counters, DeviceState, Link};
use runtime::Runtime;
pub use script::{Devices, FailureRule, FailureScript};

/// One simulated device: its id and the token the broker knows it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimSpec {
    pub id: String,
    pub token: String,
}

impl SimSpec {
    /// `count` devices `sim-00000`, `sim-00001`, ... with tokens `sim-token-00000`, ...
    pub fn numbered(count: usize) -> Vec<SimSpec> {
        (0..count).map(|i| SimSpec { id: format!("sim-{i:05}"), token: format!("sim-token-{i:05}") }).collect()
    }
}

#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Devices connecting at once; the others wait for one of them to get its CONNACK.
    pub connect_burst: usize,
    pub topics: Topics,
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self { connect_burst: 200, topics: Topics::default() }
    }
}

/// Simulated devices connected to the broker at one address, until `stop`
/// (or drop). Each device is known by its index: the order it was added in.
pub struct SimulatedFleet {
    mqtt: SocketAddr,
    topics: Arc<Topics>,
    script: Arc<FailureScript>,
    connecting: Arc<Semaphore>,
    counters: Arc<Counters>,
    ids: Vec<String>,
    states: Vec<Arc<Mutex<DeviceState>>>,
    tasks: JoinSet<()>,
}

impl SimulatedFleet {
    /// Starts `devices` against the broker at `mqtt`, with the default options.
    /// Call it inside a tokio runtime: each device is a task of it.
    pub fn start(mqtt: SocketAddr, devices: Vec<SimSpec>, script: FailureScript) -> Self {
        Self::start_with(mqtt, devices, script, FleetOptions::default())
    }

    pub fn start_with(mqtt: SocketAddr, devices: Vec<SimSpec>, script: FailureScript, options: FleetOptions) -> Self {
        let mut fleet = Self {
            mqtt,
            topics: Arc::new(options.topics),
            script: Arc::new(script),
            connecting: Arc::new(Semaphore::new(options.connect_burst.max(1))),
            counters: Arc::new(Counters::default()),
            ids: Vec::new(),
            states: Vec::new(),
            tasks: JoinSet::new(),
        };
        fleet.add(devices);
        fleet
    }

    /// Starts more devices, indexed after those already here.
    pub fn add(&mut self, devices: Vec<SimSpec>) {
        for spec in devices {
            let index = self.ids.len();
            let state = Arc::new(Mutex::new(DeviceState { runtime: Runtime::new(index), acknowledged: None }));
            let link = Link {
                index,
                id: spec.id.clone(),
                token: spec.token,
                mqtt: self.mqtt,
                topics: self.topics.clone(),
                script: self.script.clone(),
                state: state.clone(),
                counters: self.counters.clone(),
            };
            self.tasks.spawn(device::run(link, self.connecting.clone()));
            self.ids.push(spec.id);
            self.states.push(state);
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The id of the device at `index`.
    pub fn id(&self, index: usize) -> &str {
        &self.ids[index]
    }

    /// Devices that had their first CONNACK.
    pub fn connected(&self) -> usize {
        self.counters.connected.load(Ordering::Relaxed)
    }

    /// Connection attempts that failed, each one retried after a backoff.
    pub fn connection_errors(&self) -> usize {
        self.counters.connection_errors.load(Ordering::Relaxed)
    }

    /// Devices that stored the desired state of `generation` or a newer one.
    pub fn stored(&self, generation: u64) -> usize {
        self.count(|d| d.runtime.generation().is_some_and(|g| g >= generation))
    }

    /// Devices whose report of `generation` or a newer one the hub acknowledged.
    pub fn acknowledged(&self, generation: u64) -> usize {
        self.count(|d| d.acknowledged.is_some_and(|g| g >= generation))
    }

    /// Devices running `revision` of `deployment`.
    pub fn running(&self, deployment: &str, revision: u64) -> usize {
        self.count(|d| d.runtime.revision(deployment) == Some(revision))
    }

    /// The revision of `deployment` that the device at `index` runs.
    pub fn revision(&self, index: usize, deployment: &str) -> Option<u64> {
        self.read(index, |d| d.runtime.revision(deployment))
    }

    /// The workloads of the device at `index`, as it reports them.
    pub fn workloads(&self, index: usize) -> Vec<WorkloadReport> {
        self.read(index, |d| d.runtime.workloads())
    }

    /// Stops every device at once, as if their links were cut: the broker
    /// publishes their last wills (offline).
    pub async fn stop(mut self) {
        self.tasks.shutdown().await;
    }

    fn read<T>(&self, index: usize, read: impl FnOnce(&DeviceState) -> T) -> T {
        read(&self.states[index].lock().expect("no simulated device panics holding its state"))
    }

    fn count(&self, counted: impl Fn(&DeviceState) -> bool) -> usize {
        (0..self.len()).filter(|&i| self.read(i, &counted)).count()
    }
}

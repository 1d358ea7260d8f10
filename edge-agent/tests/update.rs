//! The agent's update flow against a TUF repository served over real HTTP on
//! loopback: what gets installed, and what is refused with nothing installed.
//! No root needed: the slots, the store and the repository live in temp dirs.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use edge_agent::store::Store;
use edge_agent::trust::TrustError;
use edge_agent::update::fetch::{Installed, UpdateError, Updater};
use edge_agent::update::{AgentSlots, BOOTLIMIT};
use ota::verify::VerifyError;
use ota::{BootEnv, DownloadError, Slot, SlotBackend};
use tempfile::TempDir;
use testkit::http::StaticServer;
use testkit::tuf::TufRepo;

const HARDWARE: &str = "test-board";
const OLD_AGENT: &[u8] = b"#!/bin/sh\n# agent 1.0\n";
const NEW_AGENT: &[u8] = b"#!/bin/sh\n# agent 2.0, a little longer\n";

/// A device with its store, its agent slots and the repository's root as its
/// configured trust root.
struct Device {
    data: TempDir,
    running_binary: PathBuf,
    updater: Updater,
}

impl Device {
    fn new(repo: &TufRepo, server: &StaticServer) -> Self {
        let data = tempfile::tempdir().unwrap();
        let trust_root = data.path().join("root.json");
        std::fs::write(&trust_root, repo.root_json()).unwrap();
        let running_binary = data.path().join("installed-edge-agent");
        std::fs::write(&running_binary, OLD_AGENT).unwrap();
        let updater = Updater {
            hub_http: server.url(),
            hardware: HARDWARE.into(),
            trust_root,
            agent: AgentSlots::new(data.path()),
            max_bytes_per_sec: None,
        };
        Self { data, running_binary, updater }
    }

    /// Opens the store, as an agent (re)starting does.
    fn store(&self) -> Store {
        Store::open(&self.data.path().join("store"), 1 << 20).unwrap().0
    }

    async fn update(&self, store: &Store, target: &str) -> Result<Installed, UpdateError> {
        self.updater.update(store, target, &self.running_binary).await
    }

    fn slot(&self, slot: Slot) -> Option<Vec<u8>> {
        std::fs::read(self.updater.agent.slots.slot_path(slot)).ok()
    }

    fn assert_nothing_installed(&self) {
        assert_eq!(self.updater.agent.env().unwrap(), None, "no boot environment was written");
        assert_eq!(self.slot(Slot::B), None, "slot B is empty");
        assert_eq!(self.updater.agent.pending().unwrap(), None, "no update is pending");
    }
}

fn repo_with_agent(content: &[u8], version: &str) -> TufRepo {
    let mut repo = TufRepo::new();
    repo.add_target("edge-agent", version, content, &[HARDWARE]);
    repo.publish();
    repo
}

#[tokio::test]
async fn signed_update_goes_into_slot_b_on_trial_with_the_running_binary_as_slot_a() {
    let repo = repo_with_agent(NEW_AGENT, "2.0.0");
    let server = StaticServer::start(repo.dir()).unwrap();
    let device = Device::new(&repo, &server);
    let store = device.store();

    let installed = device.update(&store, "edge-agent").await.unwrap();

    assert_eq!((installed.version.as_str(), installed.slot), ("2.0.0", Slot::B));
    assert_eq!(device.slot(Slot::A).as_deref(), Some(OLD_AGENT));
    assert_eq!(device.slot(Slot::B).as_deref(), Some(NEW_AGENT));
    let env = device.updater.agent.env().unwrap().unwrap();
    assert_eq!((env.active, env.upgrade_available, env.bootcount), (Slot::B, true, 0));
    assert_eq!(device.updater.agent.pending().unwrap().unwrap().version, "2.0.0");
    let versions = store.trusted_versions().unwrap();
    assert_eq!((versions.root, versions.timestamp, versions.snapshot, versions.targets), (1, 1, 1, 1));
    assert!(std::fs::read_dir(device.updater.agent.download_dir()).unwrap().next().is_none(), "download removed");
}

#[tokio::test]
async fn tampered_artifact_is_refused_and_nothing_is_installed() {
    let repo = repo_with_agent(NEW_AGENT, "2.0.0");
    let mut evil = NEW_AGENT.to_vec();
    *evil.last_mut().unwrap() ^= 0x01;
    std::fs::write(repo.artifact_path(NEW_AGENT), &evil).unwrap();
    let server = StaticServer::start(repo.dir()).unwrap();
    let device = Device::new(&repo, &server);

    let err = device.update(&device.store(), "edge-agent").await.unwrap_err();

    assert!(matches!(err, UpdateError::Download(DownloadError::HashMismatch { .. })), "{err}");
    device.assert_nothing_installed();
}

#[tokio::test]
async fn targets_rolled_back_to_an_older_release_after_a_restart_are_refused_and_nothing_is_installed() {
    let mut repo = repo_with_agent(NEW_AGENT, "2.0.0");
    let release_1 = repo.metadata_files();
    repo.add_target("edge-agent", "3.0.0", b"#!/bin/sh\n# agent 3.0\n", &[HARDWARE]);
    repo.publish();
    let server = StaticServer::start(repo.dir()).unwrap();
    let device = Device::new(&repo, &server);
    {
        let store = device.store();
        assert_eq!(device.update(&store, "edge-agent").await.unwrap().version, "3.0.0");
        assert_eq!(store.trusted_versions().unwrap().targets, 2);
    }
    // Confirmed, so the slot would be free for another update.
    ota::confirm_boot(&device.updater.agent.slots).unwrap();
    device.updater.agent.clear_pending().unwrap();
    for (path, bytes) in release_1 {
        std::fs::write(path, bytes).unwrap();
    }

    let err = device.update(&device.store(), "edge-agent").await.unwrap_err();

    assert!(matches!(err, UpdateError::Verify(VerifyError::Rollback { trusted: 2, found: 1, .. })), "{err}");
    assert_eq!(device.updater.agent.env().unwrap(), Some(BootEnv::new(Slot::B, BOOTLIMIT)));
    assert_eq!(device.slot(Slot::A).as_deref(), Some(OLD_AGENT), "the fallback slot is untouched");
    assert_eq!(device.updater.agent.pending().unwrap(), None);
}

#[tokio::test]
async fn expired_metadata_is_refused_and_nothing_is_installed() {
    let mut repo = TufRepo::new();
    repo.add_target("edge-agent", "2.0.0", NEW_AGENT, &[HARDWARE]);
    repo.expires = SystemTime::now() - Duration::from_secs(24 * 3600);
    repo.publish();
    let server = StaticServer::start(repo.dir()).unwrap();
    let device = Device::new(&repo, &server);

    let err = device.update(&device.store(), "edge-agent").await.unwrap_err();

    assert!(matches!(err, UpdateError::Verify(VerifyError::Expired { .. })), "{err}");
    device.assert_nothing_installed();
}

#[tokio::test]
async fn target_for_other_hardware_is_refused_and_nothing_is_installed() {
    let mut repo = TufRepo::new();
    repo.add_target("edge-agent", "2.0.0", NEW_AGENT, &["another-board"]);
    repo.publish();
    let server = StaticServer::start(repo.dir()).unwrap();
    let device = Device::new(&repo, &server);

    let err = device.update(&device.store(), "edge-agent").await.unwrap_err();

    assert!(matches!(err, UpdateError::Verify(VerifyError::WrongHardware { .. })), "{err}");
    device.assert_nothing_installed();
}

#[tokio::test]
async fn rotated_root_is_stored_and_trusted_instead_of_the_configured_one() {
    let mut repo = repo_with_agent(NEW_AGENT, "2.0.0");
    let server = StaticServer::start(repo.dir()).unwrap();
    let device = Device::new(&repo, &server);
    repo.rotate_root();
    let store = device.store();

    device.update(&store, "edge-agent").await.unwrap();

    assert_eq!(store.trusted_root().unwrap(), Some(repo.root_json()));
    assert_eq!(store.trusted_versions().unwrap().root, 2);
    // The configured file no longer matters: the store's root is used.
    std::fs::remove_file(&device.updater.trust_root).unwrap();
    let trusted = edge_agent::trust::trusted_state(&store, &device.updater.trust_root).unwrap();
    assert_eq!(trusted.root().version, 2);
}

#[tokio::test]
async fn without_a_trust_root_the_update_is_refused_naming_the_file() {
    let repo = repo_with_agent(NEW_AGENT, "2.0.0");
    let server = StaticServer::start(repo.dir()).unwrap();
    let device = Device::new(&repo, &server);
    std::fs::remove_file(&device.updater.trust_root).unwrap();

    let err = device.update(&device.store(), "edge-agent").await.unwrap_err();

    assert!(matches!(err, UpdateError::Trust(TrustError::NoRoot { .. })), "{err}");
    assert!(err.to_string().contains("root.json"), "{err}");
    device.assert_nothing_installed();
}

#[tokio::test]
async fn second_update_while_the_first_is_on_trial_is_refused_before_downloading() {
    let repo = repo_with_agent(NEW_AGENT, "2.0.0");
    let server = StaticServer::start(repo.dir()).unwrap();
    let device = Device::new(&repo, &server);
    let store = device.store();
    device.update(&store, "edge-agent").await.unwrap();
    std::fs::remove_file(repo.artifact_path(NEW_AGENT)).unwrap();

    let err = device.update(&store, "edge-agent").await.unwrap_err();

    assert!(matches!(err, UpdateError::Slot(ota::SlotError::UpgradePending { pending: Slot::B })), "{err}");
    assert_eq!(device.slot(Slot::A).as_deref(), Some(OLD_AGENT), "the fallback slot is untouched");
}

mod deployment_updates {
    use edge_agent::update::deployment::{step, Step};
    use outpost_proto::{AgentUpdate, Deployment, DesiredState, EventKind, UpdateOrigin};

    use super::*;

    /// Stores a desired state whose deployment `agent` revision `revision`
    /// asks for `target` at `version`, as the daemon would after verifying it.
    fn ask(store: &Store, revision: u64, target: &str, version: &str) {
        let update = Some(AgentUpdate { target: target.into(), version: version.into() });
        let deployment = Deployment {
            name: "agent".into(),
            revision,
            rollback_window: Duration::from_secs(60),
            workloads: Vec::new(),
            update,
            excluded: Vec::new(),
            signatures: Vec::new(),
        };
        store.set_desired(&DesiredState { version: 1, generation: revision, deployments: vec![deployment] }).unwrap();
    }

    fn events(store: &Store) -> Vec<EventKind> {
        store.events_after(0, 100).unwrap().into_iter().map(|e| e.kind).collect()
    }

    fn origin(revision: u64) -> UpdateOrigin {
        UpdateOrigin { deployment: "agent".into(), revision }
    }

    #[tokio::test]
    async fn a_deployments_agent_update_is_installed_once_for_its_revision() {
        let repo = repo_with_agent(NEW_AGENT, "2.0.0");
        let server = StaticServer::start(repo.dir()).unwrap();
        let device = Device::new(&repo, &server);
        let store = device.store();
        ask(&store, 3, "edge-agent", "2.0.0");

        let Step::Restart(installed) = step(&store, Some(&device.updater), &device.running_binary).await else {
            panic!("the update was not installed");
        };
        assert_eq!((installed.version.as_str(), installed.slot), ("2.0.0", Slot::B));
        assert_eq!(device.updater.agent.pending().unwrap().unwrap().from, Some(origin(3)));
        assert_eq!(store.agent_update_handled().unwrap(), Some(origin(3)));

        // The restarted agent confirmed (or rolled back): the same revision is not installed again.
        device.updater.agent.clear_pending().unwrap();
        ota::confirm_boot(&device.updater.agent.slots).unwrap();
        assert_eq!(step(&store, Some(&device.updater), &device.running_binary).await, Step::Idle);
        assert!(events(&store).is_empty(), "{:?}", events(&store));
    }

    #[tokio::test]
    async fn an_update_whose_target_has_another_version_is_refused_once_and_nothing_is_installed() {
        let repo = repo_with_agent(NEW_AGENT, "2.0.0");
        let server = StaticServer::start(repo.dir()).unwrap();
        let device = Device::new(&repo, &server);
        let store = device.store();
        ask(&store, 4, "edge-agent", "2.1.0");

        assert_eq!(step(&store, Some(&device.updater), &device.running_binary).await, Step::Idle);
        assert_eq!(step(&store, Some(&device.updater), &device.running_binary).await, Step::Idle);

        device.assert_nothing_installed();
        let events = events(&store);
        let [EventKind::UpdateFailed { reason, deployment, revision, .. }] = &events[..] else {
            panic!("one refusal expected: {events:?}");
        };
        assert_eq!((deployment.as_str(), *revision), ("agent", 4));
        assert!(reason.contains("version 2.0.0") && reason.contains("asks for 2.1.0"), "{reason}");
    }

    #[tokio::test]
    async fn an_agent_that_already_runs_the_target_reports_it_updated_without_installing() {
        let repo = repo_with_agent(OLD_AGENT, "1.0.0");
        let server = StaticServer::start(repo.dir()).unwrap();
        let device = Device::new(&repo, &server);
        let store = device.store();
        ask(&store, 2, "edge-agent", "1.0.0");

        assert_eq!(step(&store, Some(&device.updater), &device.running_binary).await, Step::Idle);

        device.assert_nothing_installed();
        let updated =
            EventKind::Updated { target: "edge-agent".into(), version: "1.0.0".into(), from: Some(origin(2)) };
        assert_eq!(events(&store), [updated]);
    }

    #[tokio::test]
    async fn an_unreachable_hub_leaves_the_update_to_try_again_and_records_nothing() {
        let repo = repo_with_agent(NEW_AGENT, "2.0.0");
        let server = StaticServer::start(repo.dir()).unwrap();
        let mut device = Device::new(&repo, &server);
        drop(server);
        device.updater.hub_http = format!("http://127.0.0.1:{}", testkit::hub::free_port());
        let store = device.store();
        ask(&store, 5, "edge-agent", "2.0.0");

        assert_eq!(step(&store, Some(&device.updater), &device.running_binary).await, Step::RetryLater);

        device.assert_nothing_installed();
        assert_eq!(store.agent_update_handled().unwrap(), None);
        assert!(events(&store).is_empty());
    }

    #[tokio::test]
    async fn without_hub_http_a_deployments_update_is_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store"), 1 << 20).unwrap().0;
        ask(&store, 1, "edge-agent", "2.0.0");

        assert_eq!(step(&store, None, std::path::Path::new("/proc/self/exe")).await, Step::Idle);

        let events = events(&store);
        assert!(
            matches!(&events[..], [EventKind::UpdateFailed { reason, .. }] if reason.contains("hub-http")),
            "{events:?}"
        );
    }
}

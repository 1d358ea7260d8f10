//! `daemon::apply` tells a refused document (never to be stored) from one
//! the store could not take now (to be offered again): found by the chaos
//! hw-test, where a full disk made the agent take a desired state from the
//! hub for a refusal and ignore it until a newer one came.

use edge_agent::daemon::{apply, ApplyError};
use edge_agent::store::Store;
use outpost_proto::{DesiredState, EventKind};

fn document(generation: u64) -> DesiredState {
    let text = testkit::trust::operator().sign_document(&format!("version = 1\ngeneration = {generation}\n"));
    DesiredState::parse(&text).unwrap()
}

#[test]
fn a_state_stored_whose_snapshot_cannot_be_written_counts_as_applied_and_an_older_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(&dir.path().join("store"), 1 << 20).unwrap();
    let root = testkit::trust::operator().root_path();
    assert_eq!(apply(&store, &root, &document(1)), Ok(true));

    // The snapshot cannot be written (as on a full disk): the store has the state all the same.
    let snapshot = dir.path().join("desired.json");
    std::fs::remove_file(&snapshot).unwrap();
    std::fs::create_dir(&snapshot).unwrap();
    assert_eq!(apply(&store, &root, &document(2)), Ok(true));
    assert_eq!(store.desired().unwrap().map(|d| d.generation), Some(2));
    let applied: Vec<u64> = store
        .events_after(0, 100)
        .unwrap()
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Applied { generation } => Some(generation),
            _ => None,
        })
        .collect();
    assert_eq!(applied, [1, 2]);

    assert!(matches!(apply(&store, &root, &document(1)), Err(ApplyError::Refused(_))), "an older generation");
}

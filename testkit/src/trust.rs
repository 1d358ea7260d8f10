//! A test operator for the whole test process: a root key and a deployments
//! key, and the root.json that trusts them, so tests sign what they send to
//! agents as an operator would (docs/trust.md, "Signed deployments").

use std::path::PathBuf;
use std::sync::OnceLock;

use ota::SigningKey;
use outpost_proto::DesiredState;

pub struct Operator {
    /// Kept for the life of the test process: agents read root.json from it.
    dir: tempfile::TempDir,
    deployments_key: SigningKey,
}

/// The process-wide test operator, made on first use.
pub fn operator() -> &'static Operator {
    static OPERATOR: OnceLock<Operator> = OnceLock::new();
    OPERATOR.get_or_init(Operator::new)
}

impl Operator {
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("outpost-operator-").tempdir().expect("temp dir");
        let mut paths = Vec::new();
        for name in ["root.key", "deployments.key"] {
            let (_, pkcs8) = SigningKey::generate().expect("an Ed25519 key");
            let path = dir.path().join(name);
            std::fs::write(&path, pkcs8).expect("writing a test key");
            paths.push(path);
        }
        let ota = crate::agent::build_binary("ota", "ota");
        let root = dir.path().join("root.json");
        let out = std::process::Command::new(ota)
            .args(["new-root", "--expires", "30d", "--root-key"])
            .arg(&paths[0])
            .arg("--deployments-key")
            .arg(&paths[1])
            .arg("--out")
            .arg(&root)
            .output()
            .expect("cannot run ota");
        assert!(out.status.success(), "ota new-root failed: {}", String::from_utf8_lossy(&out.stderr));
        let deployments_key = SigningKey::from_pkcs8(&std::fs::read(&paths[1]).unwrap()).unwrap();
        Self { dir, deployments_key }
    }

    /// The operator's root.json, for an agent's or a hub's `trust-root`.
    pub fn root_path(&self) -> PathBuf {
        self.dir.path().join("root.json")
    }

    /// The deployments key file, for `hub apply --key`.
    pub fn deployments_key_path(&self) -> PathBuf {
        self.dir.path().join("deployments.key")
    }

    /// Signs every deployment with the deployments key.
    pub fn sign(&self, state: &mut DesiredState) {
        ota::sign_desired(state, &self.deployments_key).unwrap_or_else(|e| {
            panic!("cannot sign the desired state: {e} (testkit::image::busybox_pinned() pins busybox)")
        });
    }

    /// A desired-state document (TOML or JSON) signed, as JSON. A document that
    /// does not parse is returned as it is: the agent's refusal is what a test
    /// of a bad document looks at.
    pub fn sign_document(&self, text: &str) -> String {
        let Ok(mut state) = DesiredState::parse(text) else { return text.to_string() };
        self.sign(&mut state);
        serde_json::to_string_pretty(&state).expect("a desired state is JSON")
    }
}

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use anyhow::Context;
use outpost_proto::sync::Topics;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::control::socket_path;
use crate::daemon::{self, Core};
use crate::runtime::supervisor::require_root;
use crate::runtime::Supervisor;
use crate::store::Store;
use crate::sync::SyncSettings;

pub fn run(config: &Config, supervisor: Supervisor) -> anyhow::Result<()> {
    require_root()?;
    let (store, recovered) =
        Store::open(&config.data_dir.join("store"), config.store_cache.0).context("cannot open the agent's store")?;
    if let Some(r) = recovered {
        tracing::error!(
            "the store could not be read ({}); it was moved to {} and a new one started from desired generation {:?}",
            r.reason,
            r.moved_to.display(),
            r.restored_generation
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        std::fs::create_dir_all(&config.run_dir)?;
        let socket = socket_path(&config.run_dir);
        // Only one daemon can hold the store, so a socket file left here is stale.
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).with_context(|| format!("cannot listen on {}", socket.display()))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
        let mut terminate = signal(SignalKind::terminate())?;
        let shutdown = async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        tracing::info!(device = %config.device_id, "agent running; workloads keep running when it stops");
        let core =
            Core::new(Arc::new(store), supervisor, config.insecure_registries.clone(), config.trust_root.clone());
        let hub = (!config.hub.is_empty()).then(|| SyncSettings {
            hub: config.hub.clone(),
            device_id: config.device_id.clone(),
            token: config.hub_token.clone(),
            topics: Topics::new(&config.topic_prefix),
            encoding: config.encoding,
            keep_alive: config.keep_alive,
            report_interval: config.report_interval,
        });
        daemon::run(core, listener, config.reconcile_interval, hub, shutdown).await;
        let _ = std::fs::remove_file(&socket);
        Ok(())
    })
}

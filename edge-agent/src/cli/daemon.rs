use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use anyhow::Context;
use outpost_proto::sync::Topics;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;

use crate::config::Config;
use crate::control::socket_path;
use crate::daemon::{self, Core};
use crate::runtime::supervisor::require_root;
use crate::runtime::Supervisor;
use crate::store::Store;
use crate::sync::SyncSettings;
use crate::update::fetch::Updater;
use crate::update::health::Trial;
use crate::update::{self, stage0, AgentSlots};

pub fn run(config: &Config, supervisor: Supervisor) -> anyhow::Result<()> {
    require_root()?;
    one_malloc_arena();
    let agent = AgentSlots::new(&config.data_dir);
    // Before the store opens: the binary that should run may be another one.
    let boot = stage0::run(&agent).context("cannot choose which agent binary runs (stage 0)")?;
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
        let store = Arc::new(store);
        update::health::settle(&agent, &store);
        let mut core = Core::new(store.clone(), supervisor.clone(), config.pull_options(), config.trust_root.clone());
        if !config.hub_http.is_empty() {
            core = core.with_updater(Arc::new(Updater::from_config(config, agent.clone())));
        }
        let connected = Arc::new(Notify::new());
        if boot.trial {
            tokio::spawn(update::health::watch(Trial {
                agent,
                store,
                supervisor,
                run_dir: config.run_dir.clone(),
                hub_connected: (!config.hub.is_empty()).then(|| connected.clone()),
                deadline: config.update_health_deadline,
            }));
        }
        // mqtts:// hubs know the device by its certificate instead of its token.
        let tls = match config.hub.starts_with("mqtts://") {
            true => Some(crate::identity::client_config(&config.identity_paths())?),
            false => None,
        };
        let hub = (!config.hub.is_empty()).then(|| SyncSettings {
            hub: config.hub.clone(),
            tls,
            device_id: config.device_id.clone(),
            token: config.hub_token.clone(),
            topics: Topics::new(&config.topic_prefix),
            encoding: config.encoding,
            keep_alive: config.keep_alive,
            report_interval: config.report_interval,
            connected,
        });
        daemon::run(core, listener, config.reconcile_interval, hub, shutdown).await;
        let _ = std::fs::remove_file(&socket);
        Ok(())
    })
}

/// glibc gives threads their own malloc arenas, up to 8 per core, and keeps
/// what each one freed: the daemon's worker and blocking threads made its
/// anonymous memory creep up by about 0.4 MiB in 10 minutes of churn with a
/// heap of under 300 KiB (heaptrack). One arena keeps it flat
/// (docs/benchmarks.md); the daemon allocates little, so the lock costs
/// nothing measurable. Before any thread starts: later arenas only.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a malloc parameter; no other thread runs yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

//! `hub serve`: the hub until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::warn;

use crate::config::Config;

#[derive(clap::Args)]
pub struct Args {
    /// The configuration file (`hub config default` prints one); without it, the defaults.
    #[arg(long, short, env = "OUTPOST_HUB_CONFIG")]
    config: Option<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let listener =
        TcpListener::bind(config.http).await.with_context(|| format!("cannot listen on {} (`http`)", config.http))?;
    crate::run(config, listener, stop_signal()).await
}

async fn stop_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!("cannot watch for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = ctrl_c => {}
            }
        }
        Err(e) => {
            warn!("cannot watch for SIGTERM ({e}); stopping on Ctrl-C only");
            ctrl_c.await;
        }
    }
}

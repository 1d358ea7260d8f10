//! `hub rollout watch|pause|resume|abort|rollback NAME`.

use std::time::Duration;

use anyhow::bail;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use outpost_proto::fleet::{DeploymentStatus, RolloutState};
use tokio::time::Instant;

use super::client::{ApiClient, ClientError};
use super::deployments::state;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Follow the rollout live: a bar per wave, and devices by state. Exits
    /// 0 once complete, non-zero if it stops (paused, rolled back, aborted).
    Watch {
        name: String,
        /// Give up after this long, e.g. "30m".
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
    },
    /// Hold the rollout at its current wave.
    Pause { name: String },
    /// Go on from the current wave.
    Resume { name: String },
    /// Stop where it is: devices keep what they run.
    Abort { name: String },
    /// Every device back to the previous revision at once; or, with --to, a
    /// new rollout of that revision in waves.
    Rollback {
        name: String,
        #[arg(long)]
        to: Option<u64>,
    },
}

pub async fn run(client: &ApiClient, command: Command) -> anyhow::Result<()> {
    let (name, action, to) = match command {
        Command::Watch { name, timeout } => return watch(client, &name, timeout).await,
        Command::Pause { name } => (name, "pause", None),
        Command::Resume { name } => (name, "resume", None),
        Command::Abort { name } => (name, "abort", None),
        Command::Rollback { name, to } => (name, "rollback", to),
    };
    let status = client.rollout(&name, action, to).await?;
    let r = &status.rollout;
    println!("{name}: rollout of revision {} {}", r.revision, state(r.state));
    Ok(())
}

async fn watch(client: &ApiClient, name: &str, timeout: Option<Duration>) -> anyhow::Result<()> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>14} [{bar:40}] {pos}/{len} healthy {msg}")
        .expect("a valid template")
        .progress_chars("=> ");
    let summary = bars.add(ProgressBar::new_spinner());
    let mut waves: Vec<ProgressBar> = Vec::new();
    loop {
        let status = match client.deployment(name).await {
            Ok(status) => status,
            // A hub restarting is part of what one watches.
            Err(e @ ClientError::Unreachable { .. }) => {
                summary.set_message(e.to_string());
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        draw(&bars, &style, &mut waves, &summary, &status);
        let r = &status.rollout;
        match r.state {
            RolloutState::Complete => {
                summary.finish();
                return Ok(());
            }
            RolloutState::Progressing => {}
            stopped => {
                summary.finish();
                bail!(
                    "the rollout of {name} revision {} is {}: {}",
                    r.revision,
                    state(stopped),
                    r.reason.as_deref().unwrap_or("-")
                );
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            bail!(
                "the rollout of {name} did not complete within {}",
                humantime::format_duration(timeout.unwrap_or_default())
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Wave bars fill with the healthy devices of the revision, up to each wave's size.
fn draw(
    bars: &MultiProgress,
    style: &ProgressStyle,
    waves: &mut Vec<ProgressBar>,
    summary: &ProgressBar,
    status: &DeploymentStatus,
) {
    let r = &status.rollout;
    while waves.len() < r.waves.len() {
        let bar = bars.add(ProgressBar::new(0).with_style(style.clone()));
        bar.set_prefix(format!("wave {} ({})", waves.len() + 1, r.waves[waves.len()].wave));
        waves.push(bar);
    }
    for (i, (bar, wave)) in waves.iter().zip(&r.waves).enumerate() {
        bar.set_length(wave.devices as u64);
        bar.set_position((r.counts.healthy.min(wave.devices)) as u64);
        bar.set_message(if wave.done {
            "done"
        } else if i == r.wave {
            "in progress"
        } else {
            ""
        });
    }
    let c = &r.counts;
    summary.set_message(format!(
        "{} revision {}: {} | {} targeted, {} updated, {} healthy, {} failed, {} pending, {} offline",
        status.name,
        r.revision,
        state(r.state),
        c.targeted,
        c.updated,
        c.healthy,
        c.failed,
        c.pending,
        c.offline
    ));
    summary.tick();
}

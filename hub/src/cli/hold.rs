//! `hub hold pause|rollback|release NAME` and `hub holds`: on a site hub,
//! an operator holds the parent's rollouts at the site.

use outpost_proto::federation::HoldAction;

use super::client::ApiClient;
use crate::api::HoldView;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Devices at this site keep the revision of NAME they run: the
    /// parent's rollout of the revisions the site has goes no further here.
    Pause {
        name: String,
        /// Told to the parent with each device held.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Devices at this site go back to the revision before the newest the
    /// site received (or --revision); the parent counts them failed.
    Rollback {
        name: String,
        #[arg(long)]
        revision: Option<u64>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift the hold: devices get the parent's revisions again.
    Release { name: String },
}

#[derive(clap::Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &ApiClient, command: Command) -> anyhow::Result<()> {
    let body = match command {
        Command::Release { name } => {
            client.release_hold(&name).await?;
            println!("{name}: released; devices at this site get the parent's revisions again");
            return Ok(());
        }
        Command::Pause { name, reason } => (name, serde_json::json!({ "action": "pause", "reason": reason })),
        Command::Rollback { name, revision, reason } => {
            (name, serde_json::json!({ "action": "rollback", "revision": revision, "reason": reason }))
        }
    };
    let view = client.hold(&body.0, &body.1).await?;
    println!("{}: {}, {} devices held back", view.hold.deployment, describe(&view), view.devices_held.len());
    Ok(())
}

pub async fn list(client: &ApiClient, args: ListArgs) -> anyhow::Result<()> {
    let holds = client.holds().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&holds)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = holds
        .iter()
        .map(|h| {
            vec![
                h.hold.deployment.clone(),
                describe(h),
                h.devices_held.join(","),
                h.hold.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print!("{}", super::table(&["DEPLOYMENT", "HOLD", "DEVICES HELD", "REASON"], &rows));
    Ok(())
}

fn describe(view: &HoldView) -> String {
    match view.hold.action {
        HoldAction::Pause => format!("paused (revisions up to {})", view.hold.covers),
        HoldAction::Rollback { to } => format!("rolled back to revision {to} (revisions up to {})", view.hold.covers),
    }
}

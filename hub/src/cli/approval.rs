//! `hub pending`, `hub approve DEVICE`, `hub reject DEVICE`: devices held
//! for approval (`unknown-devices = "hold"`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::client::ApiClient;

#[derive(clap::Args)]
pub struct PendingArgs {
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct DeviceArgs {
    device: String,
}

pub async fn pending(client: &ApiClient, args: PendingArgs) -> anyhow::Result<()> {
    let pending = client.pending().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&pending)?);
        return Ok(());
    }
    if pending.is_empty() {
        println!("no device waits for approval");
        return Ok(());
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    let ago = |at: u64| humantime::format_duration(Duration::from_secs(now.saturating_sub(at) / 1000)).to_string();
    let rows: Vec<Vec<String>> = pending
        .iter()
        .map(|d| {
            let fingerprint = d.token_sha256.get(..12).unwrap_or(&d.token_sha256).to_string();
            vec![d.id.clone(), fingerprint, d.attempts.to_string(), format!("{} ago", ago(d.last_attempt))]
        })
        .collect();
    print!("{}", super::table(&["ID", "TOKEN SHA256", "ATTEMPTS", "LAST ATTEMPT"], &rows));
    println!("(compare TOKEN SHA256 with `printf %s TOKEN | sha256sum` of the token you gave the device)");
    Ok(())
}

pub async fn approve(client: &ApiClient, args: DeviceArgs) -> anyhow::Result<()> {
    let approved = client.approve(&args.device).await?;
    println!(
        "approved {} (token sha256 {}...): it connects at its next attempt, within a minute",
        approved.id,
        approved.token_sha256.get(..12).unwrap_or_default()
    );
    Ok(())
}

pub async fn reject(client: &ApiClient, args: DeviceArgs) -> anyhow::Result<()> {
    client.reject(&args.device).await?;
    println!("rejected {}: it stays refused, and is held again if it tries again", args.device);
    Ok(())
}

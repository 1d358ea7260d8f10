//! `hub events DEVICE`: what the device recorded (applied, failed, rolled
//! back, updated...), as far as this hub has stored it.

use super::client::ApiClient;

#[derive(clap::Args)]
pub struct Args {
    device: String,
    /// Only the events numbered after this one.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// The events as JSON, for scripts.
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &ApiClient, args: Args) -> anyhow::Result<()> {
    let events = client.events(&args.device, args.after).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&events)?);
        return Ok(());
    }
    for event in events {
        let what = serde_json::to_value(&event.kind)?;
        let kind = what["event"].as_str().unwrap_or("?").to_string();
        let mut details = what;
        if let Some(map) = details.as_object_mut() {
            map.remove("event");
        }
        println!("{:>6}  {}  {kind}  {details}", event.seq, humantime::format_rfc3339_millis(time_of(event.at)));
    }
    Ok(())
}

fn time_of(unix_ms: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms)
}

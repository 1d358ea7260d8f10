//! `hub devices`: the fleet as a table, or JSON.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::client::ApiClient;
use crate::api::DeviceView;

#[derive(clap::Args)]
pub struct Args {
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &ApiClient, args: Args) -> anyhow::Result<()> {
    let devices = client.devices().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&devices)?);
    } else {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        print!("{}", table(&devices, now));
    }
    Ok(())
}

fn table(devices: &[DeviceView], now: u64) -> String {
    let header = ["ID", "ONLINE", "GENERATION", "WORKLOADS", "LAST SEEN", "LABELS"];
    let rows: Vec<Vec<String>> = devices.iter().map(|d| row(d, now).into()).collect();
    super::table(&header, &rows)
}

fn row(d: &DeviceView, now: u64) -> [String; 6] {
    let number = |n: Option<u64>| n.map_or("-".to_string(), |n| n.to_string());
    let running = d.workloads.iter().filter(|w| w.state == "running").count();
    let mut workloads = format!("{running}/{} running", d.workloads.len());
    if d.stale {
        workloads.push_str(" (stale)");
    }
    let last_seen = match d.last_seen {
        Some(at) => {
            let ago = Duration::from_secs(now.saturating_sub(at) / 1000);
            format!("{} ago", humantime::format_duration(ago))
        }
        None => "never".into(),
    };
    let labels: Vec<String> = d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut generation = format!("{}/{}", number(d.generation), number(d.desired_generation));
    // A refusal the device has since moved past is history, not news.
    if let Some(refused) = d.refused.as_ref().filter(|r| Some(r.generation) > d.generation) {
        generation.push_str(&format!(" (refused {})", refused.generation));
    }
    [d.id.clone(), if d.online { "yes" } else { "no" }.into(), generation, workloads, last_seen, labels.join(",")]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::Refusal;

    #[test]
    fn the_table_aligns_columns_and_shows_reported_over_desired_generation() {
        let device = DeviceView {
            id: "pump-3".into(),
            labels: [("site".to_string(), "north".to_string())].into(),
            agent_version: "0.1.0".into(),
            first_seen: Some(0),
            last_seen: Some(1_000),
            online: true,
            generation: Some(4),
            desired_generation: Some(5),
            epoch: 0,
            report_seq: 9,
            event_seq: 3,
            store_reset_at: None,
            stale: true,
            workloads: vec![],
            refused: None,
            site: None,
            site_local: Vec::new(),
        };
        let never = DeviceView { id: "new".into(), last_seen: None, generation: None, online: false, ..device.clone() };
        let text = table(&[device, never], 61_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "ID      ONLINE  GENERATION  WORKLOADS            LAST SEEN  LABELS");
        assert_eq!(lines[1], "pump-3  yes     4/5         0/0 running (stale)  1m ago     site=north");
        assert_eq!(lines[2], "new     no      -/5         0/0 running (stale)  never      site=north");
    }

    #[test]
    fn a_refused_generation_newer_than_the_stored_one_is_shown() {
        let refusal = |generation| Refusal { generation, reason: "bad signature".into() };
        let device = DeviceView {
            id: "d".into(),
            labels: BTreeMap::new(),
            agent_version: String::new(),
            first_seen: None,
            last_seen: None,
            online: true,
            generation: Some(4),
            desired_generation: Some(5),
            epoch: 0,
            report_seq: 0,
            event_seq: 0,
            store_reset_at: None,
            stale: false,
            workloads: vec![],
            refused: Some(refusal(5)),
            site: None,
            site_local: Vec::new(),
        };
        assert_eq!(row(&device, 0)[2], "4/5 (refused 5)");
        let past = DeviceView { refused: Some(refusal(3)), ..device };
        assert_eq!(row(&past, 0)[2], "4/5");
    }
}

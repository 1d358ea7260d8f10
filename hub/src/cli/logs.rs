//! `hub logs DEVICE WORKLOAD`: asks the device for the workload's last lines
//! (`send-logs`), waits for its reply to that very command, and prints them.

use std::time::Duration;

use anyhow::bail;
use outpost_proto::sync::{Command, MAX_LOG_LINES};
use tokio::time::Instant;

use super::client::ApiClient;
use crate::logs::LogsReply;

const POLL: Duration = Duration::from_millis(200);

#[derive(clap::Args)]
pub struct Args {
    device: String,
    workload: String,
    /// The last N lines (the device sends at most 1000, and 64 KiB).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=MAX_LOG_LINES as u64))]
    tail: u64,
    /// Give up after this long without the device's reply, e.g. "30s".
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

pub async fn run(client: &ApiClient, args: Args) -> anyhow::Result<()> {
    let tail = usize::try_from(args.tail)?;
    let id = client.command(&args.device, &Command::SendLogs { name: args.workload.clone(), tail }).await?;
    let deadline = Instant::now() + args.timeout;
    loop {
        // A reply to an earlier command may be there already: only this command's counts.
        if let Some(reply) = client.logs(&args.device, &args.workload).await?.filter(|r| r.command == id) {
            let (out, err) = render(&reply);
            print!("{out}");
            if let Some(err) = err {
                bail!("{}: {err}", args.device);
            }
            if reply.truncated {
                eprintln!("(older lines left out: a device sends at most {MAX_LOG_LINES} lines and 64 KiB)");
            }
            return Ok(());
        }
        if Instant::now() + POLL > deadline {
            bail!(
                "{} did not send the logs of {} within {} (command {id}): the device may be offline or busy; it runs \
                 the command when it gets it, and `hub logs` again shows the lines then",
                args.device,
                args.workload,
                humantime::format_duration(args.timeout)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The lines to print, one per line, and the device's error if it sent one.
fn render(reply: &LogsReply) -> (String, Option<&str>) {
    let out: String = reply.lines.iter().map(|line| format!("{line}\n")).collect();
    (out, reply.error.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(lines: &[&str], error: Option<&str>) -> LogsReply {
        LogsReply {
            command: 1,
            workload: "web".into(),
            received_at: 0,
            lines: lines.iter().map(|l| l.to_string()).collect(),
            truncated: false,
            error: error.map(String::from),
        }
    }

    #[test]
    fn lines_are_printed_one_per_line_and_a_devices_error_is_returned() {
        assert_eq!(render(&reply(&["a", "b"], None)), ("a\nb\n".to_string(), None));
        assert_eq!(render(&reply(&[], None)), (String::new(), None));
        let unknown = reply(&[], Some("no workload named \"web\" on this device"));
        assert_eq!(render(&unknown).1, Some("no workload named \"web\" on this device"));
    }
}

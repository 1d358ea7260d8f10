//! `hub restart DEVICE WORKLOAD`: has the device stop the workload, which its
//! reconciler then starts again.

use outpost_proto::sync::Command;

use super::client::ApiClient;

#[derive(clap::Args)]
pub struct Args {
    device: String,
    workload: String,
}

pub async fn run(client: &ApiClient, args: Args) -> anyhow::Result<()> {
    let command = Command::RestartWorkload { name: args.workload.clone() };
    let id = client.command(&args.device, &command).await?;
    println!(
        "{}: restart of {} sent (command {id}); `hub devices` shows the device's workloads as it reports them",
        args.device, args.workload
    );
    Ok(())
}

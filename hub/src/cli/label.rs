//! `hub label DEVICE key=value... key-`: changes some labels, keeps the others.

use anyhow::bail;

use super::client::ApiClient;

#[derive(clap::Args)]
pub struct Args {
    device: String,
    /// `key=value` sets a label, `key-` removes it.
    #[arg(required = true)]
    changes: Vec<String>,
}

enum Change<'a> {
    Set(&'a str, &'a str),
    Remove(&'a str),
}

fn parse(arg: &str) -> anyhow::Result<Change<'_>> {
    if let Some((key, value)) = arg.split_once('=') {
        return Ok(Change::Set(key, value));
    }
    match arg.strip_suffix('-') {
        Some(key) => Ok(Change::Remove(key)),
        None => bail!("expected key=value, or key- to remove a label, not {arg:?}"),
    }
}

pub async fn run(client: &ApiClient, args: Args) -> anyhow::Result<()> {
    let changes = args.changes.iter().map(|c| parse(c)).collect::<anyhow::Result<Vec<_>>>()?;
    // The API replaces the whole map: start from the current one. A device
    // the hub does not know yet starts with none.
    let mut labels = client.find_device(&args.device).await?.map(|d| d.labels).unwrap_or_default();
    for change in changes {
        match change {
            Change::Set(key, value) => labels.insert(key.to_string(), value.to_string()),
            Change::Remove(key) => labels.remove(key),
        };
    }
    let device = client.put_labels(&args.device, &labels).await?;
    let shown: Vec<String> = device.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("{}: {}", device.id, if shown.is_empty() { "no labels".into() } else { shown.join(" ") });
    Ok(())
}

//! The hub binary. Its broker, registry and API arrive with issue 4 (sync);
//! until then it only answers `--version` and `--help`.

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Outpost hub: one binary per site or cloud (broker, registry, rollouts)")]
struct Cli {}

fn main() {
    Cli::parse();
    eprintln!("hub: nothing to serve yet; the broker and registry arrive with the sync issue (4)");
    std::process::exit(2);
}

//! The edge-agent binary: thin over the library, one file per subcommand in cli/.

use clap::Parser;

fn main() {
    let cli = edge_agent::cli::Cli::parse();
    if let Err(e) = edge_agent::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

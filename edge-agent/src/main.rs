//! The edge-agent binary: thin over the library, one file per subcommand in cli/.

use clap::Parser;

fn main() {
    // A command line tool whose output is piped into `head` or `grep -q`
    // should end quietly when the reader goes, not panic on a failed print.
    // SAFETY: setting a default disposition before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = edge_agent::cli::Cli::parse();
    if let Err(e) = edge_agent::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

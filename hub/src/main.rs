//! The hub binary: thin over the library, one file per subcommand in cli/.

use clap::Parser;

fn main() {
    // A command whose output is piped into `head` should end quietly when
    // the reader goes, not panic on a failed print.
    // SAFETY: setting a default disposition before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = hub::cli::Cli::parse();
    if let Err(e) = hub::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

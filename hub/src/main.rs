//! The hub binary: thin over the library, one file per subcommand in cli/.

use clap::Parser;

fn main() {
    // A command whose output is piped into `head` should end quietly when
    // the reader goes, not panic on a failed print.
    // SAFETY: setting a default disposition before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // glibc gives each thread that allocates its own arena; the rollout
    // engine's passes on blocking threads then leave memory spread over many
    // of them. Two arenas: 55 MB less at 10,000 devices (docs/benchmarks.md).
    #[cfg(target_env = "gnu")]
    // SAFETY: a malloc tunable, set before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2)
    };
    let cli = hub::cli::Cli::parse();
    if let Err(e) = hub::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

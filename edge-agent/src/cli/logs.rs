use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use anyhow::Context;

use crate::runtime::logs::read_lines;
use crate::runtime::{RuntimeError, Supervisor};

#[derive(clap::Args)]
pub struct LogsArgs {
    name: String,
    /// Keep printing new lines as they come.
    #[arg(short, long)]
    follow: bool,
    /// Only the last N lines.
    #[arg(long)]
    tail: Option<usize>,
}

pub fn run(supervisor: &Supervisor, args: LogsArgs) -> anyhow::Result<()> {
    let instance = supervisor.resolve(&args.name)?;
    let dir = supervisor.paths().workload(&instance).logs();
    let lines = match read_lines(&dir, args.tail) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        other => other.with_context(|| format!("cannot read the logs in {}", dir.display()))?,
    };
    for line in lines {
        println!("{line}");
    }
    if args.follow {
        follow(&dir.join("container.log"))?;
    }
    Ok(())
}

/// Prints what is appended to the current file, and reopens it when rotation replaces it.
fn follow(path: &std::path::Path) -> anyhow::Result<()> {
    let open = || -> std::io::Result<(BufReader<std::fs::File>, u64)> {
        let mut file = std::fs::File::open(path)?;
        let inode = file.metadata()?.ino();
        file.seek(SeekFrom::End(0))?;
        Ok((BufReader::new(file), inode))
    };
    let (mut reader, mut inode) = open().map_err(|_| RuntimeError::NotFound(path.display().to_string()))?;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? > 0 {
            print!("{line}");
            continue;
        }
        std::thread::sleep(Duration::from_millis(200));
        if std::fs::metadata(path).is_ok_and(|m| m.ino() != inode) {
            let mut file = std::fs::File::open(path)?;
            inode = file.metadata()?.ino();
            file.seek(SeekFrom::Start(0))?;
            reader = BufReader::new(file);
        }
    }
}

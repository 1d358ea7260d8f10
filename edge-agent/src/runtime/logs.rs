//! A workload's stdout and stderr, kept in size-capped rotating files.
//!
//! `container.log` is written; when it would pass `max_size` it becomes
//! `container.log.1`, the older ones shift up and the oldest beyond `files` is
//! deleted. Each line is `RFC3339-time stream text`, like the CRI log format,
//! so a reader can merge and filter them.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

const CURRENT: &str = "container.log";
/// A line longer than this is cut into pieces, so one runaway line cannot hold memory.
pub const MAX_LINE: usize = 16 * 1024;

pub struct RotatingLog {
    dir: PathBuf,
    max_size: u64,
    files: u32,
    file: File,
    size: u64,
}

impl RotatingLog {
    /// `files` counts the current file too; at least 1.
    pub fn open(dir: &Path, max_size: u64, files: u32) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = OpenOptions::new().create(true).append(true).open(dir.join(CURRENT))?;
        let size = file.metadata()?.len();
        Ok(Self { dir: dir.to_path_buf(), max_size, files: files.max(1), file, size })
    }

    pub fn write_line(&mut self, stream: &str, text: &[u8]) -> io::Result<()> {
        let stamp = humantime::format_rfc3339_millis(SystemTime::now());
        let mut line = Vec::with_capacity(text.len() + 40);
        write!(line, "{stamp} {stream} ")?;
        line.extend_from_slice(text);
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.max_size {
            self.rotate()?;
        }
        self.file.write_all(&line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let path = |n: u32| match n {
            0 => self.dir.join(CURRENT),
            n => self.dir.join(format!("{CURRENT}.{n}")),
        };
        let _ = std::fs::remove_file(path(self.files - 1));
        for n in (0..self.files - 1).rev() {
            match std::fs::rename(path(n), path(n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        self.file = OpenOptions::new().create(true).append(true).open(path(0))?;
        self.size = 0;
        Ok(())
    }
}

/// Splits a byte stream into lines for the log, holding at most one partial line.
#[derive(Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
}

impl LineBuffer {
    pub fn push(&mut self, bytes: &[u8], mut emit: impl FnMut(&[u8])) {
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(offset) = self.pending[start..].iter().position(|&b| b == b'\n') {
            emit(&self.pending[start..start + offset]);
            start += offset + 1;
        }
        self.pending.drain(..start);
        while self.pending.len() >= MAX_LINE {
            emit(&self.pending[..MAX_LINE]);
            self.pending.drain(..MAX_LINE);
        }
    }

    pub fn flush(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.pending.is_empty() {
            emit(&self.pending);
            self.pending.clear();
        }
    }
}

/// The log files of a workload, oldest first.
pub fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let n = name.strip_prefix(CURRENT)?.strip_prefix('.')?.parse().ok()?;
            Some((n, entry.path()))
        })
        .collect();
    rotated.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    let current = dir.join(CURRENT);
    if current.exists() {
        files.push(current);
    }
    files
}

/// The last `tail` lines over all files (all lines if `None`), oldest first.
/// Holds no more than `tail` lines at a time: the files may be large.
pub fn read_lines(dir: &Path, tail: Option<usize>) -> io::Result<Vec<String>> {
    let mut lines = VecDeque::new();
    for path in log_files(dir) {
        for line in BufReader::new(File::open(path)?).lines() {
            lines.push_back(line?);
            if tail.is_some_and(|tail| lines.len() > tail) {
                lines.pop_front();
            }
        }
    }
    Ok(lines.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_rotates_at_the_size_cap_and_keeps_the_set_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RotatingLog::open(dir.path(), 200, 3).unwrap();
        for i in 0..40 {
            log.write_line("stdout", format!("line {i:02}").as_bytes()).unwrap();
        }
        let files = log_files(dir.path());
        assert_eq!(files.len(), 3, "{files:?}");
        for f in &files {
            assert!(std::fs::metadata(f).unwrap().len() <= 200);
        }
        let lines = read_lines(dir.path(), None).unwrap();
        assert!(lines.last().unwrap().ends_with("stdout line 39"));
        assert!(!lines.iter().any(|l| l.ends_with("line 00")), "the oldest lines were rotated out");
        let tail = read_lines(dir.path(), Some(2)).unwrap();
        assert!(tail[0].ends_with("line 38") && tail[1].ends_with("line 39"));
        assert!(read_lines(dir.path(), Some(0)).unwrap().is_empty());
    }

    #[test]
    fn reopened_log_appends_and_counts_its_existing_size() {
        let dir = tempfile::tempdir().unwrap();
        RotatingLog::open(dir.path(), 1000, 2).unwrap().write_line("stderr", b"first").unwrap();
        let mut log = RotatingLog::open(dir.path(), 1000, 2).unwrap();
        assert!(log.size > 0);
        log.write_line("stdout", b"second").unwrap();
        assert_eq!(read_lines(dir.path(), None).unwrap().len(), 2);
    }

    #[test]
    fn line_buffer_splits_lines_across_reads_and_cuts_runaway_lines() {
        let mut buffer = LineBuffer::default();
        let mut out: Vec<Vec<u8>> = Vec::new();
        buffer.push(b"hel", |l| out.push(l.to_vec()));
        buffer.push(b"lo\nwor", |l| out.push(l.to_vec()));
        buffer.flush(|l| out.push(l.to_vec()));
        assert_eq!(out, [b"hello".to_vec(), b"wor".to_vec()]);
        out.clear();
        buffer.push(&vec![b'x'; MAX_LINE * 2 + 5], |l| out.push(l.to_vec()));
        assert_eq!(out.len(), 2);
        assert_eq!(buffer.pending.len(), 5);
    }
}

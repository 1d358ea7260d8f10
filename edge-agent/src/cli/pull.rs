use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::runtime::image::{Image, ImageError, ImageStore, PullOptions, PullProgress};
use crate::runtime::{Paths, Supervisor};

#[derive(clap::Args)]
pub struct PullArgs {
    /// Image reference: `registry/repository:tag` or `registry/repository@sha256:...`.
    reference: String,
    /// Times a failing download is retried in a row (resuming each time) before giving up.
    #[arg(long, default_value_t = 5)]
    retries: u32,
    /// Seconds to wait for the registry to connect, or to send more data.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

pub async fn run(paths: &Paths, pulls: &PullOptions, args: PullArgs) -> anyhow::Result<()> {
    let store = ImageStore::open(&paths.images())?;
    let opts = PullOptions { retries: args.retries, timeout: Duration::from_secs(args.timeout), ..pulls.clone() };
    let image = pull(paths, &store, &args.reference, &opts).await?;
    println!("pulled {} ({}, {} layers, {})", image.reference, image.digest, image.layers.len(), mib(image.size));
    Ok(())
}

/// The image for `reference`: the local one if present, else pulled.
pub fn ensure_image(supervisor: &Supervisor, pulls: &PullOptions, reference: &str) -> anyhow::Result<Image> {
    let paths = supervisor.paths();
    let store = ImageStore::open(&paths.images())?;
    if let Some(image) = store.find(reference)? {
        return Ok(image);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime for the pull")?;
    runtime.block_on(pull(paths, &store, reference, pulls))
}

/// Pulls with progress bars; a full disk gets one gc and one more try.
async fn pull(paths: &Paths, store: &ImageStore, reference: &str, opts: &PullOptions) -> anyhow::Result<Image> {
    match store.pull(reference, opts, &Bars::new()).await {
        Err(e) if e.is_no_space() => {
            make_room(paths, &e)?;
            Ok(store.pull(reference, opts, &Bars::new()).await?)
        }
        other => Ok(other?),
    }
}

/// After a pull or import ran out of space: removes the images no workload
/// uses, so that it can be tried once more.
pub(crate) fn make_room(paths: &Paths, error: &ImageError) -> anyhow::Result<()> {
    eprintln!("{error}");
    eprintln!("collecting unused images, then trying again");
    let report = super::gc::collect(paths)?;
    super::gc::print_report(&report);
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// One progress bar per blob.
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Bars {
    fn new() -> Self {
        Self { multi: MultiProgress::new(), bars: Mutex::new(HashMap::new()) }
    }

    fn bar(&self, digest: &str, total: u64) -> ProgressBar {
        let mut bars = self.bars.lock().expect("progress bars lock");
        bars.entry(digest.to_string())
            .or_insert_with(|| {
                let style =
                    ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}")
                        .expect("valid progress template")
                        .progress_chars("=> ");
                let short = digest.trim_start_matches("sha256:").chars().take(12).collect::<String>();
                self.multi.add(ProgressBar::new(total).with_style(style).with_prefix(short))
            })
            .clone()
    }

    /// A line above the bars, or on stderr when there are no bars (not a terminal).
    fn say(&self, line: String) {
        if self.multi.is_hidden() {
            eprintln!("{line}");
        } else {
            drop(self.multi.println(line));
        }
    }
}

impl PullProgress for Bars {
    fn blob_started(&self, digest: &str, resumed_from: u64, total: u64) {
        let bar = self.bar(digest, total);
        bar.set_position(resumed_from);
        if resumed_from > 0 {
            bar.set_message(format!("resuming at {}", mib(resumed_from)));
            self.say(format!("{digest}: resuming at {}", mib(resumed_from)));
        }
    }

    fn blob_progress(&self, digest: &str, done: u64, total: u64) {
        self.bar(digest, total).set_position(done);
    }

    fn blob_done(&self, digest: &str, total: u64) {
        let bar = self.bar(digest, total);
        bar.set_position(total);
        bar.finish_with_message("done");
    }

    fn retrying(&self, what: &str, attempt: u32, wait: Duration, error: &ImageError) {
        self.say(format!("{what}: {error}; retry {attempt} in {:.1}s", wait.as_secs_f64()));
    }

    fn unpacking(&self, digest: &str) {
        if let Some(bar) = self.bars.lock().expect("progress bars lock").get(digest) {
            bar.set_message("unpacking");
        }
    }
}

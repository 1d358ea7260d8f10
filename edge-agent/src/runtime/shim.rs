//! The per-workload shim: the only code that starts processes with libcontainer.
//!
//! libcontainer clones the calling process and runs Rust code before exec,
//! which can deadlock in a multi-threaded process (see design notes). So each
//! workload gets this single-threaded process, the agent's own binary
//! re-executed in its own session, like containerd-shim and conmon. It creates
//! and starts the container, owns its stdout and stderr, reaps it, records its
//! exit, restarts it per policy, runs its health probes, and publishes a status
//! file. It outlives the agent, so workloads keep running when the agent
//! stops, crashes or is replaced.
//!
//! Signals arrive through a self-pipe rather than a blocked signal mask: a
//! blocked mask would be inherited by the container, whose init would then
//! never see SIGTERM.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{pipe2, Pid};
use outpost_proto::workload::HealthCheck;

use super::cgroups;
use super::health::{self, Health, HealthTracker};
use super::logs::{LineBuffer, RotatingLog};
use super::paths::{Paths, WorkloadPaths};
use super::record::WorkloadRecord;
use super::restart::{Decision, RestartTracker};
use super::rootfs;
use super::status::{unix_now, ExitStatus, State, WorkloadStatus};

static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(signal: libc::c_int) {
    if signal != libc::SIGCHLD {
        STOP_REQUESTED.store(true, Ordering::SeqCst);
    }
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; errno is saved around it.
        unsafe {
            let errno = *libc::__errno_location();
            libc::write(fd, [1u8].as_ptr().cast(), 1);
            *libc::__errno_location() = errno;
        }
    }
}

fn install_signal_handlers() -> nix::Result<OwnedFd> {
    let (wake_read, wake_write) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    WAKE_FD.store(wake_write.as_raw_fd(), Ordering::SeqCst);
    std::mem::forget(wake_write);
    // SA_RESTART so that libcontainer's own blocking calls are not cut short.
    let action =
        SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART | SaFlags::SA_NOCLDSTOP, SigSet::empty());
    for signal in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only touches atomics and calls write(2).
        unsafe { sigaction(signal, &action)? };
    }
    // Rust ignores SIGPIPE, and an ignored signal stays ignored across exec:
    // give the container the default back.
    // SAFETY: setting a default disposition.
    unsafe { sigaction(Signal::SIGPIPE, &SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty()))? };
    Ok(wake_read)
}

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("cannot read workload `{name}`: {source}")]
    Record { name: String, source: std::io::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Nix(#[from] nix::Error),
    #[error("{0}")]
    Start(String),
}

struct Running {
    container: Container,
    pid: Pid,
    since: Instant,
    stdout: Option<File>,
    stderr: Option<File>,
    health: Option<HealthTracker>,
    next_probe: Option<Instant>,
    probe: Option<(Pid, Instant)>,
}

enum Phase {
    Running(Box<Running>),
    Backoff { until: Instant },
    Done,
}

pub struct Shim {
    paths: Paths,
    workload: WorkloadPaths,
    record: WorkloadRecord,
    status: WorkloadStatus,
    restarts: RestartTracker,
    log: RotatingLog,
    stdout_lines: LineBuffer,
    stderr_lines: LineBuffer,
    stop_deadline: Option<Instant>,
}

/// Runs the shim of workload `name` until the workload is stopped or exits for
/// good. `ready` hears `ok` once the first start succeeded, or the error.
pub fn run(paths: Paths, name: &str, mut ready: Option<File>) -> Result<(), ShimError> {
    let wake = install_signal_handlers()?;
    let workload = paths.workload(name);
    let record = WorkloadRecord::read(&workload.record())
        .map_err(|source| ShimError::Record { name: name.to_string(), source })?;
    std::fs::create_dir_all(&workload.run)?;
    std::fs::create_dir_all(paths.containers())?;
    let status = WorkloadStatus::starting(name, std::process::id() as i32);
    let log = RotatingLog::open(&workload.logs(), record.log_max_size, record.log_files)?;
    let mut shim = Shim {
        paths,
        workload,
        record,
        status,
        restarts: RestartTracker::default(),
        log,
        stdout_lines: LineBuffer::default(),
        stderr_lines: LineBuffer::default(),
        stop_deadline: None,
    };
    shim.publish();

    let first = shim.start_container();
    if let Some(ready) = ready.as_mut() {
        let message = match &first {
            Ok(running) => format!("ok {}\n", running.pid),
            Err(e) => format!("error {e}\n"),
        };
        let _ = ready.write_all(message.as_bytes());
    }
    drop(ready);
    let phase = match first {
        Ok(running) => Phase::Running(Box::new(running)),
        Err(e) => {
            shim.status.state = State::Failed;
            shim.status.error = Some(e.clone());
            shim.publish();
            return Err(ShimError::Start(e));
        }
    };
    shim.event_loop(wake, phase);
    Ok(())
}

impl Shim {
    fn publish(&self) {
        if let Err(e) = self.status.write(&self.workload.status()) {
            tracing::error!("cannot write status of {}: {e}", self.status.name);
        }
    }

    /// The instance id: the container's id, its directories and its cgroup.
    fn name(&self) -> &str {
        &self.status.name
    }

    fn start_container(&mut self) -> Result<Running, String> {
        let name = self.name().to_string();
        rootfs::mount_overlay(
            &self.record.layers,
            &self.workload.upper(),
            &self.workload.work(),
            &self.workload.rootfs(),
        )
        .map_err(|e| e.to_string())?;
        remove_leftover_container(&self.paths, &name);

        let (stdout_read, stdout_write) = pipe2(OFlag::O_CLOEXEC).map_err(|e| e.to_string())?;
        let (stderr_read, stderr_write) = pipe2(OFlag::O_CLOEXEC).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let mut container = ContainerBuilder::new(name.clone(), SyscallType::default())
            .with_executor(DefaultExecutor {})
            .with_root_path(self.paths.containers())
            .and_then(|b| b.with_stdout(stdout_write).with_stderr(stderr_write).validate_id())
            .and_then(|b| b.as_init(self.workload.bundle()).with_systemd(false).with_detach(true).build())
            .map_err(|e| format!("cannot create the container: {e}"))?;
        if let Err(e) = container.start() {
            let _ = container.delete(true);
            return Err(format!("cannot start the container: {e}"));
        }
        let pid = container.pid().ok_or("the runtime recorded no pid for the container")?;
        for fd in [&stdout_read, &stderr_read] {
            nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
                .map_err(|e| e.to_string())?;
        }
        let health = self
            .record
            .spec
            .health
            .as_ref()
            .map(|probe| (HealthTracker::new(started), started + probe.interval.min(Duration::from_secs(1))));
        self.status.state = State::Running;
        self.status.pid = Some(pid.as_raw());
        self.status.started_at = Some(unix_now());
        self.status.error = None;
        self.status.health = if health.is_some() { Health::Starting } else { Health::None };
        self.publish();
        tracing::info!(workload = %name, pid = pid.as_raw(), "container started");
        Ok(Running {
            container,
            pid,
            since: started,
            stdout: Some(File::from(stdout_read)),
            stderr: Some(File::from(stderr_read)),
            next_probe: health.as_ref().map(|(_, at)| *at),
            health: health.map(|(tracker, _)| tracker),
            probe: None,
        })
    }

    fn event_loop(&mut self, wake: OwnedFd, mut phase: Phase) {
        let mut wake = File::from(wake);
        loop {
            if STOP_REQUESTED.swap(false, Ordering::SeqCst) {
                phase = self.begin_stop(phase);
            }
            phase = match phase {
                Phase::Done => return,
                Phase::Backoff { until } if Instant::now() >= until => self.restart(),
                Phase::Running(mut running) => {
                    self.run_due_probe(&mut running);
                    if self.stop_deadline.is_some_and(|d| Instant::now() >= d) {
                        tracing::warn!(workload = %self.name(), "grace period over: SIGKILL");
                        let _ = running.container.kill(Signal::SIGKILL, true);
                        self.stop_deadline = None;
                    }
                    match self.reap(&mut running) {
                        Some(exit) => self.on_exit(*running, exit),
                        None => Phase::Running(running),
                    }
                }
                other => other,
            };
            if matches!(phase, Phase::Done) {
                return;
            }
            self.wait_for_event(&mut wake, &mut phase);
        }
    }

    /// Sleeps until a signal, container output, or the next deadline.
    fn wait_for_event(&mut self, wake: &mut File, phase: &mut Phase) {
        let now = Instant::now();
        let mut deadlines: Vec<Instant> = self.stop_deadline.into_iter().collect();
        match phase {
            Phase::Backoff { until } => deadlines.push(*until),
            Phase::Running(running) => {
                deadlines.extend(running.next_probe);
                deadlines.extend(running.probe.map(|(_, deadline)| deadline));
            }
            Phase::Done => {}
        }
        let timeout = deadlines.iter().min().map(|d| d.saturating_duration_since(now));
        let timeout = match timeout {
            Some(t) => PollTimeout::try_from(t.as_millis().min(60_000) as i32 + 1).unwrap_or(PollTimeout::MAX),
            None => PollTimeout::try_from(60_000).unwrap_or(PollTimeout::MAX),
        };
        let (out, err) = match phase {
            Phase::Running(running) => (running.stdout.take(), running.stderr.take()),
            _ => (None, None),
        };
        let mut fds = vec![PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
        if let Some(f) = &out {
            fds.push(PollFd::new(f.as_fd(), PollFlags::POLLIN));
        }
        if let Some(f) = &err {
            fds.push(PollFd::new(f.as_fd(), PollFlags::POLLIN));
        }
        let _ = poll(&mut fds, timeout);
        drop(fds);
        let mut drain = [0u8; 64];
        while matches!(wake.read(&mut drain), Ok(n) if n > 0) {}
        let out = out.and_then(|f| self.pump(f, "stdout"));
        let err = err.and_then(|f| self.pump(f, "stderr"));
        if let Phase::Running(running) = phase {
            running.stdout = out;
            running.stderr = err;
        }
    }

    /// Copies what is waiting on a pipe to the log; drops the pipe at EOF.
    fn pump(&mut self, mut pipe: File, stream: &'static str) -> Option<File> {
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => {
                    self.flush_lines(stream);
                    return None;
                }
                Ok(n) => {
                    let lines = if stream == "stdout" { &mut self.stdout_lines } else { &mut self.stderr_lines };
                    let log = &mut self.log;
                    lines.push(&buf[..n], |line| {
                        if let Err(e) = log.write_line(stream, line) {
                            tracing::error!("cannot write the workload's log: {e}");
                        }
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(pipe),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
            }
        }
    }

    fn flush_lines(&mut self, stream: &'static str) {
        let lines = if stream == "stdout" { &mut self.stdout_lines } else { &mut self.stderr_lines };
        let log = &mut self.log;
        lines.flush(|line| {
            let _ = log.write_line(stream, line);
        });
    }

    fn reap(&mut self, running: &mut Running) -> Option<WaitStatus> {
        if let Some((probe_pid, _)) = running.probe {
            if let Ok(status) = waitpid(probe_pid, Some(WaitPidFlag::WNOHANG)) {
                if status != WaitStatus::StillAlive {
                    running.probe = None;
                    let ok = matches!(status, WaitStatus::Exited(_, 0));
                    self.record_probe(running, ok);
                }
            }
        }
        // Only our own pids: waiting for any child would steal the exit of
        // libcontainer's helper processes from libcontainer itself.
        match waitpid(running.pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => None,
            Ok(status) => Some(status),
            // Reaped by someone else: it is gone, its status unknown.
            Err(nix::errno::Errno::ECHILD) => Some(WaitStatus::StillAlive),
            Err(_) => None,
        }
    }

    fn on_exit(&mut self, mut running: Running, status: WaitStatus) -> Phase {
        if let Some(out) = running.stdout.take() {
            self.pump(out, "stdout");
        }
        if let Some(err) = running.stderr.take() {
            self.pump(err, "stderr");
        }
        self.flush_lines("stdout");
        self.flush_lines("stderr");
        if let Some((probe_pid, _)) = running.probe.take() {
            let _ = kill(probe_pid, Signal::SIGKILL);
            let _ = waitpid(probe_pid, None);
        }
        let oom_killed =
            self.record.spec.resources.memory.is_some() && cgroups::oom_kills(&self.record.cgroups_path) > 0;
        let (code, signal) = match status {
            WaitStatus::Exited(_, code) => (Some(code), None),
            WaitStatus::Signaled(_, signal, _) => (None, Some(signal.as_str().to_string())),
            _ => (None, None),
        };
        let exit = ExitStatus { code, signal, oom_killed, at: unix_now() };
        if let Err(e) = running.container.delete(true) {
            tracing::warn!(workload = %self.name(), "cannot delete the exited container: {e}");
        }
        tracing::info!(workload = %self.name(), "container exited: {}", exit.describe());
        let ran_for = running.since.elapsed();
        let success = exit.success();
        self.status.last_exit = Some(exit);
        self.status.pid = None;
        self.status.health = Health::None;

        if self.stop_deadline.take().is_some() || self.status.state == State::Stopping {
            self.status.state = State::Stopped;
            self.publish();
            return Phase::Done;
        }
        self.decide_restart(success, ran_for, State::Exited)
    }

    /// Applies the restart policy to a run that ended; `final_state` is where
    /// the workload rests when the policy says no more.
    fn decide_restart(&mut self, success: bool, ran_for: Duration, final_state: State) -> Phase {
        let decision = self.restarts.on_exit(&self.record.spec.restart, success, ran_for);
        self.status.restarts = self.restarts.restarts;
        self.status.crash_loop = self.restarts.crash_looping(&self.record.spec.restart);
        let phase = match decision {
            Decision::RestartAfter(delay) => {
                self.status.state = State::Backoff;
                Phase::Backoff { until: Instant::now() + delay }
            }
            Decision::GiveUp => {
                self.status.state = final_state;
                Phase::Done
            }
        };
        self.publish();
        phase
    }

    fn restart(&mut self) -> Phase {
        self.status.state = State::Starting;
        self.publish();
        match self.start_container() {
            Ok(running) => Phase::Running(Box::new(running)),
            Err(e) => {
                // A restart that cannot even start (the disk is full, a device
                // went away) counts as a quick failed run and backs off.
                tracing::error!(workload = %self.name(), "restart failed: {e}");
                self.status.error = Some(e);
                self.decide_restart(false, Duration::ZERO, State::Failed)
            }
        }
    }

    fn begin_stop(&mut self, phase: Phase) -> Phase {
        match phase {
            Phase::Running(mut running) => {
                if self.status.state != State::Stopping {
                    tracing::info!(workload = %self.name(), "stopping: SIGTERM, then SIGKILL after {:?}", self.record.spec.stop_grace_period);
                    self.status.state = State::Stopping;
                    self.publish();
                    let _ = running.container.kill(Signal::SIGTERM, false);
                    self.stop_deadline = Some(Instant::now() + self.record.spec.stop_grace_period);
                }
                Phase::Running(running)
            }
            Phase::Backoff { .. } | Phase::Done => {
                self.status.state = State::Stopped;
                self.publish();
                Phase::Done
            }
        }
    }

    fn run_due_probe(&mut self, running: &mut Running) {
        let Some(probe) = self.record.spec.health.clone() else { return };
        let now = Instant::now();
        if let Some((probe_pid, deadline)) = running.probe {
            if now >= deadline {
                let _ = kill(probe_pid, Signal::SIGKILL);
                let _ = waitpid(probe_pid, None);
                running.probe = None;
                self.record_probe(running, false);
            }
            return;
        }
        if self.status.state == State::Stopping || running.next_probe.is_none_or(|at| now < at) {
            return;
        }
        running.next_probe = Some(now + probe.interval);
        match &probe.check {
            HealthCheck::Tcp(port) => {
                let ok = health::tcp_check(*port, probe.timeout);
                self.record_probe(running, ok);
            }
            HealthCheck::Http(http) => {
                let ok = health::http_check(http.port, &http.path, probe.timeout);
                self.record_probe(running, ok);
            }
            HealthCheck::Exec(command) => match self.exec_probe(command) {
                Ok(pid) => running.probe = Some((pid, now + probe.timeout)),
                Err(e) => {
                    tracing::warn!(workload = %self.name(), "exec probe could not start: {e}");
                    self.record_probe(running, false);
                }
            },
        }
    }

    fn exec_probe(&self, command: &[String]) -> Result<Pid, String> {
        let devnull = || File::options().write(true).open("/dev/null").map_err(|e| e.to_string());
        let (stdout, stderr) = (devnull()?, devnull()?);
        ContainerBuilder::new(self.name().to_string(), SyscallType::default())
            .with_executor(DefaultExecutor {})
            .with_root_path(self.paths.containers())
            .and_then(|b| {
                b.with_stdout(stdout)
                    .with_stderr(stderr)
                    .as_tenant()
                    .with_container_args(command.to_vec())
                    .with_detach(true)
                    .build()
            })
            .map_err(|e| e.to_string())
    }

    fn record_probe(&mut self, running: &mut Running, ok: bool) {
        let (Some(probe), Some(tracker)) = (self.record.spec.health.as_ref(), running.health.as_mut()) else { return };
        let health = tracker.record(probe, ok, Instant::now());
        if health != self.status.health {
            tracing::info!(workload = %self.record.spec.name, ?health, "health changed");
            self.status.health = health;
            self.publish();
        }
    }
}

/// A container of this id left by a shim that died, or by an unclean stop:
/// libcontainer refuses to create a second one with the same id.
pub fn remove_leftover_container(paths: &Paths, name: &str) {
    let dir: PathBuf = paths.containers().join(name);
    if !dir.exists() {
        return;
    }
    match Container::load(dir.clone()) {
        Ok(mut old) => {
            let _ = old.kill(Signal::SIGKILL, true);
            if let Err(e) = old.delete(true) {
                tracing::warn!("cannot delete leftover container {name}: {e}");
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        Err(_) => {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

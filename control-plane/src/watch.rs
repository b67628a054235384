//! Watches a mesh directory and reports every new state of it: a
//! [`MeshSnapshot`] when it loads, or every problem when it does not.
//!
//! The watcher is a dedicated thread (file reads and snapshot builds are
//! blocking work and never run on async workers) that polls the directory
//! every `poll_interval`. Each poll reads the mesh files (`*.yaml`/`*.yml`,
//! not hidden) and hashes their names and contents; only a changed
//! fingerprint leads to a reload. So touching a file, or an editor's
//! swap, backup or lock file (`.x.yaml.swp`, `x.yaml~`, `.#x.yaml`), does
//! nothing, and a persistent error (an unreadable file) is reported once,
//! not on every poll. A change that keeps the meaning (a comment) is
//! reloaded and reported, and gives identical per-node versions.
//!
//! Polling rather than file-system notifications: it works the same on
//! every platform and for mounted volumes (a Kubernetes ConfigMap swaps a
//! symlink), a mesh directory is a handful of small files, and 250 ms keeps
//! a change well within a second.
//!
//! Callers bridge into async code from the callback, e.g. with a
//! `tokio::sync::watch::Sender` or a bounded channel's `blocking_send`. A
//! rejected update changes nothing: keep serving the last loaded snapshot.

use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::mesh::{self, Mesh, MeshErrors};
use crate::resources::MeshSnapshot;

/// How often [`spawn`] polls unless told otherwise.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// A new state of the watched directory.
#[derive(Debug)]
pub enum MeshUpdate {
    /// The directory loaded; every node's resources.
    Loaded(MeshSnapshot),
    /// The directory changed but cannot be loaded; every problem.
    Rejected(MeshErrors),
}

/// A running watcher. [`WatchHandle::stop`] stops it and waits for its
/// thread; dropping the handle stops it without waiting.
#[derive(Debug)]
pub struct WatchHandle {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl WatchHandle {
    /// Stops the watcher and waits until its thread has ended (at most the
    /// poll or callback in progress). Blocking: from async code, call it in
    /// `spawn_blocking` or drop the handle instead. No update is reported
    /// after it returns.
    pub fn stop(mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            // A panic in the callback has already been reported by the
            // panic hook; there is nothing left to stop.
            let _ = thread.join();
        }
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        // Dropping the sender wakes the thread, which then returns.
        self.stop.take();
    }
}

/// Starts watching `dir`: the first poll happens at once and always reports
/// (the initial load), then every `poll_interval` a change is reported.
/// `on_update` runs on the watcher's thread, one update at a time.
///
/// Fails only if the thread cannot be started.
pub fn spawn(
    dir: PathBuf,
    poll_interval: Duration,
    mut on_update: impl FnMut(MeshUpdate) + Send + 'static,
) -> std::io::Result<WatchHandle> {
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("weft-mesh-watch".into())
        .spawn(move || {
            let mut poller = Poller::new(dir);
            loop {
                if let Some(update) = poller.poll() {
                    on_update(update);
                }
                // Waiting on the stop channel is the poll timer, so a stop
                // is seen at once rather than after the interval.
                match stopped.recv_timeout(poll_interval) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        })?;
    Ok(WatchHandle {
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// One directory's last seen fingerprint; `poll` reports what changed.
#[derive(Debug)]
pub(crate) struct Poller {
    dir: PathBuf,
    last: Option<String>,
    /// The mesh files' names, inodes, sizes and modification times at the
    /// last read: while they stay the same, the files are not read again.
    last_stat: Option<Vec<FileStat>>,
}

impl Poller {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            last: None,
            last_stat: None,
        }
    }

    /// Reads the directory; reloads and returns an update if its
    /// fingerprint differs from the last poll's. Blocking.
    ///
    /// PERF: reading and hashing every file on every poll cost the control
    /// plane 469 ms of CPU per second with a 5,000-workload mesh
    /// (`weft-bench xds`, benches/RESULTS.md); the files are now read only
    /// when a name, size or modification time changed.
    pub(crate) fn poll(&mut self) -> Option<MeshUpdate> {
        let stat = stat_dir(&self.dir);
        if stat.is_some() && stat == self.last_stat {
            return None;
        }
        self.last_stat = stat;
        let read = mesh::read_dir(&self.dir);
        let fingerprint = fingerprint(&read);
        if self.last.as_ref() == Some(&fingerprint) {
            return None;
        }
        self.last = Some(fingerprint);
        let update = read
            .and_then(|files| Mesh::parse(&files))
            .and_then(|mesh| mesh.snapshot());
        Some(match update {
            Ok(snapshot) => MeshUpdate::Loaded(snapshot),
            Err(errors) => MeshUpdate::Rejected(errors),
        })
    }
}

/// What identifies one version of a file without reading it: name, inode
/// (an atomic rename always makes a new one), size and modification time.
/// Only an in-place rewrite to the same size within one timestamp tick
/// (a few milliseconds) goes unseen; write files atomically.
type FileStat = (PathBuf, u64, u64, Option<std::time::SystemTime>);

/// The mesh files of `dir`, sorted; `None` if the directory cannot be
/// listed (the read then reports why).
fn stat_dir(dir: &std::path::Path) -> Option<Vec<FileStat>> {
    use std::os::unix::fs::MetadataExt as _;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).ok()? {
        let path = entry.ok()?.path();
        if !mesh::is_mesh_file(&path) {
            continue;
        }
        // Follows symbolic links, as reading does (ConfigMap mounts are
        // links to a directory swapped atomically).
        // An entry that cannot be read (a dangling link) is skipped, as
        // the read skips it; it must not disable this check for good.
        let Ok(metadata) = std::fs::metadata(&path) else {
            continue;
        };
        if metadata.is_file() {
            files.push((
                path,
                metadata.ino(),
                metadata.len(),
                metadata.modified().ok(),
            ));
        }
    }
    files.sort();
    Some(files)
}

/// A hash of what a poll read: every file's name and contents, or the read
/// errors (so that the same failure is not reported again).
fn fingerprint(read: &Result<Vec<mesh::SourceFile>, MeshErrors>) -> String {
    let mut hasher = sha1_smol::Sha1::new();
    match read {
        Ok(files) => {
            for file in files {
                hasher.update(file.name.as_bytes());
                hasher.update(&[0]);
                hasher.update(&(file.text.len() as u64).to_le_bytes());
                hasher.update(file.text.as_bytes());
            }
        }
        Err(errors) => {
            hasher.update(b"\x01error");
            hasher.update(errors.to_string().as_bytes());
        }
    }
    hasher.digest().to_string()
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use super::*;

    const VALID: &str = r#"
services:
  - name: web
    workloads: [{ name: web-1, app: "127.0.0.1:9001", inbound: "127.0.0.1:9101" }]
"#;
    const INVALID: &str = r#"
services:
  - name: web
    workloads: [{ name: web-1, app: "127.0.0.1:9001", inbound: "127.0.0.1:9101" }]
    calls: [nope]
"#;

    /// Writes a file the way careful editors do, so that a poll never sees
    /// it half written: a hidden temporary file, then a rename.
    fn write_atomic(dir: &Path, name: &str, text: &str) {
        let temporary = dir.join(format!(".{name}.tmp"));
        fs::write(&temporary, text).unwrap();
        fs::rename(&temporary, dir.join(name)).unwrap();
    }

    fn nodes(update: &MeshUpdate) -> Vec<String> {
        match update {
            MeshUpdate::Loaded(snapshot) => snapshot.nodes.keys().cloned().collect(),
            MeshUpdate::Rejected(errors) => panic!("rejected:\n{errors}"),
        }
    }

    fn rejection(update: &MeshUpdate) -> String {
        match update {
            MeshUpdate::Rejected(errors) => errors.to_string(),
            MeshUpdate::Loaded(snapshot) => panic!("loaded {:?}", snapshot.nodes.keys()),
        }
    }

    #[test]
    fn poller_reloads_on_content_changes_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mesh.yaml");
        let mut poller = Poller::new(dir.path().to_owned());

        let initial = poller.poll().expect("the initial load is reported");
        assert!(nodes(&initial).is_empty());
        assert!(poller.poll().is_none());

        fs::write(&file, VALID).unwrap();
        assert_eq!(nodes(&poller.poll().unwrap()), ["web-1"]);

        // Same content written again, editor files, other extensions.
        fs::write(&file, VALID).unwrap();
        fs::write(dir.path().join(".mesh.yaml.swp"), "garbage: [").unwrap();
        fs::write(dir.path().join("mesh.yaml~"), "garbage: [").unwrap();
        fs::write(dir.path().join("notes.txt"), "garbage: [").unwrap();
        assert!(poller.poll().is_none());

        fs::write(&file, INVALID).unwrap();
        let rejected = rejection(&poller.poll().unwrap());
        assert!(
            rejected.contains("mesh.yaml: service \"web\": calls[0]: unknown service \"nope\"")
        );
        assert!(poller.poll().is_none(), "a rejection is reported once");

        fs::write(&file, VALID).unwrap();
        assert_eq!(nodes(&poller.poll().unwrap()), ["web-1"]);

        fs::remove_file(&file).unwrap();
        assert!(nodes(&poller.poll().unwrap()).is_empty());
    }

    #[test]
    fn missing_directory_is_rejected_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut poller = Poller::new(dir.path().join("absent"));
        let rejected = rejection(&poller.poll().unwrap());
        assert!(
            rejected.contains("absent: cannot read directory"),
            "{rejected}"
        );
        assert!(poller.poll().is_none());
    }

    #[test]
    fn watcher_reports_initial_load_rejection_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "mesh.yaml", VALID);
        let (tx, rx) = mpsc::channel();
        let handle = spawn(dir.path().to_owned(), Duration::from_millis(20), move |u| {
            let _ = tx.send(u);
        })
        .unwrap();
        // Generous deadlines: a loaded machine must not fail the test; a
        // working watcher answers within one poll.
        let next = || rx.recv_timeout(Duration::from_secs(10)).expect("an update");

        assert_eq!(nodes(&next()), ["web-1"]);

        write_atomic(dir.path(), "mesh.yaml", INVALID);
        let rejected = rejection(&next());
        assert!(
            rejected.contains("mesh.yaml: service \"web\": calls[0]"),
            "{rejected}"
        );

        write_atomic(dir.path(), "mesh.yaml", &VALID.replace("web-1", "web-2"));
        assert_eq!(nodes(&next()), ["web-2"]);

        handle.stop();
        // The thread has ended: its sender is gone and nothing is pending.
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(10)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        ));
    }
}

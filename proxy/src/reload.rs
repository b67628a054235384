//! Reloading a configuration file: `weft-proxy --config FILE` watches the
//! file and every TLS file it names (certificates, keys, CA bundles), and
//! on SIGHUP or when any of them changes, loads and validates the whole
//! configuration again and applies it. A configuration that fails (a
//! syntax error, a key that does not match its certificate, a listener
//! that cannot bind) is logged with the file, resource and field, counted,
//! and the last good configuration keeps serving.
//!
//! Changes are found by polling each file's modification time, size and
//! inode (a renamed-over file, as editors and certificate tools write
//! them, has a new inode); polling needs no platform watcher and costs a
//! few `stat` calls per interval.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use crate::ConfigHandle;
use crate::config::{BootstrapSpec, Config};

/// What a file looked like at the last check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let metadata = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: metadata.modified().ok(),
        len: metadata.len(),
        inode: metadata.ino(),
    })
}

/// The configuration file and the TLS files it names.
pub fn watched_files(config_file: &Path, spec: &BootstrapSpec) -> Vec<PathBuf> {
    let mut files = vec![config_file.to_owned()];
    for listener in &spec.listeners {
        if let Some(tls) = &listener.tls {
            for cert in &tls.certificates {
                files.push(PathBuf::from(&cert.cert_file));
                files.push(PathBuf::from(&cert.key_file));
            }
            files.extend(tls.client_ca_file.iter().map(PathBuf::from));
        }
    }
    for cluster in &spec.clusters {
        if let Some(tls) = &cluster.tls {
            for file in [&tls.ca_file, &tls.cert_file, &tls.key_file]
                .into_iter()
                .flatten()
            {
                files.push(PathBuf::from(file));
            }
        }
    }
    files.extend(
        spec.trust_bundles
            .iter()
            .filter_map(|b| b.ca_file.as_ref().map(PathBuf::from)),
    );
    files.sort();
    files.dedup();
    files
}

fn stamps(files: &[PathBuf]) -> BTreeMap<PathBuf, Option<Stamp>> {
    files.iter().map(|f| (f.clone(), stamp(f))).collect()
}

/// Watches `config_file` (and the files it names) every `interval` (never,
/// if zero) and on SIGHUP, and applies each valid change through `handle`.
/// Runs until the proxy drains.
pub async fn watch(config_file: PathBuf, handle: ConfigHandle, interval: Duration) {
    let drain = handle.drain();
    let metrics = handle.metrics();
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGHUP; configuration reloads only on file changes");
            None
        }
    };
    let mut files = watched_files(&config_file, &handle.current_config().spec);
    let mut seen = stamps(&files);
    loop {
        let forced = tokio::select! {
            () = sleep_or_forever(interval) => false,
            Some(()) = recv(hangup.as_mut()) => {
                // SIGHUP also follows a log rotation.
                handle.reopen_logs();
                tracing::info!("SIGHUP: log files reopened; reloading the configuration");
                true
            }
            () = drain.cancelled() => return,
        };
        let now = stamps(&files);
        if !forced && now == seen {
            continue;
        }
        let changed: Vec<String> = now
            .iter()
            .filter(|(file, stamp)| seen.get(*file) != Some(stamp))
            .map(|(file, _)| file.display().to_string())
            .collect();
        seen = now;
        let path = config_file.clone();
        let loaded = match tokio::task::spawn_blocking(move || Config::from_file(&path)).await {
            Ok(loaded) => loaded,
            // The runtime is shutting down.
            Err(_) => return,
        };
        let config = match loaded {
            Ok(config) => config,
            Err(error) => {
                metrics.config_reload_failures.fetch_add(1, Relaxed);
                tracing::error!(
                    file = %config_file.display(),
                    changed = ?changed,
                    error = %crate::error::chain(&error),
                    "configuration reload refused; the last good configuration keeps serving"
                );
                continue;
            }
        };
        // A change to the file may name other TLS files.
        files = watched_files(&config_file, &config.spec);
        seen = stamps(&files);
        let counts = (
            config.listeners.len(),
            config.route_configs.len(),
            config.clusters.len(),
        );
        match handle.apply(config).await {
            Ok(_) => {
                metrics.config_reloads.fetch_add(1, Relaxed);
                tracing::info!(
                    file = %config_file.display(),
                    changed = ?changed,
                    forced,
                    listeners = counts.0,
                    route_configs = counts.1,
                    clusters = counts.2,
                    "configuration reloaded"
                );
            }
            Err(error) => {
                metrics.config_reload_failures.fetch_add(1, Relaxed);
                tracing::error!(
                    file = %config_file.display(),
                    %error,
                    "configuration reload refused; the last good configuration keeps serving"
                );
            }
        }
    }
}

async fn sleep_or_forever(interval: Duration) {
    if interval.is_zero() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(interval).await;
}

async fn recv(signal: Option<&mut tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tls_file_is_watched_once() {
        let spec: BootstrapSpec = serde_yaml_ng::from_str(
            r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    route_config: main
    tls:
      certificates:
        - { cert_file: /a.pem, key_file: /a.key }
        - { cert_file: /b.pem, key_file: /b.key, server_names: [b.example] }
      client_ca_file: /ca.pem
clusters:
  - name: up
    endpoints: [{ address: "127.0.0.1:1" }]
    tls: { ca_file: /ca.pem, cert_file: /me.pem, key_file: /me.key, server_name: up.example }
"#,
        )
        .unwrap();
        let files = watched_files(Path::new("/weft.yaml"), &spec);
        let names: Vec<_> = files.iter().map(|f| f.to_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "/a.key",
                "/a.pem",
                "/b.key",
                "/b.pem",
                "/ca.pem",
                "/me.key",
                "/me.pem",
                "/weft.yaml"
            ]
        );
    }

    #[test]
    fn a_replaced_file_has_a_new_stamp() {
        let dir = tempfile_dir();
        let file = dir.join("cert.pem");
        std::fs::write(&file, "one").unwrap();
        let first = stamp(&file).unwrap();
        // Written beside and renamed over, as tools replace certificates:
        // same size, maybe the same second, but a new inode.
        let next = dir.join("cert.pem.tmp");
        std::fs::write(&next, "two").unwrap();
        std::fs::rename(&next, &file).unwrap();
        assert_ne!(stamp(&file).unwrap(), first);
        assert_eq!(stamp(&dir.join("missing")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_renewed_file_under_the_same_path_changes_the_cluster() {
        // Connection pools are kept for a cluster whose configuration is
        // unchanged; a renewed CA or certificate must not count as
        // unchanged just because its path is.
        let dir = tempfile_dir();
        let ca = dir.join("ca.pem");
        let config = |ca_pem: String| {
            std::fs::write(&ca, ca_pem).unwrap();
            let yaml = format!(
                "clusters:\n  - name: up\n    endpoints: [{{ address: \"127.0.0.1:1\" }}]\n    \
                 tls: {{ ca_file: {ca:?}, server_name: up.example }}\n"
            );
            Config::from_yaml(&yaml, "test").unwrap()
        };
        let root = || {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.self_signed(&key).unwrap().pem()
        };
        let first = root();
        let (a, b, c) = (config(first.clone()), config(first), config(root()));
        let tls = |config: &Config| config.clusters[0].tls.clone().unwrap();
        assert_eq!(*tls(&a), *tls(&b));
        assert_ne!(*tls(&a), *tls(&c));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "weft-reload-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

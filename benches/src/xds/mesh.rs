//! The generated mesh directory: N workloads spread over `shared` and a few
//! `app-K` services, all calling `shared`, whose timeout the rounds edit.
//!
//! Addresses are distinct loopback addresses (`127.1.X.Y`, fixed ports per
//! role) that nothing binds: the control plane only names them in the
//! resources it builds. Files are written with `tokio::fs`; the edited file
//! is replaced atomically (a hidden temporary file renamed over it), as
//! the mesh directory reference asks, so the watcher never reads half a
//! file.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tokio::time::Instant;

/// Services other than `shared` that workloads are spread over.
pub(super) const APP_SERVICES: usize = 4;

/// The service every other service calls.
pub(super) const SHARED_SERVICE: &str = "shared";

/// The most workloads [`workload_ip`] can give distinct addresses.
pub(super) const MAX_WORKLOADS: usize = 250 * 250 * 200;

/// The file the rounds rewrite.
const SHARED_FILE: &str = "shared.yaml";

/// One workload: its node id and its service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Workload {
    pub(super) node_id: String,
    pub(super) service: String,
}

/// The workloads of a mesh of `count` workloads, in node order.
pub(super) fn workloads(count: usize) -> Vec<Workload> {
    (0..count)
        .map(|index| Workload {
            node_id: format!("w{index}"),
            service: service_of(index, count),
        })
        .collect()
}

/// Workload 0 is `shared`'s; the rest go round robin to the app services.
fn service_of(index: usize, count: usize) -> String {
    if index == 0 {
        return SHARED_SERVICE.to_owned();
    }
    let apps = APP_SERVICES.min(count - 1);
    format!("app-{}", (index - 1) % apps)
}

/// `127.1+a.b.c+1`: distinct for every index below [`MAX_WORKLOADS`].
pub(super) fn workload_ip(index: usize) -> Ipv4Addr {
    let octet =
        |value: usize| u8::try_from(value).expect("each octet is below 256 by construction");
    Ipv4Addr::new(
        127,
        octet(1 + index / (250 * 250)),
        octet((index / 250) % 250),
        octet(index % 250 + 1),
    )
}

fn workload_line(index: usize) -> String {
    let ip = workload_ip(index);
    format!(
        "      - {{ name: w{index}, version: v1, app: \"{ip}:20001\", inbound: \"{ip}:20002\", \
         outbound: \"{ip}:20003\" }}\n"
    )
}

/// `shared.yaml`: the shared service (workload 0), calling itself, with
/// the deadline its callers apply.
pub(super) fn shared_yaml(timeout_seconds: u64) -> String {
    format!(
        "services:\n  - name: {SHARED_SERVICE}\n    protocol: http1\n    timeout: {timeout_seconds}s\n    \
         calls: [{SHARED_SERVICE}]\n    workloads:\n{}",
        workload_line(0)
    )
}

/// `app-K.yaml`: service `app-K` with its workloads, calling `shared`.
fn app_yaml(app: usize, count: usize) -> String {
    let mut yaml = format!(
        "services:\n  - name: app-{app}\n    protocol: http1\n    calls: [{SHARED_SERVICE}]\n    workloads:\n"
    );
    let apps = APP_SERVICES.min(count - 1);
    for index in (1 + app..count).step_by(apps) {
        yaml.push_str(&workload_line(index));
    }
    yaml
}

/// Writes a mesh of `count` workloads (at least 1) into `dir`.
pub(super) async fn write(dir: &Path, count: usize, timeout_seconds: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=MAX_WORKLOADS).contains(&count),
        "a mesh needs 1..={MAX_WORKLOADS} workloads, not {count}"
    );
    tokio::fs::create_dir_all(dir)
        .await
        .with_context(|| format!("creating {}", dir.display()))?;
    for app in 0..APP_SERVICES.min(count - 1) {
        let path = dir.join(format!("app-{app}.yaml"));
        tokio::fs::write(&path, app_yaml(app, count))
            .await
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let path = dir.join(SHARED_FILE);
    tokio::fs::write(&path, shared_yaml(timeout_seconds))
        .await
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Rewrites `shared.yaml` with a new timeout: a hidden temporary file
/// (which the watcher ignores) renamed over it. Returns the instant just
/// before the rename, when the change becomes visible.
pub(super) async fn set_shared_timeout(
    dir: &Path,
    timeout_seconds: u64,
) -> anyhow::Result<Instant> {
    let temporary: PathBuf = dir.join(format!(".{SHARED_FILE}.tmp"));
    tokio::fs::write(&temporary, shared_yaml(timeout_seconds))
        .await
        .with_context(|| format!("writing {}", temporary.display()))?;
    let target = dir.join(SHARED_FILE);
    let written = Instant::now();
    tokio::fs::rename(&temporary, &target)
        .await
        .with_context(|| format!("renaming {} to {}", temporary.display(), target.display()))?;
    Ok(written)
}

//! The open-files limit: each simulated proxy holds a socket in this
//! process and one in the control plane (which inherits this process's
//! limit).
//!
//! There is no libc binding in the workspace (and `unsafe` is denied), so
//! the soft limit is raised to the hard one with util-linux's `prlimit`
//! on this process, when it is installed; otherwise the current limit is
//! used and proxy counts that do not fit are skipped.

use std::process::Stdio;

use tracing::{info, warn};

use crate::compare::system;

/// Descriptors kept free for everything but the clients' sockets (runtime,
/// files, the admin requests, the child's pipes).
pub(super) const SPARE_DESCRIPTORS: u64 = 256;

/// The soft open-files limit after trying to raise it to the hard one;
/// `None` is unlimited.
pub(super) fn raise_open_files_limit() -> Option<u64> {
    let Some((soft, hard)) = system::open_files_limit() else {
        warn!("cannot read /proc/self/limits; assuming no open-files limit");
        return None;
    };
    let soft = soft?;
    if hard.is_some_and(|hard| hard <= soft) {
        return Some(soft);
    }
    let Some(prlimit) = system::find_program("prlimit", None) else {
        warn!(
            soft,
            "prlimit (util-linux) not installed; the open-files limit stays"
        );
        return Some(soft);
    };
    let hard_text = hard.map_or_else(|| "unlimited".to_owned(), |hard| hard.to_string());
    let status = std::process::Command::new(prlimit)
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={hard_text}:{hard_text}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status();
    match status {
        Ok(status) if status.success() => {
            info!(from = soft, to = %hard_text, "open-files limit raised");
            system::open_files_limit().and_then(|(soft, _)| soft)
        }
        Ok(status) => {
            warn!(%status, soft, "prlimit failed; the open-files limit stays");
            Some(soft)
        }
        Err(err) => {
            warn!(error = %err, soft, "prlimit failed; the open-files limit stays");
            Some(soft)
        }
    }
}

/// Why `proxies` cannot run under `limit`, if it cannot.
pub(super) fn skip_reason(proxies: usize, limit: Option<u64>) -> Option<String> {
    let limit = limit?;
    let needed = proxies as u64 + SPARE_DESCRIPTORS;
    (needed > limit).then(|| {
        format!(
            "needs about {needed} open files per process ({proxies} connections + \
             {SPARE_DESCRIPTORS} spare), the limit is {limit} and cannot be raised"
        )
    })
}

//! CPU placement: proxies on one core, the load generator and the echo on
//! the others, so that the proxy's core does nothing but proxy.
//!
//! Affinity is set with `taskset` (util-linux): the current process (the
//! generator and the in-process echo, all threads) is moved to the load
//! CPUs once, before its runtime starts, and every proxy is started as
//! `taskset -c CPU program ...` (`taskset` execs the program, so the pid is
//! the proxy's). Without `taskset` or with a single CPU nothing is pinned,
//! and the report says so.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::system;

/// Where the proxies and the load generator run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Placement {
    /// CPU list the proxies are pinned to (`taskset -c`), if pinned.
    pub proxy_cpus: Option<String>,
    /// CPU list the current process (generator and echo) is pinned to.
    pub load_cpus: Option<String>,
    /// What was done, in words, for the report.
    pub description: String,
    /// The `taskset` used to start proxies.
    #[serde(skip)]
    taskset: Option<PathBuf>,
}

impl Placement {
    /// No pinning; `reason` says why.
    pub fn unpinned(reason: &str) -> Self {
        Self {
            proxy_cpus: None,
            load_cpus: None,
            description: format!("not pinned ({reason})"),
            taskset: None,
        }
    }

    /// With two or more usable CPUs and `taskset` available: pins every
    /// thread of the current process to all usable CPUs but the first, and
    /// returns a placement that starts proxies on the first. Otherwise
    /// returns an unpinned placement saying why.
    ///
    /// Blocking (runs `taskset`): call it before building a runtime, so
    /// that the runtime's threads inherit the affinity.
    pub fn pin_current_process(search_path: Option<&OsStr>) -> Self {
        let allowed = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
                    .and_then(|list| system::parse_cpu_list(list.trim()))
            });
        let Some(allowed) = allowed else {
            return Self::unpinned("cannot read the CPUs this process may use");
        };
        let [proxy_cpu, load @ ..] = allowed.as_slice() else {
            return Self::unpinned("no usable CPU listed");
        };
        if load.is_empty() {
            return Self::unpinned("only one CPU is usable");
        }
        let Some(taskset) = system::find_program("taskset", search_path) else {
            return Self::unpinned("taskset (util-linux) is not installed");
        };
        let load_cpus = load
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let pid = std::process::id().to_string();
        let status = std::process::Command::new(&taskset)
            .args(["-a", "-p", "-c", &load_cpus, &pid])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status();
        match status {
            Ok(status) if status.success() => {
                info!(proxy_cpus = proxy_cpu, load_cpus, "cpu placement set");
                Self {
                    proxy_cpus: Some(proxy_cpu.to_string()),
                    load_cpus: Some(load_cpus.clone()),
                    description: format!(
                        "each proxy pinned to CPU {proxy_cpu} (`taskset -c {proxy_cpu}`, all its \
                         threads and processes); the load generator and the echo upstream run \
                         in the weft-bench process, pinned to CPU {load_cpus} \
                         (`taskset -a -p -c {load_cpus}` on itself)"
                    ),
                    taskset: Some(taskset),
                }
            }
            Ok(status) => {
                warn!(%status, "taskset failed; running unpinned");
                Self::unpinned(&format!("taskset -p failed: {status}"))
            }
            Err(err) => {
                warn!(error = %err, "taskset failed; running unpinned");
                Self::unpinned(&format!("taskset -p failed: {err}"))
            }
        }
    }

    /// A command that runs `program` on the proxy CPUs (plain `program`
    /// when unpinned).
    pub(crate) fn proxy_command(&self, program: &Path) -> tokio::process::Command {
        match (&self.taskset, &self.proxy_cpus) {
            (Some(taskset), Some(cpus)) => {
                let mut command = tokio::process::Command::new(taskset);
                command.arg("-c").arg(cpus).arg(program);
                command
            }
            _ => tokio::process::Command::new(program),
        }
    }

    /// A command that runs an external load generator (wrk, h2load) on
    /// the load CPUs (plain `program` when unpinned).
    pub(crate) fn generator_command(&self, program: &Path) -> tokio::process::Command {
        match (&self.taskset, &self.load_cpus) {
            (Some(taskset), Some(cpus)) => {
                let mut command = tokio::process::Command::new(taskset);
                command.arg("-c").arg(cpus).arg(program);
                command
            }
            _ => tokio::process::Command::new(program),
        }
    }

    /// How [`Placement::generator_command`] starts `program`, for reports.
    pub(crate) fn generator_prefix(&self, program: &Path) -> String {
        match (&self.taskset, &self.load_cpus) {
            (Some(_), Some(cpus)) => format!("taskset -c {cpus} {}", program.display()),
            _ => program.display().to_string(),
        }
    }

    /// CPUs the load generator runs on: those of `load_cpus`, else one.
    pub(crate) fn load_cpu_count(&self) -> usize {
        self.load_cpus
            .as_deref()
            .and_then(system::parse_cpu_list)
            .map_or(1, |cpus| cpus.len().max(1))
    }
}

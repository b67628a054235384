//! The machine and its programs: finding executables, running short
//! commands with a timeout, and reading `/proc` (resident memory, the
//! running user, file-descriptor limits, children of a process).
//!
//! Everything here is Linux-only and reads files or runs programs; nothing
//! calls libc directly (the workspace denies `unsafe`).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;

use super::report::Machine;

/// How long a short informational command (`--version`, `taskset`) may run.
pub(crate) const SHORT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Finds `program` in `search_path` (PATH syntax), or in the process's
/// `PATH` when `None`.
pub(crate) fn find_program(program: &str, search_path: Option<&OsStr>) -> Option<PathBuf> {
    let path = match search_path {
        Some(path) => path.to_owned(),
        None => std::env::var_os("PATH")?,
    };
    std::env::split_paths(&path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Runs `program args` to completion within `timeout` and returns its exit
/// status with stdout and stderr (lossy UTF-8).
pub(crate) async fn run_command<I, S>(
    program: &Path,
    args: I,
    timeout: Duration,
) -> anyhow::Result<(std::process::ExitStatus, String, String)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {}", program.display()))?;
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .with_context(|| format!("{} ran longer than {timeout:?}", program.display()))?
        .with_context(|| format!("waiting for {}", program.display()))?;
    Ok((
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// The first non-empty line a program prints for its version (either
/// stream: nginx prints it on stderr).
pub(crate) async fn version_line(program: &Path, flag: &str) -> Option<String> {
    let (_, stdout, stderr) = run_command(program, [flag], SHORT_COMMAND_TIMEOUT)
        .await
        .ok()?;
    stdout
        .lines()
        .chain(stderr.lines())
        .map(str::trim)
        .find(|line| !line.is_empty())
        .map(str::to_owned)
}

/// `VmRSS` of process `pid`, in bytes.
pub(crate) async fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = tokio::fs::read_to_string(&path)
        .await
        .with_context(|| format!("reading {path}"))?;
    parse_status_kib(&status, "VmRSS:")
        .map(|kib| kib * 1024)
        .with_context(|| format!("no VmRSS in {path}"))
}

/// `VmRSS` of the processes `pids`, summed, in bytes (a chain of proxies
/// is measured as one).
pub(crate) async fn rss_bytes_sum(pids: &[u32]) -> anyhow::Result<u64> {
    let mut sum = 0;
    for &pid in pids {
        sum += rss_bytes(pid).await?;
    }
    Ok(sum)
}

/// A `NAME:  1234 kB` line of `/proc/PID/status` (or `/proc/meminfo`), in
/// KiB.
pub(crate) fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with(key))?;
    let mut words = line[key.len()..].split_whitespace();
    let value = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(value)
}

/// Whether the current process runs as root (real uid 0).
pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("Uid:"))?;
            line.split_whitespace().nth(1).map(|uid| uid == "0")
        })
        .unwrap_or(false)
}

/// The soft and hard limits on open files of the current process, from
/// `/proc/self/limits` (`None` for a value of `unlimited`).
pub(crate) fn open_files_limit() -> Option<(Option<u64>, Option<u64>)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_files_limit(&limits)
}

/// Parses the `Max open files  SOFT  HARD  files` line of
/// `/proc/PID/limits`.
pub(crate) fn parse_open_files_limit(limits: &str) -> Option<(Option<u64>, Option<u64>)> {
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    let mut words = line["Max open files".len()..].split_whitespace();
    let parse = |word: &str| match word {
        "unlimited" => Some(None),
        number => number.parse().ok().map(Some),
    };
    let soft = parse(words.next()?)?;
    let hard = parse(words.next()?)?;
    Some((soft, hard))
}

/// The ids of the processes whose parent is `pid`, from `/proc/*/stat`.
pub(crate) async fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    let Ok(mut entries) = tokio::fs::read_dir("/proc").await else {
        return children;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Ok(stat) = tokio::fs::read_to_string(entry.path().join("stat")).await
            && parse_parent_pid(&stat) == Some(pid)
        {
            children.push(child);
        }
    }
    children.sort_unstable();
    children
}

/// The parent pid (field 4) of a `/proc/PID/stat` line. The command name
/// (field 2) may contain spaces and parentheses, so fields are counted after
/// its last `)`.
pub(crate) fn parse_parent_pid(stat: &str) -> Option<u32> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// Sends SIGKILL to every process of group `pgid` (a process group the
/// runner created for one proxy). Blocking but brief; used on drop.
pub(crate) fn kill_process_group(pgid: u32) {
    // `kill -KILL -- -PGID` addresses the group, not a single process.
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`), as written.
pub(crate) fn load_average() -> Option<String> {
    let loadavg = std::fs::read_to_string("/proc/loadavg").ok()?;
    let fields: Vec<&str> = loadavg.split_whitespace().take(3).collect();
    (fields.len() == 3).then(|| fields.join(" "))
}

/// What this machine is: CPU model, cores, memory, kernel, distribution.
pub(crate) fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, model)| model.trim().to_owned());
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|meminfo| parse_status_kib(&meminfo, "MemTotal:"))
        .map(|kib| kib * 1024);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|release| release.trim().to_owned());
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|release| {
            release
                .lines()
                .find_map(|line| line.strip_prefix("PRETTY_NAME="))
                .map(|name| name.trim_matches('"').to_owned())
        });
    Machine {
        cpu_model,
        cores: std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        online_cpus: online_cpus(),
        memory_bytes,
        kernel,
        os,
    }
}

/// CPUs online on the machine (not just those this process may use), from
/// `/sys/devices/system/cpu/online` (`0-1`, `0,2-3`).
pub(crate) fn online_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|list| parse_cpu_list(list.trim()))
        .map_or_else(
            || std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            |cpus| cpus.len(),
        )
}

/// Parses a kernel CPU list (`0-3,6`) into CPU numbers.
pub(crate) fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|part| !part.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last): (usize, usize) = (first.parse().ok()?, last.parse().ok()?);
                if last < first {
                    return None;
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

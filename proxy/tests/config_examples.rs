//! The example configurations under `config/examples/` must stay valid, and
//! `weft-proxy --check-config` must report the validator's verdict: exit 0
//! for a valid file, exit 1 with every problem (resource and field) on
//! stderr for an invalid one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use weft_proxy::config::Config;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples")
}

/// Every `*.yaml` file in the examples directory, sorted.
fn examples() -> Vec<PathBuf> {
    let dir = examples_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}

fn check_config(file: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft-proxy"))
        .arg("--check-config")
        .arg(file)
        .output()
        .expect("weft-proxy runs")
}

/// A file in the temporary directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(contents: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "weft-config-examples-{}-{nanos}.yaml",
            std::process::id()
        ));
        std::fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn every_example_is_valid() {
    let files = examples();
    for file in &files {
        let config = Config::from_file(file).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !config.listeners.is_empty(),
            "{}: an example should configure at least one listener",
            file.display()
        );
    }
    assert!(
        files.len() >= 3,
        "expected at least 3 examples in {}, found {files:?}",
        examples_dir().display()
    );
}

#[test]
fn check_config_accepts_a_valid_example() {
    let file = examples_dir().join("gateway.yaml");
    let output = check_config(&file);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(": ok"), "{stdout}");
}

#[test]
fn check_config_rejects_an_invalid_file_naming_resource_and_field() {
    let file = TempFile::new(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    route_config: missing
clusters:
  - name: x
    lb: fastest
    endpoints: [{ address: "127.0.0.1:8080" }]
"#,
    );
    let output = check_config(&file.0);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    // Every problem is reported, each with its resource and field.
    for want in [
        r#"cluster "x": lb: unknown value "fastest""#,
        r#"listener "web": route_config: unknown route_config "missing""#,
    ] {
        assert!(stderr.contains(want), "want {want:?} in stderr: {stderr}");
    }
    assert!(
        output.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}

//! Validation of `policies`: each is compiled here, once per version (see
//! [`compile_once`]), and every reference to one (a route's or a
//! listener's `policy`) must resolve.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};

use super::{Checker, check_name, check_unique};
use crate::config::ConfigError;
use crate::config::spec::{BootstrapSpec, PolicySpec};
use crate::policy::{CompiledPolicy, DEFAULT_QUERY, FailureMode, Mode, Module};

/// The largest Rego or data file read.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

fn read(check: &mut Checker<'_>, field: &str, path: &str) -> Option<String> {
    let file = std::path::Path::new(path);
    match std::fs::metadata(file) {
        Ok(meta) if meta.len() > MAX_FILE_BYTES => {
            check.error(field, format!("{path}: larger than {MAX_FILE_BYTES} bytes"));
            return None;
        }
        Ok(_) => {}
        Err(error) => {
            check.error(field, format!("{path}: {error}"));
            return None;
        }
    }
    match std::fs::read_to_string(file) {
        Ok(text) => Some(text),
        Err(error) => {
            check.error(field, format!("{path}: {error}"));
            None
        }
    }
}

/// Checks and compiles one policy on its own, as a configuration holding it
/// would: for tools that check policies before they are pushed (the
/// control plane's mesh validation). Relative `rego_files` and `data_file`
/// are read from the working directory.
pub fn compile_policy(spec: &PolicySpec) -> Result<Arc<CompiledPolicy>, Vec<ConfigError>> {
    let mut errors = Vec::new();
    match validate_policy(spec, &mut errors) {
        Some(policy) if errors.is_empty() => Ok(policy),
        _ => Err(errors),
    }
}

fn validate_policy(
    spec: &PolicySpec,
    errors: &mut Vec<ConfigError>,
) -> Option<Arc<CompiledPolicy>> {
    let before = errors.len();
    let mut check = Checker {
        kind: "policy",
        resource: spec.name.clone(),
        errors,
    };
    check_name(&mut check, "name", &spec.name);
    let mut modules = Vec::new();
    for (i, path) in spec.rego_files.iter().flatten().enumerate() {
        if let Some(text) = read(&mut check, &format!("rego_files[{i}]"), path) {
            modules.push(Module {
                name: path.clone(),
                text,
            });
        }
    }
    if let Some(text) = &spec.rego {
        modules.push(Module {
            name: format!("{}.rego", spec.name),
            text: text.clone(),
        });
    }
    for (i, module) in spec.modules.iter().flatten().enumerate() {
        if module.name.is_empty() {
            check.error(format!("modules[{i}].name"), "must not be empty");
        }
        modules.push(Module {
            name: module.name.clone(),
            text: module.rego.clone(),
        });
    }
    if modules.is_empty() && check.errors.len() == before {
        check.error("rego", "set rego_files, rego or modules");
    }
    let data = match (&spec.data, &spec.data_file) {
        (Some(_), Some(_)) => {
            check.error("data", "set data or data_file, not both");
            None
        }
        (Some(data), None) => {
            if !data.is_object() {
                check.error(
                    "data",
                    "must be a mapping (the `data` document's top level)",
                );
            }
            Some(data.clone())
        }
        (None, Some(path)) => read(&mut check, "data_file", path).and_then(|text| {
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(value) if value.is_object() => Some(value),
                Ok(_) => {
                    check.error("data_file", format!("{path}: must hold a JSON object"));
                    None
                }
                Err(error) => {
                    check.error("data_file", format!("{path}: {error}"));
                    None
                }
            }
        }),
        (None, None) => None,
    };
    let rego_v0 = match spec.rego_version.as_deref() {
        None | Some("v1") => false,
        Some("v0") => true,
        Some(other) => {
            check.error("rego_version", format!("{other:?} is not v0 or v1"));
            false
        }
    };
    let mode = match spec.mode.as_deref() {
        None | Some("enforce") => Mode::Enforce,
        Some("audit") => Mode::Audit,
        Some(other) => {
            check.error("mode", format!("{other:?} is not enforce or audit"));
            Mode::Enforce
        }
    };
    let failure_mode = match spec.failure_mode.as_deref() {
        None | Some("deny") => FailureMode::Deny,
        Some("allow") => FailureMode::Allow,
        Some(other) => {
            check.error("failure_mode", format!("{other:?} is not deny or allow"));
            FailureMode::Deny
        }
    };
    if check.errors.len() > before {
        return None;
    }
    let query = spec.query.as_deref().unwrap_or(DEFAULT_QUERY);
    let source = Source {
        name: spec.name.clone(),
        modules: modules
            .iter()
            .map(|m| (m.name.clone(), m.text.clone()))
            .collect(),
        data: data.as_ref().map(serde_json::Value::to_string),
        query: query.to_owned(),
        rego_v0,
        mode,
        failure_mode,
    };
    match compile_once(source, || {
        CompiledPolicy::compile(
            &spec.name,
            &modules,
            data.as_ref(),
            query,
            rego_v0,
            mode,
            failure_mode,
        )
    }) {
        Ok(policy) => Some(policy),
        Err(error) => {
            check.error("rego", error);
            None
        }
    }
}

/// What a policy is compiled from: equal sources give equal policies.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Source {
    name: String,
    modules: Vec<(String, String)>,
    data: Option<String>,
    query: String,
    rego_v0: bool,
    mode: Mode,
    failure_mode: FailureMode,
}

/// The policy compiled from `source`: the one compiled before if it is
/// still in use, else `compile`'s.
///
/// Every configuration a proxy loads (each xDS update, of a cluster as much
/// as of a policy; each reload) is validated whole, so without this every
/// policy would be compiled again each time. With it a policy is compiled
/// once per version, and an unchanged one keeps its identity: each worker's
/// prepared engine for it stays warm across configuration changes. Only
/// policies still held by a configuration are remembered.
fn compile_once(
    source: Source,
    compile: impl FnOnce() -> Result<CompiledPolicy, String>,
) -> Result<Arc<CompiledPolicy>, String> {
    static COMPILED: LazyLock<Mutex<HashMap<Source, Weak<CompiledPolicy>>>> =
        LazyLock::new(Mutex::default);
    let lock = || COMPILED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(compiled) = lock().get(&source).and_then(Weak::upgrade) {
        return Ok(compiled);
    }
    // Compiled without the lock held: compilations of different policies
    // do not wait for each other.
    let compiled = Arc::new(compile()?);
    let mut known = lock();
    known.retain(|_, policy| policy.strong_count() > 0);
    known.insert(source, Arc::downgrade(&compiled));
    Ok(compiled)
}

/// Compiles every policy and checks every reference to one.
pub(super) fn validate_policies(
    spec: &BootstrapSpec,
    errors: &mut Vec<ConfigError>,
) -> Vec<Arc<CompiledPolicy>> {
    let policies: Vec<Arc<CompiledPolicy>> = spec
        .policies
        .iter()
        .filter_map(|p| validate_policy(p, errors))
        .collect();
    check_unique(
        errors,
        "policy",
        spec.policies.iter().map(|p| p.name.as_str()),
    );
    let names: HashSet<&str> = spec.policies.iter().map(|p| p.name.as_str()).collect();
    for listener in &spec.listeners {
        if let Some(name) = &listener.policy {
            let mut check = Checker {
                kind: "listener",
                resource: listener.name.clone(),
                errors,
            };
            // A TCP listener's policy sees each connection's source and
            // destination; an HTTP listener's, each request.
            if !names.contains(name.as_str()) {
                check.unresolved("policy", format!("unknown policy {name:?}"));
            }
        }
    }
    for config in &spec.route_configs {
        for (vi, vhost) in config.virtual_hosts.iter().enumerate() {
            for (ri, route) in vhost.routes.iter().enumerate() {
                if let Some(name) = &route.policy
                    && !names.contains(name.as_str())
                {
                    let mut check = Checker {
                        kind: "route_config",
                        resource: config.name.clone(),
                        errors,
                    };
                    check.unresolved(
                        format!("virtual_hosts[{vi}].routes[{ri}].policy"),
                        format!("unknown policy {name:?}"),
                    );
                }
            }
        }
    }
    policies
}

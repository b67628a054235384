//! A mesh's policies: Rego files beside the YAML, named by a policy's
//! `rego_files` and `data_file`, read with the directory and inlined into
//! the policy resources pushed to proxies. Each policy is compiled here, so
//! that a broken one is reported with its file and line before any proxy
//! sees it; `<stem>_test.rego` beside a policy's `<stem>.rego` holds its
//! unit tests (`weft-cp validate` runs them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use weft_proxy::config::{PolicySpec, RegoModuleSpec};
use weft_proxy::policy::{Module, TestOutcome};

use super::{Located, Mesh, MeshError, SourceFile};

/// A policy with its files' contents inline, and its tests.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshPolicy {
    /// As pushed: `modules` and `data` inline, no file names.
    pub spec: PolicySpec,
    /// The `_test.rego` modules found beside its Rego files.
    pub tests: Vec<RegoModuleSpec>,
}

/// Whether `path` is a file policies can name: Rego modules and JSON data.
pub(super) fn is_policy_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "rego" || e == "json")
}

/// The files policies can name, by file name.
pub(super) fn assets(files: &[SourceFile]) -> BTreeMap<String, &SourceFile> {
    files
        .iter()
        .filter(|f| is_policy_file(Path::new(&*f.name)))
        .filter_map(|f| {
            let name = Path::new(&*f.name).file_name()?.to_str()?.to_owned();
            Some((name, f))
        })
        .collect()
}

/// Inlines and compiles every policy; reports what does not resolve or
/// compile against the YAML file that defines the policy.
pub(super) fn resolve(
    policies: Vec<Located<PolicySpec>>,
    assets: &BTreeMap<String, &SourceFile>,
    errors: &mut Vec<MeshError>,
) -> Vec<Located<MeshPolicy>> {
    let mut seen: BTreeMap<String, Arc<str>> = BTreeMap::new();
    let mut resolved = Vec::with_capacity(policies.len());
    for located in policies {
        let file = located.file.clone();
        let spec = located.spec;
        let before = errors.len();
        let mut error = |field: String, message: String| {
            errors.push(MeshError::Invalid {
                file: file.clone(),
                kind: "policy",
                name: spec.name.clone(),
                field,
                message,
            });
        };
        if let Some(first) = seen.get(&spec.name) {
            error(
                "name".into(),
                format!("duplicate policy name (also defined in {first})"),
            );
        } else {
            seen.insert(spec.name.clone(), file.clone());
        }
        let mut modules: Vec<RegoModuleSpec> = spec.modules.clone().unwrap_or_default();
        let mut tests = Vec::new();
        for (i, name) in spec.rego_files.iter().flatten().enumerate() {
            let Some(asset) = asset(assets, name, "rego", &mut error, format!("rego_files[{i}]"))
            else {
                continue;
            };
            modules.push(RegoModuleSpec {
                name: asset.name.to_string(),
                rego: asset.text.clone(),
            });
            if let Some(stem) = name.strip_suffix(".rego")
                && let Some(test) = assets.get(&format!("{stem}_test.rego"))
            {
                tests.push(RegoModuleSpec {
                    name: test.name.to_string(),
                    rego: test.text.clone(),
                });
            }
        }
        if let Some(rego) = &spec.rego {
            modules.push(RegoModuleSpec {
                name: format!("{}.rego", spec.name),
                rego: rego.clone(),
            });
        }
        let mut data = spec.data.clone();
        if let Some(name) = &spec.data_file
            && let Some(asset) = asset(assets, name, "json", &mut error, "data_file".into())
        {
            match serde_json::from_str::<serde_json::Value>(&asset.text) {
                Ok(value) => data = Some(value),
                Err(e) => error("data_file".into(), format!("{}: {e}", asset.name)),
            }
        }
        if spec.data.is_some() && spec.data_file.is_some() {
            error("data".into(), "set data or data_file, not both".into());
        }
        let inline = PolicySpec {
            rego_files: None,
            rego: None,
            modules: Some(modules),
            data,
            data_file: None,
            ..spec.clone()
        };
        if errors.len() == before
            && let Err(found) = weft_proxy::config::compile_policy(&inline)
        {
            for e in found {
                errors.push(MeshError::Invalid {
                    file: file.clone(),
                    kind: "policy",
                    name: spec.name.clone(),
                    field: e.field,
                    message: e.message,
                });
            }
        }
        resolved.push(Located {
            file,
            spec: MeshPolicy {
                spec: inline,
                tests,
            },
        });
    }
    resolved
}

/// The file `name` among the directory's policy files, which must end in
/// `.{extension}` and be a plain file name.
fn asset<'a>(
    assets: &BTreeMap<String, &'a SourceFile>,
    name: &str,
    extension: &str,
    error: &mut impl FnMut(String, String),
    field: String,
) -> Option<&'a SourceFile> {
    if name.contains('/') || !name.ends_with(&format!(".{extension}")) {
        error(
            field,
            format!(
                "{name:?}: must be the name of a .{extension} file in the mesh directory (no directories)"
            ),
        );
        return None;
    }
    let found = assets.get(name).copied();
    if found.is_none() {
        error(
            field,
            format!("{name:?}: no such file in the mesh directory"),
        );
    }
    found
}

/// Every reference to a policy (a service's, a gateway listener's or
/// route's `policy`) must name one.
pub(super) fn check_references(mesh: &Mesh, errors: &mut Vec<MeshError>) {
    let names: BTreeSet<&str> = mesh
        .policies
        .iter()
        .map(|p| p.spec.spec.name.as_str())
        .collect();
    let mut unknown = |file: &Arc<str>, kind, name: &str, field: String, policy: &str| {
        if !names.contains(policy) {
            errors.push(MeshError::Invalid {
                file: file.clone(),
                kind,
                name: name.to_owned(),
                field,
                message: format!("unknown policy {policy:?}"),
            });
        }
    };
    for service in &mesh.services {
        if let Some(policy) = &service.spec.policy {
            unknown(
                &service.file,
                "service",
                &service.spec.name,
                "policy".into(),
                policy,
            );
        }
    }
    for gateway in &mesh.gateways {
        for (li, listener) in gateway.spec.listeners.iter().enumerate() {
            if let Some(policy) = &listener.policy {
                let field = format!("listeners[{li}].policy");
                unknown(&gateway.file, "gateway", &gateway.spec.name, field, policy);
            }
            for (ri, route) in listener.routes.iter().enumerate() {
                if let Some(policy) = &route.policy {
                    let field = format!("listeners[{li}].routes[{ri}].policy");
                    unknown(&gateway.file, "gateway", &gateway.spec.name, field, policy);
                }
            }
        }
    }
}

/// The results of one policy's unit tests.
#[derive(Debug, Clone)]
pub struct PolicyTests {
    /// The policy.
    pub policy: String,
    /// Its test rules' outcomes; `Err` when its tests could not run.
    pub outcomes: Result<Vec<TestOutcome>, String>,
}

impl Mesh {
    /// Runs the unit tests of every policy that has some.
    pub fn run_policy_tests(&self) -> Vec<PolicyTests> {
        self.policies
            .iter()
            .filter(|p| !p.spec.tests.is_empty())
            .map(|p| {
                let tests: Vec<Module> = p
                    .spec
                    .tests
                    .iter()
                    .map(|t| Module {
                        name: t.name.clone(),
                        text: t.rego.clone(),
                    })
                    .collect();
                let outcomes = weft_proxy::config::compile_policy(&p.spec.spec)
                    .map_err(|errors| {
                        errors
                            .iter()
                            .map(|e| e.message.clone())
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .and_then(|compiled| compiled.run_tests(&tests));
                PolicyTests {
                    policy: p.spec.spec.name.clone(),
                    outcomes,
                }
            })
            .collect()
    }
}

//! The mesh model: a directory of YAML files describing services, their
//! workloads, how calls to them are routed, and ingress gateways; its
//! validation; and the builder that turns it into each proxy's resources
//! (a [`MeshSnapshot`]).
//!
//! The pipeline is [`read_dir`] (blocking I/O) → [`Mesh::parse`] (syntax and
//! mesh-level validation) → [`Mesh::snapshot`] (per-node resources, each
//! node's configuration checked by the proxy's own validator). [`load_dir`]
//! and [`build_dir`] chain them.
//!
//! Invariants callers rely on: a [`Mesh`] only exists if it is valid (names
//! unique, every reference resolves, addresses parse and do not collide); a
//! snapshot only exists if every node's configuration passes
//! `weft_proxy::config::Config::try_from`; building the same mesh twice
//! gives identical resources and versions. Errors are collected, never
//! returned one at a time, and each names its file, resource and field.

mod build;
mod policy;
pub mod spec;
mod validate;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use weft_proxy::config::ConfigError;

use crate::resources::MeshSnapshot;
pub use policy::{MeshPolicy, PolicyTests};
pub use spec::{
    GatewayListenerSpec, GatewayRouteSpec, GatewaySpec, MeshFileSpec, ServiceRouteSpec,
    ServiceSpec, WorkloadSpec,
};

/// One problem with a mesh directory.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The directory could not be listed.
    #[error("{}: cannot read directory: {source}", dir.display())]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be read.
    #[error("{}: cannot read: {source}", file.display())]
    ReadFile {
        /// The file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file is not YAML of the mesh's shape (unknown field, wrong type).
    #[error("{file}: {source}")]
    Syntax {
        /// The file.
        file: Arc<str>,
        /// The parser's error, with its field path and line.
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// A resource breaks a mesh rule.
    #[error("{file}: {kind} {name:?}: {field}: {message}")]
    Invalid {
        /// The file that defines the resource.
        file: Arc<str>,
        /// `service` or `gateway`.
        kind: &'static str,
        /// The resource's name.
        name: String,
        /// Field path inside the resource, e.g. `routes[1].split.v3`.
        field: String,
        /// What is wrong, with the offending value.
        message: String,
    },
    /// The configuration built for one proxy fails the proxy's validator.
    #[error("{file}: node {node:?}: {error}")]
    Node {
        /// The file that defines the workload or gateway.
        file: Arc<str>,
        /// The node id.
        node: String,
        /// The proxy validator's finding.
        error: ConfigError,
    },
}

/// Every problem found in a mesh directory; `Display` writes one line per
/// problem.
#[derive(Debug, thiserror::Error)]
pub struct MeshErrors(pub Vec<MeshError>);

impl fmt::Display for MeshErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl From<MeshError> for MeshErrors {
    fn from(error: MeshError) -> Self {
        Self(vec![error])
    }
}

/// The text of one file of a mesh directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// How errors name the file (its path as given).
    pub name: Arc<str>,
    /// Its contents.
    pub text: String,
}

/// A resource and the file that defines it.
#[derive(Debug, Clone, PartialEq)]
pub struct Located<T> {
    /// The defining file.
    pub file: Arc<str>,
    /// The resource.
    pub spec: T,
}

/// A validated mesh.
#[derive(Debug, Clone, PartialEq)]
pub struct Mesh {
    services: Vec<Located<ServiceSpec>>,
    gateways: Vec<Located<GatewaySpec>>,
    policies: Vec<Located<MeshPolicy>>,
    trust_domain: Option<Located<String>>,
    tracing: Option<Located<weft_proxy::config::TracingSpec>>,
    istio_metrics: Option<Located<spec::MeshIstioMetricsSpec>>,
}

/// Whether `path` names a file the mesh reads: `*.yaml` or `*.yml`, and
/// the `*.rego` and `*.json` files policies name; not hidden. Hidden files
/// are skipped because editors keep their lock and swap files there
/// (`.#services.yaml`).
pub fn is_mesh_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    !hidden && (is_yaml(path) || policy::is_policy_file(path))
}

fn is_yaml(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "yaml" || e == "yml")
}

/// Reads every mesh file directly inside `dir` (not recursive), sorted by
/// name. Blocking: call it from a dedicated thread or `spawn_blocking`.
pub fn read_dir(dir: &Path) -> Result<Vec<SourceFile>, MeshErrors> {
    let read_dir_error = |source| MeshError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir_error)? {
        let path = entry.map_err(read_dir_error)?.path();
        if is_mesh_file(&path) && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    let mut files = Vec::with_capacity(paths.len());
    let mut errors = Vec::new();
    for path in paths {
        match std::fs::read_to_string(&path) {
            Ok(text) => files.push(SourceFile {
                name: path.display().to_string().into(),
                text,
            }),
            Err(source) => errors.push(MeshError::ReadFile { file: path, source }),
        }
    }
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(MeshErrors(errors))
    }
}

/// Reads, parses and validates a mesh directory. Blocking.
pub fn load_dir(dir: &Path) -> Result<Mesh, MeshErrors> {
    Mesh::parse(&read_dir(dir)?)
}

/// Reads a mesh directory and builds every node's resources. Blocking.
pub fn build_dir(dir: &Path) -> Result<MeshSnapshot, MeshErrors> {
    load_dir(dir)?.snapshot()
}

impl Mesh {
    /// Parses and validates the files of one mesh. If any file fails to
    /// parse, only syntax errors are reported (cross-file checks would
    /// otherwise report references to what the broken file defines).
    pub fn parse(files: &[SourceFile]) -> Result<Self, MeshErrors> {
        let mut errors = Vec::new();
        let mut mesh = Mesh {
            services: Vec::new(),
            gateways: Vec::new(),
            policies: Vec::new(),
            trust_domain: None,
            tracing: None,
            istio_metrics: None,
        };
        let mut policies = Vec::new();
        for file in files
            .iter()
            .filter(|f| !policy::is_policy_file(Path::new(&*f.name)))
        {
            // An empty file (or one holding only comments) is an empty mesh
            // file, not a syntax error.
            let parsed = if file.text.trim().is_empty() {
                Ok(MeshFileSpec::default())
            } else {
                serde_yaml_ng::from_str::<Option<MeshFileSpec>>(&file.text)
                    .map(Option::unwrap_or_default)
            };
            match parsed {
                Ok(spec) => {
                    if let Some(domain) = spec.trust_domain {
                        match &mesh.trust_domain {
                            Some(first) if first.spec != domain => {
                                errors.push(MeshError::Invalid {
                                    file: file.name.clone(),
                                    kind: "mesh",
                                    name: "trust_domain".into(),
                                    field: "trust_domain".into(),
                                    message: format!(
                                        "{domain:?} disagrees with {:?} set in {}",
                                        first.spec, first.file
                                    ),
                                });
                            }
                            Some(_) => {}
                            None => {
                                mesh.trust_domain = Some(Located {
                                    file: file.name.clone(),
                                    spec: domain,
                                });
                            }
                        }
                    }
                    if let Some(tracing) = spec.tracing {
                        if let Some(first) = &mesh.tracing {
                            errors.push(MeshError::Invalid {
                                file: file.name.clone(),
                                kind: "mesh",
                                name: "tracing".into(),
                                field: "tracing".into(),
                                message: format!("already set in {}", first.file),
                            });
                        } else if tracing.service_name.is_some() {
                            errors.push(MeshError::Invalid {
                                file: file.name.clone(),
                                kind: "mesh",
                                name: "tracing".into(),
                                field: "tracing.service_name".into(),
                                message: "set per proxy (its service, or the gateway's name)"
                                    .into(),
                            });
                        } else {
                            mesh.tracing = Some(Located {
                                file: file.name.clone(),
                                spec: tracing,
                            });
                        }
                    }
                    if let Some(istio) = spec.istio_metrics {
                        if let Some(first) = &mesh.istio_metrics {
                            errors.push(MeshError::Invalid {
                                file: file.name.clone(),
                                kind: "mesh",
                                name: "istio_metrics".into(),
                                field: "istio_metrics".into(),
                                message: format!("already set in {}", first.file),
                            });
                        } else {
                            mesh.istio_metrics = Some(Located {
                                file: file.name.clone(),
                                spec: istio,
                            });
                        }
                    }
                    mesh.services
                        .extend(spec.services.into_iter().map(|spec| Located {
                            file: file.name.clone(),
                            spec,
                        }));
                    mesh.gateways
                        .extend(spec.gateways.into_iter().map(|spec| Located {
                            file: file.name.clone(),
                            spec,
                        }));
                    policies.extend(spec.policies.into_iter().map(|spec| Located {
                        file: file.name.clone(),
                        spec,
                    }));
                }
                Err(source) => errors.push(MeshError::Syntax {
                    file: file.name.clone(),
                    source,
                }),
            }
        }
        if !errors.is_empty() {
            return Err(MeshErrors(errors));
        }
        mesh.policies = policy::resolve(policies, &policy::assets(files), &mut errors);
        if let Err(MeshErrors(found)) = validate::validate(&mesh) {
            errors.extend(found);
        }
        if errors.is_empty() {
            Ok(mesh)
        } else {
            Err(MeshErrors(errors))
        }
    }

    /// The services, in file order then definition order.
    pub fn services(&self) -> &[Located<ServiceSpec>] {
        &self.services
    }

    /// The gateways, in file order then definition order.
    pub fn gateways(&self) -> &[Located<GatewaySpec>] {
        &self.gateways
    }

    /// The policies, their files inlined, in file order then definition
    /// order.
    pub fn policies(&self) -> &[Located<MeshPolicy>] {
        &self.policies
    }

    /// The mesh's tracing settings, if it traces.
    pub fn tracing(&self) -> Option<&weft_proxy::config::TracingSpec> {
        self.tracing.as_ref().map(|t| &t.spec)
    }

    /// The mesh's Istio metrics settings, if its proxies report them.
    pub fn istio_metrics(&self) -> Option<&spec::MeshIstioMetricsSpec> {
        self.istio_metrics.as_ref().map(|m| &m.spec)
    }

    /// The SPIFFE trust domain, if the mesh has identities.
    pub fn trust_domain(&self) -> Option<&str> {
        self.trust_domain.as_ref().map(|d| d.spec.as_str())
    }

    /// Builds every node's resources: one sidecar per workload (node id =
    /// workload name) and one proxy per gateway. Each node's configuration
    /// goes through the proxy's validator; its findings come back as
    /// [`MeshError::Node`].
    pub fn snapshot(&self) -> Result<MeshSnapshot, MeshErrors> {
        build::snapshot(self)
    }
}

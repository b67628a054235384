//! The mesh's trust, reloadable while serving: the CA that signs workload
//! certificates now, and the trust bundle every proxy verifies its peers
//! against (pushed over xDS as a `TrustBundle` resource).
//!
//! Without `--trust-bundle`, the bundle is the signing CA's root. With it,
//! the file is the whole bundle, and it must hold that root. A CA
//! rotation is three edits, each applied within a poll and pushed to every
//! proxy without a restart:
//!
//! 1. the new root is added to the bundle file (proxies trust both);
//! 2. the CA files are replaced by the new CA: the bundle now names it as
//!    its `signer`, and every proxy holding a certificate from the old CA
//!    asks for a new one at once;
//! 3. the old root is removed from the bundle file.
//!
//! A change that does not load (a file half written, a key that is not
//! the certificate's, a bundle without the signing root, another trust
//! domain) is logged and reported in `/status`, and the last good state
//! keeps serving.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use weft_proto::config::v1 as pb;

use crate::ca::{Ca, CaError, pem_blocks};
use crate::serve::CaSource;

/// The signing CA and the bundle, as one consistent state.
#[derive(Debug)]
pub struct Trust {
    /// The CA that signs now.
    pub ca: Ca,
    /// The roots proxies trust (PEM).
    pub bundle_pem: String,
    /// SHA-256 (hex) of the signing CA's certificate.
    pub signer: String,
}

/// The current [`Trust`] and the files it is loaded from.
#[derive(Debug)]
pub struct Authority {
    source: CaSource,
    bundle_file: Option<PathBuf>,
    trust_domain: String,
    current: RwLock<Arc<Trust>>,
    /// The files' contents when last loaded (or tried), to notice changes.
    seen: std::sync::Mutex<Vec<Option<Vec<u8>>>>,
}

impl Authority {
    /// Loads (or, from a state directory, creates) the CA for
    /// `trust_domain` and the bundle.
    pub fn load(
        source: CaSource,
        bundle_file: Option<PathBuf>,
        trust_domain: &str,
    ) -> Result<Self, CaError> {
        let ca = match &source {
            CaSource::StateDir(dir) => Ca::load_or_create(dir, trust_domain)?,
            CaSource::Files { cert, key } => Ca::from_files(cert, key)?,
        };
        let trust = trust_with(ca, bundle_file.as_deref(), &cert_path(&source))?;
        let authority = Self {
            source,
            bundle_file,
            trust_domain: trust_domain.to_owned(),
            current: RwLock::new(Arc::new(trust)),
            seen: std::sync::Mutex::new(Vec::new()),
        };
        *authority
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = authority.contents();
        Ok(authority)
    }

    /// The trust now.
    pub fn current(&self) -> Arc<Trust> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The bundle as pushed to proxies.
    pub fn trust_bundle(&self) -> pb::TrustBundle {
        let trust = self.current();
        pb::TrustBundle {
            trust_domain: self.trust_domain.clone(),
            roots_pem: trust.bundle_pem.clone(),
            signer: trust.signer.clone(),
        }
    }

    /// Reloads if any file changed since the last look: `Ok(true)` when a
    /// new state is serving, `Ok(false)` when nothing changed, an error
    /// (naming the file) when the change does not load; the last good
    /// state then keeps serving, and the same contents are not retried.
    /// Blocking (reads files).
    pub fn reload_if_changed(&self) -> Result<bool, CaError> {
        let contents = self.contents();
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if *seen == contents {
                return Ok(false);
            }
            *seen = contents;
        }
        let ca = match &self.source {
            CaSource::StateDir(dir) => Ca::from_files(&dir.join("ca.pem"), &dir.join("ca.key"))?,
            CaSource::Files { cert, key } => Ca::from_files(cert, key)?,
        };
        if ca.trust_domain() != self.trust_domain {
            return Err(CaError::Identity(format!(
                "{}: the new CA signs for trust domain {:?}, the mesh's is {:?}",
                cert_path(&self.source).display(),
                ca.trust_domain(),
                self.trust_domain
            )));
        }
        let trust = trust_with(ca, self.bundle_file.as_deref(), &cert_path(&self.source))?;
        let before = self.current();
        if trust.signer == before.signer && trust.bundle_pem == before.bundle_pem {
            return Ok(false);
        }
        tracing::info!(
            signer = %trust.signer,
            roots = pem_blocks(&trust.bundle_pem).count(),
            signer_changed = trust.signer != before.signer,
            "certificate authority reloaded"
        );
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(trust);
        Ok(true)
    }

    /// The files a change of trust comes from.
    fn files(&self) -> Vec<PathBuf> {
        let mut files = match &self.source {
            CaSource::StateDir(dir) => vec![dir.join("ca.pem"), dir.join("ca.key")],
            CaSource::Files { cert, key } => vec![cert.clone(), key.clone()],
        };
        files.extend(self.bundle_file.clone());
        files
    }

    fn contents(&self) -> Vec<Option<Vec<u8>>> {
        self.files().iter().map(|f| read_opt(f)).collect()
    }
}

/// `ca` with the bundle: the bundle file's certificates (which must
/// include `ca`'s root), or that root alone.
fn trust_with(ca: Ca, bundle_file: Option<&Path>, cert_path: &Path) -> Result<Trust, CaError> {
    let root = ca.root_pem();
    let bundle_pem = match bundle_file {
        None => root,
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| CaError::Io {
                path: path.to_owned(),
                source,
            })?;
            let invalid = |message: String| CaError::Invalid {
                path: path.to_owned(),
                message,
            };
            let summaries = crate::ca::inspect(&text).map_err(invalid)?;
            if let Some(i) = summaries.iter().position(|s| !s.is_ca) {
                return Err(invalid(format!(
                    "certificate {} is not a CA certificate",
                    i + 1
                )));
            }
            let blocks: Vec<String> = pem_blocks(&text).collect();
            let root_der = der(&root);
            if !blocks.iter().any(|b| der(b) == root_der) {
                return Err(invalid(format!(
                    "does not hold the root of the signing CA ({}): certificates it signs would not be trusted",
                    cert_path.display()
                )));
            }
            blocks.concat()
        }
    };
    Ok(Trust {
        signer: ca.signer(),
        bundle_pem,
        ca,
    })
}

/// The CA certificate file of a source.
fn cert_path(source: &CaSource) -> PathBuf {
    match source {
        CaSource::StateDir(dir) => dir.join("ca.pem"),
        CaSource::Files { cert, .. } => cert.clone(),
    }
}

fn read_opt(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

/// The DER of a PEM certificate block (empty if it does not parse).
fn der(pem: &str) -> Vec<u8> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map(|(_, block)| block.contents)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_dir_ca(dir: &Path, domain: &str) -> Ca {
        Ca::load_or_create(dir, domain).unwrap()
    }

    #[test]
    fn a_rotation_adds_a_root_switches_the_signer_and_removes_the_old_root() {
        let tmp = tempfile::tempdir().unwrap();
        let old = tmp.path().join("old");
        let new = tmp.path().join("new");
        let old_ca = state_dir_ca(&old, "example.org");
        let new_ca = state_dir_ca(&new, "example.org");
        let live_cert = tmp.path().join("ca.pem");
        let live_key = tmp.path().join("ca.key");
        let bundle = tmp.path().join("bundle.pem");
        let copy = |from: &Path, to: &Path| std::fs::copy(from, to).unwrap();
        copy(&old.join("ca.pem"), &live_cert);
        copy(&old.join("ca.key"), &live_key);
        std::fs::write(&bundle, old_ca.root_pem()).unwrap();
        let authority = Authority::load(
            CaSource::Files {
                cert: live_cert.clone(),
                key: live_key.clone(),
            },
            Some(bundle.clone()),
            "example.org",
        )
        .unwrap();
        assert_eq!(authority.current().signer, old_ca.signer());
        assert!(!authority.reload_if_changed().unwrap(), "nothing changed");

        // 1. Both roots trusted.
        std::fs::write(&bundle, old_ca.root_pem() + &new_ca.root_pem()).unwrap();
        assert!(authority.reload_if_changed().unwrap());
        assert_eq!(pem_blocks(&authority.trust_bundle().roots_pem).count(), 2);
        assert_eq!(authority.trust_bundle().signer, old_ca.signer());

        // 2. The new CA signs. A certificate installed before its key is a
        //    pair that does not match: refused, the old CA keeps signing.
        copy(&new.join("ca.pem"), &live_cert);
        let error = authority.reload_if_changed().unwrap_err();
        assert!(
            error
                .to_string()
                .contains("is not the key of the CA certificate"),
            "{error}"
        );
        assert_eq!(authority.current().signer, old_ca.signer());
        copy(&new.join("ca.key"), &live_key);
        assert!(authority.reload_if_changed().unwrap());
        assert_eq!(authority.trust_bundle().signer, new_ca.signer());
        assert_ne!(new_ca.signer(), old_ca.signer());

        // A bundle without the signing root is refused.
        std::fs::write(&bundle, old_ca.root_pem()).unwrap();
        let error = authority.reload_if_changed().unwrap_err();
        assert!(
            error.to_string().contains("does not hold the root"),
            "{error}"
        );
        assert_eq!(pem_blocks(&authority.trust_bundle().roots_pem).count(), 2);

        // 3. The old root removed.
        std::fs::write(&bundle, new_ca.root_pem()).unwrap();
        assert!(authority.reload_if_changed().unwrap());
        let pushed = authority.trust_bundle();
        assert_eq!(pem_blocks(&pushed.roots_pem).count(), 1);
        assert_eq!(der(&pushed.roots_pem), der(&new_ca.root_pem()));

        // Another trust domain's CA is refused.
        let other = tmp.path().join("other");
        state_dir_ca(&other, "other.org");
        copy(&other.join("ca.pem"), &live_cert);
        copy(&other.join("ca.key"), &live_key);
        assert!(authority.reload_if_changed().is_err());
        assert_eq!(authority.trust_bundle().signer, new_ca.signer());
    }
}

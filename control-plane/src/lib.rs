//! Weft's control plane: reads the mesh's desired state, builds each
//! proxy's resources, and streams them over xDS.
//!
//! - [`mesh`]: the mesh model (a directory of YAML files), its validation
//!   and the per-node resource builder.
//! - [`watch`]: polls a mesh directory and reports each new snapshot (or
//!   why a change was rejected).
//! - [`resources`]: the resources one proxy should have, versioned by
//!   content; the value every other module passes around.
//! - [`cache`]: the latest mesh snapshot, with a per-node change signal.
//! - [`xds`]: the aggregated discovery service (state of the world and
//!   delta), its authentication, and the server's lifecycle.
//! - `admin`: the admin HTTP API (`/status`, `/metrics`, `/ready`), started
//!   by [`xds::Server`].
//! - [`status`]: the status report's types, its client and its table.
//! - [`serve`]: `weft-cp serve`, the server fed by a watched directory.
//! - [`flags`]: command-line value parsers with their bounds.
//! - [`demo`]: `weft-cp demo`, a whole mesh on loopback.
//! - [`ca`]: the mesh's certificate authority (`weft-cp cert`).
//! - [`authority`]: the signing CA and the trust bundle, reloaded while
//!   serving (CA rotation).

mod admin;
pub mod authority;
pub mod ca;
pub mod cache;
pub mod demo;
pub mod flags;
pub mod mesh;
pub mod otlp;
pub mod resources;
pub mod serve;
pub mod status;
pub mod watch;
pub mod xds;

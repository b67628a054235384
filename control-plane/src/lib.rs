//! Weft's control plane: reads the mesh's desired state, builds each
//! proxy's resources, and streams them over xDS.
//!
//! - [`resources`]: the resources one proxy should have, versioned by
//!   content; the value every other module passes around.
//! - [`cache`]: the latest mesh snapshot, with a per-node change signal.
//! - [`xds`]: the aggregated discovery service (state of the world and
//!   delta), its authentication, and the server's lifecycle.
//! - `admin`: the admin HTTP API (`/status`, `/metrics`, `/ready`), started
//!   by [`xds::Server`].
//! - [`status`]: the status report's types, its client and its table.

mod admin;
pub mod cache;
pub mod resources;
pub mod status;
pub mod xds;

//! Weft's control plane: reads the mesh's desired state, builds each
//! proxy's resources, and streams them over xDS.
//!
//! - [`mesh`]: the mesh model (a directory of YAML files), its validation
//!   and the per-node resource builder.
//! - [`watch`]: polls a mesh directory and reports each new snapshot (or
//!   why a change was rejected).
//! - [`resources`]: the resources one proxy should have, versioned by
//!   content; the value every other module passes around.

pub mod mesh;
pub mod resources;
pub mod watch;

//! Weft's control plane: reads the mesh's desired state, builds each
//! proxy's resources, and streams them over xDS.
//!
//! - [`mesh`]: the mesh model (a directory of YAML files), its validation
//!   and the per-node resource builder.
//! - [`resources`]: the resources one proxy should have, versioned by
//!   content; the value every other module passes around.

pub mod mesh;
pub mod resources;

//! Weft's control plane: reads the mesh's desired state, builds each
//! proxy's resources, and streams them over xDS.
//!
//! - [`resources`]: the resources one proxy should have, versioned by
//!   content; the value every other module passes around.

pub mod resources;

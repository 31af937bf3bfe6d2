//! Code both Quarry binaries need beyond the wire types. Kept small on purpose.

pub mod binary;
pub mod exit;
pub mod metrics;
pub mod names;
pub mod secret;
pub mod storage;
pub mod telemetry;
pub mod transport;

//! Quarry's coordinator: plans each object's quota into seed-deterministic rounds, leases them
//! to workers over gRPC, commits each round exactly once, merges committed rounds into the
//! final per object, writes the manifest and cleans up.

pub mod coordinator;
pub mod election;
pub mod final_layout;
pub mod job;
pub mod manifest;
pub mod merge;
pub mod metrics;
pub mod service;
pub mod spec;
pub mod state;

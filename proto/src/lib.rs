//! Wire types of Quarry's gRPC API, package `quarry.v1`.
//!
//! Only generated code lives here; domain logic stays in the coordinator and worker crates.

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("quarry.v1");
}

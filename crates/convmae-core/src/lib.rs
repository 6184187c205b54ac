//! ConvMAE in Rust: configuration, model, masking, loss, training and checkpoints.
//! The N-API surface lives in `node.rs` (feature `node`) and only marshals.

pub mod augment;
pub mod classify;
pub mod config;
pub mod device;
pub mod fixture;
pub mod loss;
pub mod masking;
pub mod model;
pub mod params;
pub mod precision;
pub mod pos_embed;
pub mod rng;

pub use config::ConvMaeConfig;
pub use model::ConvMae;
pub mod optim;
pub mod train;
pub mod checkpoint;
pub mod flops;
pub mod imaging;
pub mod recon;
pub mod session;
#[cfg(feature = "node")]
mod node;
pub mod bench;

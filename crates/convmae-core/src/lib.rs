//! ConvMAE in Rust: configuration, model, masking, loss, training and checkpoints.
//! The N-API surface lives in `node.rs` (feature `node`) and only marshals.

pub mod augment;
pub mod block_cache;
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
pub mod boxes;
pub mod polygons;
pub mod detect;
pub mod segment;

pub use config::ConvMaeConfig;
pub use model::ConvMae;
pub mod optim;
pub mod train;
pub mod checkpoint;
pub mod flops;
pub mod imaging;
pub mod recon;
pub mod session;
pub mod threads;
#[cfg(feature = "node")]
mod node;

/// The addon's allocator: the system's, with freed large blocks kept for reuse (block_cache.rs).
#[cfg(feature = "node")]
#[global_allocator]
static ALLOCATOR: block_cache::BlockCache<std::alloc::System> = block_cache::BlockCache::new(std::alloc::System, None);
pub mod bench;

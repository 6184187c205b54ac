//! The crate's integration tests as one binary: each file beside this one is a module here (see
//! `autotests = false` in Cargo.toml for why). Run one file's tests with its module name as the
//! filter, e.g. `cargo test -p convmae-core --release --test integration detector::`; the
//! `*_bench` modules are ignored tests, run with `-- --ignored --nocapture`.
//! `weight_casts.rs` stays a binary of its own: its switch is read once per process.

mod common;

mod checkpoint;
mod classifier;
mod complementary;
mod detector;
mod golden;
mod host_overhead_bench;
mod manifest;
mod neighbour_tables_bench;
mod normalize_bench;
mod overlap;
mod precision;
mod segmenter;
mod sparse;
mod sublayer_chain;
mod tape;
mod tape_backward_bench;

//! Tests of the kernels against `convmae_kernels::reference`, finite differences, each other
//! (f32 vs f64) and themselves (bitwise reproducibility across thread counts).

mod bench;
mod common;
mod composite;
mod depthwise_conv;
mod layer_norm;
mod softmax;
mod sparse_depthwise_conv;

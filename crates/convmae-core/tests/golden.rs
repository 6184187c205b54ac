//! Parity with the official code: the golden fixtures in ../shared/golden decide.

use candle_core::DType;
use convmae_core::fixture::check_fixture;
use convmae_core::model::ConvPath;

/// The golden fixtures: $CONVMAE_GOLDEN, or ../shared/golden beside the repository.
fn golden(name: &str) -> String {
    let dir = std::env::var("CONVMAE_GOLDEN").unwrap_or_else(|_| format!("{}/../../../shared/golden", env!("CARGO_MANIFEST_DIR")));
    format!("{dir}/{name}")
}

#[test]
fn pretrain_small_f64_dense_matches_official() {
    let r = check_fixture(&golden("pretrain_small.safetensors"), DType::F64, ConvPath::Dense).unwrap();
    assert!(r.pass, "worst {} at {:.3e} > {:.0e}", r.worst, r.worst_rel, r.tolerance);
}

#[test]
fn pretrain_small_f64_sparse_matches_official() {
    let r = check_fixture(&golden("pretrain_small.safetensors"), DType::F64, ConvPath::Sparse).unwrap();
    for e in &r.errors {
        println!("{:40} abs {:.3e} rel {:.3e}", e.name, e.max_abs, e.max_rel);
    }
    assert!(r.pass, "worst {} at {:.3e} > {:.0e}", r.worst, r.worst_rel, r.tolerance);
}

#[test]
fn pretrain_small_f32_matches_official() {
    let r = check_fixture(&golden("pretrain_small.safetensors"), DType::F32, ConvPath::Sparse).unwrap();
    assert!(r.pass, "worst {} at {:.3e} > {:.0e}", r.worst, r.worst_rel, r.tolerance);
}

#[test]
fn finetune_small_f64_matches_official() {
    let r = check_fixture(&golden("finetune_small.safetensors"), DType::F64, ConvPath::Sparse).unwrap();
    assert_eq!(r.kind, "finetune");
    assert!(r.pass, "worst {} at {:.3e} > {:.0e}", r.worst, r.worst_rel, r.tolerance);
}

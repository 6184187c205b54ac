//! ConvMAE-B tensor names, shapes and counts equal the official model's (golden manifest).

use convmae_core::model::classifier::ClassifierHead;
use convmae_core::params::{classifier_param_specs, pretrain_param_specs, ParamSpec};
use convmae_core::ConvMaeConfig;

fn manifest() -> serde_json::Value {
    let dir = std::env::var("CONVMAE_GOLDEN").unwrap_or_else(|_| format!("{}/../../../shared/golden", env!("CARGO_MANIFEST_DIR")));
    let path = format!("{dir}/convmae_base_manifest.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn check(specs: &[ParamSpec], m: &serde_json::Value) {
    let tensors = m["tensors"].as_array().unwrap();
    assert_eq!(specs.len(), tensors.len());
    assert_eq!(specs.len() as u64, m["count"].as_u64().unwrap());
    for (s, t) in specs.iter().zip(tensors) {
        assert_eq!(s.name, t["name"].as_str().unwrap());
        let shape: Vec<usize> = t["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(s.shape, shape, "{}", s.name);
        assert_eq!(s.trainable, t["trainable"].as_bool().unwrap(), "{}", s.name);
    }
    let elements: usize = specs.iter().map(|s| s.numel()).sum();
    let trainable: usize = specs.iter().filter(|s| s.trainable).map(|s| s.numel()).sum();
    assert_eq!(elements as u64, m["elements"].as_u64().unwrap());
    assert_eq!(trainable as u64, m["trainable_elements"].as_u64().unwrap());
}

#[test]
fn pretrain_model_matches_the_official_manifest() {
    check(&pretrain_param_specs(&ConvMaeConfig::base()), &manifest()["pretrain"]);
}

#[test]
fn finetune_model_matches_the_official_manifest() {
    check(&classifier_param_specs(&ConvMaeConfig::base(), &ClassifierHead::finetune(1000)), &manifest()["finetune"]);
}

#[test]
fn qkv_bias_off_drops_only_the_stage3_qkv_biases() {
    let mut cfg = ConvMaeConfig::base();
    cfg.qkv_bias = false;
    let names: Vec<String> = pretrain_param_specs(&cfg).into_iter().map(|s| s.name).collect();
    assert!(!names.iter().any(|n| n.starts_with("blocks3.") && n.ends_with("attn.qkv.bias")));
    assert!(names.contains(&"blocks3.0.attn.qkv.weight".to_string()));
    assert!(names.contains(&"decoder_blocks.0.attn.qkv.bias".to_string()));
    assert_eq!(names.len(), 313 - 11);
}

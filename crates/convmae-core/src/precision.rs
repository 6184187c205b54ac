//! Mixed precision: the dtype the network computes in, separate from the dtype of the master
//! weights and optimizer state.

use candle_core::DType;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in the parameters' dtype.
    #[default]
    Fp32,
    /// Activations and matmuls in bfloat16; master weights, optimizer state, the loss and the
    /// LayerNorm / softmax statistics in float32 (PyTorch autocast's split).
    Bf16,
}

impl Precision {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "fp32" | "f32" => Ok(Self::Fp32),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!("precision must be 'fp32' or 'bf16', got '{other}'")),
        }
    }

    /// The compute dtype for parameters of `master` dtype.
    pub fn compute_dtype(self, master: DType) -> DType {
        match self {
            Self::Fp32 => master,
            Self::Bf16 => DType::BF16,
        }
    }

    /// bf16 compute needs f32 master weights (an f64 model is the parity path).
    pub fn check_master(self, master: DType) -> Result<(), String> {
        if self == Self::Bf16 && master != DType::F32 {
            return Err(format!("precision 'bf16' needs dtype f32 master weights, got {master:?}"));
        }
        Ok(())
    }
}

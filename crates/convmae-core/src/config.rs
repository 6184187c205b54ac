//! The one configuration object of a ConvMAE model, with the named presets.
//!
//! Field names follow the keyword arguments of the official `MaskedAutoencoderConvViT`
//! (`embed_dim`, `depth`, `mlp_ratio`, ...), so a config reads like the Python factory call.

use serde::{Deserialize, Serialize};

/// Pixels per side of one stage-3 token; the official loss patchifies with this (hard-coded p = 16).
pub const TOKEN_PATCH: usize = 16;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConvMaeConfig {
    /// Input side in pixels; any multiple of 16 (the official code hard-codes 224).
    pub img_size: usize,
    pub in_chans: usize,
    /// Strides of the three patch embeds; their product must be 16.
    pub patch_size: [usize; 3],
    pub embed_dim: [usize; 3],
    pub depth: [usize; 3],
    /// Heads of the stage-3 transformer blocks (the conv blocks have none).
    pub num_heads: usize,
    pub mlp_ratio: [f64; 3],
    /// Bias of the stage-3 blocks' qkv projection (the decoder blocks always have one).
    pub qkv_bias: bool,
    pub decoder_embed_dim: usize,
    pub decoder_depth: usize,
    pub decoder_num_heads: usize,
    pub norm_pix_loss: bool,
    pub mask_ratio: f64,
    /// FastConvMAE's complementary masking (spec section 8.1): each image is seen as
    /// `L / len_keep` views (4 at mask ratio 0.75) whose visible sets split its tokens, so the
    /// loss covers every token of every image; false is ConvMAE's one random mask per image.
    /// The model and its weights are the same either way.
    pub complementary_masking: bool,
}

impl Default for ConvMaeConfig {
    fn default() -> Self {
        Self::base()
    }
}

/// Names accepted by [`ConvMaeConfig::preset`].
pub const PRESET_NAMES: [&str; 4] = ["convmae-base", "convmae-small", "convmae-tiny", "convmae-golden-small"];

impl ConvMaeConfig {
    /// ConvMAE-B, the paper's model (`convmae_convvit_base_patch16_dec512d8b`).
    pub fn base() -> Self {
        Self {
            img_size: 224,
            in_chans: 3,
            patch_size: [4, 2, 2],
            embed_dim: [256, 384, 768],
            depth: [2, 2, 11],
            num_heads: 12,
            mlp_ratio: [4.0, 4.0, 4.0],
            qkv_bias: true,
            decoder_embed_dim: 512,
            decoder_depth: 8,
            decoder_num_heads: 16,
            norm_pix_loss: true,
            mask_ratio: 0.75,
            complementary_masking: false,
        }
    }

    /// A small 224-px model for CPU experiments (widths of PaddlePaddle PLSC's ConvMAE-Small,
    /// a third-party size: the official repository defines only Base).
    pub fn small() -> Self {
        Self {
            embed_dim: [64, 128, 256],
            depth: [2, 2, 8],
            num_heads: 8,
            mlp_ratio: [4.0, 4.0, 4.0],
            decoder_embed_dim: 128,
            decoder_depth: 2,
            decoder_num_heads: 4,
            ..Self::base()
        }
    }

    /// The CPU demo and test model: 64-px images (a 4x4 token grid), trains in minutes on 2 cores.
    pub fn tiny() -> Self {
        Self {
            img_size: 64,
            embed_dim: [32, 64, 128],
            depth: [1, 1, 4],
            num_heads: 4,
            decoder_embed_dim: 64,
            decoder_depth: 2,
            decoder_num_heads: 4,
            ..Self::base()
        }
    }

    /// The configuration of the golden fixtures in `shared/golden` (small widths at 224 px).
    pub fn golden_small() -> Self {
        Self {
            embed_dim: [32, 48, 64],
            depth: [2, 1, 2],
            num_heads: 4,
            decoder_embed_dim: 32,
            decoder_depth: 2,
            decoder_num_heads: 4,
            ..Self::base()
        }
    }

    pub fn preset(name: &str) -> Result<Self, String> {
        match name {
            "convmae-base" => Ok(Self::base()),
            "convmae-small" => Ok(Self::small()),
            "convmae-tiny" => Ok(Self::tiny()),
            "convmae-golden-small" => Ok(Self::golden_small()),
            other => Err(format!("unknown preset '{other}'; known presets: {}", PRESET_NAMES.join(", "))),
        }
    }

    /// Checks every invariant the model relies on, so a bad config fails before any compute.
    pub fn validate(&self) -> Result<(), String> {
        let fail = |msg: String| Err(format!("invalid config: {msg}"));
        if self.img_size == 0 || !self.img_size.is_multiple_of(TOKEN_PATCH) {
            return fail(format!("img_size must be a positive multiple of 16, got {}", self.img_size));
        }
        if self.in_chans == 0 {
            return fail("in_chans must be positive".into());
        }
        if self.patch_size.contains(&0) || self.patch_size.iter().product::<usize>() != TOKEN_PATCH {
            return fail(format!(
                "patch_size entries must be positive with product 16 (the loss patchifies 16x16), got {:?}",
                self.patch_size
            ));
        }
        if self.embed_dim.contains(&0) {
            return fail(format!("embed_dim entries must be positive, got {:?}", self.embed_dim));
        }
        if self.mlp_ratio.iter().any(|&r| !(r.is_finite() && r > 0.0)) {
            return fail(format!("mlp_ratio entries must be positive, got {:?}", self.mlp_ratio));
        }
        if self.num_heads == 0 || !self.embed_dim[2].is_multiple_of(self.num_heads) {
            return fail(format!(
                "embed_dim[2] = {} must be divisible by num_heads = {}",
                self.embed_dim[2], self.num_heads
            ));
        }
        if self.decoder_embed_dim == 0
            || self.decoder_num_heads == 0
            || !self.decoder_embed_dim.is_multiple_of(self.decoder_num_heads)
        {
            return fail(format!(
                "decoder_embed_dim = {} must be positive and divisible by decoder_num_heads = {}",
                self.decoder_embed_dim, self.decoder_num_heads
            ));
        }
        if !self.embed_dim[2].is_multiple_of(4) || !self.decoder_embed_dim.is_multiple_of(4) {
            return fail("embed_dim[2] and decoder_embed_dim must be multiples of 4 (2-D sin-cos position tables)".into());
        }
        if !(self.mask_ratio >= 0.0 && self.mask_ratio < 1.0) {
            return fail(format!("mask_ratio must be in [0, 1), got {}", self.mask_ratio));
        }
        if self.len_keep() == 0 {
            return fail(format!(
                "mask_ratio {} keeps no token of the {} on a {}-px image",
                self.mask_ratio,
                self.num_tokens(),
                self.img_size
            ));
        }
        if self.complementary_masking {
            if let Err(e) = crate::masking::complementary_views(self.num_tokens(), self.len_keep()) {
                return fail(format!("complementary_masking with mask_ratio {} on a {}-px image: {e}", self.mask_ratio, self.img_size));
            }
        }
        Ok(())
    }

    /// A config from JSON (every field optional over ConvMAE-B), validated. A field of the wrong
    /// type or an unknown one is named: serde's own message gives only a column.
    pub fn from_json(json: &str) -> Result<Self, String> {
        let cfg: Self = match serde_json::from_str(json) {
            Ok(cfg) => cfg,
            Err(e) => {
                // Each field alone over the defaults: the first that fails is the one to name.
                let named = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(json).ok().and_then(|fields| {
                    fields.into_iter().find_map(|(key, value)| {
                        let one = serde_json::Value::Object([(key.clone(), value)].into_iter().collect());
                        serde_json::from_value::<Self>(one).err().map(|e| format!("invalid config: '{key}': {e}"))
                    })
                });
                return Err(named.unwrap_or_else(|| format!("invalid config: {e}")));
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Tokens per side of the stage-3 grid (img_size / 16).
    pub fn grid(&self) -> usize {
        self.img_size / TOKEN_PATCH
    }
    pub fn num_tokens(&self) -> usize {
        self.grid() * self.grid()
    }
    /// Visible tokens per image: `int(L * (1 - mask_ratio))`, as the official code computes it.
    pub fn len_keep(&self) -> usize {
        (self.num_tokens() as f64 * (1.0 - self.mask_ratio)) as usize
    }
    /// Side of the stage-`s` feature map (s = 0, 1, 2).
    pub fn stage_side(&self, s: usize) -> usize {
        self.img_size / self.patch_size[..=s].iter().product::<usize>()
    }
    /// How many stage-`s` positions per side fall in one 16-px token (4 for stage 1 of Base).
    pub fn stage_cell(&self, s: usize) -> usize {
        self.patch_size[s + 1..].iter().product()
    }
    /// `int(dim * mlp_ratio)`, timm's hidden width.
    pub fn mlp_hidden(dim: usize, ratio: f64) -> usize {
        (dim as f64 * ratio) as usize
    }
    /// Values per target patch: 16 * 16 * in_chans.
    pub fn patch_values(&self) -> usize {
        TOKEN_PATCH * TOKEN_PATCH * self.in_chans
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_json_names_the_field_that_fails() {
        let e = ConvMaeConfig::from_json(r#"{"mask_ratio": 0.75, "complementary_masking": "yes"}"#).unwrap_err();
        assert!(e.starts_with("invalid config: 'complementary_masking': invalid type: string \"yes\", expected a boolean"), "{e}");
        let e = ConvMaeConfig::from_json(r#"{"mask_ratios": 0.5}"#).unwrap_err();
        assert!(e.starts_with("invalid config: 'mask_ratios': unknown field"), "{e}");
        let e = ConvMaeConfig::from_json("[1]").unwrap_err();
        assert!(e.starts_with("invalid config: ") && !e.contains('\''), "{e}");
        assert!(ConvMaeConfig::from_json(r#"{"complementary_masking": true, "mask_ratio": 0.6}"#).unwrap_err().contains("complementary_masking with mask_ratio 0.6"));
        assert!(ConvMaeConfig::from_json(r#"{"complementary_masking": true}"#).unwrap().complementary_masking);
    }

    #[test]
    fn presets_are_valid() {
        for name in PRESET_NAMES {
            ConvMaeConfig::preset(name).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn base_geometry_matches_the_paper() {
        let c = ConvMaeConfig::base();
        assert_eq!((c.grid(), c.num_tokens(), c.len_keep()), (14, 196, 49));
        assert_eq!([c.stage_side(0), c.stage_side(1), c.stage_side(2)], [56, 28, 14]);
        assert_eq!([c.stage_cell(0), c.stage_cell(1)], [4, 2]);
    }

    #[test]
    fn bad_configs_are_named() {
        let mut c = ConvMaeConfig::base();
        c.img_size = 100;
        assert!(c.validate().unwrap_err().contains("img_size"));
        let mut c = ConvMaeConfig::base();
        c.num_heads = 7;
        assert!(c.validate().unwrap_err().contains("num_heads"));
        let mut c = ConvMaeConfig::base();
        c.mask_ratio = 1.0;
        assert!(c.validate().unwrap_err().contains("mask_ratio"));
    }
}

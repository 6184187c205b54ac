//! Multiply-accumulate counts per image (spec section 3's scope: convs, linears and the two
//! attention matmuls; norms, activations, softmax and adds are left out, well under 1%).

use crate::config::ConvMaeConfig;
use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct MacCount {
    /// Pretraining as the official code computes it (stages 1-2 dense on every position). Under
    /// complementary masking, FastConvMAE's: stages 1-2 once with each depthwise conv once per
    /// view, then stage 3 and the decoder once per view; all of an image's views counted.
    pub pretrain_dense: f64,
    /// Pretraining computing only visible positions in stages 1-2 (exact, spec section 2); under
    /// complementary masking each position once, in its own view.
    pub pretrain_sparse: f64,
    /// Fine-tuning / inference encoder on all tokens, without a classification head.
    pub encoder: f64,
}

fn conv_block(cfg: &ConvMaeConfig, stage: usize, positions: f64) -> f64 {
    let d = cfg.embed_dim[stage] as f64;
    let hidden = ConvMaeConfig::mlp_hidden(cfg.embed_dim[stage], cfg.mlp_ratio[stage]) as f64;
    positions * (2.0 * d * d + 25.0 * d + 2.0 * d * hidden)
}

fn transformer_block(dim: usize, mlp_ratio: f64, tokens: f64) -> f64 {
    let d = dim as f64;
    let hidden = ConvMaeConfig::mlp_hidden(dim, mlp_ratio) as f64;
    tokens * (3.0 * d * d + d * d + 2.0 * d * hidden) + 2.0 * tokens * tokens * d
}

pub fn macs_per_image(cfg: &ConvMaeConfig) -> MacCount {
    let [d1, d2, d3] = cfg.embed_dim.map(|d| d as f64);
    let [p1, p2, p3] = cfg.patch_size.map(|p| p as f64);
    let l = cfg.num_tokens() as f64;
    let keep = cfg.len_keep() as f64;
    let pos1 = (cfg.stage_side(0) * cfg.stage_side(0)) as f64;
    let pos2 = (cfg.stage_side(1) * cfg.stage_side(1)) as f64;
    let (c1, c2) = (cfg.stage_cell(0) as f64, cfg.stage_cell(1) as f64);

    // `frac` of the stage-1/2 positions (and of the stage-3 embeds, fusion convs) are computed.
    let stages12 = |frac: f64| {
        let s1 = frac * pos1 * cfg.in_chans as f64 * p1 * p1 * d1
            + (0..cfg.depth[0]).map(|_| conv_block(cfg, 0, frac * pos1)).sum::<f64>();
        let s2 = frac * pos2 * d1 * p2 * p2 * d2 + (0..cfg.depth[1]).map(|_| conv_block(cfg, 1, frac * pos2)).sum::<f64>();
        s1 + s2
    };
    let embed3 = |tokens: f64| tokens * (d2 * p3 * p3 * d3 + d3 * d3);
    let fusion = |tokens: f64| tokens * (d1 * c1 * c1 * d3 + d2 * c2 * c2 * d3);
    let blocks3 = |tokens: f64| cfg.depth[2] as f64 * transformer_block(cfg.embed_dim[2], cfg.mlp_ratio[2], tokens);
    let dd = cfg.decoder_embed_dim as f64;
    let decoder = keep * d3 * dd
        + cfg.decoder_depth as f64 * transformer_block(cfg.decoder_embed_dim, cfg.mlp_ratio[0], l)
        + l * dd * cfg.patch_values() as f64;

    // Masked views per image: the complementary views split the tokens (FastConvMAE), else 1.
    let views = if cfg.complementary_masking { l / keep } else { 1.0 };
    // The depthwise convs FastConvMAE's dense stages run once more per extra view.
    let depthwise = cfg.depth[0] as f64 * pos1 * 25.0 * d1 + cfg.depth[1] as f64 * pos2 * 25.0 * d2;
    let seen = views * keep;
    MacCount {
        pretrain_dense: stages12(1.0) + (views - 1.0) * depthwise + embed3(l) + fusion(l) + views * (blocks3(keep) + decoder),
        pretrain_sparse: stages12(seen / l) + embed3(seen) + fusion(seen) + views * (blocks3(keep) + decoder),
        encoder: stages12(1.0) + embed3(l) + blocks3(l),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base_matches_the_spec_budget() {
        let m = super::macs_per_image(&crate::ConvMaeConfig::base());
        let g = |x: f64| (x / 1e9 * 100.0).round() / 100.0;
        assert_eq!(g(m.pretrain_dense), 17.22);
        assert_eq!(g(m.pretrain_sparse), 11.20);
        assert_eq!(g(m.encoder), 23.08);
    }

    /// FastConvMAE at ConvMAE-B: the 4 views see every position once in stages 1-2 (dense: 3
    /// more depthwise convs per conv block), and stage 3 (49 tokens) and the decoder run 4 times.
    #[test]
    fn complementary_views_count_each_view() {
        use super::transformer_block;
        let plain = super::macs_per_image(&crate::ConvMaeConfig::base());
        let cfg = crate::ConvMaeConfig { complementary_masking: true, ..crate::ConvMaeConfig::base() };
        let m = super::macs_per_image(&cfg);
        let depthwise = 2.0 * 56.0 * 56.0 * 25.0 * 256.0 + 2.0 * 28.0 * 28.0 * 25.0 * 384.0;
        assert!((m.pretrain_dense - m.pretrain_sparse - 3.0 * depthwise).abs() < 1.0);
        let decoder = 49.0 * 768.0 * 512.0 + 8.0 * transformer_block(512, 4.0, 196.0) + 196.0 * 512.0 * 768.0;
        let view = 11.0 * transformer_block(768, 4.0, 49.0) + decoder;
        // Beyond the plain sparse step: the masked positions' stages 1-2 (plain dense minus
        // plain sparse), and 3 more views of stage 3 and the decoder.
        let want = plain.pretrain_sparse + (plain.pretrain_dense - plain.pretrain_sparse) + 3.0 * view;
        assert!((m.pretrain_sparse - want).abs() < 1e-6 * want, "{} vs {want}", m.pretrain_sparse);
    }
}

//! Parameter tensors under their official state_dict names, in the official registration order.
//!
//! `pretrain_param_specs` is the single place that knows which tensors a ConvMAE model has, their
//! shapes, whether they train and how the official code initializes them. Init, the manifest,
//! `convmae info`, checkpoint loading and the optimizer all read it.

use crate::config::ConvMaeConfig;
use crate::model::classifier::{ClassifierHead, HeadKind, Pooling};
use crate::pos_embed::sincos_2d;
use crate::rng::Rng;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How the official code initializes a tensor when training from scratch (spec section 1.9).
#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    /// torch.nn.init.xavier_uniform_: U(+-sqrt(6 / (fan_in + fan_out))).
    XavierUniform { fan_in: usize, fan_out: usize },
    /// PyTorch's default Conv2d init, kaiming_uniform(a = sqrt 5): U(+-1/sqrt(fan_in)); also its bias init.
    ConvDefault { fan_in: usize },
    Normal { std: f64 },
    /// Fixed 2-D sin-cos table of the given width on the model's token grid.
    SinCos { dim: usize, grid: usize },
}

#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub trainable: bool,
    pub init: Init,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

struct SpecList(Vec<ParamSpec>);

impl SpecList {
    fn push(&mut self, name: String, shape: &[usize], init: Init) {
        self.0.push(ParamSpec { name, shape: shape.to_vec(), trainable: true, init });
    }
    fn frozen(&mut self, name: &str, shape: &[usize], init: Init) {
        self.0.push(ParamSpec { name: name.into(), shape: shape.to_vec(), trainable: false, init });
    }
    fn linear(&mut self, prefix: &str, inp: usize, out: usize) {
        self.push(format!("{prefix}.weight"), &[out, inp], Init::XavierUniform { fan_in: inp, fan_out: out });
        self.push(format!("{prefix}.bias"), &[out], Init::Zeros);
    }
    fn layer_norm(&mut self, prefix: &str, dim: usize) {
        self.push(format!("{prefix}.weight"), &[dim], Init::Ones);
        self.push(format!("{prefix}.bias"), &[dim], Init::Zeros);
    }
    /// A Conv2d left at PyTorch's default init (groups = `inp` for depthwise: weight [out, 1, k, k]).
    fn conv(&mut self, prefix: &str, inp_per_group: usize, out: usize, k: usize) {
        let fan_in = inp_per_group * k * k;
        self.push(format!("{prefix}.weight"), &[out, inp_per_group, k, k], Init::ConvDefault { fan_in });
        self.push(format!("{prefix}.bias"), &[out], Init::ConvDefault { fan_in });
    }
    fn patch_embed(&mut self, prefix: &str, inp: usize, out: usize, k: usize) {
        self.conv(&format!("{prefix}.proj"), inp, out, k);
        self.layer_norm(&format!("{prefix}.norm"), out);
    }
    fn conv_block(&mut self, prefix: &str, dim: usize, mlp_ratio: f64) {
        let hidden = ConvMaeConfig::mlp_hidden(dim, mlp_ratio);
        self.layer_norm(&format!("{prefix}.norm1"), dim);
        self.conv(&format!("{prefix}.conv1"), dim, dim, 1);
        self.conv(&format!("{prefix}.conv2"), dim, dim, 1);
        self.conv(&format!("{prefix}.attn"), 1, dim, 5);
        self.layer_norm(&format!("{prefix}.norm2"), dim);
        self.conv(&format!("{prefix}.mlp.fc1"), dim, hidden, 1);
        self.conv(&format!("{prefix}.mlp.fc2"), hidden, dim, 1);
    }
    fn transformer_block(&mut self, prefix: &str, dim: usize, mlp_ratio: f64, qkv_bias: bool) {
        let hidden = ConvMaeConfig::mlp_hidden(dim, mlp_ratio);
        self.layer_norm(&format!("{prefix}.norm1"), dim);
        if qkv_bias {
            self.linear(&format!("{prefix}.attn.qkv"), dim, 3 * dim);
        } else {
            self.push(format!("{prefix}.attn.qkv.weight"), &[3 * dim, dim], Init::XavierUniform { fan_in: dim, fan_out: 3 * dim });
        }
        self.linear(&format!("{prefix}.attn.proj"), dim, dim);
        self.layer_norm(&format!("{prefix}.norm2"), dim);
        self.linear(&format!("{prefix}.mlp.fc1"), dim, hidden);
        self.linear(&format!("{prefix}.mlp.fc2"), hidden, dim);
    }
}

impl SpecList {
    /// patch_embed1..4 (shared by the pretraining and classification models).
    fn patch_embeds(&mut self, cfg: &ConvMaeConfig) {
        let [d1, d2, d3] = cfg.embed_dim;
        let [p1, p2, p3] = cfg.patch_size;
        self.patch_embed("patch_embed1", cfg.in_chans, d1, p1);
        self.patch_embed("patch_embed2", d1, d2, p2);
        self.patch_embed("patch_embed3", d2, d3, p3);
        // The only conv the official init treats like a Linear: xavier on its [out, in*k*k] view.
        let pe3 = self.0.iter_mut().find(|p| p.name == "patch_embed3.proj.weight").unwrap();
        pe3.init = Init::XavierUniform { fan_in: d2 * p3 * p3, fan_out: d3 };
        self.linear("patch_embed4", d3, d3);
    }

    /// blocks1, blocks2 (conv blocks) and blocks3 (transformer blocks).
    fn encoder_blocks(&mut self, cfg: &ConvMaeConfig) {
        let [d1, d2, d3] = cfg.embed_dim;
        for i in 0..cfg.depth[0] {
            self.conv_block(&format!("blocks1.{i}"), d1, cfg.mlp_ratio[0]);
        }
        for i in 0..cfg.depth[1] {
            self.conv_block(&format!("blocks2.{i}"), d2, cfg.mlp_ratio[1]);
        }
        for i in 0..cfg.depth[2] {
            self.transformer_block(&format!("blocks3.{i}"), d3, cfg.mlp_ratio[2], cfg.qkv_bias);
        }
    }
}

/// Every tensor of the official `ConvViT` classifier, in state_dict order, for a head and pooling.
///
/// - Fine-tuning (`main_finetune.py`): everything trains; pos_embed is learnable; `head` is
///   trunc_normal(2e-5).
/// - Linear probe (`main_linprobe.py`): everything but the head is frozen; the head is
///   BatchNorm1d(affine=False) (`head.0`, running stats as frozen buffers) + Linear (`head.1`,
///   trunc_normal(0.01)).
/// - Global pooling adds `fc_norm` (the official class deletes `norm` then); token pooling keeps
///   `norm`, applied to the tokens before token 0 is taken.
pub fn classifier_param_specs(cfg: &ConvMaeConfig, head: &ClassifierHead) -> Vec<ParamSpec> {
    let d3 = cfg.embed_dim[2];
    let k = head.num_classes;
    let mut s = SpecList(Vec::new());
    s.push("pos_embed".into(), &[1, cfg.num_tokens(), d3], Init::SinCos { dim: d3, grid: cfg.grid() });
    s.patch_embeds(cfg);
    s.encoder_blocks(cfg);
    if head.pool == Pooling::Token {
        s.layer_norm("norm", d3);
    }
    match head.kind {
        HeadKind::Finetune => {
            s.push("head.weight".into(), &[k, d3], Init::Normal { std: 2e-5 });
            s.push("head.bias".into(), &[k], Init::Zeros);
        }
        HeadKind::LinearProbe => {
            s.frozen("head.0.running_mean", &[d3], Init::Zeros);
            s.frozen("head.0.running_var", &[d3], Init::Ones);
            s.push("head.1.weight".into(), &[k, d3], Init::Normal { std: 0.01 });
            s.push("head.1.bias".into(), &[k], Init::Zeros);
        }
    }
    if head.pool == Pooling::Global {
        s.layer_norm("fc_norm", d3);
    }
    if head.kind == HeadKind::LinearProbe {
        for p in s.0.iter_mut().filter(|p| !p.name.starts_with("head.1.")) {
            p.trainable = false;
        }
    }
    s.0
}

/// Every tensor of `MaskedAutoencoderConvViT`, in the order of its state_dict.
pub fn pretrain_param_specs(cfg: &ConvMaeConfig) -> Vec<ParamSpec> {
    let [d1, d2, d3] = cfg.embed_dim;
    let (grid, tokens, dd) = (cfg.grid(), cfg.num_tokens(), cfg.decoder_embed_dim);
    let mut s = SpecList(Vec::new());
    s.frozen("pos_embed", &[1, tokens, d3], Init::SinCos { dim: d3, grid });
    s.push("mask_token".into(), &[1, 1, dd], Init::Normal { std: 0.02 });
    s.frozen("decoder_pos_embed", &[1, tokens, dd], Init::SinCos { dim: dd, grid });
    s.patch_embeds(cfg);
    s.conv("stage1_output_decode", d1, d3, cfg.stage_cell(0));
    s.conv("stage2_output_decode", d2, d3, cfg.stage_cell(1));
    s.encoder_blocks(cfg);
    s.layer_norm("norm", d3);
    s.linear("decoder_embed", d3, dd);
    for i in 0..cfg.decoder_depth {
        // The official decoder blocks use mlp_ratio[0] and always have a qkv bias.
        s.transformer_block(&format!("decoder_blocks.{i}"), dd, cfg.mlp_ratio[0], true);
    }
    s.layer_norm("decoder_norm", dd);
    s.linear("decoder_pred", dd, cfg.patch_values());
    s.0
}

/// Draws one tensor's initial values (in f64; callers cast).
pub fn init_values(spec: &ParamSpec, rng: &mut Rng) -> Vec<f64> {
    let n = spec.numel();
    match spec.init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::XavierUniform { fan_in, fan_out } => {
            let a = (6.0 / (fan_in + fan_out) as f64).sqrt();
            (0..n).map(|_| rng.uniform_range(-a, a)).collect()
        }
        Init::ConvDefault { fan_in } => {
            let a = 1.0 / (fan_in as f64).sqrt();
            (0..n).map(|_| rng.uniform_range(-a, a)).collect()
        }
        Init::Normal { std } => (0..n).map(|_| rng.normal() * std).collect(),
        Init::SinCos { dim, grid } => sincos_2d(dim, grid),
    }
}

/// One named tensor of a live model. Trainable tensors are candle `Var`s (autograd leaves);
/// frozen ones are plain tensors, so no gradient is computed for them.
#[derive(Clone)]
pub struct Param {
    pub spec: ParamSpec,
    pub var: Option<Var>,
    pub tensor: Tensor,
}

#[derive(Clone)]
pub struct ParamStore {
    params: Vec<Param>,
    index: HashMap<String, usize>,
    pub dtype: DType,
    pub device: Device,
    /// The compute copies of mixed precision, once a forward has asked for them (`compute_view`).
    /// Shared by clones, as the master tensors are (a `Var` clone is the same storage).
    shadow: Arc<Mutex<Option<Shadow>>>,
}

/// Mixed precision's compute copies: every tensor of a store in the compute dtype, the
/// trainable ones as autograd leaves of their own. The forward reads them with no cast node per
/// tensor, so the backward has none either: the gradients arrive at the copies, in the compute
/// dtype, and the optimizer reads them there. On a GPU that is 3 launches fewer per tensor per
/// step (the cast, its backward cast, the f32 accumulation), about 950 for convmae-base (run 1's profile: 629 casts, 322 f32 adds); the
/// values are the same, a bf16 gradient converted to f32 being exact. Whoever changes a master
/// tensor keeps its copy equal to it rounded once: `ParamStore::set`, and the optimizers after
/// each update (on CUDA the fused AdamW writes both in one pass).
struct Shadow {
    dtype: DType,
    /// Per tensor of the store, in its order.
    tensors: Vec<Tensor>,
    /// Per tensor: the copy's Var for trainable ones.
    vars: Vec<Option<Var>>,
}

impl ParamStore {
    /// Builds the tensors of `specs` with values from `values(spec)` (f64, cast to `dtype`).
    pub fn build(
        specs: Vec<ParamSpec>,
        dtype: DType,
        device: &Device,
        mut values: impl FnMut(&ParamSpec) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Self> {
        let mut params = Vec::with_capacity(specs.len());
        let mut index = HashMap::new();
        for spec in specs {
            let t = values(&spec)?.to_dtype(dtype)?.to_device(device)?;
            let (var, tensor) = if spec.trainable {
                let v = Var::from_tensor(&t)?;
                let t = v.as_tensor().clone();
                (Some(v), t)
            } else {
                (None, t)
            };
            index.insert(spec.name.clone(), params.len());
            params.push(Param { spec, var, tensor });
        }
        Ok(Self { params, index, dtype, device: device.clone(), shadow: Arc::default() })
    }

    /// Fresh weights with the official init, drawn from `seed`.
    pub fn init(specs: Vec<ParamSpec>, dtype: DType, device: &Device, seed: u64) -> candle_core::Result<Self> {
        let mut rng = Rng::new(seed);
        Self::build(specs, dtype, device, |spec| {
            Tensor::from_vec(init_values(spec, &mut rng), spec.shape.as_slice(), &Device::Cpu)
        })
    }

    /// The tensor named `name` (the model's own names; a missing one is a programming error).
    pub fn get(&self, name: &str) -> &Tensor {
        match self.index.get(name) {
            Some(&i) => &self.params[i].tensor,
            None => panic!("model has no tensor named '{name}'"),
        }
    }

    pub fn find(&self, name: &str) -> Option<&Param> {
        self.index.get(name).map(|&i| &self.params[i])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.params.iter()
    }

    pub fn trainable(&self) -> impl Iterator<Item = (&Param, &Var)> {
        self.params.iter().filter_map(|p| p.var.as_ref().map(|v| (p, v)))
    }

    /// The tensors as a forward in `dtype` reads them: this store itself when `dtype` is its own,
    /// else its compute copies in `dtype` (made on the first call, kept in step by `set` and the
    /// optimizers): a store whose trainable tensors are the copies' Vars.
    pub fn compute_view(&self, dtype: DType) -> candle_core::Result<Self> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        if crate::device::compute_copies_off() {
            // The A/B's other side: casts recorded by autograd, so the gradients flow back to
            // the masters through them, every forward.
            let params = self.params.iter().map(|p| Ok(Param { spec: p.spec.clone(), var: None, tensor: p.tensor.to_dtype(dtype)? })).collect::<candle_core::Result<_>>()?;
            return Ok(Self { params, index: self.index.clone(), dtype, device: self.device.clone(), shadow: Arc::default() });
        }
        let mut shadow = self.shadow.lock().unwrap_or_else(|e| e.into_inner());
        if shadow.as_ref().is_none_or(|s| s.dtype != dtype) {
            let mut tensors = Vec::with_capacity(self.params.len());
            let mut vars = Vec::with_capacity(self.params.len());
            for p in &self.params {
                let t = p.tensor.detach().to_dtype(dtype)?;
                let var = if p.var.is_some() { Some(Var::from_tensor(&t)?) } else { None };
                tensors.push(var.as_ref().map_or(t, |v| v.as_tensor().clone()));
                vars.push(var);
            }
            *shadow = Some(Shadow { dtype, tensors, vars });
        }
        let sh = shadow.as_ref().expect("made above");
        let params = self
            .params
            .iter()
            .zip(sh.tensors.iter().zip(&sh.vars))
            .map(|(p, (t, v))| Param { spec: p.spec.clone(), var: v.clone(), tensor: t.clone() })
            .collect();
        Ok(Self { params, index: self.index.clone(), dtype, device: self.device.clone(), shadow: Arc::default() })
    }

    /// The gradient of every trainable tensor from one backward, in `trainable()` order: what
    /// reached its master Var, its compute copy's, or both (the classifier's head reads the
    /// masters, its encoder the copies), summed in the master dtype. A copy's gradient is in the
    /// compute dtype; the optimizers take either. A tensor no gradient reached is an error
    /// naming it.
    pub fn gradients(&self, grads: &candle_core::backprop::GradStore) -> candle_core::Result<Vec<Tensor>> {
        self.trainable()
            .zip(self.trainable_shadows())
            .map(|((p, master), copy)| {
                let from_master = grads.get(master.as_tensor());
                let from_copy = copy.as_ref().and_then(|c| grads.get(c.as_tensor()));
                match (from_master, from_copy) {
                    (Some(g), None) | (None, Some(g)) => Ok(g.clone()),
                    (Some(g), Some(c)) => g + c.to_dtype(g.dtype())?,
                    (None, None) => Err(candle_core::Error::Msg(format!("no gradient reached '{}'", p.spec.name))),
                }
            })
            .collect()
    }

    /// The compute copies' Vars in `trainable()` order, or None where there are none.
    pub fn trainable_shadows(&self) -> Vec<Option<Var>> {
        let shadow = self.shadow.lock().unwrap_or_else(|e| e.into_inner());
        match shadow.as_ref() {
            Some(sh) => self.params.iter().zip(&sh.vars).filter(|(p, _)| p.var.is_some()).map(|(_, v)| v.clone()).collect(),
            None => vec![None; self.trainable().count()],
        }
    }

    /// Replaces a tensor's values (shape-checked by the caller); keeps Var identity for the optimizer.
    pub fn set(&mut self, name: &str, value: &Tensor) -> candle_core::Result<()> {
        let i = *self.index.get(name).ok_or_else(|| candle_core::Error::Msg(format!("model has no tensor named '{name}'")))?;
        let value = value.to_dtype(self.dtype)?.to_device(&self.device)?;
        let p = &mut self.params[i];
        match &p.var {
            Some(v) => v.set(&value)?,
            None => p.tensor = value.clone(),
        }
        // The compute copy follows, rounded once from the new master value.
        let mut shadow = self.shadow.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sh) = shadow.as_mut() {
            let copy = value.to_dtype(sh.dtype)?;
            match &sh.vars[i] {
                Some(v) => v.set(&copy)?,
                None => sh.tensors[i] = copy,
            }
        }
        Ok(())
    }
}

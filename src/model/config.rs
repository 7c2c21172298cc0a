//! The architecture of a causal LM, family-neutral: what each family's config.json resolves to.
//!
//! A family file (`family/<name>.rs`) reads its own config.json and fills this in: sizes, then
//! one choice per block (norm, positions, attention, MLP, residual) and a name map from the
//! blocks to the checkpoint's tensor names. The network (`lm.rs`, `blocks/`) is built from this
//! alone.

/// Which normalisation every norm of the model uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    /// x / rms(x) · w (Llama). With `unit_offset` the weight is stored as w − 1 and applied as
    /// (1 + w), computed in f32 (Gemma).
    Rms { eps: f64, unit_offset: bool },
    /// (x − mean) / std · w + b (GPT-2, GPT-NeoX, BLOOM).
    Layer { eps: f64 },
}

/// How rotary frequencies are rescaled for long context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (Code Llama, Gemma 3's global layers).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Phi-3's LongRoPE: per-frequency divisors, `short_factor` up to the original context and
    /// `long_factor` past it (chosen per forward pass from its largest position, as
    /// transformers does), and cos/sin multiplied by `attention_factor`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
}

/// One rotary table: Gemma 3 has two (global and local layers), others one.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
    /// Rotated dimensions of each head (rotate_half on these, the rest pass through): all of
    /// head_dim, or GPT-NeoX's rotary_pct / Phi-3's partial_rotary_factor of it.
    pub rotary_dim: usize,
}

/// How positions enter the network.
#[derive(Debug, Clone, PartialEq)]
pub enum Positions {
    /// Rotary embeddings on q and k; each layer names its table (`LayerConfig::rope`).
    Rope(Vec<RopeConfig>),
    /// A learned `[max_positions, hidden]` table added to the token embeddings (GPT-2).
    Learned,
    /// A linear bias on the attention scores per head (BLOOM), slopes from the head count.
    Alibi,
}

/// How q, k and v come out of the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvLayout {
    /// Three projections.
    Separate,
    /// One projection whose output is [all q | all k | all v] (Phi-3, GPT-2).
    Fused,
    /// One projection whose output is per head [q | k | v] (GPT-NeoX, BLOOM).
    FusedPerHead,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttentionConfig {
    pub qkv: QkvLayout,
    /// Bias on q, k and v (or the fused projection).
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// A norm over each head of q and k before the rotation (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Multiplies q·kᵀ: 1/√head_dim, or Gemma's query_pre_attn_scalar^−½.
    pub scale: f64,
    /// Gemma 2's attention logit soft-capping: cap·tanh(score / cap).
    pub softcap: Option<f64>,
}

/// The activation of the MLP.
pub use crate::ops::Activation;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    /// down(act(gate(x)) · up(x)): SwiGLU (Llama), GeGLU (Gemma).
    Gated,
    /// As Gated, with gate and up fused into one projection [gate | up] (Phi-3).
    GatedFused,
    /// down(act(up(x))) (GPT-2, GPT-NeoX, BLOOM).
    Plain,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlpConfig {
    pub kind: MlpKind,
    pub act: Activation,
    pub bias: bool,
}

/// How a block combines its sublayers with the residual stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residual {
    /// x + attn(norm(x)), then x + mlp(norm(x)).
    Sequential,
    /// x + attn(norm₁(x)) + mlp(norm₂(x)) (GPT-NeoX).
    Parallel,
    /// Gemma: each sublayer's output is normed again before it is added,
    /// x + norm(attn(norm(x))), then x + norm(mlp(norm(x))).
    Sandwich,
}

/// What differs between the layers of one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerConfig {
    /// Sliding-window attention: each query sees at most this many positions back (itself
    /// included).
    pub window: Option<usize>,
    /// Which rotary table (index into `Positions::Rope`).
    pub rope: usize,
}

/// The linear layers' storage on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `nn.Linear`: `[out, in]`.
    OutIn,
    /// GPT-2's `Conv1D`: `[in, out]`.
    InOut,
}

/// The projections of q, k and v, as named in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvNames {
    Separate { q: &'static str, k: &'static str, v: &'static str },
    Fused(&'static str),
}

/// The MLP's projections, as named in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpNames {
    Gated { gate: &'static str, up: &'static str, down: &'static str },
    GatedFused { gate_up: &'static str, down: &'static str },
    Plain { up: &'static str, down: &'static str },
}

/// A family's module paths, without `.weight` / `.bias`. Per-layer names are relative to
/// `{layers}.{i}`. These are also PEFT's module names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Names {
    pub embed_tokens: &'static str,
    /// GPT-2's learned position table.
    pub embed_positions: Option<&'static str>,
    /// BLOOM's norm right after the embedding.
    pub embed_norm: Option<&'static str>,
    pub layers: &'static str,
    /// Before attention (input_layernorm, ln_1).
    pub attn_norm: &'static str,
    /// Gemma's norm of the attention output (its `post_attention_layernorm`).
    pub attn_out_norm: Option<&'static str>,
    /// Before the MLP (Llama's post_attention_layernorm, ln_2, Gemma's pre_feedforward_layernorm).
    pub mlp_norm: &'static str,
    /// Gemma's norm of the MLP output.
    pub mlp_out_norm: Option<&'static str>,
    pub qkv: QkvNames,
    pub o_proj: &'static str,
    pub q_norm: &'static str,
    pub k_norm: &'static str,
    pub mlp: MlpNames,
    pub final_norm: &'static str,
    pub lm_head: &'static str,
    /// The prefix transformers' base model adds (`transformer.`) that some checkpoints, like
    /// the original GPT-2's, were saved without.
    pub optional_prefix: Option<&'static str>,
}

/// The architecture, resolved from config.json with the family's defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// transformers' `model_type`: the family (`ModelConfig::family`) it was read as.
    pub model_type: &'static str,
    pub names: &'static Names,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub norm: NormKind,
    pub positions: Positions,
    pub attention: AttentionConfig,
    pub mlp: MlpConfig,
    pub residual: Residual,
    pub layers: Vec<LayerConfig>,
    pub layout: WeightLayout,
    /// Gemma multiplies the embeddings by √hidden_size.
    pub embed_scale: Option<f64>,
    /// Gemma 2's final logit soft-capping.
    pub final_softcap: Option<f64>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// One linear layer of the model, known from the config alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearInfo {
    /// The module path (`model.layers.0.self_attn.q_proj`): PEFT's name for it.
    pub path: String,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
}

impl ModelConfig {
    pub fn num_hidden_layers(&self) -> usize {
        self.layers.len()
    }

    /// LongRoPE's original context, past which it rotates with other factors.
    pub fn positions_switch_at(&self) -> Option<usize> {
        match &self.positions {
            Positions::Rope(tables) => tables.iter().find_map(|t| match t.scaling {
                RopeScaling::LongRope { original_max_position_embeddings, .. } => Some(original_max_position_embeddings),
                _ => None,
            }),
            _ => None,
        }
    }

    /// The linear layers of one block, in order, with paths relative to the block.
    fn block_linears(&self) -> Vec<(&'static str, usize, usize, bool)> {
        let (h, d) = (self.hidden_size, self.head_dim);
        let (q, kv) = (self.num_attention_heads * d, self.num_key_value_heads * d);
        let a = &self.attention;
        let m = &self.mlp;
        let mut out = Vec::with_capacity(7);
        match self.names.qkv {
            QkvNames::Separate { q: qn, k: kn, v: vn } => {
                out.push((qn, h, q, a.qkv_bias));
                out.push((kn, h, kv, a.qkv_bias));
                out.push((vn, h, kv, a.qkv_bias));
            }
            QkvNames::Fused(n) => out.push((n, h, q + 2 * kv, a.qkv_bias)),
        }
        out.push((self.names.o_proj, q, h, a.o_bias));
        let i = self.intermediate_size;
        match self.names.mlp {
            MlpNames::Gated { gate, up, down } => {
                out.push((gate, h, i, m.bias));
                out.push((up, h, i, m.bias));
                out.push((down, i, h, m.bias));
            }
            MlpNames::GatedFused { gate_up, down } => {
                out.push((gate_up, h, 2 * i, m.bias));
                out.push((down, i, h, m.bias));
            }
            MlpNames::Plain { up, down } => {
                out.push((up, h, i, m.bias));
                out.push((down, i, h, m.bias));
            }
        }
        out
    }

    /// Every linear layer but the output head, in model order (layer by layer, attention then
    /// MLP): where adapters attach, as PEFT's `named_modules` walk finds them.
    pub fn linears(&self) -> Vec<LinearInfo> {
        let block = self.block_linears();
        (0..self.num_hidden_layers())
            .flat_map(|l| {
                block.iter().map(move |&(name, i, o, bias)| LinearInfo {
                    path: format!("{}.{l}.{name}", self.names.layers),
                    in_features: i,
                    out_features: o,
                    bias,
                })
            })
            .collect()
    }

    /// The distinct short names of [`Self::linears`] (`q_proj`, …, or `c_attn`, `c_proj`,
    /// `c_fc`): what `target_modules` may name, and what `all-linear` means for this family.
    pub fn linear_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for (n, ..) in self.block_linears() {
            let short = n.rsplit('.').next().unwrap_or(n).to_string();
            if !names.contains(&short) {
                names.push(short);
            }
        }
        names
    }

    /// Parameters of the network (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let linears: usize = self.linears().iter().map(|l| l.in_features * l.out_features + if l.bias { l.out_features } else { 0 }).sum();
        let norm = match self.norm {
            NormKind::Rms { .. } => h,
            NormKind::Layer { .. } => 2 * h,
        };
        let per_layer_norms = 2 + usize::from(self.names.attn_out_norm.is_some()) + usize::from(self.names.mlp_out_norm.is_some());
        let qk = if self.attention.qk_norm { 2 * self.head_dim * norm / h } else { 0 };
        let layers = self.num_hidden_layers() * (per_layer_norms * norm + qk);
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        let positions = if self.positions == Positions::Learned { self.max_position_embeddings * h } else { 0 };
        let embed_norm = if self.names.embed_norm.is_some() { norm } else { 0 };
        linears + layers + embed + head + positions + embed_norm + norm
    }
}

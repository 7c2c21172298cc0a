//! Fused operations of the decoder: attention (with the families' options), RMSNorm and
//! LayerNorm, rotary embedding (whole or partial), the MLPs' activations, the frozen linear
//! layers with LoRA (dense, or quantized and dequantized tile by tile) and the loss.
//!
//! Written op by op, each of these is a chain of element-wise tensor ops, and the autodiff graph
//! keeps every intermediate for the backward pass: attention alone would keep several
//! `[batch, heads, seq, seq]` tensors per layer. Here each is one operation with its backward
//! written out, which keeps only its inputs (and, for attention, one log-sum-exp per query).
//!
//! [`FusedOps`] is a burn backend extension. Its default methods are plain burn tensor ops, so
//! every backend (burn-ndarray) runs them; [`cpu`] overrides them for burn-flex with kernels on
//! the raw buffers, `cube` for CUDA and wgpu with CubeCL kernels, and [`autodiff`] gives every
//! backend the backward passes. The defaults double as the reference the kernels are tested
//! against.

pub mod autodiff;
pub mod bf16;
pub mod cpu;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub mod cube;

use burn::tensor::backend::Backend;
use burn::tensor::ops::{BoolTensor, FloatTensor};
use burn::tensor::{Bool, DType, Tensor, TensorPrimitive};

use crate::quant::SharedMatrix;

/// A backend primitive as a tensor, and back: the fused ops work on primitives.
pub(crate) fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

pub(crate) fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// Which keys a query may see, for [`FusedOps::fused_attention`], before any sliding window.
#[derive(Debug, Clone)]
pub enum Mask<B: Backend> {
    /// Causal, aligned at the bottom right: query i of s sees keys 0..=i + (t − s).
    Causal,
    /// `[batch, 1, s, t]`, or `[1, 1, s, t]` for every row of the batch alike; `true` where
    /// attention is NOT allowed.
    Explicit(BoolTensor<B>),
}

/// The frozen weights and the adapter of [`FusedOps::lora_linear`].
#[derive(Debug, Clone)]
pub struct LoraLinear<B: Backend> {
    /// `[in, out]`
    pub w: FloatTensor<B>,
    /// `[out]`
    pub bias: Option<FloatTensor<B>>,
    /// lora_A, `[in, r]`
    pub a: FloatTensor<B>,
    /// lora_B, `[r, out]`
    pub b: FloatTensor<B>,
    pub scale: f64,
}

/// A frozen linear layer whose weight is stored quantized ([`crate::quant`]), for
/// [`FusedOps::quant_linear`], with its LoRA adapter when it has one.
#[derive(Debug, Clone)]
pub struct QuantLinear<B: Backend> {
    /// `[out, in]`, an `nn.Linear`'s layout, on the host: the kernels dequantize it tile by tile.
    pub w: SharedMatrix,
    /// `[out]`
    pub bias: Option<FloatTensor<B>>,
    pub lora: Option<LoraWeights<B>>,
}

/// The trainable half of [`QuantLinear`]: lora_A `[in, r]`, lora_B `[r, out]` and the scale.
#[derive(Debug, Clone)]
pub struct LoraWeights<B: Backend> {
    pub a: FloatTensor<B>,
    pub b: FloatTensor<B>,
    pub scale: f64,
}

/// What varies in attention between families, for [`FusedOps::fused_attention`]. Applied in
/// transformers' order: s = scale·q·kᵀ; s = cap·tanh(s/cap); s += ALiBi bias; −∞ where masked
/// or outside the window; softmax; ·v. Positions are absolute: query i of s is i_abs = i + t − s
/// among the t keys.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionOptions {
    /// Multiplies q·kᵀ; 1/√head_dim unless the family says otherwise (Gemma: query_pre_attn_scalar^-½).
    pub scale: f64,
    /// Gemma 2's attention logit soft-capping: score -> cap·tanh(score/cap), applied after scaling, before bias/mask.
    pub softcap: Option<f64>,
    /// Sliding window: key j is hidden from query i when (i_abs − j_abs) >= window, on top of the mask.
    pub window: Option<usize>,
    /// ALiBi (BLOOM): one slope per query head; score += −slope_h · (i_abs − j_abs).
    pub alibi: Option<Vec<f32>>,
}

impl AttentionOptions {
    /// Scale 1/√head_dim, nothing else.
    pub fn new(head_dim: usize) -> Self {
        AttentionOptions { scale: 1.0 / (head_dim as f64).sqrt(), softcap: None, window: None, alibi: None }
    }
}

/// The activations of the MLPs, for [`FusedOps::fused_glu`] and [`FusedOps::fused_activation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// x·σ(x) (SwiGLU's gate).
    Silu,
    /// 0.5x(1 + tanh(√(2/π)(x + 0.044715x³))): gelu_new, gelu_pytorch_tanh, BLOOM's gelu
    /// (GeGLU's gate).
    GeluTanh,
    /// x·Φ(x), with the exact erf.
    Gelu,
}

/// The fused operations. q, k and v are laid out `[batch, seq, heads, head_dim]` as the
/// projections produce them, so no transpose is needed before or after attention.
pub trait FusedOps: Backend {
    /// softmax(scale·q·kᵀ + mask)·v with grouped-query heads and the family's options (soft-cap,
    /// ALiBi, sliding window: [`AttentionOptions`]): q `[b, s, h, d]`, k and v `[b, t, kv, d]`
    /// with h a multiple of kv (query head j uses kv head j / (h / kv), as HF's repeat_kv).
    /// Returns `[b, s, h, d]`.
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Mask<Self>,
        opts: &AttentionOptions,
    ) -> FloatTensor<Self> {
        Self::attention_forward(q, k, v, mask, opts).0
    }

    /// The attention output and the log-sum-exp of each query's scores, `[b, h, s]`, which
    /// is all the backward pass needs to rebuild the softmax.
    fn attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Mask<Self>,
        opts: &AttentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::attention_forward::<Self>(q, k, v, mask, opts)
    }

    /// Gradients of q, k and v from the output's gradient, recomputing the softmax from lse.
    /// With a soft-cap c = cap·tanh(raw/cap), the scores' gradient is chained through
    /// dc/draw = 1 − (c/cap)²; the ALiBi bias and the mask take no gradient.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Mask<Self>,
        opts: &AttentionOptions,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        reference::attention_backward::<Self>(q, k, v, mask, opts, out, lse, grad)
    }

    /// x·w for a frozen w stored in another dtype than x (a bf16 base under f32 activations),
    /// `[n, k]`·`[k, m]` -> `[n, m]` in x's dtype: x is rounded to w's dtype where it enters the
    /// product, as autocast rounds it, and the products are summed in f32. w may be a
    /// transposed view (the backward pass multiplies by wᵀ). w takes no gradient.
    fn frozen_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::frozen_matmul::<Self>(x, w)
    }

    /// A frozen linear layer with its LoRA adapter, `[n, in]` -> `[n, out]`:
    /// y = x·w + bias + scale·(x_lora·a)·b, where x_lora is x after LoRA dropout (None: x itself).
    /// w `[in, out]`, a `[in, r]`, b `[r, out]`.
    fn lora_linear(x: FloatTensor<Self>, x_lora: Option<FloatTensor<Self>>, p: LoraLinear<Self>) -> FloatTensor<Self> {
        reference::lora_linear::<Self>(x, x_lora, p)
    }

    /// Gradients of x, x_lora (when given; otherwise its part is in x's), a and b. dx is None
    /// when `need_dx` is false (x does not require a gradient).
    #[allow(clippy::type_complexity)]
    fn lora_linear_backward(
        x: FloatTensor<Self>,
        x_lora: Option<FloatTensor<Self>>,
        p: LoraLinear<Self>,
        grad: FloatTensor<Self>,
        need_dx: bool,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>, FloatTensor<Self>, FloatTensor<Self>) {
        reference::lora_linear_backward::<Self>(x, x_lora, p, grad, need_dx)
    }

    /// DoRA's weight norm: the L2 norm of each output feature's weights in w + scale·a·b (w
    /// `[in, out]`, a `[in, r]`, b `[r, out]`), computed in f32, `[1, out]`. PEFT detaches it
    /// from the graph (DoRA, §4.3), so an autodiff backend computes it on its inner backend: the
    /// `[in, out]` sum is a temporary, never kept for the backward pass.
    fn dora_weight_norm(w: FloatTensor<Self>, a: FloatTensor<Self>, b: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        reference::dora_weight_norm::<Self>(w, a, b, scale)
    }

    /// [`FusedOps::lora_linear`] for a quantized frozen weight `[out, in]`:
    /// y = x·Wᵀ + bias (+ scale·(x_lora·a)·b with an adapter), W dequantized as
    /// [`crate::quant`] defines it. The default dequantizes W whole onto x's device for one plain
    /// matmul (what burn-ndarray and CUDA run); the CPU kernel dequantizes a tile at a time.
    fn quant_linear(x: FloatTensor<Self>, x_lora: Option<FloatTensor<Self>>, p: QuantLinear<Self>) -> FloatTensor<Self> {
        reference::quant_linear::<Self>(x, x_lora, p)
    }

    /// dx = grad·W for a quantized frozen weight `[out, in]` (W takes no gradient): the backward
    /// pass of [`FusedOps::quant_linear`] without an adapter, which needs nothing saved but W.
    fn quant_linear_input_grad(w: &SharedMatrix, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::quant_linear_input_grad::<Self>(w, grad)
    }

    /// The backward pass of [`FusedOps::quant_linear`] with an adapter (`p.lora` is Some): as
    /// [`FusedOps::lora_linear_backward`], gradients of x (when `need_dx`), x_lora (when given),
    /// a and b.
    #[allow(clippy::type_complexity)]
    fn quant_lora_linear_backward(
        x: FloatTensor<Self>,
        x_lora: Option<FloatTensor<Self>>,
        p: QuantLinear<Self>,
        grad: FloatTensor<Self>,
        need_dx: bool,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>, FloatTensor<Self>, FloatTensor<Self>) {
        reference::quant_lora_linear_backward::<Self>(x, x_lora, p, grad, need_dx)
    }

    /// Cross-entropy of logits `[c, vocab]` against target ids, each row weighted by `coef`:
    /// returns Σ coef·nll as a `[1]` f32 tensor and its gradient with respect to the logits,
    /// (softmax − one-hot)·coef. The loss stays a tensor so that a GPU need not wait for each
    /// chunk: the caller reads the chunks' losses back once.
    /// With a soft-cap (Gemma 2's final_logit_softcapping) the loss is that of
    /// c = cap·tanh(logits/cap), and the gradient is still with respect to the raw logits,
    /// through dc/dlogits = 1 − (c/cap)².
    fn cross_entropy(
        logits: FloatTensor<Self>,
        targets: &[u32],
        coef: &[f32],
        softcap: Option<f64>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::cross_entropy::<Self>(logits, targets, coef, softcap)
    }

    /// An inverted-dropout mask `[len]`: element k is 0 when draw number `first + k` of tune's
    /// [`crate::rng::Rng`] seeded with `seed`, as a uniform in [0, 1), is below p, and 1/(1 − p)
    /// otherwise. SplitMix64's draws depend only on their number, so a GPU draws the mask in
    /// place (no [tokens × features] upload per projection) and gets the host's exact bits:
    /// a run draws the same masks on any backend, and a resumed run the same as the first.
    fn dropout_mask(len: usize, p: f64, seed: u64, first: u64, device: &Self::Device) -> FloatTensor<Self> {
        reference::dropout_mask::<Self>(len, p, seed, first, device)
    }

    /// x / sqrt(mean(x²) + eps) · w over the last dimension of `[n, d]`.
    fn fused_rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        Self::rms_norm_forward(x, w, eps).0
    }

    /// The output and 1 / sqrt(mean(x²) + eps) per row, `[n, 1]`.
    fn rms_norm_forward(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::rms_norm_forward::<Self>(x, w, eps)
    }

    /// Gradient of x (the norm's weight is frozen in tune): with g = grad·w,
    /// dx = rstd · (g − x · rstd² · mean(g·x)).
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::rms_norm_backward::<Self>(x, w, rstd, grad)
    }

    /// (x − mean) / sqrt(var + eps) · w + b over the last dimension of `[n, d]`, with the biased
    /// variance (as torch's LayerNorm). The weight and bias are frozen in tune.
    fn fused_layer_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, b: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        Self::layer_norm_forward(x, w, b, eps).0
    }

    /// The output and each row's mean and 1 / sqrt(var + eps), `[n, 2]`.
    fn layer_norm_forward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::layer_norm_forward::<Self>(x, w, b, eps)
    }

    /// Gradient of x: with x̂ = (x − mean)·rstd and g = grad·w,
    /// dx = rstd · (g − mean(g) − x̂ · mean(g·x̂)).
    fn layer_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::layer_norm_backward::<Self>(x, w, stats, grad)
    }

    /// Rotary embedding in HF's rotate_half layout: x·cos + cat(x2, x1)·sin for x
    /// `[b, s, h, d]` and tables `[b, s, 1, r]` whose sin carries rotate_half's sign
    /// (−sin on the first half). With r < d (r even: GPT-NeoX's rotary_pct, Phi-3's
    /// partial_rotary_factor) only the first r dimensions of each head rotate, the rest pass
    /// through. The backward pass is the same rotation with −sin.
    fn fused_rope(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::fused_rope::<Self>(x, cos, sin)
    }

    /// A gated MLP's gate, act(gate) · up for gate and up `[n, d]`: SwiGLU with [`Activation::Silu`],
    /// GeGLU with [`Activation::GeluTanh`].
    fn fused_glu(gate: FloatTensor<Self>, up: FloatTensor<Self>, act: Activation) -> FloatTensor<Self> {
        reference::fused_glu::<Self>(gate, up, act)
    }

    /// Gradients of gate and up: d gate = grad·up·act'(gate), d up = grad·act(gate).
    fn glu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        act: Activation,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::glu_backward::<Self>(gate, up, act, grad)
    }

    /// act(x) for a plain MLP, x `[n, d]`.
    fn fused_activation(x: FloatTensor<Self>, act: Activation) -> FloatTensor<Self> {
        prim(reference::activation::<Self, 2>(float(x), act))
    }

    /// Gradient of x: grad·act'(x).
    fn activation_backward(x: FloatTensor<Self>, act: Activation, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::activation_backward::<Self>(x, act, grad)
    }
}

/// The fused operations as plain burn tensor ops: what every backend without kernels of its
/// own runs, and the reference the kernels are tested against.
pub mod reference {
    use super::*;

    pub fn attention_forward<B: Backend>(
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        mask: Mask<B>,
        opts: &AttentionOptions,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let (q, k, v) = (float::<B, 4>(q), float::<B, 4>(k), float::<B, 4>(v));
        let h = q.dims()[2];
        let kv = k.dims()[2];
        let q = q.swap_dims(1, 2);
        let k = repeat_heads(k.swap_dims(1, 2), h / kv);
        let v = repeat_heads(v.swap_dims(1, 2), h / kv);
        let (scores, _) = scores(q, k, &mask, opts);
        let lse = logsumexp(scores.clone());
        let p = (scores - lse.clone()).exp();
        let out = p.matmul(v).swap_dims(1, 2);
        (prim(out), prim(lse.squeeze_dim::<3>(3)))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward<B: Backend>(
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        mask: Mask<B>,
        opts: &AttentionOptions,
        out: FloatTensor<B>,
        lse: FloatTensor<B>,
        grad: FloatTensor<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
        let (q, k, v) = (float::<B, 4>(q), float::<B, 4>(k), float::<B, 4>(v));
        let [b, _, h, d] = q.dims();
        let [_, t, kv, _] = k.dims();
        let rep = h / kv;
        let q = q.swap_dims(1, 2);
        let k = repeat_heads(k.swap_dims(1, 2), rep);
        let v = repeat_heads(v.swap_dims(1, 2), rep);
        let out = float::<B, 4>(out).swap_dims(1, 2);
        let grad = float::<B, 4>(grad).swap_dims(1, 2);
        let lse = float::<B, 3>(lse).unsqueeze_dim::<4>(3);
        let (scores, cap_grad) = scores(q.clone(), k.clone(), &mask, opts);
        let p = (scores - lse).exp();
        let dv = p.clone().swap_dims(2, 3).matmul(grad.clone());
        let dp = grad.clone().matmul(v.swap_dims(2, 3));
        let row = (grad * out).sum_dim(3);
        let mut ds = p * (dp - row);
        if let Some(cap_grad) = cap_grad {
            ds = ds * cap_grad;
        }
        let ds = ds * opts.scale;
        let dq = ds.clone().matmul(k).swap_dims(1, 2);
        let dk = ds.swap_dims(2, 3).matmul(q);
        // Sum the gradients of the query heads that share a kv head.
        let group = |x: Tensor<B, 4>| x.reshape([b, kv, rep, t, d]).sum_dim(2).reshape([b, kv, t, d]).swap_dims(1, 2);
        (prim(dq), prim(group(dk)), prim(group(dv)))
    }

    pub fn frozen_matmul<B: Backend>(x: FloatTensor<B>, w: FloatTensor<B>) -> FloatTensor<B> {
        let (x, w) = (float::<B, 2>(x), float::<B, 2>(w));
        let xd = x.dtype();
        prim(x.cast(w.dtype()).matmul(w).cast(xd))
    }

    /// x·w for the frozen w of a layer: in x's dtype when w shares it, else through
    /// [`FusedOps::frozen_matmul`] (a bf16 base).
    fn base_matmul<B: FusedOps>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
        if x.dtype() == w.dtype() {
            x.matmul(w)
        } else {
            float(B::frozen_matmul(prim(x), prim(w)))
        }
    }

    pub fn lora_linear<B: FusedOps>(x: FloatTensor<B>, x_lora: Option<FloatTensor<B>>, p: LoraLinear<B>) -> FloatTensor<B> {
        use burn::tensor::module::linear;
        let x = float::<B, 2>(x);
        let x_lora = x_lora.map(float::<B, 2>).unwrap_or_else(|| x.clone());
        let mut y = base_matmul(x, float::<B, 2>(p.w));
        if let Some(bias) = p.bias {
            y = y + float::<B, 1>(bias).unsqueeze();
        }
        let down = linear(x_lora, float::<B, 2>(p.a), None);
        prim(y + linear(down, float::<B, 2>(p.b), None) * p.scale)
    }

    #[allow(clippy::type_complexity)]
    pub fn lora_linear_backward<B: FusedOps>(
        x: FloatTensor<B>,
        x_lora: Option<FloatTensor<B>>,
        p: LoraLinear<B>,
        grad: FloatTensor<B>,
        need_dx: bool,
    ) -> (Option<FloatTensor<B>>, Option<FloatTensor<B>>, FloatTensor<B>, FloatTensor<B>) {
        let grad = float::<B, 2>(grad);
        let x = float::<B, 2>(x);
        let shared = x_lora.is_none();
        let x_lora = x_lora.map(float::<B, 2>).unwrap_or_else(|| x.clone());
        let (a, b) = (float::<B, 2>(p.a), float::<B, 2>(p.b));
        let down = x_lora.clone().matmul(a.clone());
        // v = grad · bᵀ, the gradient at the adapter's bottleneck, before the scale
        let v = grad.clone().matmul(b.transpose());
        let db = down.transpose().matmul(grad.clone()) * p.scale;
        let da = x_lora.transpose().matmul(v.clone()) * p.scale;
        let dx_lora = v.matmul(a.transpose()) * p.scale;
        let w = float::<B, 2>(p.w);
        let dx_base = need_dx.then(|| base_matmul(grad, w.transpose()));
        let (dx, dx_lora) = if shared { (dx_base.map(|d| d + dx_lora), None) } else { (dx_base, Some(dx_lora)) };
        (dx.map(prim), dx_lora.map(prim), prim(da), prim(db))
    }

    pub fn dora_weight_norm<B: Backend>(w: FloatTensor<B>, a: FloatTensor<B>, b: FloatTensor<B>, scale: f64) -> FloatTensor<B> {
        let w = float::<B, 2>(w).cast(DType::F32);
        let delta = float::<B, 2>(a).matmul(float::<B, 2>(b));
        prim((w + delta * scale).square().sum_dim(0).sqrt())
    }

    /// The quantized weight, dequantized whole, as an `[out, in]` tensor on `device`.
    pub fn dequantized<B: Backend>(w: &crate::quant::QuantizedMatrix, device: &B::Device) -> Tensor<B, 2> {
        use burn::tensor::TensorData;
        Tensor::from_data(TensorData::new(w.dequantize(), [w.rows(), w.cols()]), device)
    }

    /// The [`LoraLinear`] of a quantized layer with an adapter: W dequantized, as `[in, out]`.
    pub(crate) fn dequantized_lora<B: Backend>(p: QuantLinear<B>, device: &B::Device) -> LoraLinear<B> {
        let lora = p.lora.expect("quant_lora_linear_backward: a layer with an adapter");
        LoraLinear { w: prim(dequantized::<B>(&p.w, device).transpose()), bias: p.bias, a: lora.a, b: lora.b, scale: lora.scale }
    }

    pub fn quant_linear<B: FusedOps>(x: FloatTensor<B>, x_lora: Option<FloatTensor<B>>, p: QuantLinear<B>) -> FloatTensor<B> {
        let device = B::float_device(&x);
        if p.lora.is_some() {
            return lora_linear::<B>(x, x_lora, dequantized_lora(p, &device));
        }
        let w = dequantized::<B>(&p.w, &device).transpose();
        prim(burn::tensor::module::linear(float::<B, 2>(x), w, p.bias.map(float::<B, 1>)))
    }

    pub fn quant_linear_input_grad<B: Backend>(w: &SharedMatrix, grad: FloatTensor<B>) -> FloatTensor<B> {
        let device = B::float_device(&grad);
        prim(float::<B, 2>(grad).matmul(dequantized::<B>(w, &device)))
    }

    #[allow(clippy::type_complexity)]
    pub fn quant_lora_linear_backward<B: FusedOps>(
        x: FloatTensor<B>,
        x_lora: Option<FloatTensor<B>>,
        p: QuantLinear<B>,
        grad: FloatTensor<B>,
        need_dx: bool,
    ) -> (Option<FloatTensor<B>>, Option<FloatTensor<B>>, FloatTensor<B>, FloatTensor<B>) {
        let device = B::float_device(&x);
        lora_linear_backward::<B>(x, x_lora, dequantized_lora(p, &device), grad, need_dx)
    }

    pub fn cross_entropy<B: Backend>(
        logits: FloatTensor<B>,
        targets: &[u32],
        coef: &[f32],
        softcap: Option<f64>,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let Some(cap) = softcap else {
            return cross_entropy_plain::<B>(logits, targets, coef);
        };
        // c = cap·tanh(l / cap); dc/dl = 1 − (c / cap)².
        let capped = (float::<B, 2>(logits) / cap).tanh();
        let (loss, dc) = cross_entropy_plain::<B>(prim(capped.clone() * cap), targets, coef);
        (loss, prim(float::<B, 2>(dc) * (capped.square().neg() + 1.0)))
    }

    fn cross_entropy_plain<B: Backend>(logits: FloatTensor<B>, targets: &[u32], coef: &[f32]) -> (FloatTensor<B>, FloatTensor<B>) {
        use burn::tensor::{Int, TensorData};
        let logits = float::<B, 2>(logits);
        let [c, vocab] = logits.dims();
        let device = logits.device();
        let ids: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [c, 1]), &device);
        let weight = Tensor::<B, 2>::from_data(TensorData::new(coef.to_vec(), [c, 1]), &device);
        let shifted = logits.clone() - logits.max_dim(1);
        let exp = shifted.clone().exp();
        let sum = exp.clone().sum_dim(1);
        let nll = sum.clone().log() - shifted.gather(1, ids.clone());
        let loss = prim((nll * weight.clone()).sum());
        let one_hot = Tensor::<B, 2>::zeros([c, vocab], &device).scatter(1, ids, weight.clone(), burn::tensor::IndexingUpdateOp::Add);
        (loss, prim(exp * (weight / sum) - one_hot))
    }

    pub fn dropout_mask<B: Backend>(len: usize, p: f64, seed: u64, first: u64, device: &B::Device) -> FloatTensor<B> {
        use burn::tensor::TensorData;
        let mut rng = crate::rng::Rng::new(seed);
        rng.skip(first);
        let keep = (1.0 / (1.0 - p)) as f32;
        let data: Vec<f32> = (0..len).map(|_| if rng.next_f64() < p { 0.0 } else { keep }).collect();
        prim(Tensor::<B, 1>::from_data(TensorData::new(data, [len]), device))
    }

    pub fn layer_norm_forward<B: Backend>(
        x: FloatTensor<B>,
        w: FloatTensor<B>,
        b: FloatTensor<B>,
        eps: f64,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let x = float::<B, 2>(x);
        let (w, b) = (float::<B, 1>(w).cast(DType::F32), float::<B, 1>(b).cast(DType::F32));
        let mean = x.clone().mean_dim(1);
        let centred = x - mean.clone();
        let rstd = inverse_sqrt(centred.clone().square().mean_dim(1) + eps);
        let out = centred * rstd.clone() * w.unsqueeze::<2>() + b.unsqueeze::<2>();
        (prim(out), prim(Tensor::cat(vec![mean, rstd], 1)))
    }

    pub fn layer_norm_backward<B: Backend>(
        x: FloatTensor<B>,
        w: FloatTensor<B>,
        stats: FloatTensor<B>,
        grad: FloatTensor<B>,
    ) -> FloatTensor<B> {
        let stats = float::<B, 2>(stats);
        let (mean, rstd) = (stats.clone().narrow(1, 0, 1), stats.narrow(1, 1, 1));
        let x_hat = (float::<B, 2>(x) - mean) * rstd.clone();
        let g = float::<B, 2>(grad) * float::<B, 1>(w).cast(DType::F32).unsqueeze::<2>();
        let dot = (g.clone() * x_hat.clone()).mean_dim(1);
        prim((g.clone() - g.mean_dim(1) - x_hat * dot) * rstd)
    }

    pub fn activation<B: Backend, const D: usize>(x: Tensor<B, D>, act: Activation) -> Tensor<B, D> {
        match act {
            Activation::Silu => burn::tensor::activation::silu(x),
            Activation::Gelu => burn::tensor::activation::gelu(x),
            Activation::GeluTanh => {
                let inner = (x.clone() + x.clone().powi_scalar(3) * 0.044715) * (2.0 / std::f64::consts::PI).sqrt();
                x * (inner.tanh() + 1.0) * 0.5
            }
        }
    }

    pub fn rms_norm_forward<B: Backend>(x: FloatTensor<B>, w: FloatTensor<B>, eps: f64) -> (FloatTensor<B>, FloatTensor<B>) {
        let x = float::<B, 2>(x);
        let w = float::<B, 1>(w).cast(DType::F32);
        let rstd = inverse_sqrt(x.clone().square().mean_dim(1) + eps);
        (prim(x * rstd.clone() * w.unsqueeze::<2>()), prim(rstd))
    }

    pub fn rms_norm_backward<B: Backend>(
        x: FloatTensor<B>,
        w: FloatTensor<B>,
        rstd: FloatTensor<B>,
        grad: FloatTensor<B>,
    ) -> FloatTensor<B> {
        let x = float::<B, 2>(x);
        let rstd = float::<B, 2>(rstd);
        let g = float::<B, 2>(grad) * float::<B, 1>(w).cast(DType::F32).unsqueeze::<2>();
        let dot = (g.clone() * x.clone()).mean_dim(1);
        prim((g - x * rstd.clone().square() * dot) * rstd)
    }

    pub fn fused_rope<B: Backend>(x: FloatTensor<B>, cos: FloatTensor<B>, sin: FloatTensor<B>) -> FloatTensor<B> {
        let (x, cos) = (float::<B, 4>(x), float::<B, 4>(cos));
        let (d, r) = (x.dims()[3], cos.dims()[3]);
        let rotate = |x: Tensor<B, 4>| {
            let half = r / 2;
            let swapped = Tensor::cat(vec![x.clone().narrow(3, half, half), x.clone().narrow(3, 0, half)], 3);
            x * cos + swapped * float::<B, 4>(sin)
        };
        if r == d {
            return prim(rotate(x));
        }
        prim(Tensor::cat(vec![rotate(x.clone().narrow(3, 0, r)), x.narrow(3, r, d - r)], 3))
    }

    /// act'(x): σ·(1 + x·(1 − σ)) for SiLU; for the tanh GELU, with u = √(2/π)(x + 0.044715x³),
    /// 0.5(1 + tanh u) + 0.5x(1 − tanh²u)·√(2/π)(1 + 3·0.044715x²); Φ(x) + x·φ(x) for GELU.
    pub fn activation_grad<B: Backend, const D: usize>(x: Tensor<B, D>, act: Activation) -> Tensor<B, D> {
        use std::f64::consts::{FRAC_1_SQRT_2, PI};
        match act {
            Activation::Silu => {
                let sig = burn::tensor::activation::sigmoid(x.clone());
                sig.clone() * (x * (sig.neg() + 1.0) + 1.0)
            }
            Activation::GeluTanh => {
                let k = (2.0 / PI).sqrt();
                let th = ((x.clone() + x.clone().powi_scalar(3) * 0.044715) * k).tanh();
                let du = (x.clone().square() * (3.0 * 0.044715) + 1.0) * k;
                (th.clone() + 1.0) * 0.5 + x * (th.square().neg() + 1.0) * du * 0.5
            }
            Activation::Gelu => {
                let cdf = ((x.clone() * FRAC_1_SQRT_2).erf() + 1.0) * 0.5;
                let pdf = (x.clone().square() * -0.5).exp() * (1.0 / (2.0 * PI).sqrt());
                cdf + x * pdf
            }
        }
    }

    pub fn fused_glu<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>, act: Activation) -> FloatTensor<B> {
        prim(activation::<B, 2>(float(gate), act) * float::<B, 2>(up))
    }

    pub fn glu_backward<B: Backend>(
        gate: FloatTensor<B>,
        up: FloatTensor<B>,
        act: Activation,
        grad: FloatTensor<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let (gate, up, grad) = (float::<B, 2>(gate), float::<B, 2>(up), float::<B, 2>(grad));
        let dgate = grad.clone() * up * activation_grad(gate.clone(), act);
        (prim(dgate), prim(grad * activation(gate, act)))
    }

    pub fn activation_backward<B: Backend>(x: FloatTensor<B>, act: Activation, grad: FloatTensor<B>) -> FloatTensor<B> {
        prim(float::<B, 2>(grad) * activation_grad(float::<B, 2>(x), act))
    }
}

/// 1/√x by a division: burn-ndarray's `recip` is the 12-bit `rcpps` estimate on AVX2, which
/// puts a norm's gradient ~1e-4 off.
fn inverse_sqrt<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.ones_like() / x.sqrt()
}

/// `[b, kv, t, d]` -> `[b, kv·n, t, d]`, head j being kv head j / n.
fn repeat_heads<B: Backend>(x: Tensor<B, 4>, n: usize) -> Tensor<B, 4> {
    if n == 1 {
        return x;
    }
    let [b, kv, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2).expand([b, kv, n, t, d]).reshape([b, kv * n, t, d])
}

/// The scores the softmax sees, `[b, h, s, t]`, in transformers' order: scale·q·kᵀ, soft-capped
/// (c = cap·tanh(raw/cap)), plus the ALiBi bias, −∞ where masked or outside the window. With a
/// cap, also dc/draw = 1 − (c/cap)², for the backward pass.
fn scores<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, mask: &Mask<B>, opts: &AttentionOptions) -> (Tensor<B, 4>, Option<Tensor<B, 4>>) {
    use burn::tensor::TensorData;
    let [b, h, s, _] = q.dims();
    let t = k.dims()[2];
    let device = q.device();
    let mut scores = q.matmul(k.swap_dims(2, 3)) * opts.scale;
    let mut cap_grad = None;
    if let Some(cap) = opts.softcap {
        let capped = (scores / cap).tanh();
        cap_grad = Some(capped.clone().square().neg() + 1.0);
        scores = capped * cap;
    }
    let mut masked: Tensor<B, 4, Bool> = match mask {
        Mask::Causal => {
            // tril_mask is true above the shifted diagonal: key j hidden from query i when j > i + (t − s).
            Tensor::<B, 2, Bool>::tril_mask([s, t], (t - s) as i64, &device).unsqueeze::<4>().expand([b, h, s, t])
        }
        Mask::Explicit(m) => Tensor::<B, 4, Bool>::from_primitive(m.clone()).expand([b, h, s, t]),
    };
    if opts.alibi.is_some() || opts.window.is_some() {
        // i_abs − j_abs, `[1, 1, s, t]`
        let dist: Vec<f32> = (0..s).flat_map(|i| (0..t).map(move |j| (i + t - s) as f32 - j as f32)).collect();
        let dist = Tensor::<B, 4>::from_data(TensorData::new(dist, [1, 1, s, t]), &device).cast(scores.dtype());
        if let Some(w) = opts.window {
            masked = masked.bool_or(dist.clone().greater_equal_elem(w as f64).expand([b, h, s, t]));
        }
        if let Some(slopes) = &opts.alibi {
            let slopes = Tensor::<B, 4>::from_data(TensorData::new(slopes.clone(), [1, h, 1, 1]), &device).cast(scores.dtype());
            scores = scores - dist * slopes;
        }
    }
    (scores.mask_fill(masked, f32::NEG_INFINITY), cap_grad)
}

/// log Σ exp over the last dimension, kept as `[.., 1]`; a row with every score masked gets
/// the smallest finite value rather than NaN.
fn logsumexp<B: Backend>(scores: Tensor<B, 4>) -> Tensor<B, 4> {
    let max = scores.clone().max_dim(3).clamp_min(f32::MIN);
    ((scores - max.clone()).exp().sum_dim(3).log() + max).clamp_min(f32::MIN)
}

impl FusedOps for burn::backend::NdArray {}

#[cfg(test)]
mod tests;

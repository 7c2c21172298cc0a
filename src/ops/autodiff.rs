//! The backward passes of the fused operations, for burn's autodiff backend over any backend
//! that has them. Each operation saves only what its backward needs: attention its inputs,
//! options, output and log-sum-exp; RMSNorm its input and 1/rms; LayerNorm its input, mean and
//! 1/std; RoPE nothing; the MLP's activations their inputs; a quantized linear layer its
//! (shared, still quantized) weight, and with an adapter its input and the adapter.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::FloatTensor;

use super::{Activation, AttentionOptions, FusedOps, LoraLinear, LoraWeights, Mask, QuantLinear};

fn inner_mask<B: FusedOps, C: CheckpointStrategy>(mask: Mask<Autodiff<B, C>>) -> Mask<B> {
    match mask {
        Mask::Causal => Mask::Causal,
        Mask::Explicit(m) => Mask::Explicit(m),
    }
}

#[derive(Debug)]
struct Attention;

impl<B: FusedOps> Backward<B, 3> for Attention {
    /// q, k, v, mask, options, output, log-sum-exp
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, Mask<B>, AttentionOptions, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (q, k, v, mask, opts, out, lse) = ops.state;
        let (dq, dk, dv) = B::attention_backward(q, k, v, mask, &opts, out, lse, grad);
        for (node, g) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

#[derive(Debug)]
struct RmsNorm;

impl<B: FusedOps> Backward<B, 1> for RmsNorm {
    /// x, weight, 1/rms
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, w, rstd) = ops.state;
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::rms_norm_backward(x, w, rstd, grad));
        }
    }
}

#[derive(Debug)]
struct LayerNorm;

impl<B: FusedOps> Backward<B, 1> for LayerNorm {
    /// x, weight, each row's mean and 1/std
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, w, stats) = ops.state;
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::layer_norm_backward(x, w, stats, grad));
        }
    }
}

#[derive(Debug)]
struct Rope;

impl<B: FusedOps> Backward<B, 1> for Rope {
    /// cos, sin
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (cos, sin) = ops.state;
        if let Some(node) = node_x {
            // A rotation's transpose is the rotation by −θ.
            grads.register::<B>(node.id, B::fused_rope(grad, cos, B::float_neg(sin)));
        }
    }
}

#[derive(Debug)]
struct Glu;

impl<B: FusedOps> Backward<B, 2> for Glu {
    /// gate, up, activation
    type State = (FloatTensor<B>, FloatTensor<B>, Activation);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_gate, node_up] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (gate, up, act) = ops.state;
        let (dgate, dup) = B::glu_backward(gate, up, act, grad);
        for (node, g) in [(node_gate, dgate), (node_up, dup)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

#[derive(Debug)]
struct ActivationOp;

impl<B: FusedOps> Backward<B, 1> for ActivationOp {
    /// x, activation
    type State = (FloatTensor<B>, Activation);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, act) = ops.state;
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::activation_backward(x, act, grad));
        }
    }
}

/// Registers what a LoRA linear's backward pass returns, (dx, dx_lora, da, db), with the
/// parents x, x_lora, lora_A, lora_B; when `shared` (no dropout) x_lora is x and its part is in dx.
#[allow(clippy::type_complexity)]
fn register_lora_grads<B: FusedOps>(
    grads: &mut Gradients,
    [x, x_lora, a, b]: [Option<NodeId>; 4],
    shared: bool,
    (dx, dx_lora, da, db): (Option<FloatTensor<B>>, Option<FloatTensor<B>>, FloatTensor<B>, FloatTensor<B>),
) {
    if let (Some(id), Some(dx)) = (x, dx) {
        grads.register::<B>(id, dx);
    }
    if let (Some(id), Some(dx_lora), false) = (x_lora, dx_lora, shared) {
        grads.register::<B>(id, dx_lora);
    }
    for (id, g) in [(a, da), (b, db)] {
        if let Some(id) = id {
            grads.register::<B>(id, g);
        }
    }
}

#[derive(Debug)]
struct LoraLinearOp;

impl<B: FusedOps> Backward<B, 4> for LoraLinearOp {
    /// x, x after dropout (None when there is none: then parents 0 and 1 are both x), the
    /// layer's weights and adapter.
    type State = (FloatTensor<B>, Option<FloatTensor<B>>, LoraLinear<B>);

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let parents = ops.parents.map(|n| n.map(|n| n.id));
        let grad = grads.consume::<B>(&ops.node);
        let (x, x_lora, p) = ops.state;
        let shared = x_lora.is_none();
        let out = B::lora_linear_backward(x, x_lora, p, grad, parents[0].is_some());
        register_lora_grads::<B>(grads, parents, shared, out);
    }
}

#[derive(Debug)]
struct FrozenMatmul;

impl<B: FusedOps> Backward<B, 1> for FrozenMatmul {
    /// The frozen weight.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::frozen_matmul(grad, B::float_transpose(ops.state)));
        }
    }
}

#[derive(Debug)]
struct QuantLinearOp;

impl<B: FusedOps> Backward<B, 1> for QuantLinearOp {
    /// The frozen quantized weight: dx = grad·W needs nothing else (not x).
    type State = crate::quant::SharedMatrix;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::quant_linear_input_grad(&ops.state, grad));
        }
    }
}

#[derive(Debug)]
struct QuantLoraLinearOp;

impl<B: FusedOps> Backward<B, 4> for QuantLoraLinearOp {
    /// As [`LoraLinearOp`]'s, with the quantized weight.
    type State = (FloatTensor<B>, Option<FloatTensor<B>>, QuantLinear<B>);

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let parents = ops.parents.map(|n| n.map(|n| n.id));
        let grad = grads.consume::<B>(&ops.node);
        let (x, x_lora, p) = ops.state;
        let shared = x_lora.is_none();
        let out = B::quant_lora_linear_backward(x, x_lora, p, grad, parents[0].is_some());
        register_lora_grads::<B>(grads, parents, shared, out);
    }
}

impl<B: FusedOps, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn frozen_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        // The weight is frozen: not a parent, no gradient flows to it.
        let w = w.primitive;
        match FrozenMatmul.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::frozen_matmul(x.primitive, w.clone());
                prep.finish(w, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::frozen_matmul(x.primitive, w)),
        }
    }

    fn quant_linear(x: FloatTensor<Self>, x_lora: Option<FloatTensor<Self>>, p: QuantLinear<Self>) -> FloatTensor<Self> {
        // The frozen weight and bias are not parents: no gradient is computed for them.
        let bias = p.bias.map(|b| b.primitive);
        let Some(lora) = p.lora else {
            let inner = QuantLinear::<B> { w: p.w.clone(), bias, lora: None };
            return match QuantLinearOp.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish(p.w, B::quant_linear(x.primitive, None, inner)),
                OpsKind::UnTracked(prep) => prep.finish(B::quant_linear(x.primitive, None, inner)),
            };
        };
        let inner = QuantLinear::<B> {
            w: p.w,
            bias,
            lora: Some(LoraWeights { a: lora.a.primitive.clone(), b: lora.b.primitive.clone(), scale: lora.scale }),
        };
        let x_lora_node = x_lora.as_ref().map_or_else(|| x.node.clone(), |t| t.node.clone());
        let x_lora = x_lora.map(|t| t.primitive);
        match QuantLoraLinearOp
            .prepare::<C>([x.node.clone(), x_lora_node, lora.a.node.clone(), lora.b.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::quant_linear(x.primitive.clone(), x_lora.clone(), inner.clone());
                prep.finish((x.primitive, x_lora, inner), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::quant_linear(x.primitive, x_lora, inner)),
        }
    }

    fn lora_linear(x: FloatTensor<Self>, x_lora: Option<FloatTensor<Self>>, p: LoraLinear<Self>) -> FloatTensor<Self> {
        // The frozen weight and bias are not parents: no gradient is computed for them.
        let inner = LoraLinear::<B> {
            w: p.w.primitive,
            bias: p.bias.map(|b| b.primitive),
            a: p.a.primitive.clone(),
            b: p.b.primitive.clone(),
            scale: p.scale,
        };
        let x_lora_node = x_lora.as_ref().map_or_else(|| x.node.clone(), |t| t.node.clone());
        let x_lora = x_lora.map(|t| t.primitive);
        match LoraLinearOp.prepare::<C>([x.node.clone(), x_lora_node, p.a.node.clone(), p.b.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::lora_linear(x.primitive.clone(), x_lora.clone(), inner.clone());
                prep.finish((x.primitive, x_lora, inner), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::lora_linear(x.primitive, x_lora, inner)),
        }
    }

    fn dora_weight_norm(w: FloatTensor<Self>, a: FloatTensor<Self>, b: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        // A constant of the graph: no parents, so nothing of it is recorded.
        Self::from_inner(B::dora_weight_norm(w.primitive, a.primitive, b.primitive, scale))
    }

    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Mask<Self>,
        opts: &AttentionOptions,
    ) -> FloatTensor<Self> {
        let mask = inner_mask(mask);
        match Attention.prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, lse) = B::attention_forward(q.primitive.clone(), k.primitive.clone(), v.primitive.clone(), mask.clone(), opts);
                prep.finish((q.primitive, k.primitive, v.primitive, mask, opts.clone(), out.clone(), lse), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_attention(q.primitive, k.primitive, v.primitive, mask, opts)),
        }
    }

    /// The inner backend's mask, as a constant: nothing flows back into a mask.
    fn dropout_mask(len: usize, p: f64, seed: u64, first: u64, device: &Self::Device) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::dropout_mask(len, p, seed, first, device))
    }

    fn fused_rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        // The weight is frozen: it is not a parent, so no gradient flows to it.
        let w = w.primitive;
        match RmsNorm.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, rstd) = B::rms_norm_forward(x.primitive.clone(), w.clone(), eps);
                prep.finish((x.primitive, w, rstd), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_rms_norm(x.primitive, w, eps)),
        }
    }

    fn fused_layer_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, b: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        // The weight and bias are frozen: not parents, no gradient flows to them.
        let (w, b) = (w.primitive, b.primitive);
        match LayerNorm.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, stats) = B::layer_norm_forward(x.primitive.clone(), w.clone(), b, eps);
                prep.finish((x.primitive, w, stats), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_layer_norm(x.primitive, w, b, eps)),
        }
    }

    fn fused_rope(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        let (cos, sin) = (cos.primitive, sin.primitive);
        match Rope.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::fused_rope(x.primitive, cos.clone(), sin.clone());
                prep.finish((cos, sin), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_rope(x.primitive, cos, sin)),
        }
    }

    fn fused_glu(gate: FloatTensor<Self>, up: FloatTensor<Self>, act: Activation) -> FloatTensor<Self> {
        match Glu.prepare::<C>([gate.node.clone(), up.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::fused_glu(gate.primitive.clone(), up.primitive.clone(), act);
                prep.finish((gate.primitive, up.primitive, act), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_glu(gate.primitive, up.primitive, act)),
        }
    }

    fn fused_activation(x: FloatTensor<Self>, act: Activation) -> FloatTensor<Self> {
        match ActivationOp.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::fused_activation(x.primitive.clone(), act);
                prep.finish((x.primitive, act), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_activation(x.primitive, act)),
        }
    }
}

//! The fused operations on burn's CubeCL backends, CUDA and wgpu: [`FusedOps`] for
//! `CubeBackend<R, ..>` over any runtime R, with the kernels in [`kernels`].
//!
//! Attention keeps only its inputs and one log-sum-exp per query (the generic ops store the
//! `[b, h, s, t]` scores and probabilities). The norms, the rotary embedding and the MLPs'
//! activations are one kernel each way, reading their inputs once instead of through burn's
//! chain of element-wise ops (each a kernel launch and a tensor in memory). The cross-entropy
//! is one kernel per chunk of rows that leaves its loss on the device. The frozen linear
//! layers with LoRA take cubecl's autotuned matmuls for their products, reading a bf16 base as
//! it is stored and summing in f32 into the activations' dtype, and one kernel folds the
//! adapter's up-projection (and the bias) into the frozen product's output.
//!
//! tune runs these backends without burn's fusion (see Cargo.toml), so the kernels register on
//! `CubeBackend` directly and fusion's open wrong-result bugs cannot reach them.

mod kernels;
#[cfg(test)]
mod tests;

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::kernel::matmul::MatmulStrategy;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::*;
use cubecl_runtime::server::CubeCountSelection;

use super::{float, prim, Activation, AttentionOptions, FusedOps, LoraLinear, Mask, QuantLinear};

/// Units per cube for the row kernels: a power of two, at most what the device allows.
fn row_block<R: CubeRuntime>(client: &ComputeClient<R>) -> usize {
    let max = client.properties().hardware.max_units_per_cube.clamp(1, 256);
    1 << (31 - max.leading_zeros())
}

/// One cube per row; the device may give more cubes than asked, which the kernels skip.
fn row_launch<R: CubeRuntime>(client: &ComputeClient<R>, rows: usize) -> (CubeCount, CubeDim, usize) {
    let block = row_block(client);
    let count = CubeCountSelection::new(client, rows as u32).cube_count();
    (count, CubeDim::new_1d(block as u32), block)
}

/// One unit per element.
fn elementwise_launch<R: CubeRuntime>(client: &ComputeClient<R>, len: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(client, len);
    (cubecl::calculate_cube_count_elemwise(client, len, dim), dim)
}

fn empty_like<R: CubeRuntime>(x: &CubeTensor<R>, shape: Shape) -> CubeTensor<R> {
    empty_device_dtype(x.client.clone(), x.device.clone(), shape, x.dtype)
}

/// `[n, d]` of a 2-d tensor, with a message naming the operation otherwise.
fn rows_and_width<R: CubeRuntime>(x: &CubeTensor<R>, what: &str) -> (usize, usize) {
    let shape = x.meta.shape();
    assert!(shape.num_dims() == 2, "{what}: expected a [rows, width] tensor, got {shape:?}");
    (shape[0], shape[1])
}

fn storage(dtype: DType) -> StorageType {
    dtype.into()
}

/// The comptime code of an activation in [`kernels`].
fn activation_code(act: Activation) -> u32 {
    match act {
        Activation::Silu => 0,
        Activation::GeluTanh => 1,
        Activation::Gelu => 2,
    }
}

/// What the three attention kernels share: the mask as a tensor (q itself, unread, when
/// causal), the ALiBi slopes (one unread zero without ALiBi), the sizes and options, and the
/// flags the kernels are compiled for.
struct AttentionArgs<R: CubeRuntime> {
    mask: CubeTensor<R>,
    slopes: CubeTensor<R>,
    /// b, s, t, h, kv, mask rows
    sizes: [usize; 6],
    scale: f32,
    cap: f32,
    window: usize,
    flags: kernels::AttentionFlags,
}

impl<R: CubeRuntime> AttentionArgs<R> {
    /// `mask` None is causal.
    fn new(q: &CubeTensor<R>, k: &CubeTensor<R>, mask: Option<CubeTensor<R>>, opts: &AttentionOptions) -> Self {
        let (qs, ks) = (q.meta.shape(), k.meta.shape());
        assert!(
            qs.num_dims() == 4
                && ks.num_dims() == 4
                && qs[0] == ks[0]
                && qs[3] == ks[3]
                && ks[2] > 0
                && qs[2] % ks[2] == 0
                && qs[1] <= ks[1],
            "attention: q {qs:?}, k {ks:?} (expected [b, s, h, d], [b, t, kv, d] with h a multiple of kv and s <= t)"
        );
        let (b, s, h, d) = (qs[0], qs[1], qs[2], qs[3]);
        let (t, kv) = (ks[1], ks[2]);
        let (mask, causal, mask_rows) = match mask {
            None => (q.clone(), true, 1),
            Some(m) => {
                let m = into_contiguous(m);
                let ms = m.meta.shape();
                assert!(
                    ms.num_dims() == 4 && (ms[0] == 1 || ms[0] == b) && ms[1] == 1 && ms[2] == s && ms[3] == t,
                    "attention: mask {ms:?} for q {qs:?} and k {ks:?} (expected [b or 1, 1, s, t])"
                );
                let rows = ms[0];
                (m, false, rows)
            }
        };
        let slopes = match &opts.alibi {
            Some(slopes) => {
                assert_eq!(slopes.len(), h, "attention: {} ALiBi slopes for {h} heads", slopes.len());
                slopes.clone()
            }
            None => vec![0.0],
        };
        let handle = q.client.create_from_slice(f32::as_bytes(&slopes));
        let slopes = CubeTensor::new_contiguous(q.client.clone(), q.device.clone(), Shape::new([slopes.len()]), handle, DType::F32);
        let flags = kernels::AttentionFlags {
            head_dim: d,
            causal,
            softcap: opts.softcap.is_some(),
            alibi: opts.alibi.is_some(),
            window: opts.window.is_some(),
        };
        AttentionArgs {
            mask,
            slopes,
            sizes: [b, s, t, h, kv, mask_rows],
            scale: opts.scale as f32,
            cap: opts.softcap.unwrap_or(1.0) as f32,
            window: opts.window.unwrap_or(0),
            flags,
        }
    }

    fn launch_sizes(&self) -> RuntimeArg<kernels::AttentionSizes, R> {
        let [b, s, t, h, kv, mask_rows] = self.sizes;
        kernels::AttentionSizesLaunch::new(b, s, t, h, kv, mask_rows, self.scale, self.cap, self.window)
    }

    fn dtypes(&self, x: &CubeTensor<R>) -> [StorageType; 2] {
        [storage(x.dtype), storage(self.mask.dtype)]
    }
}

/// x·w for the frozen w of a layer (`[n, k]`·`[k, m]`, w may be a transposed view), in x's
/// dtype: cubecl's matmul reads both operands in w's dtype (x rounded once, where it enters) and
/// writes its f32 sums straight into x's dtype. A bf16 matmul followed by a cast, the generic
/// path, would round every output to bf16 on the way.
fn base_product<R: CubeRuntime>(x: CubeTensor<R>, w: CubeTensor<R>) -> CubeTensor<R> {
    let out_dtype = x.dtype;
    let x = if x.dtype == w.dtype { x } else { burn_cubecl::kernel::cast(x, w.dtype) };
    let (xs, ws) = (x.meta.shape().clone(), w.meta.shape().clone());
    burn_cubecl::kernel::matmul::matmul(x, w, None, MatmulStrategy::default(), out_dtype)
        .unwrap_or_else(|e| panic!("frozen matmul of {xs:?} by {ws:?} into {out_dtype:?}: {e:?}"))
}

/// out + bias + scale·u·up, written into `out` (`[n, m]`, a product just made here, so no one
/// else holds it): [`kernels::lora_add`]. u `[n, r]`, up `[r, m]`, bias `[m]`.
fn lora_add<R: CubeRuntime>(
    out: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    u: CubeTensor<R>,
    up: CubeTensor<R>,
    scale: f64,
) -> CubeTensor<R> {
    // A copy of a contiguous tensor is contiguous.
    let out = into_contiguous(out);
    let out = if out.can_mut() { out } else { out.copy() };
    let (n, m) = rows_and_width(&out, "lora_add");
    let (us, ups) = (u.meta.shape().clone(), up.meta.shape().clone());
    assert!(
        us.num_dims() == 2 && ups.num_dims() == 2 && us[0] == n && ups[1] == m && us[1] == ups[0],
        "lora_add: [{n}, {m}] += [n, r] {us:?} · [r, m] {ups:?}"
    );
    assert_eq!(u.dtype, up.dtype, "lora_add: the adapter's factors");
    let bias = bias.map(into_contiguous);
    if let Some(b) = &bias {
        assert!(b.meta.shape().num_elements() == m, "lora_add: a bias of {:?} for {m} outputs", b.meta.shape());
    }
    let has_bias = bias.is_some();
    let bias = bias.unwrap_or_else(|| u.clone());
    let len = n * m;
    let (count, dim) = elementwise_launch(&out.client, len);
    let dtypes = [storage(out.dtype), storage(u.dtype), storage(bias.dtype)];
    kernels::lora_add::launch::<R>(
        &out.client.clone(),
        count,
        dim,
        out.clone().into_tensor_arg(),
        bias.into_tensor_arg(),
        u.into_tensor_arg(),
        up.into_tensor_arg(),
        len,
        m,
        us[1],
        scale as f32,
        has_bias,
        dtypes,
    );
    out
}

fn explicit<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    mask: Mask<CubeBackend<R, F, I, BT>>,
) -> Option<CubeTensor<R>> {
    match mask {
        Mask::Causal => None,
        Mask::Explicit(m) => Some(m),
    }
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedOps for CubeBackend<R, F, I, BT> {
    fn attention_forward(
        q: CubeTensor<R>,
        k: CubeTensor<R>,
        v: CubeTensor<R>,
        mask: Mask<Self>,
        opts: &AttentionOptions,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
        let args = AttentionArgs::new(&q, &k, explicit(mask), opts);
        let [b, s, _, h, _, _] = args.sizes;
        let sizes = args.launch_sizes();
        let out = empty_like(&q, q.meta.shape().clone());
        let lse = empty_like(&q, Shape::new([b, h, s]));
        let (count, dim) = elementwise_launch(&q.client, b * h * s);
        let dtypes = args.dtypes(&q);
        let client = q.client.clone();
        kernels::attention_forward::launch::<R>(
            &client,
            count,
            dim,
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            args.mask.into_tensor_arg(),
            args.slopes.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            sizes,
            args.flags,
            dtypes,
        );
        (out, lse)
    }

    fn attention_backward(
        q: CubeTensor<R>,
        k: CubeTensor<R>,
        v: CubeTensor<R>,
        mask: Mask<Self>,
        opts: &AttentionOptions,
        out: CubeTensor<R>,
        lse: CubeTensor<R>,
        grad: CubeTensor<R>,
    ) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
        let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
        let (out, lse, grad) = (into_contiguous(out), into_contiguous(lse), into_contiguous(grad));
        let args = AttentionArgs::new(&q, &k, explicit(mask), opts);
        let [b, s, t, h, kv, _] = args.sizes;
        let (sizes, sizes_kv) = (args.launch_sizes(), args.launch_sizes());
        let dq = empty_like(&q, q.meta.shape().clone());
        let (dk, dv) = (empty_like(&k, k.meta.shape().clone()), empty_like(&v, v.meta.shape().clone()));
        let delta = empty_device_dtype(q.client.clone(), q.device.clone(), Shape::new([b, h, s]), DType::F32);
        let dtypes = args.dtypes(&q);
        let client = q.client.clone();
        let (count, dim) = elementwise_launch(&client, b * h * s);
        kernels::attention_backward_q::launch::<R>(
            &client,
            count,
            dim,
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            args.mask.clone().into_tensor_arg(),
            args.slopes.clone().into_tensor_arg(),
            out.into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            grad.clone().into_tensor_arg(),
            dq.clone().into_tensor_arg(),
            delta.clone().into_tensor_arg(),
            sizes,
            args.flags,
            dtypes,
        );
        // Queued after the first on the same stream: it reads the delta that one wrote.
        let (count, dim) = elementwise_launch(&client, b * kv * t);
        kernels::attention_backward_kv::launch::<R>(
            &client,
            count,
            dim,
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            args.mask.into_tensor_arg(),
            args.slopes.into_tensor_arg(),
            lse.into_tensor_arg(),
            delta.into_tensor_arg(),
            grad.into_tensor_arg(),
            dk.clone().into_tensor_arg(),
            dv.clone().into_tensor_arg(),
            sizes_kv,
            args.flags,
            dtypes,
        );
        (dq, dk, dv)
    }

    fn frozen_matmul(x: CubeTensor<R>, w: CubeTensor<R>) -> CubeTensor<R> {
        base_product(x, w)
    }

    fn lora_linear(x: CubeTensor<R>, x_lora: Option<CubeTensor<R>>, p: LoraLinear<Self>) -> CubeTensor<R> {
        let x_lora = x_lora.unwrap_or_else(|| x.clone());
        let y = base_product(x, p.w);
        let down = prim(float::<Self, 2>(x_lora).matmul(float(p.a)));
        lora_add(y, p.bias, down, p.b, p.scale)
    }

    fn lora_linear_backward(
        x: CubeTensor<R>,
        x_lora: Option<CubeTensor<R>>,
        p: LoraLinear<Self>,
        grad: CubeTensor<R>,
        need_dx: bool,
    ) -> (Option<CubeTensor<R>>, Option<CubeTensor<R>>, CubeTensor<R>, CubeTensor<R>) {
        let shared = x_lora.is_none();
        let x_lora = float::<Self, 2>(x_lora.unwrap_or(x));
        let (a, b, g) = (float::<Self, 2>(p.a), float::<Self, 2>(p.b), float::<Self, 2>(grad.clone()));
        // The scale goes on the thin [n, r] factors, not on the gradients they make.
        let down = x_lora.clone().matmul(a.clone()) * p.scale;
        let v = g.clone().matmul(b.transpose()) * p.scale;
        let db = down.transpose().matmul(g);
        let da = x_lora.transpose().matmul(v.clone());
        let dx = need_dx.then(|| {
            let dx = base_product(grad, prim(float::<Self, 2>(p.w).transpose()));
            if shared {
                lora_add(dx, None, prim(v.clone()), prim(a.clone().transpose()), 1.0)
            } else {
                dx
            }
        });
        let dx_lora = (!shared).then(|| prim(v.matmul(a.transpose())));
        (dx, dx_lora, prim(da), prim(db))
    }

    fn quant_linear(x: CubeTensor<R>, x_lora: Option<CubeTensor<R>>, p: QuantLinear<Self>) -> CubeTensor<R> {
        if p.lora.is_none() {
            return super::reference::quant_linear::<Self>(x, x_lora, p);
        }
        let device = x.device.clone();
        Self::lora_linear(x, x_lora, super::reference::dequantized_lora(p, &device))
    }

    fn quant_lora_linear_backward(
        x: CubeTensor<R>,
        x_lora: Option<CubeTensor<R>>,
        p: QuantLinear<Self>,
        grad: CubeTensor<R>,
        need_dx: bool,
    ) -> (Option<CubeTensor<R>>, Option<CubeTensor<R>>, CubeTensor<R>, CubeTensor<R>) {
        let device = x.device.clone();
        Self::lora_linear_backward(x, x_lora, super::reference::dequantized_lora(p, &device), grad, need_dx)
    }

    fn rms_norm_forward(x: CubeTensor<R>, w: CubeTensor<R>, eps: f64) -> (CubeTensor<R>, CubeTensor<R>) {
        let (x, w) = (into_contiguous(x), into_contiguous(w));
        let (rows, d) = rows_and_width(&x, "rms_norm");
        let out = empty_like(&x, Shape::new([rows, d]));
        let rstd = empty_like(&x, Shape::new([rows, 1]));
        let (count, dim, block) = row_launch(&x.client, rows);
        let dtypes = [storage(x.dtype), storage(w.dtype)];
        kernels::rms_norm_forward::launch::<R>(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            w.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            rstd.clone().into_tensor_arg(),
            rows,
            d,
            eps as f32,
            block,
            dtypes,
        );
        (out, rstd)
    }

    fn rms_norm_backward(x: CubeTensor<R>, w: CubeTensor<R>, rstd: CubeTensor<R>, grad: CubeTensor<R>) -> CubeTensor<R> {
        let (x, w, rstd, grad) = (into_contiguous(x), into_contiguous(w), into_contiguous(rstd), into_contiguous(grad));
        let (rows, d) = rows_and_width(&x, "rms_norm_backward");
        let dx = empty_like(&x, Shape::new([rows, d]));
        let (count, dim, block) = row_launch(&x.client, rows);
        let dtypes = [storage(x.dtype), storage(w.dtype)];
        kernels::rms_norm_backward::launch::<R>(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            w.into_tensor_arg(),
            rstd.into_tensor_arg(),
            grad.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            rows,
            d,
            block,
            dtypes,
        );
        dx
    }

    fn layer_norm_forward(x: CubeTensor<R>, w: CubeTensor<R>, b: CubeTensor<R>, eps: f64) -> (CubeTensor<R>, CubeTensor<R>) {
        let (x, w, b) = (into_contiguous(x), into_contiguous(w), into_contiguous(b));
        assert_eq!(w.dtype, b.dtype, "layer_norm: weight {:?} and bias {:?}", w.dtype, b.dtype);
        let (rows, d) = rows_and_width(&x, "layer_norm");
        let out = empty_like(&x, Shape::new([rows, d]));
        let stats = empty_like(&x, Shape::new([rows, 2]));
        let (count, dim, block) = row_launch(&x.client, rows);
        let dtypes = [storage(x.dtype), storage(w.dtype)];
        kernels::layer_norm_forward::launch::<R>(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            w.into_tensor_arg(),
            b.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            stats.clone().into_tensor_arg(),
            rows,
            d,
            eps as f32,
            block,
            dtypes,
        );
        (out, stats)
    }

    fn layer_norm_backward(x: CubeTensor<R>, w: CubeTensor<R>, stats: CubeTensor<R>, grad: CubeTensor<R>) -> CubeTensor<R> {
        let (x, w, stats, grad) = (into_contiguous(x), into_contiguous(w), into_contiguous(stats), into_contiguous(grad));
        let (rows, d) = rows_and_width(&x, "layer_norm_backward");
        let dx = empty_like(&x, Shape::new([rows, d]));
        let (count, dim, block) = row_launch(&x.client, rows);
        let dtypes = [storage(x.dtype), storage(w.dtype)];
        kernels::layer_norm_backward::launch::<R>(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            w.into_tensor_arg(),
            stats.into_tensor_arg(),
            grad.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            rows,
            d,
            block,
            dtypes,
        );
        dx
    }

    fn fused_rope(x: CubeTensor<R>, cos: CubeTensor<R>, sin: CubeTensor<R>) -> CubeTensor<R> {
        let (x, cos, sin) = (into_contiguous(x), into_contiguous(cos), into_contiguous(sin));
        let (xs, ts) = (x.meta.shape().clone(), cos.meta.shape().clone());
        assert!(
            xs.num_dims() == 4 && ts.num_dims() == 4 && (ts[0] == 1 || ts[0] == xs[0]) && ts[1] == xs[1] && ts[2] == 1,
            "rope: x {xs:?} with tables {ts:?} (expected [b, s, h, d] and [b or 1, s, 1, r])"
        );
        let (r, d) = (ts[3], xs[3]);
        assert!(r <= d && r % 2 == 0, "rope: {r} rotary dimensions of a head of {d}");
        let len = xs.num_elements();
        let out = empty_like(&x, xs.clone());
        let (count, dim) = elementwise_launch(&x.client, len);
        let dtypes = [storage(x.dtype), storage(cos.dtype)];
        kernels::rope::launch::<R>(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            cos.into_tensor_arg(),
            sin.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            len,
            xs[1],
            xs[2],
            d,
            r,
            ts[0],
            dtypes,
        );
        out
    }

    fn fused_glu(gate: CubeTensor<R>, up: CubeTensor<R>, act: Activation) -> CubeTensor<R> {
        let (gate, up) = (into_contiguous(gate), into_contiguous(up));
        assert_eq!(gate.meta.shape(), up.meta.shape(), "glu: gate and up");
        let len = gate.meta.shape().num_elements();
        let out = empty_like(&gate, gate.meta.shape().clone());
        let (count, dim) = elementwise_launch(&gate.client, len);
        let dtype = storage(gate.dtype);
        kernels::glu::launch::<R>(
            &gate.client.clone(),
            count,
            dim,
            gate.into_tensor_arg(),
            up.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            len,
            activation_code(act),
            dtype,
        );
        out
    }

    fn glu_backward(gate: CubeTensor<R>, up: CubeTensor<R>, act: Activation, grad: CubeTensor<R>) -> (CubeTensor<R>, CubeTensor<R>) {
        let (gate, up, grad) = (into_contiguous(gate), into_contiguous(up), into_contiguous(grad));
        let shape = gate.meta.shape().clone();
        let len = shape.num_elements();
        let (d_gate, d_up) = (empty_like(&gate, shape.clone()), empty_like(&gate, shape));
        let (count, dim) = elementwise_launch(&gate.client, len);
        let dtype = storage(gate.dtype);
        kernels::glu_backward::launch::<R>(
            &gate.client.clone(),
            count,
            dim,
            gate.into_tensor_arg(),
            up.into_tensor_arg(),
            grad.into_tensor_arg(),
            d_gate.clone().into_tensor_arg(),
            d_up.clone().into_tensor_arg(),
            len,
            activation_code(act),
            dtype,
        );
        (d_gate, d_up)
    }

    fn fused_activation(x: CubeTensor<R>, act: Activation) -> CubeTensor<R> {
        let x = into_contiguous(x);
        let len = x.meta.shape().num_elements();
        let out = empty_like(&x, x.meta.shape().clone());
        let (count, dim) = elementwise_launch(&x.client, len);
        let dtype = storage(x.dtype);
        kernels::activation::launch::<R>(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            len,
            activation_code(act),
            dtype,
        );
        out
    }

    fn activation_backward(x: CubeTensor<R>, act: Activation, grad: CubeTensor<R>) -> CubeTensor<R> {
        let (x, grad) = (into_contiguous(x), into_contiguous(grad));
        let len = x.meta.shape().num_elements();
        let dx = empty_like(&x, x.meta.shape().clone());
        let (count, dim) = elementwise_launch(&x.client, len);
        let dtype = storage(x.dtype);
        kernels::activation_backward::launch::<R>(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            grad.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            len,
            activation_code(act),
            dtype,
        );
        dx
    }

    fn cross_entropy(logits: CubeTensor<R>, targets: &[u32], coef: &[f32], softcap: Option<f64>) -> (CubeTensor<R>, CubeTensor<R>) {
        let logits = into_contiguous(logits);
        let (rows, vocab) = rows_and_width(&logits, "cross_entropy");
        assert!(
            targets.len() == rows && coef.len() == rows,
            "cross_entropy: logits [{rows}, {vocab}] for {} targets and {} weights",
            targets.len(),
            coef.len()
        );
        if let Some((row, t)) = targets.iter().enumerate().find(|&(_, &t)| t as usize >= vocab) {
            panic!("cross_entropy: target {t} of row {row} is not below the vocabulary size {vocab} (logits [{rows}, {vocab}])");
        }
        let client = logits.client.clone();
        let upload = |bytes: &[u8], dtype: DType| {
            let handle = client.create_from_slice(bytes);
            CubeTensor::new_contiguous(client.clone(), logits.device.clone(), Shape::new([rows]), handle, dtype)
        };
        let (targets, coef) = (upload(u32::as_bytes(targets), DType::U32), upload(f32::as_bytes(coef), DType::F32));
        let grad = empty_like(&logits, Shape::new([rows, vocab]));
        let loss = empty_device_dtype(client.clone(), logits.device.clone(), Shape::new([rows]), DType::F32);
        let (count, dim, block) = row_launch(&client, rows);
        let dtype = storage(logits.dtype);
        kernels::cross_entropy::launch::<R>(
            &client,
            count,
            dim,
            logits.into_tensor_arg(),
            targets.into_tensor_arg(),
            coef.into_tensor_arg(),
            grad.clone().into_tensor_arg(),
            loss.clone().into_tensor_arg(),
            rows,
            vocab,
            softcap.unwrap_or(1.0) as f32,
            softcap.is_some(),
            block,
            dtype,
        );
        (super::prim(super::float::<Self, 1>(loss).sum()), grad)
    }

    fn dropout_mask(len: usize, p: f64, seed: u64, first: u64, device: &Self::Device) -> CubeTensor<R> {
        assert!(len <= u32::MAX as usize, "dropout: a mask of {len} elements (the kernel counts them in 32 bits)");
        assert!((0.0..1.0).contains(&p), "dropout: probability {p} (expected 0 <= p < 1)");
        let base = seed.wrapping_add(first.wrapping_add(1).wrapping_mul(crate::rng::GOLDEN_GAMMA));
        // next_f64() < p ⟺ (draw >> 11) < p·2⁵³ ⟺ (draw >> 11) < ⌈p·2⁵³⌉: p·2⁵³ is exact in f64.
        let threshold = (p * (1u64 << 53) as f64).ceil() as u64;
        let client = R::client(device);
        let mask = empty_device_dtype(client.clone(), device.clone(), Shape::new([len]), F::dtype());
        let (count, dim) = elementwise_launch(&client, len);
        kernels::dropout_mask::launch::<R>(
            &client,
            count,
            dim,
            mask.clone().into_tensor_arg(),
            len,
            base as u32,
            (base >> 32) as u32,
            threshold as u32,
            (threshold >> 32) as u32,
            (1.0 / (1.0 - p)) as f32,
            storage(F::dtype()),
        );
        mask
    }
}

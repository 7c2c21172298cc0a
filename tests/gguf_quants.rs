//! ggml's codecs and llama-quantize's Q4_K_M mix (src/gguf) against a real llama-quantize: the
//! fixtures in tests/fixtures/gguf_quants/ come from tests/fixtures/gguf_quants.py (llama.cpp as
//! llama-cpp-python 0.3.36 vendors it, and gguf-py's dequantization).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tune::gguf::mix::{fallback, llama_order, q4_k_m_types, MixInfo};
use tune::gguf::quants::{dequantize_row, quantize_row};
use tune::gguf::GgmlType;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_quants").join(name)
}

/// The few GGUF facts these tests need: metadata integers and strings, tensor names, dims, types
/// and bytes. Test-only; no validation beyond what a wrong fixture would trip over.
struct Gguf {
    kv: BTreeMap<String, String>,
    tensors: Vec<Tensor>,
}

struct Tensor {
    name: String,
    ne: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        s
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn str(&mut self) -> String {
        let n = self.u64() as usize;
        String::from_utf8(self.take(n).to_vec()).unwrap()
    }
    /// A metadata value as text (scalars only; arrays are skipped).
    fn value(&mut self, ty: u32) -> String {
        match ty {
            0 | 1 | 7 => self.take(1)[0].to_string(),
            2 | 3 => u16::from_le_bytes(self.take(2).try_into().unwrap()).to_string(),
            4 => self.u32().to_string(),
            5 => (self.u32() as i32).to_string(),
            6 => f32::from_bits(self.u32()).to_string(),
            8 => self.str(),
            9 => {
                let (ety, n) = (self.u32(), self.u64());
                for _ in 0..n {
                    self.value(ety);
                }
                "[array]".into()
            }
            10 | 11 => self.u64().to_string(),
            12 => f64::from_bits(self.u64()).to_string(),
            t => panic!("GGUF value type {t}"),
        }
    }
}

fn read_gguf(path: &Path) -> Gguf {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut c = Cursor { b: &bytes, pos: 0 };
    assert_eq!(c.take(4), b"GGUF", "{}", path.display());
    assert_eq!(c.u32(), 3);
    let (n_tensors, n_kv) = (c.u64(), c.u64());
    let mut kv = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.str();
        let ty = c.u32();
        kv.insert(key, c.value(ty));
    }
    let mut infos = Vec::new();
    for _ in 0..n_tensors {
        let name = c.str();
        let nd = c.u32() as usize;
        let ne: Vec<u64> = (0..nd).map(|_| c.u64()).collect();
        let ty = c.u32();
        infos.push((name, ne, ty, c.u64() as usize));
    }
    let align: usize = kv.get("general.alignment").map_or(32, |a| a.parse().unwrap());
    let data_start = c.pos.div_ceil(align) * align;
    let tensors = infos
        .into_iter()
        .map(|(name, ne, ty, off)| {
            let n: u64 = ne.iter().product();
            let t = ggml_type(ty);
            let len = t.row_bytes(ne[0] as usize) * (n / ne[0]) as usize;
            let data = bytes[data_start + off..data_start + off + len].to_vec();
            Tensor { name, ne, ty, data }
        })
        .collect();
    Gguf { kv, tensors }
}

fn ggml_type(ty: u32) -> GgmlType {
    use GgmlType::*;
    [F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, BF16]
        .into_iter()
        .find(|t| *t as u32 == ty)
        .unwrap_or_else(|| panic!("ggml type {ty}"))
}

impl Gguf {
    fn tensor(&self, name: &str) -> &Tensor {
        self.tensors.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no tensor {name}"))
    }
}

impl Tensor {
    fn f32s(&self) -> Vec<f32> {
        assert_eq!(self.ty, 0, "{}: not f32", self.name);
        self.data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }
}

/// The pure runs (`llama-quantize --pure`) and the mix run, by file.
const RUNS: &[(&str, Option<GgmlType>)] = &[
    ("q4_0", Some(GgmlType::Q4_0)),
    ("q4_1", Some(GgmlType::Q4_1)),
    ("q5_0", Some(GgmlType::Q5_0)),
    ("q5_1", Some(GgmlType::Q5_1)),
    ("q8_0", Some(GgmlType::Q8_0)),
    ("q4_k", Some(GgmlType::Q4_K)),
    ("q5_k", Some(GgmlType::Q5_K)),
    ("q6_k", Some(GgmlType::Q6_K)),
    ("f16", Some(GgmlType::F16)),
    ("q4_k_m", None),
];

/// Every tensor llama-quantize quantized, requantized from input.gguf by quantize_row: 0 differing
/// bytes, for every type (a pure K-quant run also covers its fallbacks for 576-, 640-, 96- and
/// 100-long rows).
#[test]
fn quantized_bytes_are_llama_quantizes() {
    let input = read_gguf(&fixture("input.gguf"));
    let mut per_type: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut failures = Vec::new();
    for (run, pure) in RUNS {
        let out = read_gguf(&fixture(&format!("{run}.gguf")));
        assert_eq!(out.tensors.len(), input.tensors.len(), "{run}");
        for t in &out.tensors {
            let src = input.tensor(&t.name);
            assert_eq!(t.ne, src.ne, "{run} {}", t.name);
            let ty = ggml_type(t.ty);
            if ty == GgmlType::F32 {
                assert_eq!(t.data, src.data, "{run} {}: copied f32", t.name);
                continue;
            }
            if let Some(p) = pure {
                // --pure: every quantized tensor is the run's type unless its row forces the fallback.
                let want = if *p == GgmlType::F16 { GgmlType::F16 } else { fallback(*p, t.ne[0]) };
                assert_eq!(ty, want, "{run} {} ({} values a row)", t.name, t.ne[0]);
            }
            let mut ours = Vec::new();
            quantize_row(ty, &src.f32s(), &mut ours).unwrap();
            assert_eq!(ours.len(), t.data.len(), "{run} {}", t.name);
            let diff = ours.iter().zip(&t.data).filter(|(a, b)| a != b).count();
            if diff != 0 {
                let first = ours.iter().zip(&t.data).position(|(a, b)| a != b).unwrap();
                failures.push(format!(
                    "{run} {} as {}: {diff} of {} bytes differ, first at byte {first} (block {})",
                    t.name,
                    ty.name(),
                    ours.len(),
                    first / ty.type_size()
                ));
            }
            let e = per_type.entry(ty.name()).or_default();
            e.0 += 1;
            e.1 += ours.len();
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("tensors and bytes compared per type: {per_type:?}");
    // Every codec q4_k_m can write was compared (and the legacy ones).
    for t in ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_K", "q5_K", "q6_K", "f16"] {
        assert!(per_type.get(t).is_some_and(|&(n, _)| n >= 3), "{t}: {per_type:?}");
    }
}

/// dequantize_row(quantize_row(x)) against gguf-py's dequantization of llama-quantize's tensors,
/// bit for bit (dequant.gguf holds the first row of each, all rows of the one with the zero,
/// constant, tiny and tie rows).
#[test]
fn dequantized_values_are_gguf_pys() {
    let input = read_gguf(&fixture("input.gguf"));
    let reference = read_gguf(&fixture("dequant.gguf"));
    let mut outs = BTreeMap::new();
    let mut compared = 0;
    for r in &reference.tensors {
        let (run, name) = r.name.split_once('/').unwrap();
        let out = outs.entry(run.to_string()).or_insert_with(|| read_gguf(&fixture(&format!("{run}.gguf"))));
        let ty = ggml_type(out.tensor(name).ty);
        let mut bytes = Vec::new();
        quantize_row(ty, &input.tensor(name).f32s(), &mut bytes).unwrap();
        let mut ours = vec![0f32; bytes.len() / ty.type_size() * ty.block_size()];
        dequantize_row(ty, &bytes, &mut ours).unwrap();
        let want = r.f32s();
        let bad = want.iter().zip(&ours).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(bad, 0, "{}: {bad} of {} values differ from gguf-py", r.name, want.len());
        compared += want.len();
    }
    assert!(compared > 10_000, "{compared}");
}

fn info_of(g: &Gguf) -> MixInfo {
    let arch = g.kv["general.architecture"].clone();
    let get = |k: &str| g.kv.get(&format!("{arch}.{k}")).map_or(0, |v| v.parse().unwrap());
    MixInfo {
        n_layer: get("block_count"),
        n_head: get("attention.head_count"),
        n_head_kv: get("attention.head_count_kv"),
        n_expert: get("expert_count"),
        arch,
    }
}

fn type_label(t: Option<GgmlType>) -> String {
    t.map_or("F32".into(), |t| t.name().to_uppercase())
}

/// The Q4_K_M run of input.gguf: q4_k_m_types picks llama-quantize's type for every tensor, and
/// llama_order is the order llama-quantize wrote them in.
#[test]
fn q4_k_m_types_of_the_codec_model() {
    let input = read_gguf(&fixture("input.gguf"));
    let out = read_gguf(&fixture("q4_k_m.gguf"));
    let tensors: Vec<(&str, Vec<u64>)> = input.tensors.iter().map(|t| (t.name.as_str(), t.ne.clone())).collect();
    let types = q4_k_m_types(&info_of(&input), &tensors).unwrap();
    for ((name, _), t) in tensors.iter().zip(types) {
        assert_eq!(type_label(t), ggml_type(out.tensor(name).ty).name().to_uppercase(), "{name}");
    }
    let names: Vec<&str> = tensors.iter().map(|t| t.0).collect();
    let order: Vec<&str> = llama_order(&names).into_iter().map(|i| names[i]).collect();
    let written: Vec<&str> = out.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(order, written);
}

#[derive(serde::Deserialize)]
struct MixModel {
    label: String,
    info: MixJsonInfo,
    /// (name, ggml dims, llama-quantize's type), in llama-quantize's output order.
    tensors: Vec<(String, Vec<u64>, String)>,
}

#[derive(serde::Deserialize)]
struct MixJsonInfo {
    arch: String,
    n_layer: usize,
    n_head: usize,
    n_head_kv: usize,
    n_expert: usize,
}

/// mix.json: fake models of every arch tune exports (and llama.cpp's 70B, Mixtral and falcon
/// rules) at their real layer counts and row lengths; every tensor's type and the visiting order
/// are llama-quantize's.
#[test]
fn q4_k_m_types_match_llama_quantize_per_arch() {
    let text = std::fs::read_to_string(fixture("mix.json")).unwrap();
    let models: Vec<MixModel> = serde_json::from_str(&text).unwrap();
    assert!(models.len() >= 12);
    let mut checked = 0;
    for m in &models {
        let i = &m.info;
        let info = MixInfo { arch: i.arch.clone(), n_layer: i.n_layer, n_head: i.n_head, n_head_kv: i.n_head_kv, n_expert: i.n_expert };
        // Given in reverse: the order llama.cpp visits in must come from llama_order, not the input.
        let tensors: Vec<(&str, Vec<u64>)> = m.tensors.iter().rev().map(|(n, ne, _)| (n.as_str(), ne.clone())).collect();
        let types = q4_k_m_types(&info, &tensors).unwrap();
        for ((name, _), t) in tensors.iter().zip(&types) {
            let want = &m.tensors.iter().find(|x| x.0 == *name).unwrap().2;
            assert_eq!(&type_label(*t), want, "{}: {name}", m.label);
            checked += 1;
        }
        let names: Vec<&str> = tensors.iter().map(|t| t.0).collect();
        let order: Vec<&str> = llama_order(&names).into_iter().map(|i| names[i]).collect();
        let written: Vec<&str> = m.tensors.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(order, written, "{}", m.label);
    }
    assert!(checked > 2000, "{checked}");
}

/// Bad input is refused with the type and the length in the message.
#[test]
fn quantize_row_refuses_partial_blocks_and_unsupported_types() {
    let mut out = Vec::new();
    let e = quantize_row(GgmlType::Q4_K, &[0.0; 576], &mut out).unwrap_err().to_string();
    assert!(e.contains("q4_K") && e.contains("576") && e.contains("256"), "{e}");
    let e = quantize_row(GgmlType::Q8_0, &[0.0; 40], &mut out).unwrap_err().to_string();
    assert!(e.contains("q8_0") && e.contains("40"), "{e}");
    let e = quantize_row(GgmlType::IQ4_NL, &[0.0; 32], &mut out).unwrap_err().to_string();
    assert!(e.contains("iq4_nl"), "{e}");
    let e = quantize_row(GgmlType::Q8_0, &[f32::NAN; 32], &mut out).unwrap_err().to_string();
    assert!(e.contains("not finite"), "{e}");
    assert!(out.is_empty());
}

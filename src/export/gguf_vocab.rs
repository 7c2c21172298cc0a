//! The tokenizer of a GGUF file, as llama.cpp's convert_hf_to_gguf.py writes it. The family's
//! `GGUF.vocab` names which of the converter's readers its model class takes:
//!
//! - `_set_vocab_gpt2`, for a Hugging Face "fast" tokenizer with BPE merges (SmolLM2, Llama 3,
//!   Qwen, GPT-2, GPT-NeoX, BLOOM, Gemma 3 without a tokenizer.model, Phi-4-mini):
//!   `tokenizer.ggml.model` "gpt2", `tokenizer.ggml.pre` the pre-tokenizer llama.cpp should
//!   run, recognised as the converter does: by the sha256 of the ids of a fixed probe text;
//!   every id below the config's vocab_size: its token (added tokens as their content,
//!   `[PAD<i>]` for ids without one) and type (1 normal, 3 control, 4 user-defined, 5 unused);
//!   the merges.
//! - `_set_vocab_sentencepiece`, for a SentencePiece tokenizer.model (Llama 2, Mistral,
//!   Gemma 2, Gemma 3 with one): `tokenizer.ggml.model` "llama", pre "default", each piece with
//!   its score and type, then added_tokens.json and tokenizer_config's added_tokens_decoder on
//!   top; Phi-3's model class has its own variant of it.
//!
//! Both end with gguf-py's `SpecialVocab`: special token ids from tokenizer_config.json
//! (matched against tokenizer.json's added tokens), then config.json's `*_token_id`; whether to
//! add bos/eos from the post-processor and tokenizer_config; the chat template.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{read_json, Error, Result};
use crate::gguf::{Array, Value};
use crate::hf::sentencepiece::{PieceType, SentencePieceModel};
use crate::model::family::GgufVocab;

/// The probe text of convert_hf_to_gguf.py's `get_vocab_base_pre`.
const CHKTXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\u{1F680} (normal) \u{1F636}\u{200D}\u{1F32B}\u{FE0F} (multiple emojis concatenated) \u{2705} \u{1F999}\u{1F999} 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 \u{1780}\u{17B6}\u{1793}\u{17CB}\u{178F}\u{17C2}\u{1796}\u{17B7}\u{179F}\u{17C1}\u{179F}\u{17A2}\u{17B6}\u{1785}\u{1F601} ?\u{6211}\u{60F3}\u{5728}apple\u{5DE5}\u{4F5C}1314151\u{5929}\u{FF5E} ------======= \u{043D}\u{0435}\u{0449}\u{043E} \u{043D}\u{0430} \u{0411}\u{044A}\u{043B}\u{0433}\u{0430}\u{0440}\u{0441}\u{043A}\u{0438} ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// Probe hashes -> llama.cpp pre-tokenizer, for the tokenizers of the families tune trains
/// (from the converter's table; a model not listed needs `pre` given explicitly).
const KNOWN_PRE: &[(&str, &str)] = &[
    ("855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249", "smollm"),
    ("0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5", "llama-bpe"),
    ("e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea", "qwen2"),
    ("d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c", "qwen2"),
    ("3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454", "gpt-2"),
    ("3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7", "bloom"),
    ("b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166", "olmo"),
    // Gemma 3's tokenizer.json (without a tokenizer.model) hashes as IBM's Granite embedding
    // model, whose pre-tokenizer llama.cpp runs as Gemma 4's (escaped whitespace): what the
    // converter writes for Gemma 3 270M.
    ("789696f5946cc0fc59371f39f6097cafed196b3acded6140432f26bbb1ae1669", "granite-embed-multi-311m"),
];

pub const NORMAL: i32 = 1;
pub const UNKNOWN: i32 = 2;
pub const CONTROL: i32 = 3;
pub const USER_DEFINED: i32 = 4;
pub const UNUSED: i32 = 5;
pub const BYTE: i32 = 6;

#[derive(serde::Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
    #[serde(default)]
    special: bool,
}

/// The converter's guess that an added token not flagged special is a control token anyway.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{FF5C}") && t.ends_with("\u{FF5C}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// Whether the converter reads this directory's vocabulary from its tokenizer.model.
pub fn uses_sentencepiece(dir: &Path, kind: GgufVocab) -> Result<bool> {
    let spm = dir.join("tokenizer.model");
    Ok(match kind {
        GgufVocab::Bpe => false,
        GgufVocab::SentencePieceOrBpe => spm.is_file(),
        GgufVocab::SentencePiece => true,
        GgufVocab::Phi3 => {
            let tc = dir.join("tokenizer_config.json");
            let class =
                if tc.is_file() { read_json::<serde_json::Value>(&tc)?["tokenizer_class"].as_str().map(str::to_string) } else { None };
            class.as_deref() != Some("GPT2Tokenizer")
        }
    })
}

/// The tokenizer keys of a model directory (`tokenizer.json` or `tokenizer.model`,
/// `tokenizer_config.json`, `config.json`), with the chat template `chat_template` (the
/// adapter's or the base's, chosen by the caller), in the order the converter adds them.
pub fn tokenizer_kv(
    dir: &Path,
    vocab_size: usize,
    kind: GgufVocab,
    pre: Option<&str>,
    chat_template: Option<&str>,
) -> Result<Vec<(String, Value)>> {
    if uses_sentencepiece(dir, kind)? {
        return sentencepiece_kv(dir, vocab_size, kind == GgufVocab::Phi3, chat_template);
    }
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(Error::Tokenizer { path, msg: "not found: a GGUF export needs the base model's tokenizer.json".into() });
    }
    let tok: serde_json::Value = read_json(&path)?;
    let model = &tok["model"];
    if model["type"] != "BPE" {
        return Err(Error::Tokenizer { path, msg: format!("model type {} (only BPE tokenizers are written to GGUF)", model["type"]) });
    }
    let bad = |msg: String| Error::Tokenizer { path: path.clone(), msg };
    let vocab = model["vocab"].as_object().ok_or_else(|| bad("model.vocab is not an object".into()))?;
    let added: Vec<AddedToken> = serde_json::from_value(tok["added_tokens"].clone()).map_err(|e| bad(format!("added_tokens: {e}")))?;

    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    for (t, id) in vocab {
        let id = id.as_u64().ok_or_else(|| bad(format!("model.vocab[{t:?}] is not an id")))? as usize;
        if id >= vocab_size {
            return Err(bad(format!("token {t:?} has id {id}, past the config's vocab_size {vocab_size}")));
        }
        tokens[id] = Some(t.clone());
    }
    for a in &added {
        if a.id as usize >= vocab_size {
            return Err(bad(format!("added token {:?} has id {}, past the config's vocab_size {vocab_size}", a.content, a.id)));
        }
        tokens[a.id as usize] = Some(a.content.clone());
    }
    let mut types = Vec::with_capacity(vocab_size);
    let list: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| match t {
            None => {
                types.push(UNUSED);
                format!("[PAD{i}]")
            }
            Some(t) => match added.iter().find(|a| a.content == t) {
                Some(a) if a.special || looks_special(&t) => {
                    types.push(CONTROL);
                    t
                }
                // Pre-normalised user-defined spaces (the converter's note: for Gemma).
                Some(_) => {
                    types.push(USER_DEFINED);
                    t.replace('\u{2581}', " ")
                }
                None => {
                    types.push(NORMAL);
                    t
                }
            },
        })
        .collect();

    let pre = match pre {
        Some(p) => p.to_string(),
        None => {
            let hash = pre_hash(&path)?;
            match KNOWN_PRE.iter().find(|(h, _)| *h == hash) {
                Some((_, name)) => name.to_string(),
                None => {
                    return Err(Error::Unsupported(format!(
                        "{}: llama.cpp's pre-tokenizer for this tokenizer is not known to tune (probe hash {hash}); \
                         look it up in convert_hf_to_gguf.py's get_vocab_base_pre and pass it with --gguf-pre NAME",
                        path.display()
                    )))
                }
            }
        }
    };
    let mut kv: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre)),
        ("tokenizer.ggml.tokens".into(), Value::Array(Array::String(list))),
        ("tokenizer.ggml.token_type".into(), Value::Array(Array::I32(types))),
    ];
    let merges = merges(&model["merges"]).ok_or_else(|| bad("model.merges: expected strings or pairs of strings".into()))?;
    if !merges.is_empty() {
        kv.push(("tokenizer.ggml.merges".into(), Value::Array(Array::String(merges))));
    }
    kv.extend(special_vocab(dir, &tok, &added, None, chat_template)?);
    Ok(kv)
}

/// `_create_vocab_sentencepiece` (or Phi3MiniModel's variant of it, `phi3`) and
/// `SpecialVocab(n_vocab = vocab_size)`.
fn sentencepiece_kv(dir: &Path, vocab_size: usize, phi3: bool, chat_template: Option<&str>) -> Result<Vec<(String, Value)>> {
    let model_path = dir.join("tokenizer.model");
    if !model_path.is_file() {
        return Err(Error::Tokenizer {
            path: model_path,
            msg: "not found: llama.cpp reads this family's vocabulary from the SentencePiece tokenizer.model".into(),
        });
    }
    let spm = SentencePieceModel::open(&model_path)?;
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000f32; vocab_size];
    let mut types = vec![UNUSED; vocab_size];
    // Pieces past the config's vocab_size are dropped, as the converter drops them.
    for (id, p) in spm.pieces.iter().enumerate().take(vocab_size) {
        tokens[id] = p.piece.clone();
        scores[id] = p.score;
        // A user-defined piece stays normal: the converter asks only is-unknown, -control,
        // -unused and -byte.
        types[id] = match p.kind {
            PieceType::Unknown => UNKNOWN,
            PieceType::Control => CONTROL,
            PieceType::Unused => UNUSED,
            PieceType::Byte => BYTE,
            PieceType::Normal | PieceType::UserDefined => NORMAL,
        };
    }
    let mut set = |id: usize, token: String, ty: i32| {
        tokens[id] = token;
        scores[id] = -1000.0;
        types[id] = ty;
    };
    let added_json = dir.join("added_tokens.json");
    if added_json.is_file() {
        let map: serde_json::Map<String, serde_json::Value> = read_json(&added_json)?;
        for (token, id) in map {
            let id = id.as_u64().ok_or_else(|| Error::format(&added_json, format!("{token:?}: expected a token id")))? as usize;
            if id < vocab_size {
                set(id, token, USER_DEFINED);
            }
        }
    }
    let tc_path = dir.join("tokenizer_config.json");
    if tc_path.is_file() {
        let tc: serde_json::Value = read_json(&tc_path)?;
        if let Some(decoder) = tc.get("added_tokens_decoder").and_then(serde_json::Value::as_object) {
            for (id, data) in decoder {
                let bad = |msg: &str| Error::format(&tc_path, format!("added_tokens_decoder[{id:?}]: {msg}"));
                let id: usize = id.parse().map_err(|_| bad("the key is not a token id"))?;
                let content = data["content"].as_str().ok_or_else(|| bad("no `content` string"))?.to_string();
                let special = data["special"].as_bool().unwrap_or(false);
                if id >= vocab_size {
                    continue;
                }
                if phi3 {
                    set(id, content, if special { CONTROL } else { USER_DEFINED });
                } else if special || looks_special(&content) {
                    set(id, content, CONTROL);
                } else {
                    // Pre-normalised user-defined spaces (the converter's note: for Gemma).
                    set(id, content.replace('\u{2581}', " "), USER_DEFINED);
                }
            }
        }
    }
    let tok_path = dir.join("tokenizer.json");
    let tok: serde_json::Value = if tok_path.is_file() { read_json(&tok_path)? } else { serde_json::Value::Null };
    let added: Vec<AddedToken> = match tok.get("added_tokens") {
        Some(a) => {
            serde_json::from_value(a.clone()).map_err(|e| Error::Tokenizer { path: tok_path.clone(), msg: format!("added_tokens: {e}") })?
        }
        None => Vec::new(),
    };
    if phi3 {
        for a in added.iter().filter(|a| (a.id as usize) < vocab_size) {
            set(a.id as usize, a.content.clone(), if a.special { CONTROL } else { USER_DEFINED });
        }
    }
    let mut kv: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(Array::String(tokens))),
        ("tokenizer.ggml.scores".into(), Value::Array(Array::F32(scores))),
        ("tokenizer.ggml.token_type".into(), Value::Array(Array::I32(types))),
    ];
    kv.extend(special_vocab(dir, &tok, &added, Some(vocab_size), chat_template)?);
    Ok(kv)
}

/// sha256 of the probe's ids, written as Python prints a list (`[1, 2, 3]`).
fn pre_hash(path: &Path) -> Result<String> {
    let t = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| Error::Tokenizer { path: path.to_path_buf(), msg: format!("cannot load: {e}") })?;
    let enc = t.encode(CHKTXT, true).map_err(|e| Error::Tokenizer { path: path.to_path_buf(), msg: format!("cannot encode: {e}") })?;
    let ids: Vec<String> = enc.get_ids().iter().map(u32::to_string).collect();
    let digest = Sha256::digest(format!("[{}]", ids.join(", ")).as_bytes());
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// Merges as "a b" strings; the pair form (transformers ≥ 4.45) with a space inside a part
/// encodes that space as U+0120, as gguf-py does.
fn merges(m: &serde_json::Value) -> Option<Vec<String>> {
    let Some(list) = m.as_array() else { return m.is_null().then(Vec::new) };
    list.iter()
        .map(|e| match e {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(p) if p.len() == 2 => {
                let part = |v: &serde_json::Value| v.as_str().map(|s| s.replace(' ', "\u{0120}"));
                Some(format!("{} {}", part(&p[0])?, part(&p[1])?))
            }
            _ => None,
        })
        .collect()
}

/// gguf-py's SpecialVocab: special ids (below `n_vocab` when given), add_bos/add_eos, the
/// chat template.
fn special_vocab(
    dir: &Path,
    tok: &serde_json::Value,
    added: &[AddedToken],
    n_vocab: Option<usize>,
    chat_template: Option<&str>,
) -> Result<Vec<(String, Value)>> {
    let config_path = dir.join("tokenizer_config.json");
    let tc: Option<serde_json::Value> = if config_path.is_file() { Some(read_json(&config_path)?) } else { None };
    let content = |key: &str| -> Option<String> {
        match tc.as_ref()?.get(key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
            _ => None,
        }
    };
    let mut ids: Vec<(&str, u32)> = Vec::new();
    let mut add: Vec<(&str, bool)> = Vec::new();
    let set_add = |add: &mut Vec<(&str, bool)>, k: &'static str, v: bool, overwrite: bool| match add.iter_mut().find(|(t, _)| *t == k) {
        Some(slot) if overwrite => slot.1 = v,
        Some(_) => {}
        None => add.push((k, v)),
    };
    const TYPES: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];
    let fits = |id: u32| n_vocab.is_none_or(|n| (id as usize) < n);
    if let Some(tc) = &tc {
        let bos = content("bos_token").or_else(|| content("cls_token"));
        if let Some(pp) = tok.get("post_processor").filter(|p| !p.is_null()) {
            let procs: Vec<&serde_json::Value> = match pp.get("processors").and_then(|p| p.as_array()) {
                Some(list) => list.iter().collect(),
                None => vec![pp],
            };
            for p in procs {
                match p["type"].as_str() {
                    Some("ByteLevel") => {
                        set_add(&mut add, "bos", false, false);
                        set_add(&mut add, "eos", false, false);
                    }
                    Some("TemplateProcessing") => {
                        let single = p["single"].as_array().cloned().unwrap_or_default();
                        if single.len() > 1 {
                            if let Some(first) = single[0]["SpecialToken"]["id"].as_str() {
                                set_add(&mut add, "bos", bos.as_deref() == Some(first), true);
                            }
                            if let Some(last) = single[single.len() - 1]["SpecialToken"]["id"].as_str() {
                                set_add(&mut add, "eos", content("eos_token").as_deref() == Some(last), true);
                            }
                        }
                        if let Some(sep) = pair_sep(
                            &single,
                            p["pair"].as_array().map(Vec::as_slice).unwrap_or_default(),
                            content("sep_token"),
                            content("eos_token"),
                        ) {
                            set_add(&mut add, "sep", sep, true);
                        }
                    }
                    Some(other) => {
                        return Err(Error::Unsupported(format!(
                            "{}: post_processor `{other}` is not read for GGUF (ByteLevel and TemplateProcessing are)",
                            dir.join("tokenizer.json").display()
                        )))
                    }
                    None => {}
                }
            }
        }
        for typ in TYPES {
            if let Some(b) = tc.get(format!("add_{typ}_token")).and_then(serde_json::Value::as_bool) {
                set_add(&mut add, typ, b, false);
            }
            let Some(c) = content(&format!("{typ}_token")) else { continue };
            if let Some(a) = added.iter().find(|a| a.content == c) {
                if !ids.iter().any(|(t, _)| *t == typ) && fits(a.id) {
                    ids.push((typ, a.id));
                }
            }
        }
    }
    // config.json fills in what the tokenizer did not name.
    let config: serde_json::Value = read_json(&dir.join("config.json"))?;
    for typ in TYPES {
        let id = config.get(format!("{typ}_token_id")).or_else(|| config.get("text_config").and_then(|t| t.get(format!("{typ}_token_id"))));
        if let Some(id) = id.and_then(serde_json::Value::as_u64) {
            if !ids.iter().any(|(t, _)| *t == typ) && fits(id as u32) {
                ids.push((typ, id as u32));
            }
        }
    }
    let key = |typ: &str| match typ {
        "unk" => "tokenizer.ggml.unknown_token_id".to_string(),
        "sep" => "tokenizer.ggml.seperator_token_id".to_string(),
        "pad" => "tokenizer.ggml.padding_token_id".to_string(),
        t => format!("tokenizer.ggml.{t}_token_id"),
    };
    let mut kv: Vec<(String, Value)> = ids.into_iter().map(|(t, id)| (key(t), Value::U32(id))).collect();
    kv.extend(add.into_iter().map(|(t, b)| (format!("tokenizer.ggml.add_{t}_token"), Value::Bool(b))));
    if tc.is_some() {
        if let Some(t) = chat_template {
            kv.push(("tokenizer.chat_template".into(), Value::String(t.to_string())));
        }
    }
    Ok(kv)
}

/// Whether TemplateProcessing's pair template puts a separator between A and B, read as gguf-py
/// reads it: the single template's leading and trailing special tokens stripped, then
/// `A <sep or eos> [<sep or eos>] B` (None: no pair template to read).
fn pair_sep(single: &[serde_json::Value], pair: &[serde_json::Value], sep: Option<String>, eos: Option<String>) -> Option<bool> {
    let special = |v: &serde_json::Value| v["SpecialToken"]["id"].as_str().map(str::to_string);
    let first = if single.len() > 1 { single.first().and_then(special) } else { None };
    let last = if single.len() > 1 { single.last().and_then(special) } else { None };
    if pair.is_empty() {
        return None;
    }
    let start = usize::from(first.is_some() && pair.first().and_then(special) == first);
    let stop = if last.is_some() && pair.last().and_then(special) == last { pair.len() - 1 } else { pair.len() };
    let pair = pair.get(start..stop).filter(|p| !p.is_empty())?;
    let seq = |v: &serde_json::Value| v["Sequence"]["id"].as_str().map(str::to_string);
    if seq(&pair[0]).as_deref() != Some("A") || seq(&pair[pair.len() - 1]).as_deref() != Some("B") {
        return None;
    }
    let middle = &pair[1..pair.len() - 1];
    if middle.is_empty() {
        return None;
    }
    let is_sep = |v: &serde_json::Value| special(v).is_some_and(|s| Some(&s) == sep.as_ref() || Some(&s) == eos.as_ref());
    let mut add_sep = is_sep(&middle[0]) && last.is_none();
    if middle.len() == 2 && is_sep(&middle[1]) {
        add_sep = true;
    }
    Some(add_sep)
}

/// The chat template a model directory carries, where SpecialVocab looks: tokenizer_config's
/// `chat_template`, else chat_template.jinja, else chat_template.json.
pub fn model_chat_template(dir: &Path) -> Result<Option<String>> {
    let tc = dir.join("tokenizer_config.json");
    if tc.is_file() {
        let v: serde_json::Value = read_json(&tc)?;
        if let Some(t) = v.get("chat_template").and_then(serde_json::Value::as_str) {
            return Ok(Some(t.to_string()));
        }
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return crate::error::read_to_string(&jinja).map(Some);
    }
    let json = dir.join("chat_template.json");
    if json.is_file() {
        let v: serde_json::Value = read_json(&json)?;
        return Ok(v.get("chat_template").and_then(serde_json::Value::as_str).map(str::to_string));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_in_both_forms() {
        let old = serde_json::json!(["a b", "ab c"]);
        assert_eq!(merges(&old).unwrap(), ["a b", "ab c"]);
        let new = serde_json::json!([["a", "b"], [" x", "y"]]);
        assert_eq!(merges(&new).unwrap(), ["a b", "\u{0120}x y"]);
    }

    #[test]
    fn probe_text_is_the_converters() {
        // len() and sha256 of the UTF-8 of convert_hf_to_gguf.py's chktxt, printed by Python.
        assert_eq!(CHKTXT.chars().count(), 350);
        let digest: String = Sha256::digest(CHKTXT.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(digest, "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da");
    }
}

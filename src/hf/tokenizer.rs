//! The model's tokenizer: `tokenizer.json` (a "fast" tokenizer, read with the `tokenizers`
//! crate), the special tokens of `tokenizer_config.json`, and the chat template.

use std::path::{Path, PathBuf};

use crate::error::{read_json, Error, Result};
use crate::hf::chat_template::ChatTemplate;

/// The byte range in the encoded text of each token, `(start, end)`.
pub type TokenOffsets = Vec<(usize, usize)>;

/// A Hugging Face tokenizer loaded from a model directory.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The `tokenizer.json` it was read from, for error messages.
    path: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("pad_token", &self.pad_token)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` (required) and `tokenizer_config.json` (optional: special tokens,
    /// chat template) from a model directory, and the chat template (`chat_template.jinja` or the
    /// config's `chat_template`).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::Tokenizer {
                path,
                msg: format!(
                    "not found: tune needs a tokenizer.json (a \"fast\" tokenizer) in {}; \
                     slow-tokenizer files (tokenizer.model, vocab.json + merges.txt) are not read. \
                     Convert it with transformers: \
                     AutoTokenizer.from_pretrained(dir).save_pretrained(dir)",
                    dir.display()
                ),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer { path: path.clone(), msg: format!("cannot load: {e}") })?;

        let config_path = dir.join("tokenizer_config.json");
        let config: Option<serde_json::Value> = if config_path.is_file() { Some(read_json(&config_path)?) } else { None };
        let special = |key: &str| -> Result<Option<String>> {
            match &config {
                Some(c) => special_token(c, key, &config_path),
                None => Ok(None),
            }
        };
        let bos_token = special("bos_token")?;
        let eos_token = special("eos_token")?;
        let pad_token = special("pad_token")?;
        let chat_template = ChatTemplate::from_model_dir_with_config(dir, config.as_ref(), bos_token.as_deref(), eos_token.as_deref())?;
        Ok(Tokenizer { inner, path, bos_token, eos_token, pad_token, chat_template })
    }

    /// The `tokenizer.json` this tokenizer was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text`. `add_special_tokens` applies tokenizer.json's post-processor (a BOS
    /// token for Llama-style tokenizers, nothing for most others).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, add_special_tokens).map_err(|e| self.error(format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` and each token's byte range in `text` (the `tokenizers` offsets:
    /// byte-level BPE trims a token's leading space from its range, and a token the
    /// post-processor adds has an empty range).
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<(Vec<u32>, TokenOffsets)> {
        let encoding = self.inner.encode(text, add_special_tokens).map_err(|e| self.error(format!("cannot encode text: {e}")))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// The text of `ids`; `skip_special_tokens` drops special tokens (BOS, EOS, chat markers).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| self.error(format!("cannot decode ids: {e}")))
    }

    /// For streaming output: given every id generated so far and how many bytes of their decoded
    /// text (special tokens skipped) were already printed, returns the text to print now and the
    /// new printed length.
    /// Nothing is returned while the text ends in U+FFFD (a multi-byte character split over
    /// tokens) or when the decoded prefix changed under what was printed.
    ///
    /// This decodes all `ids` on each call; [`DecodeStream`] does the same work in constant time
    /// per token.
    pub fn decode_incremental(&self, ids: &[u32], already_printed: usize) -> Result<(String, usize)> {
        let text = self.decode(ids, true)?;
        if text.ends_with('\u{FFFD}') {
            return Ok((String::new(), already_printed));
        }
        match text.get(already_printed..) {
            Some(new) => Ok((new.to_string(), text.len())),
            None => Ok((String::new(), already_printed)),
        }
    }

    /// A streaming decoder over this tokenizer.
    pub fn decode_stream(&self, skip_special_tokens: bool) -> DecodeStream<'_> {
        DecodeStream { tokenizer: self, skip_special_tokens, ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    /// The id of `token` (vocabulary or added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of `id`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// `bos_token` of tokenizer_config.json.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// `eos_token` of tokenizer_config.json.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// `pad_token` of tokenizer_config.json.
    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }

    /// The id of `bos_token`, if it is in the vocabulary.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token().and_then(|t| self.token_to_id(t))
    }

    /// The id of `eos_token`, if it is in the vocabulary.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token().and_then(|t| self.token_to_id(t))
    }

    /// The chat template, if the model directory has one (or one was set).
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The chat template, to fix its date ([`ChatTemplate::set_date`]).
    pub fn chat_template_mut(&mut self) -> Option<&mut ChatTemplate> {
        self.chat_template.as_mut()
    }

    /// Replaces the model's chat template with `source`, compiled with this tokenizer's special
    /// tokens. `origin` (a file, or a built-in's name) names the template in compile errors.
    pub fn set_chat_template(&mut self, source: &str, origin: &str) -> Result<()> {
        let template = ChatTemplate::new(source, self.bos_token(), self.eos_token()).map_err(|e| match e {
            Error::Template(msg) => Error::Template(format!("{origin}: {msg}")),
            e => e,
        })?;
        self.chat_template = Some(template);
        Ok(())
    }

    /// Uses the chat template saved with an adapter (`chat_template.jinja` in its directory)
    /// instead of the model's, when it has one; returns that file.
    pub fn use_adapter_chat_template(&mut self, adapter_dir: &Path) -> Result<Option<PathBuf>> {
        let Some((source, path)) = crate::hf::adapter_template::read(adapter_dir)? else {
            return Ok(None);
        };
        self.set_chat_template(&source, &path.display().to_string())?;
        Ok(Some(path))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn error(&self, msg: String) -> Error {
        Error::Tokenizer { path: self.path.clone(), msg }
    }
}

/// A special token of tokenizer_config.json: a string, an AddedToken dict `{"content": ...}`, or
/// null/absent.
fn special_token(config: &serde_json::Value, key: &str, path: &Path) -> Result<Option<String>> {
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Object(obj)) => match obj.get("content") {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::format(path, format!("`{key}` is an object without a string \"content\""))),
        },
        Some(_) => Err(Error::format(path, format!("`{key}` must be a string, {{\"content\": string}} or null"))),
    }
}

/// Streaming detokenization: feed ids one at a time, get the text that became printable.
///
/// Only a short window of ids is decoded per step (the approach of text-generation-inference):
/// the ids since the last printed chunk, with the chunk before them as context so that decoders
/// which depend on neighbours (leading spaces of SentencePiece, byte fallback) see them.
pub struct DecodeStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl DecodeStream<'_> {
    /// Adds `id`; returns the newly printable text, or `None` while it is incomplete.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = self.tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let text = self.tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') {
            if let Some(new) = text.get(prefix.len()..) {
                let new = new.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                return Ok(Some(new));
            }
        }
        Ok(None)
    }

    /// Every id fed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hf::chat_template::Message;

    /// A hand-written byte-fallback BPE: "hello", " ", "world", the bytes of "é", `<s>` added by
    /// the post-processor, and ChatML markers.
    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
    }

    fn tiny() -> Tokenizer {
        Tokenizer::from_model_dir(&fixture_dir()).unwrap()
    }

    use crate::fsutil::TempDir;

    fn tokenizer_json() -> String {
        std::fs::read_to_string(fixture_dir().join("tokenizer.json")).unwrap()
    }

    #[test]
    fn encode_and_decode() {
        let t = tiny();
        assert_eq!(t.encode("hello world", false).unwrap(), vec![16, 9, 20]);
        assert_eq!(t.encode("hello world", true).unwrap(), vec![1, 16, 9, 20]);
        assert_eq!(t.decode(&[1, 16, 9, 20], true).unwrap(), "hello world");
        assert_eq!(t.decode(&[1, 16, 9, 20], false).unwrap(), "<s>hello world");
        // Byte fallback: "é" is two byte tokens.
        assert_eq!(t.encode("é", false).unwrap(), vec![3, 4]);
        assert_eq!(t.decode(&[3, 4], true).unwrap(), "é");
        assert_eq!(t.decode(&[3], true).unwrap(), "\u{FFFD}");
        // Added special tokens are matched in the text.
        assert_eq!(t.encode("<|im_start|>hello<|im_end|>", false).unwrap(), vec![21, 16, 22]);
        assert_eq!(t.decode(&[21, 16, 22], true).unwrap(), "hello");
        assert_eq!(t.vocab_size(), 23);
        assert_eq!(t.token_to_id("world"), Some(20));
        assert_eq!(t.token_to_id("nope"), None);
        assert_eq!(t.id_to_token(16).as_deref(), Some("hello"));
        assert_eq!(t.path(), fixture_dir().join("tokenizer.json"));
    }

    #[test]
    fn special_tokens_from_config() {
        let t = tiny();
        // bos_token is a string, eos_token an AddedToken dict, pad_token null.
        assert_eq!(t.bos_token(), Some("<s>"));
        assert_eq!(t.eos_token(), Some("</s>"));
        assert_eq!(t.pad_token(), None);
        assert_eq!(t.bos_token_id(), Some(1));
        assert_eq!(t.eos_token_id(), Some(2));
    }

    #[test]
    fn chat_template_from_config() {
        let t = tiny();
        let template = t.chat_template().expect("the fixture has a chat template");
        let text = template.render(&[Message::new("user", " hello ")], true).unwrap();
        assert_eq!(text, "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n");
        // The markers are special tokens; letters outside the tiny vocabulary become <unk>.
        let unk = 0;
        let mut expected = vec![21, unk, unk, 6, 11, unk, 16, 22, unk, 21];
        expected.extend([unk; 10]); // "assistant\n"
        assert_eq!(t.encode(&text, false).unwrap(), expected);
    }

    #[test]
    fn missing_tokenizer_json_names_the_file() {
        let dir = TempDir::new("missing", &[("tokenizer_config.json", "{}")]);
        let err = Tokenizer::from_model_dir(&dir.0).unwrap_err();
        assert!(matches!(err, Error::Tokenizer { .. }), "{err:?}");
        let msg = err.to_string();
        let expected_path = dir.0.join("tokenizer.json");
        assert!(msg.contains(&expected_path.display().to_string()), "{msg}");
        assert!(msg.contains("fast"), "{msg}");
    }

    #[test]
    fn bad_tokenizer_json_names_the_file() {
        let dir = TempDir::new("bad", &[("tokenizer.json", "{\"model\": 3}")]);
        let msg = Tokenizer::from_model_dir(&dir.0).unwrap_err().to_string();
        assert!(msg.contains("tokenizer.json"), "{msg}");
    }

    #[test]
    fn tokenizer_config_is_optional() {
        let json = tokenizer_json();
        let dir = TempDir::new("no-config", &[("tokenizer.json", &json)]);
        let t = Tokenizer::from_model_dir(&dir.0).unwrap();
        assert_eq!(t.bos_token(), None);
        assert_eq!(t.eos_token(), None);
        assert!(t.chat_template().is_none());
        assert_eq!(t.encode("hello", true).unwrap(), vec![1, 16]);
    }

    #[test]
    fn bad_special_token_names_the_config() {
        let json = tokenizer_json();
        let dir = TempDir::new("bad-config", &[("tokenizer.json", &json), ("tokenizer_config.json", r#"{"eos_token": 7}"#)]);
        let msg = Tokenizer::from_model_dir(&dir.0).unwrap_err().to_string();
        assert!(msg.contains("tokenizer_config.json") && msg.contains("eos_token"), "{msg}");

        let dir = TempDir::new("bad-json", &[("tokenizer.json", &json), ("tokenizer_config.json", "{")]);
        let msg = Tokenizer::from_model_dir(&dir.0).unwrap_err().to_string();
        assert!(msg.contains("tokenizer_config.json"), "{msg}");
    }

    #[test]
    fn chat_template_jinja_is_preferred() {
        let json = tokenizer_json();
        let config = std::fs::read_to_string(fixture_dir().join("tokenizer_config.json")).unwrap();
        let dir = TempDir::new(
            "jinja",
            &[
                ("tokenizer.json", &json),
                ("tokenizer_config.json", &config),
                ("chat_template.jinja", "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"),
            ],
        );
        let t = Tokenizer::from_model_dir(&dir.0).unwrap();
        let text = t.chat_template().unwrap().render(&[Message::new("user", "hi")], false).unwrap();
        assert_eq!(text, "<s>hi</s>");
    }

    #[test]
    fn incremental_decoding_holds_back_split_characters() {
        let t = tiny();
        // "hello é world": the "é" arrives as two byte tokens.
        let ids = [1, 16, 9, 3, 4, 9, 20];
        let mut printed = 0;
        let mut pieces = Vec::new();
        for n in 1..=ids.len() {
            let (new, now) = t.decode_incremental(&ids[..n], printed).unwrap();
            printed = now;
            pieces.push(new);
        }
        assert_eq!(pieces, ["", "hello", " ", "", "é", " ", "world"]);
        assert_eq!(printed, "hello é world".len());

        let mut stream = t.decode_stream(true);
        let mut pieces = Vec::new();
        for id in ids {
            pieces.push(stream.step(id).unwrap());
        }
        assert_eq!(
            pieces,
            [
                None,
                Some("hello".to_string()),
                Some(" ".to_string()),
                None,
                Some("é".to_string()),
                Some(" ".to_string()),
                Some("world".to_string()),
            ]
        );
        assert_eq!(stream.ids(), ids);
    }
}

//! Records -> token ids with a loss mask, per format:
//!
//! - `text`   {"text"}: loss on every token.
//! - `alpaca` {"instruction", "input"?, "output"}: the Stanford Alpaca prompt, loss on the
//!   response only unless train_on_input.
//! - `chat`   {"messages": [{"role", "content"}, ...]}: the chat template, loss on the
//!   assistant turns only unless train_on_input.
//!
//! A conversation is rendered once and its text tokenized once (as `apply_chat_template`
//! tokenizes it), so its ids are exactly those of the whole rendering, whatever the tokenizer.
//! The assistant turns are byte ranges of that text: the `{% generation %}` blocks of a
//! template that has them (exactly what transformers' `return_assistant_tokens_mask` marks),
//! otherwise, per assistant message, from the end of the conversation before it rendered with
//! the generation prompt to the end of the conversation through it (the message's content and
//! what the template writes after it: its end-of-turn token and separator). A token is trained
//! when its character range overlaps a turn's range, transformers' rule: so a token that
//! straddles a boundary (a header's newline merged with a content's leading newline, say) is
//! trained, and a zero-width token only when it lies strictly inside a turn.

use std::ops::Range;
use std::path::Path;

use serde_json::Value;

use super::{json_kind, string_field, text_ids, Record};
use crate::error::{Error, Result};
use crate::hf::{ChatTemplate, Message, Tokenizer};
use crate::recipe::DataFormat;

/// One tokenized example. `trained[i]` says whether ids[i] is a label: the loss includes the
/// prediction of ids[i] from ids[..i].
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
}

impl Example {
    fn push(&mut self, ids: &[u32], trained: bool) {
        self.ids.extend_from_slice(ids);
        self.trained.extend(std::iter::repeat_n(trained, ids.len()));
    }

    /// Number of tokens whose prediction is in the loss (the first token is never predicted).
    pub fn label_count(&self) -> usize {
        self.trained.iter().skip(1).filter(|&&t| t).count()
    }
}

/// Options that shape examples.
#[derive(Debug, Clone, Copy)]
pub struct ExampleOptions {
    pub max_seq_len: usize,
    pub train_on_input: bool,
    pub add_eos: bool,
    pub eos: Option<u32>,
}

pub const ALPACA_PROMPT_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
pub const ALPACA_PROMPT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

/// The Alpaca prompt for an instruction and optional input.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        ALPACA_PROMPT.replace("{instruction}", instruction)
    } else {
        ALPACA_PROMPT_WITH_INPUT.replace("{instruction}", instruction).replace("{input}", input)
    }
}

/// The format of a file, from its first record's keys.
pub fn detect_format(path: &Path, first: &Record) -> Result<DataFormat> {
    let has = |k: &str| first.value.get(k).is_some();
    if has("messages") {
        Ok(DataFormat::Chat)
    } else if has("instruction") && has("output") {
        Ok(DataFormat::Alpaca)
    } else if has("text") {
        Ok(DataFormat::Text)
    } else {
        Err(Error::format(
            path,
            format!(
                "line {}: cannot tell the dataset format: expected a record with \"text\", \"instruction\"+\"output\", or \"messages\" (or set dataset.format)",
                first.line
            ),
        ))
    }
}

pub fn build_example(path: &Path, record: &Record, format: DataFormat, tokenizer: &Tokenizer, opts: ExampleOptions) -> Result<Example> {
    let mut ex = Example { ids: Vec::new(), trained: Vec::new() };
    match format {
        DataFormat::Text => {
            let text = string_field(path, record, "text")?;
            let ids = if opts.add_eos { text_ids(tokenizer, text, opts.eos)? } else { tokenizer.encode(text, true)? };
            ex.push(&ids, true);
        }
        DataFormat::Alpaca => {
            let instruction = string_field(path, record, "instruction")?;
            let input = match record.value.get("input") {
                None | Some(Value::Null) => "",
                Some(_) => string_field(path, record, "input")?,
            };
            let output = string_field(path, record, "output")?;
            let prompt = tokenizer.encode(&alpaca_prompt(instruction, input), true)?;
            let mut response = tokenizer.encode(output, false)?;
            if opts.add_eos {
                if let Some(eos) = opts.eos {
                    if response.last() != Some(&eos) {
                        response.push(eos);
                    }
                }
            }
            ex.push(&prompt, opts.train_on_input);
            ex.push(&response, true);
        }
        DataFormat::Chat => {
            let messages = chat_messages(path, record)?;
            let template = tokenizer.chat_template().ok_or_else(|| {
                Error::Model(format!(
                    "{}: chat data needs a chat template, and {} has none (set dataset.chat_template)",
                    path.display(),
                    tokenizer.path().display()
                ))
            })?;
            let (text, turns) = assistant_turns(template, &messages).map_err(|e| match e {
                Error::Template(msg) => Error::format(path, format!("line {}: chat template: {msg}", record.line)),
                e => e,
            })?;
            // The template already holds any special tokens, as with apply_chat_template.
            let (ids, offsets) = tokenizer.encode_with_offsets(&text, false)?;
            ex.ids = ids;
            ex.trained =
                offsets.iter().map(|&(start, end)| opts.train_on_input || turns.iter().any(|t| start < t.end && end > t.start)).collect();
        }
    }
    ex.ids.truncate(opts.max_seq_len);
    ex.trained.truncate(opts.max_seq_len);
    Ok(ex)
}

/// The rendered conversation and the byte ranges of its assistant turns (see the module doc).
pub fn assistant_turns(template: &ChatTemplate, messages: &[Message]) -> Result<(String, Vec<Range<usize>>)> {
    if template.has_generation_tags() {
        return template.render_with_generation(messages, false);
    }
    let full = template.render(messages, false)?;
    let mut turns = Vec::new();
    let mut done = 0usize;
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = template.render(&messages[..i], true)?;
        let through = template.render(&messages[..=i], false)?;
        if !full.starts_with(&before) || !full.starts_with(&through) || before.len() < done || through.len() < before.len() {
            return Err(Error::Template(
                "the chat template renders earlier turns differently once later turns follow, so assistant turns cannot be located; use train_on_input: true, or a template that marks them with {% generation %} tags".into(),
            ));
        }
        turns.push(before.len()..through.len());
        done = through.len();
    }
    Ok((full, turns))
}

fn chat_messages(path: &Path, record: &Record) -> Result<Vec<Message>> {
    let bad = |msg: String| Error::format(path, format!("line {}: {msg}", record.line));
    let list = match record.value.get("messages") {
        Some(Value::Array(list)) => list,
        Some(other) => return Err(bad(format!("`messages` must be an array, found {}", json_kind(other)))),
        None => return Err(bad("missing key `messages` (expected {\"messages\": [{\"role\", \"content\"}, ...]})".into())),
    };
    if list.is_empty() {
        return Err(bad("`messages` is empty".into()));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |k: &str| match m.get(k) {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(bad(format!("messages[{i}] needs string `role` and `content`"))),
            };
            Ok(Message { role: field("role")?, content: field("content")? })
        })
        .collect()
}

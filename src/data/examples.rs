//! Records -> token ids with a loss mask, per format:
//!
//! - `text`   {"text"}: loss on every token.
//! - `alpaca` {"instruction", "input"?, "output"}: the Stanford Alpaca prompt, loss on the
//!   response only unless train_on_input.
//! - `chat`   {"messages": [{"role", "content", ...}, ...], "tools"?}: the chat template, loss
//!   on the assistant turns only unless train_on_input.
//! - `sharegpt` {"conversations": [{"from", "value"}, ...], "system"?, "tools"?}: mapped to
//!   messages ([`sharegpt_role`]), then as `chat`.
//! - `prompt_completion` {"prompt", "completion"} (TRL): strings (the prompt's tokens are those
//!   of the prompt alone, as TRL counts them), or message lists (the prompt rendered with the
//!   generation prompt, the whole rendered once); loss on the completion only unless
//!   train_on_input.
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
    } else if has("conversations") {
        Ok(DataFormat::Sharegpt)
    } else if has("prompt") && has("completion") {
        Ok(DataFormat::PromptCompletion)
    } else if has("instruction") && has("output") {
        Ok(DataFormat::Alpaca)
    } else if has("text") {
        Ok(DataFormat::Text)
    } else {
        let keys: Vec<&str> = first.value.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
        Err(Error::format(
            path,
            format!(
                "{}: cannot tell the dataset format from its keys ({}): expected \"messages\" (chat), \"conversations\" (sharegpt), \"prompt\"+\"completion\" (prompt_completion), \"instruction\"+\"output\" (alpaca) or \"text\" (or set dataset.format)",
                first.at(),
                if keys.is_empty() { "none".to_string() } else { keys.join(", ") }
            ),
        ))
    }
}

/// Whether the format renders through the chat template (for `prompt_completion`, only when its
/// fields are message lists, which `first` tells).
pub fn uses_chat_template(format: DataFormat, first: &Record) -> bool {
    match format {
        DataFormat::Chat | DataFormat::Sharegpt => true,
        DataFormat::PromptCompletion => first.value.get("prompt").is_some_and(Value::is_array),
        DataFormat::Text | DataFormat::Alpaca => false,
    }
}

/// The example of a record, truncated to `opts.max_seq_len`.
pub fn build_example(path: &Path, record: &Record, format: DataFormat, tokenizer: &Tokenizer, opts: ExampleOptions) -> Result<Example> {
    let mut ex = build_full_example(path, record, format, tokenizer, opts)?;
    ex.ids.truncate(opts.max_seq_len);
    ex.trained.truncate(opts.max_seq_len);
    Ok(ex)
}

/// The example of a record, before truncation.
pub fn build_full_example(
    path: &Path,
    record: &Record,
    format: DataFormat,
    tokenizer: &Tokenizer,
    opts: ExampleOptions,
) -> Result<Example> {
    let mut ex = Example { ids: Vec::new(), trained: Vec::new() };
    let push_eos = |ids: &mut Vec<u32>| {
        if let (true, Some(eos)) = (opts.add_eos, opts.eos) {
            if ids.last() != Some(&eos) {
                ids.push(eos);
            }
        }
    };
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
            push_eos(&mut response);
            ex.push(&prompt, opts.train_on_input);
            ex.push(&response, true);
        }
        DataFormat::Chat | DataFormat::Sharegpt => {
            let (messages, tools) = if format == DataFormat::Chat {
                (chat_messages(path, record, "messages")?, tools_field(path, record)?)
            } else {
                sharegpt_messages(path, record)?
            };
            let template = template_of(path, tokenizer)?;
            let (text, turns) = assistant_turns_tools(template, &messages, tools.as_ref()).map_err(|e| in_record(path, record, e))?;
            // The template already holds any special tokens, as with apply_chat_template.
            let (ids, offsets) = tokenizer.encode_with_offsets(&text, false)?;
            ex.ids = ids;
            ex.trained =
                offsets.iter().map(|&(start, end)| opts.train_on_input || turns.iter().any(|t| start < t.end && end > t.start)).collect();
        }
        DataFormat::PromptCompletion => match (record.value.get("prompt"), record.value.get("completion")) {
            (Some(Value::String(prompt)), Some(Value::String(completion))) => {
                // TRL's rule: the prompt's tokens are those of the prompt tokenized alone, the
                // rest of prompt + completion (tokenized once) is the completion.
                let prompt_len = tokenizer.encode(prompt, true)?.len();
                let mut ids = tokenizer.encode(&format!("{prompt}{completion}"), true)?;
                push_eos(&mut ids);
                ex.trained = (0..ids.len()).map(|i| opts.train_on_input || i >= prompt_len).collect();
                ex.ids = ids;
            }
            (Some(Value::Array(_)), Some(Value::Array(_))) => {
                let prompt = chat_messages(path, record, "prompt")?;
                let completion = chat_messages(path, record, "completion")?;
                let tools = tools_field(path, record)?;
                let template = template_of(path, tokenizer)?;
                let render = |messages: &[Message], agp: bool| {
                    template.render_tools(messages, tools.as_ref(), agp).map_err(|e| in_record(path, record, e))
                };
                let before = render(&prompt, true)?;
                let whole: Vec<Message> = prompt.iter().chain(&completion).cloned().collect();
                let text = render(&whole, false)?;
                if !text.starts_with(&before) {
                    return Err(Error::format(
                        path,
                        format!("{}: the chat template renders the prompt differently once the completion follows, so the completion cannot be located; use train_on_input: true", record.at()),
                    ));
                }
                let (ids, offsets) = tokenizer.encode_with_offsets(&text, false)?;
                ex.ids = ids;
                ex.trained = offsets.iter().map(|&(_, end)| opts.train_on_input || end > before.len()).collect();
            }
            (p, c) => {
                let kind = |v: Option<&Value>| v.map_or("missing", json_kind);
                return Err(Error::format(
                    path,
                    format!(
                        "{}: `prompt` and `completion` must both be strings or both be lists of messages, found {} and {}",
                        record.at(),
                        kind(p),
                        kind(c)
                    ),
                ));
            }
        },
    }
    Ok(ex)
}

/// The tokenizer's chat template, or an error saying chat data needs one.
fn template_of<'a>(path: &Path, tokenizer: &'a Tokenizer) -> Result<&'a ChatTemplate> {
    tokenizer.chat_template().ok_or_else(|| {
        Error::Model(format!(
            "{}: chat data needs a chat template, and {} has none (set dataset.chat_template)",
            path.display(),
            tokenizer.path().display()
        ))
    })
}

/// A template error as a format error naming the file and record.
fn in_record(path: &Path, record: &Record, e: Error) -> Error {
    match e {
        Error::Template(msg) => Error::format(path, format!("{}: chat template: {msg}", record.at())),
        e => e,
    }
}

/// The rendered conversation and the byte ranges of its assistant turns (see the module doc).
pub fn assistant_turns(template: &ChatTemplate, messages: &[Message]) -> Result<(String, Vec<Range<usize>>)> {
    assistant_turns_tools(template, messages, None)
}

/// As [`assistant_turns`], with `tools` passed to the template.
pub fn assistant_turns_tools(template: &ChatTemplate, messages: &[Message], tools: Option<&Value>) -> Result<(String, Vec<Range<usize>>)> {
    if template.has_generation_tags() {
        return template.render_with_generation_tools(messages, tools, false);
    }
    let full = template.render_tools(messages, tools, false)?;
    let mut turns = Vec::new();
    let mut done = 0usize;
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = template.render_tools(&messages[..i], tools, true)?;
        let through = template.render_tools(&messages[..=i], tools, false)?;
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

/// The record's `tools`: a list of tool schemas, or a string holding one as JSON (as
/// LLaMA-Factory stores it); absent, null or an empty string is none.
fn tools_field(path: &Path, record: &Record) -> Result<Option<Value>> {
    let bad = |msg: String| Error::format(path, format!("{}: `tools` {msg}", record.at()));
    match record.value.get("tools") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(list)) if list.is_empty() => Ok(None),
        Some(v @ Value::Array(_)) => Ok(Some(v.clone())),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Array(_)) => Ok(Some(v)),
            Ok(other) => Err(bad(format!("is a string holding {}, expected a JSON list of tool schemas", json_kind(&other)))),
            Err(e) => Err(bad(format!("is a string but not JSON ({e}); expected a list of tool schemas"))),
        },
        Some(other) => Err(bad(format!("must be a list of tool schemas, found {}", json_kind(other)))),
    }
}

/// The message list under `key`: objects with a string `role` and a string (or null or absent:
/// empty) `content`; their other keys are kept for the template.
fn chat_messages(path: &Path, record: &Record, key: &str) -> Result<Vec<Message>> {
    let bad = |msg: String| Error::format(path, format!("{}: {msg}", record.at()));
    let list = match record.value.get(key) {
        Some(Value::Array(list)) => list,
        Some(other) => return Err(bad(format!("`{key}` must be an array, found {}", json_kind(other)))),
        None => return Err(bad(format!("missing key `{key}` (expected {{\"{key}\": [{{\"role\", \"content\"}}, ...]}})"))),
    };
    if list.is_empty() {
        return Err(bad(format!("`{key}` is empty")));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let Value::Object(fields) = m else {
                return Err(bad(format!("{key}[{i}] must be an object {{\"role\", \"content\"}}, found {}", json_kind(m))));
            };
            let role = match fields.get("role") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => return Err(bad(format!("{key}[{i}].role must be a string, found {}", json_kind(other)))),
                None => return Err(bad(format!("{key}[{i}] needs string `role` and `content`"))),
            };
            let content = match fields.get("content") {
                Some(Value::String(s)) => s.clone(),
                // An assistant turn that only calls tools has a null content (OpenAI's form).
                None | Some(Value::Null) if fields.contains_key("tool_calls") => String::new(),
                Some(Value::Null) => String::new(),
                None => return Err(bad(format!("{key}[{i}] needs string `role` and `content`"))),
                Some(other) => {
                    return Err(bad(format!(
                        "{key}[{i}].content must be a string, found {} (lists of content parts are not read)",
                        json_kind(other)
                    )))
                }
            };
            let extra = fields.iter().filter(|(k, _)| *k != "role" && *k != "content").map(|(k, v)| (k.clone(), v.clone())).collect();
            Ok(Message { role, content, extra })
        })
        .collect()
}

/// The ShareGPT `from` values tune reads and the role each becomes: axolotl's default
/// mapping (`human`/`user`, `gpt`/`assistant`, `system`, `tool`).
pub const SHAREGPT_ROLES: &[(&str, &str)] =
    &[("human", "user"), ("user", "user"), ("gpt", "assistant"), ("assistant", "assistant"), ("system", "system"), ("tool", "tool")];

/// The chat role of a ShareGPT `from` value.
pub fn sharegpt_role(from: &str) -> Option<&'static str> {
    SHAREGPT_ROLES.iter().find(|(f, _)| *f == from).map(|(_, r)| *r)
}

/// A ShareGPT record as messages and tools: `conversations` of `{"from", "value"}` (or
/// `{"role", "content"}`), the record's `system` as a first system turn unless the
/// conversation has one.
fn sharegpt_messages(path: &Path, record: &Record) -> Result<(Vec<Message>, Option<Value>)> {
    let bad = |msg: String| Error::format(path, format!("{}: {msg}", record.at()));
    let list = match record.value.get("conversations") {
        Some(Value::Array(list)) => list,
        Some(other) => return Err(bad(format!("`conversations` must be an array, found {}", json_kind(other)))),
        None => return Err(bad("missing key `conversations` (expected {\"conversations\": [{\"from\", \"value\"}, ...]})".into())),
    };
    if list.is_empty() {
        return Err(bad("`conversations` is empty".into()));
    }
    let allowed = || SHAREGPT_ROLES.iter().map(|(f, _)| *f).collect::<Vec<_>>().join(", ");
    let mut messages = Vec::with_capacity(list.len() + 1);
    for (i, turn) in list.iter().enumerate() {
        let (role_key, content_key) =
            if turn.get("from").is_none() && turn.get("role").is_some() { ("role", "content") } else { ("from", "value") };
        let from = match turn.get(role_key) {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => return Err(bad(format!("conversations[{i}].{role_key} must be a string, found {}", json_kind(other)))),
            None => return Err(bad(format!("conversations[{i}] needs string `from` and `value`"))),
        };
        let role = sharegpt_role(from)
            .ok_or_else(|| bad(format!("conversations[{i}].{role_key}: unknown role {from:?} (expected one of {})", allowed())))?;
        let value = match turn.get(content_key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) => String::new(),
            Some(other) => return Err(bad(format!("conversations[{i}].{content_key} must be a string, found {}", json_kind(other)))),
            None => return Err(bad(format!("conversations[{i}] needs string `from` and `value`"))),
        };
        messages.push(Message::new(role, value));
    }
    match record.value.get("system") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() || messages[0].role == "system" => {}
        Some(Value::String(s)) => messages.insert(0, Message::new("system", s.clone())),
        Some(other) => return Err(bad(format!("`system` must be a string, found {}", json_kind(other)))),
    }
    Ok((messages, tools_field(path, record)?))
}

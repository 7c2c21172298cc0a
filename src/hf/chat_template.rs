//! Hugging Face chat templates (Jinja2), rendered with minijinja the way transformers'
//! `apply_chat_template(tokenize=False)` renders them.
//!
//! transformers compiles the template in an `ImmutableSandboxedEnvironment` with
//! `trim_blocks=True, lstrip_blocks=True` (and `keep_trailing_newline=False`), the `loopcontrols`
//! extension and its own `{% generation %}` tag; it adds the globals `raise_exception` and
//! `strftime_now`, replaces `tojson` with `json.dumps(ensure_ascii=False)`, and renders with
//! `messages`, `tools=None`, `documents=None`, `add_generation_prompt` and the tokenizer's special
//! tokens. Python's string and dict methods (`.strip()`, `.split()`, `.items()`, ...) come from
//! minijinja-contrib's pycompat layer, and values print as Python prints them (`None`, `True`).
//!
//! Two differences are deliberate: `strftime_now` formats a fixed date when one is set
//! ([`ChatTemplate::set_date`], so a training run renders the same text every day), and
//! [`ChatTemplate::render_with_generation`] reports where each `{% generation %}` block's output
//! lies in the text (transformers' `return_assistant_tokens_mask` needs the same positions).

use std::fmt::Write as _;
use std::ops::Range;
use std::path::Path;

use minijinja::value::{Kwargs, Rest, ValueKind};
use minijinja::{Environment, ErrorKind, State, UndefinedBehavior, Value};

use crate::error::{read_json, read_to_string, Error, Result};

/// One chat turn, as in transformers' list of `{"role": ..., "content": ...}` dicts.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// The message's other keys, which the template sees as they are: an assistant's
    /// `tool_calls`, a tool reply's `name` or `tool_call_id`, ...
    #[serde(flatten, default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into(), extra: serde_json::Map::new() }
    }
}

/// The name the template is registered under; it has no extension, so nothing is auto-escaped.
const TEMPLATE_NAME: &str = "chat_template";

/// ChatML as transformers defines it (its former default chat template, and the format its chat
/// templating guide recommends for new models): `<|im_start|>{role}\n{content}<|im_end|>\n` per
/// message, and `<|im_start|>assistant\n` as the generation prompt.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The templates `dataset.chat_template` can name, as (name, Jinja source).
pub const BUILTIN_TEMPLATES: &[(&str, &str)] = &[("chatml", CHATML)];

/// The source of a built-in template.
pub fn builtin(name: &str) -> Option<&'static str> {
    BUILTIN_TEMPLATES.iter().find(|(n, _)| *n == name).map(|(_, source)| *source)
}

/// A calendar date (UTC) for `strftime_now`, which then formats midnight UTC of that day.
/// Written as `YYYY-MM-DD`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChatDate {
    /// Days since 1970-01-01.
    days: i64,
}

impl ChatDate {
    /// Today's date in UTC.
    pub fn today() -> Self {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        ChatDate { days: secs.div_euclid(86_400) }
    }

    pub fn from_ymd(year: i64, month: u32, day: u32) -> Option<Self> {
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return None;
        }
        Some(ChatDate { days: days_from_civil(year, month, day) })
    }

    /// Seconds since the Unix epoch at midnight UTC of this date.
    pub fn unix_seconds(self) -> i64 {
        self.days * 86_400
    }
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

impl std::fmt::Display for ChatDate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (y, m, d) = civil_from_days(self.days);
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

impl std::str::FromStr for ChatDate {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("`{s}` is not a date (expected YYYY-MM-DD)");
        let mut parts = s.splitn(3, '-');
        let (Some(y), Some(m), Some(d)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        if y.len() != 4 || m.len() != 2 || d.len() != 2 {
            return Err(bad());
        }
        let num = |t: &str| t.parse::<u32>().map_err(|_| bad());
        ChatDate::from_ymd(num(y)? as i64, num(m)?, num(d)?).ok_or_else(bad)
    }
}

impl serde::Serialize for ChatDate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ChatDate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The context variable that carries a fixed `strftime_now` time (Unix seconds) into a render.
const NOW_VAR: &str = "__tune_strftime_now";
/// Set (to true) in a render that reports generation blocks.
const TRACK_VAR: &str = "__tune_track_generation";
/// The filter a `{% generation %}` block becomes.
const GENERATION_FILTER: &str = "__tune_generation";
/// What marks the start and end of a generation block's output while tracking: Unicode
/// noncharacters, which are reserved for a program's internal use and never meant to appear in
/// text.
const GENERATION_START: char = '\u{FDD0}';
const GENERATION_END: char = '\u{FDD1}';

/// A compiled chat template with the tokens it renders with.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    date: Option<ChatDate>,
    has_generation: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("date", &self.date)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`. A template that does not compile is an `Error::Template` with
    /// minijinja's message (which names the line).
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, _state, value| {
            if !value.is_undefined() {
                let mut s = String::new();
                py_str(&mut s, value);
                out.write_str(&s)?;
            }
            Ok(())
        });
        env.add_filter("tojson", tojson_filter);
        env.add_filter("string", |value: &Value| {
            let mut s = String::new();
            py_str(&mut s, value);
            s
        });
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter(GENERATION_FILTER, generation_filter);
        let (rewritten, has_generation) = rewrite_generation_tags(source);
        env.add_template_owned(TEMPLATE_NAME, rewritten).map_err(template_error)?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
            date: None,
            has_generation,
        })
    }

    /// Makes `strftime_now` format midnight UTC of `date` instead of the current time (`None`:
    /// the current time, as transformers does).
    pub fn set_date(&mut self, date: Option<ChatDate>) {
        self.date = date;
    }

    /// The date `strftime_now` formats, when fixed.
    pub fn date(&self) -> Option<ChatDate> {
        self.date
    }

    /// Whether the template uses transformers' `{% generation %}` tags.
    pub fn has_generation_tags(&self) -> bool {
        self.has_generation
    }

    /// The chat template of a model directory: `chat_template.jinja` if present, else
    /// `tokenizer_config.json`'s `chat_template` (a string, or a list of `{"name", "template"}`
    /// of which the one named "default" is taken). `Ok(None)` when the directory has none.
    pub fn from_model_dir(dir: &Path, bos: Option<&str>, eos: Option<&str>) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Option<serde_json::Value> = if config_path.is_file() { Some(read_json(&config_path)?) } else { None };
        Self::from_model_dir_with_config(dir, config.as_ref(), bos, eos)
    }

    /// As [`ChatTemplate::from_model_dir`], with `tokenizer_config.json` already parsed.
    pub(crate) fn from_model_dir_with_config(
        dir: &Path,
        config: Option<&serde_json::Value>,
        bos: Option<&str>,
        eos: Option<&str>,
    ) -> Result<Option<Self>> {
        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.is_file() {
            let source = read_to_string(&jinja_path)?;
            return Self::new(&source, bos, eos).map(Some).map_err(|e| in_file(&jinja_path, e));
        }
        let config_path = dir.join("tokenizer_config.json");
        let Some(value) = config.and_then(|c| c.get("chat_template")) else {
            return Ok(None);
        };
        let source = match value {
            serde_json::Value::Null => return Ok(None),
            serde_json::Value::String(s) => s.as_str(),
            serde_json::Value::Array(list) => {
                let mut default = None;
                for entry in list {
                    let name = entry.get("name").and_then(|n| n.as_str());
                    let template = entry.get("template").and_then(|t| t.as_str());
                    match (name, template) {
                        (Some(name), Some(template)) => {
                            if name == "default" {
                                default = Some(template);
                            }
                        }
                        _ => {
                            return Err(Error::format(
                                &config_path,
                                "`chat_template` is a list whose entries must be {\"name\": string, \"template\": string}",
                            ))
                        }
                    }
                }
                match default {
                    Some(t) => t,
                    None => {
                        let names: Vec<&str> = list.iter().filter_map(|e| e.get("name").and_then(|n| n.as_str())).collect();
                        return Err(Error::format(
                            &config_path,
                            format!("`chat_template` lists several templates ({}) but none is named \"default\"", names.join(", ")),
                        ));
                    }
                }
            }
            _ => return Err(Error::format(&config_path, "`chat_template` must be a string or a list of {\"name\", \"template\"}")),
        };
        Self::new(source, bos, eos).map(Some).map_err(|e| in_file(&config_path, e))
    }

    /// The template's source as written in the model directory.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` does. `raise_exception(msg)` in the template becomes an
    /// `Error::Template` holding `msg`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_ctx(messages, None, add_generation_prompt, false)
    }

    /// As [`ChatTemplate::render`], with `tools` (the JSON list of tool schemas that
    /// `apply_chat_template(tools=...)` takes) in the template's `tools` instead of None.
    pub fn render_tools(&self, messages: &[Message], tools: Option<&serde_json::Value>, add_generation_prompt: bool) -> Result<String> {
        self.render_ctx(messages, tools, add_generation_prompt, false)
    }

    /// Renders as [`ChatTemplate::render`] does, and returns the byte ranges of the text that
    /// `{% generation %}` blocks produced, in the order the blocks ended (as transformers
    /// records them). Their output must reach the text unchanged: a block whose output is
    /// captured and altered (by `{% set %}...{% endset %}` and a filter, say) is an error.
    pub fn render_with_generation(&self, messages: &[Message], add_generation_prompt: bool) -> Result<(String, Vec<Range<usize>>)> {
        self.render_with_generation_tools(messages, None, add_generation_prompt)
    }

    /// As [`ChatTemplate::render_with_generation`], with `tools` as in [`ChatTemplate::render_tools`].
    pub fn render_with_generation_tools(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<Range<usize>>)> {
        let plain = self.render_ctx(messages, tools, add_generation_prompt, false)?;
        if !self.has_generation {
            return Ok((plain, Vec::new()));
        }
        let is_marker = |c: char| c == GENERATION_START || c == GENERATION_END;
        if messages.iter().any(|m| m.content.contains(is_marker) || m.role.contains(is_marker)) {
            return Err(Error::Template(
                "a message holds U+FDD0 or U+FDD1, the noncharacters that mark {% generation %} blocks while rendering".into(),
            ));
        }
        let marked = self.render_ctx(messages, tools, add_generation_prompt, true)?;
        let mut text = String::with_capacity(marked.len());
        let mut open = Vec::new();
        let mut spans = Vec::new();
        for c in marked.chars() {
            match c {
                GENERATION_START => open.push(text.len()),
                GENERATION_END => match open.pop() {
                    Some(start) => spans.push(start..text.len()),
                    None => open.push(usize::MAX),
                },
                c => text.push(c),
            }
        }
        if !open.is_empty() || text != plain {
            return Err(Error::Template(
                "the template alters the output of its {% generation %} blocks after rendering them (captured with set or a filter block), so the generated text cannot be located".into(),
            ));
        }
        Ok((text, spans))
    }

    fn render_ctx(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        track_generation: bool,
    ) -> Result<String> {
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", Value::from_serialize(messages)),
            ("tools", tools.map_or(Value::from(()), Value::from_serialize)),
            ("documents", Value::from(())),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ];
        // transformers passes only the special tokens the tokenizer has; a missing one stays
        // undefined rather than None.
        if let Some(bos) = &self.bos_token {
            ctx.push(("bos_token", Value::from(bos.as_str())));
        }
        if let Some(eos) = &self.eos_token {
            ctx.push(("eos_token", Value::from(eos.as_str())));
        }
        if let Some(date) = self.date {
            ctx.push((NOW_VAR, Value::from(date.unix_seconds())));
        }
        if track_generation {
            ctx.push((TRACK_VAR, Value::from(true)));
        }
        let ctx: Value = ctx.into_iter().collect();
        let template = self.env.get_template(TEMPLATE_NAME).map_err(template_error)?;
        template.render(ctx).map_err(template_error)
    }
}

fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Template(msg) => Error::Template(format!("{}: {msg}", path.display())),
        e => e,
    }
}

/// The message a template passed to `raise_exception`, carried as the minijinja error's source.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, "raise_exception").with_source(RaisedException(msg)))
}

fn template_error(e: minijinja::Error) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if let Some(raised) = err.downcast_ref::<RaisedException>() {
            return Error::Template(raised.0.clone());
        }
        source = err.source();
    }
    Error::Template(e.to_string())
}

/// transformers' `{% generation %}...{% endgeneration %}` marks assistant text for
/// `return_assistant_tokens_mask`; it renders its body unchanged. minijinja has no custom tags,
/// so the tags become a filter block, `{% filter __tune_generation %}` / `{% endfilter %}`,
/// keeping their whitespace control (both are block tags, so trim_blocks and lstrip_blocks treat
/// them alike). The filter returns the body, between markers when a render tracks the blocks.
/// Returns the rewritten source and whether it had any generation tag.
fn rewrite_generation_tags(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        if let Some((len, replacement)) = generation_tag(tag) {
            out.push_str(&replacement);
            rest = &tag[len..];
            found = true;
        } else {
            out.push_str("{%");
            rest = &tag[2..];
        }
    }
    out.push_str(rest);
    (out, found)
}

/// The body of a generation block: unchanged, or between the markers when tracking.
fn generation_filter(state: &State, body: String) -> String {
    if state.lookup(TRACK_VAR).is_some_and(|v| v.is_true()) {
        format!("{GENERATION_START}{body}{GENERATION_END}")
    } else {
        body
    }
}

/// If `tag` starts with `{% generation %}` or `{% endgeneration %}` (with any `-`/`+` markers),
/// its length and the equivalent filter-block tag.
fn generation_tag(tag: &str) -> Option<(usize, String)> {
    let mut i = 2;
    let bytes = tag.as_bytes();
    let open_marker = match bytes.get(i) {
        Some(b'-') | Some(b'+') => {
            i += 1;
            &tag[i - 1..i]
        }
        _ => "",
    };
    while bytes.get(i).is_some_and(|b| b.is_ascii_whitespace()) {
        i += 1;
    }
    let word_start = i;
    while bytes.get(i).is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_') {
        i += 1;
    }
    let word = &tag[word_start..i];
    let body = match word {
        "generation" => "filter __tune_generation",
        "endgeneration" => "endfilter",
        _ => return None,
    };
    while bytes.get(i).is_some_and(|b| b.is_ascii_whitespace()) {
        i += 1;
    }
    let close_marker = match bytes.get(i) {
        Some(b'-') | Some(b'+') => {
            i += 1;
            &tag[i - 1..i]
        }
        _ => "",
    };
    if !tag[i..].starts_with("%}") {
        return None;
    }
    Some((i + 2, format!("{{%{open_marker} {body} {close_marker}%}}")))
}

// ---------------------------------------------------------------------------------------------
// Python-like printing

/// Appends `str(value)` as Python prints it: `None`, `True`, `1.0`, `['a', 1]`, `{'k': 'v'}`.
fn py_str(out: &mut String, value: &Value) {
    match value.kind() {
        ValueKind::String => out.push_str(value.as_str().unwrap_or_default()),
        _ => py_repr(out, value),
    }
}

/// Appends `repr(value)` as Python writes it.
fn py_repr(out: &mut String, value: &Value) {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => {
            if value.is_integer() {
                let _ = write!(out, "{value}");
            } else {
                match f64::try_from(value.clone()) {
                    Ok(f) if f.is_nan() => out.push_str("nan"),
                    Ok(f) if f.is_infinite() => out.push_str(if f > 0.0 { "inf" } else { "-inf" }),
                    Ok(f) => out.push_str(&py_float(f)),
                    Err(_) => {
                        let _ = write!(out, "{value}");
                    }
                }
            }
        }
        ValueKind::String => py_str_repr(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            if let Ok(iter) = value.try_iter() {
                for (i, item) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(out, &item);
                }
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, (k, v)) in map_pairs(value).into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(out, &k);
                out.push_str(": ");
                py_repr(out, &v);
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
}

fn map_pairs(value: &Value) -> Vec<(Value, Value)> {
    if let Some(obj) = value.as_object() {
        if let Some(pairs) = obj.try_iter_pairs() {
            return pairs.collect();
        }
    }
    match value.try_iter() {
        Ok(keys) => keys
            .map(|k| {
                let v = value.get_item(&k).unwrap_or_default();
                (k, v)
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Python's `repr` of a string: single quotes unless the string holds `'` and no `"`.
fn py_str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `repr(float)`: shortest round-trip digits, positional for exponents in [-4, 16),
/// scientific (`1e-05`, `1e+16`) otherwise, and always a `.0` on integral values.
fn py_float(f: f64) -> String {
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut out = String::from(sign);
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.extend(std::iter::repeat_n('0', int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.unsigned_abs());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// tojson = json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)

struct JsonOptions {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn tojson_filter(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > names.len() {
        return Err(minijinja::Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments (ensure_ascii, indent, separators, sort_keys)",
        ));
    }
    let mut params: [Option<Value>; 4] = Default::default();
    for (slot, v) in params.iter_mut().zip(args.iter()) {
        *slot = Some(v.clone());
    }
    for (slot, name) in params.iter_mut().zip(names) {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            *slot = Some(v);
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = params;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => match v.as_i64() {
                Some(n) => Some(" ".repeat(n.max(0) as usize)),
                None => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an integer or a string")),
            },
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    (a.as_str().unwrap_or_default().to_string(), b.as_str().unwrap_or_default().to_string())
                }
                _ => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair of strings")),
            }
        }
        _ => (if indent.is_some() { "," } else { ", " }.to_string(), ": ".to_string()),
    };
    let opts = JsonOptions {
        ensure_ascii: ensure_ascii.is_some_and(|v| v.is_true()),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.is_some_and(|v| v.is_true()),
    };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(Value::from(out))
}

fn write_json(out: &mut String, value: &Value, opts: &JsonOptions, depth: usize) -> std::result::Result<(), minijinja::Error> {
    if depth > 500 {
        return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: value nested too deeply"));
    }
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                let _ = write!(out, "{value}");
            } else {
                let f = f64::try_from(value.clone())?;
                if f.is_nan() {
                    out.push_str("NaN");
                } else if f.is_infinite() {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                } else {
                    out.push_str(&py_float(f));
                }
            }
        }
        ValueKind::String => json_string(out, value.as_str().unwrap_or_default(), opts.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(out, opts, depth + 1);
                write_json(out, item, opts, depth + 1)?;
            }
            newline_indent(out, opts, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut pairs: Vec<(String, Value)> = Vec::new();
            for (k, v) in map_pairs(value) {
                pairs.push((json_key(&k)?, v));
            }
            if pairs.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if opts.sort_keys {
                pairs.sort_by(|a, b| a.0.cmp(&b.0));
            }
            out.push('{');
            for (i, (k, v)) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(out, opts, depth + 1);
                json_string(out, k, opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                write_json(out, v, opts, depth + 1)?;
            }
            newline_indent(out, opts, depth);
            out.push('}');
        }
        kind => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: Object of type {kind} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

/// A dict key as json.dumps writes it: strings as they are, numbers, booleans and None converted.
fn json_key(key: &Value) -> std::result::Result<String, minijinja::Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".to_string(),
        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_string(),
        ValueKind::Number => {
            let mut s = String::new();
            write_json(&mut s, key, &JSON_KEY_OPTS, 0)?;
            s
        }
        kind => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
            ))
        }
    })
}

const JSON_KEY_OPTS: JsonOptions =
    JsonOptions { ensure_ascii: false, indent: None, item_sep: String::new(), key_sep: String::new(), sort_keys: false };

fn newline_indent(out: &mut String, opts: &JsonOptions, depth: usize) {
    if let Some(indent) = &opts.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(indent);
        }
    }
}

/// A JSON string as Python's json module writes it.
fn json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------------------------------------
// strftime_now

/// `datetime.now().strftime(format)`, in UTC; midnight UTC of the template's date when one is
/// set ([`ChatTemplate::set_date`]).
fn strftime_now(state: &State, format: String) -> String {
    let fixed = state.lookup(NOW_VAR).and_then(|v| v.as_i64());
    let secs = fixed
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0));
    strftime(&format, secs)
}

const MONTHS: [&str; 12] =
    ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
const WEEKDAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];

/// Formats a Unix time (UTC) with the C `strftime` directives templates use.
fn strftime(format: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // glibc's `%-d` drops the padding.
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let num = |out: &mut String, v: i64, width: usize| {
            if unpadded {
                let _ = write!(out, "{v}");
            } else {
                let _ = write!(out, "{v:0width$}");
            }
        };
        match d {
            'Y' => {
                let _ = write!(out, "{year}");
            }
            'y' => num(&mut out, year.rem_euclid(100), 2),
            'm' => num(&mut out, month as i64, 2),
            'd' => num(&mut out, day as i64, 2),
            'e' => {
                let _ = write!(out, "{day:2}");
            }
            'H' => num(&mut out, hour, 2),
            'I' => num(&mut out, hour12, 2),
            'M' => num(&mut out, minute, 2),
            'S' => num(&mut out, second, 2),
            'j' => num(&mut out, yday, 3),
            'p' => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            'B' => out.push_str(MONTHS[month as usize - 1]),
            'b' | 'h' => out.push_str(&MONTHS[month as usize - 1][..3]),
            'A' => out.push_str(WEEKDAYS[weekday]),
            'a' => out.push_str(&WEEKDAYS[weekday][..3]),
            'w' => {
                let _ = write!(out, "{weekday}");
            }
            'F' => {
                let _ = write!(out, "{year}-{month:02}-{day:02}");
            }
            'T' => {
                let _ = write!(out, "{hour:02}:{minute:02}:{second:02}");
            }
            'Z' => out.push_str("UTC"),
            'z' => out.push_str("+0000"),
            '%' => out.push('%'),
            other => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    out
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = month as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct FixtureTemplate {
        name: String,
        template: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
        cases: Vec<FixtureCase>,
    }

    #[derive(serde::Deserialize)]
    struct FixtureCase {
        messages: Vec<Message>,
        add_generation_prompt: bool,
        expected: Option<String>,
        error: Option<String>,
    }

    /// Renders every case of a fixture file; returns one message per failure.
    fn check_fixture(path: &Path) -> (usize, Vec<String>) {
        let templates: Vec<FixtureTemplate> = read_json(path).unwrap();
        let mut failures = Vec::new();
        let mut count = 0;
        for t in &templates {
            let template = match ChatTemplate::new(&t.template, t.bos_token.as_deref(), t.eos_token.as_deref()) {
                Ok(template) => template,
                Err(e) => {
                    failures.push(format!("[{}] does not compile: {e}", t.name));
                    continue;
                }
            };
            for (i, case) in t.cases.iter().enumerate() {
                count += 1;
                let got = template.render(&case.messages, case.add_generation_prompt);
                let label = format!("[{} case {i}, add_generation_prompt={}]", t.name, case.add_generation_prompt);
                match (&case.expected, &case.error, got) {
                    (Some(expected), _, Ok(got)) if &got == expected => {}
                    (Some(expected), _, Ok(got)) => failures.push(format!(
                        "{label} mismatch\n--- expected\n{expected:?}\n--- got\n{got:?}\n{}",
                        first_difference(expected, &got)
                    )),
                    (Some(_), _, Err(e)) => failures.push(format!("{label} failed: {e}")),
                    (None, Some(error), Err(e)) if e.to_string().contains(error.as_str()) => {}
                    (None, Some(error), Err(e)) => failures.push(format!("{label} error {:?} does not contain {error:?}", e.to_string())),
                    (None, Some(error), Ok(got)) => {
                        failures.push(format!("{label} expected an error containing {error:?}, rendered {got:?}"))
                    }
                    (None, None, _) => failures.push(format!("{label} has neither expected nor error")),
                }
            }
        }
        (count, failures)
    }

    fn first_difference(expected: &str, got: &str) -> String {
        let at = expected
            .char_indices()
            .zip(got.chars())
            .find(|((_, a), b)| a != b)
            .map(|((i, _), _)| i)
            .unwrap_or(expected.len().min(got.len()));
        let from = expected[..at].char_indices().rev().nth(20).map_or(0, |(i, _)| i);
        format!("first difference at byte {at}: expected {:?}..., got {:?}...", &expected[from..], got.get(from..).unwrap_or(""))
    }

    /// transformers' output for `tests/fixtures/chat/templates.json`: real models' templates.
    #[test]
    fn hf_fixture_templates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat/templates.json");
        let (count, failures) = check_fixture(&path);
        for f in &failures {
            eprintln!("{f}\n");
        }
        assert!(failures.is_empty(), "{} of {count} cases in {} failed (see above)", failures.len(), path.display());
        assert!(count > 0, "{} has no cases", path.display());
    }

    /// Extra fixture files in transformers' format, for checking templates by hand:
    /// `TUNE_CHAT_FIXTURE=cases.json cargo test --lib hf::chat_template`.
    #[test]
    fn env_fixture_templates() {
        let Ok(path) = std::env::var("TUNE_CHAT_FIXTURE") else {
            return;
        };
        let (count, failures) = check_fixture(Path::new(&path));
        for f in &failures {
            eprintln!("{f}\n");
        }
        assert!(failures.is_empty(), "{} of {count} cases failed", failures.len());
    }

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_template() {
        let t = ChatTemplate::new(SMOLLM2, Some("<|im_start|>"), Some("<|im_end|>")).unwrap();
        let messages = [Message::new("user", "What is the capital of France?")];
        assert_eq!(
            t.render(&messages, true).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&messages, false).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        );
    }

    fn conversation() -> Vec<Message> {
        vec![
            Message::new("system", "Be nice."),
            Message::new("user", "  Hi there  "),
            Message::new("assistant", "Hello! é\"<tag>"),
            Message::new("user", "Bye"),
        ]
    }

    /// Templates exercising Jinja2 and Python semantics; the expected text is what jinja2 3.1
    /// renders in transformers' environment (same options, globals and `tojson`).
    #[test]
    fn jinja2_semantics() {
        let cases: &[(&str, &str)] = &[
        // print
        (
            "{{ none }}|{{ true }}|{{ false }}|{{ [1, 'a', none, true, \"it's\"] }}|{{ {'a': 1, 'b': [2.5]} }}|{{ 1.5 }}|{{ 2.0 }}|{{ 1e-5 }}|{{ 1e20 }}|{{ 10 / 4 }}|{{ 7 // 2 }}|{{ 6 / 3 }}",
            "None|True|False|[1, 'a', None, True, \"it's\"]|{'a': 1, 'b': [2.5]}|1.5|2.0|1e-05|1e+20|2.5|3|2.0",
        ),
        // tojson
        (
            "{{ messages | tojson }}\n{{ messages[:2] | tojson(indent=2) }}\n{{ {'b': 1, 'a': [1, 2.5, none, true, 'é\\n\"\\t']} | tojson(sort_keys=true) }}\n{{ 'é☃😀' | tojson(ensure_ascii=true) }}\n{{ [] | tojson(indent=4) }}{{ {} | tojson }}\n{{ [1,2] | tojson(separators=(',', ':')) }}\n{{ {'a': {'b': [1, {'c': 2}]}} | tojson(indent='\\t') }}\n{{ '<>&\\'' | tojson }}",
            "[{\"role\": \"system\", \"content\": \"Be nice.\"}, {\"role\": \"user\", \"content\": \"  Hi there  \"}, {\"role\": \"assistant\", \"content\": \"Hello! é\\\"<tag>\"}, {\"role\": \"user\", \"content\": \"Bye\"}]\n[\n  {\n    \"role\": \"system\",\n    \"content\": \"Be nice.\"\n  },\n  {\n    \"role\": \"user\",\n    \"content\": \"  Hi there  \"\n  }\n]\n{\"a\": [1, 2.5, null, true, \"é\\n\\\"\\t\"], \"b\": 1}\n\"\\u00e9\\u2603\\ud83d\\ude00\"\n[]{}\n[1,2]\n{\n\t\"a\": {\n\t\t\"b\": [\n\t\t\t1,\n\t\t\t{\n\t\t\t\t\"c\": 2\n\t\t\t}\n\t\t]\n\t}\n}\n\"<>&'\"",
        ),
        // strmethods
        (
            "{{ '  x  '.strip() }}|{{ 'a,b'.split(',') }}|{{ 'abc'.startswith('a') }}|{{ 'abc'.endswith(('x', 'c')) }}|{{ 'Hello'.upper() }}|{{ 'Hello'.lower() }}|{{ 'a b-c'.title() }}|{{ 'xax'.replace('a','b') }}|{{ ' a  b '.split() }}|{{ 'xxyx'.lstrip('x') }}|{{ 'xyxx'.rstrip('x') }}|{{ '\\n a\\n'.strip() }}|{{ 'a\\nb'.splitlines() }}|{{ 'a<think>b</think>c'.split('</think>')[-1] }}|{{ 'ab'.find('b') }}",
            "x|['a', 'b']|True|True|HELLO|hello|A B-C|xbx|['a', 'b']|yx|xy|a|['a', 'b']|c|1",
        ),
        // dictmethods
        (
            "{% for k, v in messages[0].items() %}{{k}}={{v}};{% endfor %}{{ messages[0].get('foo', 'd') }}|{{ messages[0].get('foo') }}|{{ messages[0].get('role') }}|{{ messages[0].keys() | list }}|{{ 'role' in messages[0] }}",
            "role=system;content=Be nice.;d|None|system|['role', 'content']|True",
        ),
        // undefined
        (
            "{{ foo }}|{% if foo %}y{% else %}n{% endif %}|{{ messages[0].missing }}|{% if messages[0].tool_calls is defined %}d{% else %}u{% endif %}|{{ tools is none }}|{{ date_string is defined }}|{{ documents }}|{{ foo | default('dflt') }}|{% for x in foo %}x{% endfor %}|{{ messages[10] is defined }}|{{ bos_token }}{{ eos_token }}",
            "|n||u|True|False|None|dflt||False|<s></s>",
        ),
        // whitespace
        (
            "{% for message in messages %}\n    {% if message.role == 'user' %}\n        {{ 'U: ' + message.content }}\n    {% else %}\n  {# a comment #}\n        {{- 'O: ' + message.content }}\n    {% endif %}\n{% endfor %}\n{%- if add_generation_prompt %}\n    {{- 'A:' }}\n{% endif %}\n",
            "O: Be nice.\n        U:   Hi there  \nO: Hello! é\"<tag>\n        U: Bye\n",
        ),
        // whitespace2
        (
            "a\n  {%+ if true %}b{% endif %}\n  {%- if true -%}\n   c  \n  {%- endif %}\n\n  {# comment #}\nd  {{ 'e' }}  \n{% raw %}  {{ x }}\n{% endraw %}\n",
            "a\n  bc\nd  e  \n  {{ x }}\n",
        ),
        // loopctl
        (
            "{% for m in messages %}{% if loop.index0 == 2 %}{% break %}{% endif %}{% if loop.first %}{% continue %}{% endif %}{{ m.role }}{% endfor %}|{% for m in messages %}{{ loop.index }}/{{ loop.length }}/{{ loop.revindex0 }}{% if loop.last %}L{% endif %}{% if loop.previtem is defined %}<{{ loop.previtem.role }}{% endif %}{% if loop.nextitem %}>{{ loop.nextitem.role }}{% endif %},{% endfor %}",
            "user|1/4/3>user,2/4/2<system>assistant,3/4/1<user>user,4/4/0L<assistant,",
        ),
        // namespace
        (
            "{% set ns = namespace(x=0, last='') %}{% for m in messages %}{% set ns.x = ns.x + 1 %}{% if m.role == 'user' %}{% set ns.last = m.content %}{% endif %}{% endfor %}{{ ns.x }}|{{ ns.last }}|{% set y = 1 %}{% for m in messages %}{% set y = y + 1 %}{% endfor %}{{ y }}",
            "4|Bye|1",
        ),
        // generation
        (
            "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}\n{% else %}{{ m.content }}\n{% endif %}{%- generation -%}  x  {%- endgeneration -%}{% endfor %}",
            "Be nice.\nx  Hi there  \nxHello! é\"<tag>xBye\nx",
        ),
        // trailing1
        (
            "x\n",
            "x",
        ),
        // trailing2
        (
            "x\n\n",
            "x\n",
        ),
        // macros
        (
            "{% macro f(x, y='d') %}[{{ x }}{{ y }}]{% endmacro %}{{ f('a') }}{{ f('a', y='b') }}{% macro g(m) %}{% if m.role == 'bad' %}{{ raise_exception('bad in macro') }}{% endif %}{{ m.role }}{% endmacro %}{% for m in messages %}{{ g(m) }}{% endfor %}",
            "[ad][ab]systemuserassistantuser",
        ),
        // concat
        (
            "{{ 'a' ~ 1 ~ 'b' }}|{{ 'x' * 3 }}|{{ true and 'a' or 'b' }}|{{ [1] + [2] }}|{{ 'a' + 'b' }}",
            "a1b|xxx|a|[1, 2]|ab",
        ),
        // strfilter
        (
            "{{ messages[0] | string }}|{{ none | string }}|{{ true | string }}|{{ 1.0 | string }}",
            "{'role': 'system', 'content': 'Be nice.'}|None|True|1.0",
        ),
        // tilde_none
        (
            "{{ 'a' ~ none ~ true ~ 1.0 }}",
            "aNoneTrue1.0",
        ),
        ];
        let messages = conversation();
        let mut failures = Vec::new();
        for (source, expected) in cases {
            let got = ChatTemplate::new(source, Some("<s>"), Some("</s>")).and_then(|t| t.render(&messages, false));
            match got {
                Ok(got) if got == *expected => {}
                Ok(got) => failures.push(format!(
                    "template {source:?}\n--- expected\n{expected:?}\n--- got\n{got:?}\n{}",
                    first_difference(expected, &got)
                )),
                Err(e) => failures.push(format!("template {source:?} failed: {e}")),
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    }

    #[test]
    fn python_string_methods_on_content() {
        let source = "{% for m in messages %}{% if m.role == 'assistant' %}{% set content = m.content %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}{{ content }}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(source, None, None).unwrap();
        let messages = [Message::new("user", "Hi"), Message::new("assistant", "<think>hmm</think>\n\nHello!")];
        assert_eq!(t.render(&messages, false).unwrap(), "Hello!");
    }

    #[test]
    fn raise_exception_carries_the_message() {
        let source = "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{{ m.content }}{% endfor %}";
        let t = ChatTemplate::new(source, None, None).unwrap();
        let ok = [Message::new("user", "a"), Message::new("assistant", "b")];
        assert_eq!(t.render(&ok, false).unwrap(), "ab");
        match t.render(&conversation(), false) {
            Err(Error::Template(msg)) => assert_eq!(msg, "Conversation roles must alternate user/assistant/user/assistant/..."),
            other => panic!("expected a template error, got {other:?}"),
        }
        // Also from inside a macro.
        let t = ChatTemplate::new(
            "{% macro check(m) %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}{% endmacro %}{% for m in messages %}{{ check(m) }}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let err = t.render(&[Message::new("tool", "x")], false).unwrap_err();
        assert_eq!(err.to_string(), "chat template: no tools");
    }

    #[test]
    fn compile_error_is_a_template_error() {
        match ChatTemplate::new("{% for m in messages %}{{ m.content }}", None, None) {
            Err(Error::Template(msg)) => assert!(msg.contains("syntax error"), "{msg}"),
            other => panic!("expected a template error, got {other:?}"),
        }
    }

    #[test]
    fn missing_special_tokens_are_undefined() {
        let t = ChatTemplate::new(
            "{{ bos_token is defined }}|{{ eos_token is defined }}|[{{ bos_token }}]|{{ tools is none }}|{{ date_string is defined }}|{{ strftime_now is defined }}",
            None,
            Some("</s>"),
        )
        .unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "False|True|[]|True|False|True");
    }

    #[test]
    fn python_floats() {
        for (f, repr) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (2.5, "2.5"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (1.5e300, "1.5e+300"),
            (-2.5e-10, "-2.5e-10"),
            (123.456, "123.456"),
        ] {
            assert_eq!(py_float(f), repr, "{f:e}");
        }
    }

    #[test]
    fn strftime_formats() {
        // 2024-07-26 13:05:09 UTC, a Friday, day 208 of a leap year.
        let t = 1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(strftime("%B %-d, %Y", t), "July 26, 2024");
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S %I%p %a %A %j %y %%", t), "2024-07-26 13:05:09 01PM Fri Friday 208 24 %");
        assert_eq!(strftime("%d %b %Y", 0), "01 Jan 1970");
        assert_eq!(strftime("%d %b %Y", 951_782_400), "29 Feb 2000");
        let now = ChatTemplate::new("{{ strftime_now('%Y') }}", None, None).unwrap().render(&[], false).unwrap();
        assert!(now.len() == 4 && now.starts_with('2'), "{now}");
    }

    /// A template that prints the date (as Llama 3.1's does) renders midnight UTC of the date
    /// set, whatever the day it runs on; without a date it prints today's.
    #[test]
    fn strftime_now_formats_the_fixed_date() {
        let source = "{{ strftime_now('%d %b %Y') }}|{{ strftime_now('%Y-%m-%d %H:%M:%S %A') }}";
        let mut t = ChatTemplate::new(source, None, None).unwrap();
        t.set_date(Some("2024-07-26".parse().unwrap()));
        assert_eq!(t.render(&[], false).unwrap(), "26 Jul 2024|2024-07-26 00:00:00 Friday");
        // A clone keeps the date; setting another on the clone leaves the original alone.
        let mut other = t.clone();
        other.set_date(Some(ChatDate::from_ymd(2000, 2, 29).unwrap()));
        assert_eq!(other.render(&[], false).unwrap(), "29 Feb 2000|2000-02-29 00:00:00 Tuesday");
        assert!(t.render(&[], false).unwrap().starts_with("26 Jul 2024|"));
        t.set_date(None);
        let today = ChatDate::today().to_string();
        let now = t.render(&[], false).unwrap();
        assert!(now.ends_with(&strftime("%A", ChatDate::today().unix_seconds())));
        assert!(now.contains(&today), "{now} vs {today}");
    }

    #[test]
    fn chat_dates_parse_and_print() {
        let d: ChatDate = "2026-12-01".parse().unwrap();
        assert_eq!(d.to_string(), "2026-12-01");
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"2026-12-01\"");
        assert_eq!(serde_json::from_str::<ChatDate>("\"1970-01-01\"").unwrap().unix_seconds(), 0);
        for bad in ["2026-13-01", "2026-02-30", "2025-02-29", "26-12-01", "2026-1-01", "x"] {
            assert!(bad.parse::<ChatDate>().is_err(), "{bad}");
        }
        assert!("2024-02-29".parse::<ChatDate>().is_ok());
        assert!(ChatDate::today() > "2024-01-01".parse().unwrap());
    }

    /// The byte ranges of `{% generation %}` blocks, with whitespace control and nesting in a
    /// loop, and without changing the text.
    #[test]
    fn generation_blocks_are_located() {
        let source = "{% for m in messages %}{% if m.role == 'assistant' %}A:\n  {%- generation -%}\n  {{ m.content }}<end>\n  {%- endgeneration %}\n{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}";
        let t = ChatTemplate::new(source, None, None).unwrap();
        assert!(t.has_generation_tags());
        let messages =
            [Message::new("user", "hi"), Message::new("assistant", " é😀 "), Message::new("user", "x"), Message::new("assistant", "")];
        let (text, spans) = t.render_with_generation(&messages, false).unwrap();
        assert_eq!(text, t.render(&messages, false).unwrap());
        // What jinja2 renders in transformers' environment, and the blocks it records.
        assert_eq!(text, "user: hi\nA: é😀 <end>user: x\nA:<end>");
        let pieces: Vec<&str> = spans.iter().map(|r| &text[r.clone()]).collect();
        assert_eq!(pieces, [" é😀 <end>", "<end>"]);

        // Without tags: no spans, and the plain rendering.
        let plain = ChatTemplate::new(CHATML, None, None).unwrap();
        assert!(!plain.has_generation_tags());
        let (text, spans) = plain.render_with_generation(&messages, false).unwrap();
        assert_eq!(text, plain.render(&messages, false).unwrap());
        assert!(spans.is_empty());

        // A block whose output the template captures and alters cannot be located.
        let captured = ChatTemplate::new(
            "{% for m in messages %}{% set x %}{% generation %} {{ m.content }} {% endgeneration %}{% endset %}{{ x | trim }}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let err = captured.render_with_generation(&messages, false).unwrap_err().to_string();
        assert!(err.contains("generation"), "{err}");
        // Nor can a message holding the markers.
        let err = t.render_with_generation(&[Message::new("assistant", "a\u{FDD0}")], false).unwrap_err().to_string();
        assert!(err.contains("U+FDD0"), "{err}");
    }

    use crate::fsutil::TempDir;

    #[test]
    fn from_model_dir_string_form() {
        let config = serde_json::json!({"chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"});
        let dir = TempDir::new("string", &[("tokenizer_config.json", &config.to_string())]);
        let t = ChatTemplate::from_model_dir(&dir.0, Some("<s>"), None).unwrap().unwrap();
        assert_eq!(t.render(&[Message::new("user", "hi")], false).unwrap(), "<s>hi");
    }

    #[test]
    fn from_model_dir_list_form_takes_default() {
        let config = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "DEFAULT{{ messages | length }}"},
            {"name": "rag", "template": "RAG"},
        ]});
        let dir = TempDir::new("list", &[("tokenizer_config.json", &config.to_string())]);
        let t = ChatTemplate::from_model_dir(&dir.0, None, None).unwrap().unwrap();
        assert_eq!(t.render(&[Message::new("user", "hi")], false).unwrap(), "DEFAULT1");

        let config = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "TOOLS"}]});
        let dir = TempDir::new("list-no-default", &[("tokenizer_config.json", &config.to_string())]);
        let err = ChatTemplate::from_model_dir(&dir.0, None, None).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("default"), "{err}");
    }

    #[test]
    fn from_model_dir_prefers_chat_template_jinja() {
        let config = serde_json::json!({"chat_template": "FROM CONFIG"});
        let dir = TempDir::new(
            "jinja",
            &[("tokenizer_config.json", &config.to_string()), ("chat_template.jinja", "FROM JINJA {{ messages[0].content }}\n")],
        );
        let t = ChatTemplate::from_model_dir(&dir.0, None, None).unwrap().unwrap();
        assert_eq!(t.render(&[Message::new("user", "hi")], false).unwrap(), "FROM JINJA hi");

        // A chat_template.jinja alone (no tokenizer_config.json) is enough.
        let dir = TempDir::new("jinja-alone", &[("chat_template.jinja", "J")]);
        let t = ChatTemplate::from_model_dir(&dir.0, None, None).unwrap().unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "J");

        // A broken chat_template.jinja is reported with its path.
        let dir = TempDir::new("jinja-broken", &[("chat_template.jinja", "{% if %}")]);
        let err = ChatTemplate::from_model_dir(&dir.0, None, None).unwrap_err().to_string();
        assert!(err.contains("chat_template.jinja"), "{err}");
    }

    #[test]
    fn from_model_dir_without_template() {
        let dir = TempDir::new("none", &[("tokenizer_config.json", r#"{"bos_token": "<s>"}"#)]);
        assert!(ChatTemplate::from_model_dir(&dir.0, None, None).unwrap().is_none());
        let dir = TempDir::new("null", &[("tokenizer_config.json", r#"{"chat_template": null}"#)]);
        assert!(ChatTemplate::from_model_dir(&dir.0, None, None).unwrap().is_none());
        let dir = TempDir::new("empty", &[]);
        assert!(ChatTemplate::from_model_dir(&dir.0, None, None).unwrap().is_none());
    }
}

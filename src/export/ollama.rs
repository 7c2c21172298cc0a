//! A directory Ollama builds a model from (`ollama create NAME -f DIR/Modelfile`): the merged
//! model as `model.gguf` (or the base as `model.gguf` plus the adapter as `adapter.gguf`, with
//! `ADAPTER`), and a Modelfile with
//!
//! - `FROM ./model.gguf`;
//! - `TEMPLATE`: Ollama's own Go template for the chat format of the model's Jinja template
//!   (the adapter's chat_template.jinja, else the base's), recognised by its markers: ChatML
//!   (SmolLM, Qwen), Llama 3, Gemma, Phi-3, Mistral. The text is that of Ollama's
//!   `template/*.gotmpl` for the format; any other template is refused unless a Go template
//!   file is given;
//! - `PARAMETER stop` for the format's stops (Ollama's `template/<name>.json`) and every eos
//!   token.

use std::path::{Path, PathBuf};

use super::gguf::{GgufOptions, WrittenFile};
use super::{Options, Source};
use crate::error::{read_json, Error, Result};

/// A chat format Ollama has a template for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatFormat {
    /// Ollama's template file (`template/<name>.gotmpl`).
    pub name: &'static str,
    /// A string only this format's Jinja templates contain.
    pub marker: &'static str,
    pub go_template: &'static str,
    /// Ollama's stops for the format (`template/<name>.json`).
    pub stop: &'static [&'static str],
}

/// The formats of the models tune ships recipes for, by marker (checked in order).
pub const FORMATS: &[ChatFormat] = &[
    ChatFormat {
        name: "chatml",
        marker: "<|im_start|>",
        go_template: "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        stop: &["<|im_start|>", "<|im_end|>"],
    },
    ChatFormat {
        name: "llama3-instruct",
        marker: "<|start_header_id|>",
        go_template: "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        stop: &["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    },
    ChatFormat {
        name: "gemma3-instruct",
        marker: "<start_of_turn>",
        go_template: "{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}\n{{- if eq .Role \"user\" }}<start_of_turn>user\n{{- if and (eq $i 1) $.System }}\n{{ $.System }}\n{{ end }}\n{{ .Content }}<end_of_turn>\n{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}\n{{- if $last }}<start_of_turn>model\n{{ end }}\n{{- end }}\n",
        stop: &["<end_of_turn>"],
    },
    ChatFormat {
        name: "phi-3",
        marker: "<|assistant|>",
        go_template: "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
        stop: &["<|end|>", "<|system|>", "<|user|>", "<|assistant|>"],
    },
    ChatFormat {
        name: "mistral-instruct",
        marker: "[INST]",
        go_template: "[INST] {{ range $index, $_ := .Messages }}\n{{- if eq .Role \"system\" }}{{ .Content }}\n\n{{ else if eq .Role \"user\" }}{{ .Content }}[/INST]\n{{- else if eq .Role \"assistant\" }} {{ .Content }}</s>[INST] {{ end }}\n{{- end }}",
        stop: &[],
    },
];

/// The format of a Jinja chat template, by its markers.
pub fn recognise(jinja: &str) -> Option<&'static ChatFormat> {
    FORMATS.iter().find(|f| jinja.contains(f.marker))
}

/// What `--ollama` writes besides the model.
#[derive(Debug, Clone, Default)]
pub struct OllamaOptions {
    /// A Go template file to use instead of the recognised one.
    pub template: Option<PathBuf>,
    /// The base model as model.gguf and the adapter as adapter.gguf (`ADAPTER`), instead of
    /// the merged model.
    pub with_adapter: bool,
}

/// Writes `dir`: the GGUF file(s) and the Modelfile.
pub fn export_ollama(src: &Source, dir: &Path, opts: &Options, g: &GgufOptions, o: &OllamaOptions) -> Result<Vec<WrittenFile>> {
    let base_dir = opts.base.clone().ok_or_else(|| Error::Unsupported("an Ollama export needs the base model: pass --model DIR".into()))?;
    let jinja = match crate::hf::adapter_template::read(&src.adapter_dir)? {
        Some((t, _)) => Some(t),
        None => super::gguf_vocab::model_chat_template(&base_dir)?,
    };
    let (template, stops) = match &o.template {
        Some(path) => (crate::error::read_to_string(path)?, Vec::new()),
        None => {
            let Some(jinja) = &jinja else {
                return Err(Error::Unsupported(format!(
                    "neither the adapter ({}) nor the base model ({}) has a chat template, so there is no TEMPLATE for the \
                     Modelfile; pass --ollama-template FILE (an Ollama Go template)",
                    src.adapter_dir.display(),
                    base_dir.display()
                )));
            };
            let f = recognise(jinja).ok_or_else(|| {
                Error::Unsupported(format!(
                    "the chat template is not one tune translates to an Ollama template (known: {}); pass \
                     --ollama-template FILE with the Go template for it",
                    FORMATS.iter().map(|f| f.name).collect::<Vec<_>>().join(", ")
                ))
            })?;
            (f.go_template.to_string(), f.stop.iter().map(|s| s.to_string()).collect())
        }
    };
    let mut stops = stops;
    for eos in eos_tokens(&base_dir)? {
        if !stops.contains(&eos) {
            stops.push(eos);
        }
    }
    let modelfile = modelfile(&template, &stops, o.with_adapter);
    super::check_output(dir, opts.overwrite, &[&src.adapter_dir, &base_dir])?;
    let mut written = Vec::new();
    crate::fsutil::write_dir_atomically(dir, |tmp| {
        let model = tmp.join("model.gguf");
        if o.with_adapter {
            let template = super::gguf_vocab::model_chat_template(&base_dir)?;
            written.push(super::gguf::write_model(&base_dir, &[], 0.0, template.as_deref(), &model, true, &[], g)?);
            let adapter_ty = if g.ty == super::GgufType::Q4KM { super::GgufType::F16 } else { g.ty };
            let adapter_opts = Options { overwrite: true, ..opts.clone() };
            written.push(super::gguf_adapter::export_gguf_adapter(src, &tmp.join("adapter.gguf"), &adapter_opts, adapter_ty)?);
        } else {
            let model_opts = Options { overwrite: true, ..opts.clone() };
            written.push(super::gguf::export_gguf(src, &model, &model_opts, g)?);
        }
        super::write_text(&tmp.join("Modelfile"), &modelfile)
    })?;
    for w in &mut written {
        w.path = dir.join(w.path.file_name().unwrap_or_default());
    }
    Ok(written)
}

/// The Modelfile text.
pub fn modelfile(template: &str, stops: &[String], with_adapter: bool) -> String {
    let mut s = String::from("FROM ./model.gguf\n");
    if with_adapter {
        s += "ADAPTER ./adapter.gguf\n";
    }
    // Triple quotes hold the template verbatim (newlines included).
    s += &format!("TEMPLATE \"\"\"{template}\"\"\"\n");
    for stop in stops {
        s += &format!("PARAMETER stop {}\n", quote(stop));
    }
    s
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The eos token strings: tokenizer_config's eos_token and the ids of config.json's and
/// generation_config.json's eos_token_id, as tokenizer.json names them.
fn eos_tokens(base_dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let tc = base_dir.join("tokenizer_config.json");
    if tc.is_file() {
        let v: serde_json::Value = read_json(&tc)?;
        match v.get("eos_token") {
            Some(serde_json::Value::String(s)) => out.push(s.clone()),
            Some(serde_json::Value::Object(o)) => out.extend(o.get("content").and_then(|c| c.as_str()).map(str::to_string)),
            _ => {}
        }
    }
    let mut ids = crate::model::ModelConfig::from_model_dir(base_dir)?.eos_token_ids;
    if let Some(g) = crate::hf::config::GenerationConfig::from_model_dir(base_dir)? {
        ids.extend(g.eos_token_id.map(|t| t.to_vec()).unwrap_or_default());
    }
    let tok = base_dir.join("tokenizer.json");
    if tok.is_file() && !ids.is_empty() {
        let t: serde_json::Value = read_json(&tok)?;
        let name = |id: u32| -> Option<String> {
            let added =
                t["added_tokens"].as_array()?.iter().find(|a| a["id"] == id).and_then(|a| a["content"].as_str().map(str::to_string));
            added.or_else(|| t["model"]["vocab"].as_object()?.iter().find(|(_, v)| **v == id).map(|(k, _)| k.clone()))
        };
        for id in ids {
            if let Some(n) = name(id).filter(|n| !out.contains(n)) {
                out.push(n);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_recognised_by_marker() {
        let smollm = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}";
        assert_eq!(recognise(smollm).unwrap().name, "chatml");
        assert_eq!(recognise("{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}").unwrap().name, "llama3-instruct");
        assert_eq!(recognise("{{ '<start_of_turn>' + role + '\n' }}").unwrap().name, "gemma3-instruct");
        assert_eq!(recognise("{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}{{ '<|assistant|>\n' }}").unwrap().name, "phi-3");
        assert_eq!(recognise("{{ '[INST] ' + message['content'] + ' [/INST]' }}").unwrap().name, "mistral-instruct");
        assert!(recognise("{{ '### Instruction:\n' + message['content'] }}").is_none());
    }

    #[test]
    fn modelfile_quotes_stops_and_keeps_the_template_verbatim() {
        let m = modelfile(FORMATS[0].go_template, &["<|im_end|>".into(), "a\"b".into()], false);
        assert_eq!(
            m,
            "FROM ./model.gguf\nTEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n\"\"\"\nPARAMETER stop \"<|im_end|>\"\nPARAMETER stop \"a\\\"b\"\n"
        );
    }
}

//! The chat template an adapter carries: `chat_template.jinja` in the adapter's directory
//! (transformers' file name for a saved template). A run writes there the template it trained
//! with, into its `adapter/` and every checkpoint's; `tune export` copies it into both of its
//! outputs; and `tune generate --adapter` (and training from `lora.init_from`) renders chat with
//! it instead of the base model's.

use std::path::{Path, PathBuf};

use crate::error::{read_json, read_to_string, Error, Result};

/// The file name, in an adapter directory and in a model directory.
pub const FILE: &str = "chat_template.jinja";

/// Writes `source` as the chat template of the adapter in `adapter_dir`; nothing when `None`.
pub fn write(adapter_dir: &Path, source: Option<&str>) -> Result<()> {
    match source {
        Some(source) => crate::fsutil::write_atomically(&adapter_dir.join(FILE), source.as_bytes()),
        None => Ok(()),
    }
}

/// The chat template saved with an adapter, and its path.
pub fn read(adapter_dir: &Path) -> Result<Option<(String, PathBuf)>> {
    let path = adapter_dir.join(FILE);
    if !path.is_file() {
        return Ok(None);
    }
    Ok(Some((read_to_string(&path)?, path)))
}

/// Copies the adapter's chat template, if it has one, into `out_dir` (an exported adapter).
pub fn copy(adapter_dir: &Path, out_dir: &Path) -> Result<()> {
    if let Some((source, _)) = read(adapter_dir)? {
        write(out_dir, Some(&source))?;
    }
    Ok(())
}

/// Makes `source` the chat template of the model directory `model_dir` (a merged export):
/// writes `chat_template.jinja`, and removes any `chat_template` from its
/// `tokenizer_config.json`. transformers and tune read `chat_template.jinja` first, but
/// llama.cpp's converter prefers the config's key, so the base's must not stay there.
pub fn install_in_model_dir(model_dir: &Path, source: &str) -> Result<()> {
    write(model_dir, Some(source))?;
    let config_path = model_dir.join("tokenizer_config.json");
    if !config_path.is_file() {
        return Ok(());
    }
    let mut config: serde_json::Value = read_json(&config_path)?;
    let removed = config.as_object_mut().is_some_and(|c| c.remove("chat_template").is_some());
    if removed {
        let text = serde_json::to_string_pretty(&config).expect("json") + "\n";
        std::fs::write(&config_path, text).map_err(|e| Error::io(&config_path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::TempDir;

    #[test]
    fn written_read_and_copied() {
        let dir = TempDir::new("adapter-template", &[]);
        write(&dir.0, None).unwrap();
        assert!(read(&dir.0).unwrap().is_none());
        write(&dir.0, Some("T{{ x }}")).unwrap();
        let (source, path) = read(&dir.0).unwrap().unwrap();
        assert_eq!((source.as_str(), path), ("T{{ x }}", dir.0.join(FILE)));
        let out = dir.0.join("out");
        std::fs::create_dir(&out).unwrap();
        copy(&dir.0, &out).unwrap();
        assert_eq!(std::fs::read_to_string(out.join(FILE)).unwrap(), "T{{ x }}");
    }

    #[test]
    fn installed_template_replaces_the_config_one() {
        let config = r#"{"bos_token": "<s>", "chat_template": "BASE"}"#;
        let dir = TempDir::new("model-template", &[("tokenizer_config.json", config)]);
        install_in_model_dir(&dir.0, "ADAPTER").unwrap();
        assert_eq!(std::fs::read_to_string(dir.0.join(FILE)).unwrap(), "ADAPTER");
        let config: serde_json::Value = read_json(&dir.0.join("tokenizer_config.json")).unwrap();
        assert_eq!(config, serde_json::json!({"bos_token": "<s>"}));
        let t = crate::hf::ChatTemplate::from_model_dir(&dir.0, None, None).unwrap().unwrap();
        assert_eq!(t.source(), "ADAPTER");
    }
}

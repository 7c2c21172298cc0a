//! `tune ls` and `tune cp`: the recipes shipped in recipes/, built into the binary.

use std::path::Path;

/// (name, text) of each built-in recipe.
pub const BUILTIN: &[(&str, &str)] = &[
    ("smollm2-identity", include_str!("../../recipes/smollm2-identity.yaml")),
    ("smollm2-alpaca", include_str!("../../recipes/smollm2-alpaca.yaml")),
    ("smollm2-chat", include_str!("../../recipes/smollm2-chat.yaml")),
    ("llama3.2-1b-alpaca", include_str!("../../recipes/llama3.2-1b-alpaca.yaml")),
    ("mistral-7b-alpaca", include_str!("../../recipes/mistral-7b-alpaca.yaml")),
    ("qwen2.5-0.5b-chat", include_str!("../../recipes/qwen2.5-0.5b-chat.yaml")),
    ("qwen3-0.6b-chat", include_str!("../../recipes/qwen3-0.6b-chat.yaml")),
    ("gemma3-270m-identity", include_str!("../../recipes/gemma3-270m-identity.yaml")),
];

pub fn ls() -> anyhow::Result<()> {
    for (name, text) in BUILTIN {
        let about =
            text.lines().find(|l| l.starts_with("# ") && !l.starts_with("# tune ")).map(|l| l.trim_start_matches("# ")).unwrap_or("");
        println!("{name:22} {about}");
    }
    Ok(())
}

pub fn cp(name: &str, dest: &Path) -> anyhow::Result<()> {
    let name = name.trim_end_matches(".yaml");
    let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name) else {
        let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        anyhow::bail!("no built-in recipe `{name}`{} (see `tune ls`)", tune::error::did_you_mean(name, &names));
    };
    let dest = if dest.is_dir() { dest.join(format!("{name}.yaml")) } else { dest.to_path_buf() };
    if dest.exists() {
        anyhow::bail!("{} already exists; not overwriting it", dest.display());
    }
    tune::fsutil::write_atomically(&dest, text.as_bytes())?;
    println!("{}", dest.display());
    Ok(())
}

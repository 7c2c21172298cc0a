use std::path::Path;

use tune::hf::{Tokenizer, Weights};
use tune::model::ModelConfig;

pub fn run(dir: &Path) -> anyhow::Result<()> {
    let c = ModelConfig::from_model_dir(dir)?;
    let weights = Weights::open(dir)?;
    let has_tokenizer = dir.join("tokenizer.json").is_file();
    // A tokenizer that is present but broken is an error worth seeing, not "no tokenizer".
    let tokenizer = if has_tokenizer { Some(Tokenizer::from_model_dir(dir)?) } else { None };
    let params =
        weights.num_elements() - if c.tie_word_embeddings && weights.contains("lm_head.weight") { c.vocab_size * c.hidden_size } else { 0 };
    println!("model       {}", dir.display());
    println!("family      {}", c.family().name());
    println!("parameters  {} ({:.1}M)", params, params as f64 / 1e6);
    println!("layers      {}", c.num_hidden_layers());
    println!("hidden      {} (intermediate {})", c.hidden_size, c.intermediate_size);
    println!("attention   {} heads, {} kv heads, head_dim {}", c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    match &c.positions {
        tune::model::config::Positions::Rope(tables) => {
            for t in tables {
                println!("rope        theta {} on {} of {} dims, scaling {:?}", t.theta, t.rotary_dim, c.head_dim, t.scaling);
            }
        }
        other => println!("positions   {other:?}"),
    }
    let windows: Vec<String> = c.layers.iter().map(|l| l.window.map_or("full".into(), |w| w.to_string())).collect();
    if c.layers.iter().any(|l| l.window.is_some()) {
        println!("windows     {}", windows.join(" "));
    }
    println!("linears     {} (target_modules names; all-linear = all of them)", c.linear_names().join(", "));
    println!("max_pos     {}", c.max_position_embeddings);
    println!("vocab       {}", c.vocab_size);
    println!("tied embed  {}", c.tie_word_embeddings);
    println!("dtype       {}", weights.dtypes().join(", "));
    match &tokenizer {
        Some(t) => println!(
            "tokenizer   yes ({} tokens), chat template {}",
            t.vocab_size(),
            if t.chat_template().is_some() { "yes" } else { "no" }
        ),
        None => println!("tokenizer   no tokenizer.json"),
    }
    Ok(())
}

//! Datasets: label masks for alpaca and chat, text ids, packing equivalence, and bad input.
//! Uses SmolLM2's tokenizer and chat template (committed under scripts/) and the tiny fixtures.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use tune::data::batch::{pack, Batch, Row};
use tune::data::examples::{alpaca_prompt, build_example, detect_format, Example, ExampleOptions};
use tune::data::{read_records, Record};
use tune::hf::{Message, Tokenizer};
use tune::model::{self, CausalLm};
use tune::recipe::{DataFormat, Recipe};

fn smollm2_tokenizer() -> Tokenizer {
    Tokenizer::from_model_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/smollm2-135m-instruct")).unwrap()
}

fn opts(tok: &Tokenizer, train_on_input: bool) -> ExampleOptions {
    ExampleOptions { max_seq_len: 4096, train_on_input, add_eos: true, eos: tok.eos_token_id() }
}

fn record(json: &str) -> Record {
    Record { line: 1, value: serde_json::from_str(json).unwrap() }
}

/// The contiguous runs of trained tokens, decoded.
fn trained_spans(tok: &Tokenizer, ex: &Example) -> Vec<String> {
    let mut spans = Vec::new();
    let mut cur: Vec<u32> = Vec::new();
    for (id, t) in ex.ids.iter().zip(&ex.trained) {
        if *t {
            cur.push(*id);
        } else if !cur.is_empty() {
            spans.push(tok.decode(&std::mem::take(&mut cur), false).unwrap());
        }
    }
    if !cur.is_empty() {
        spans.push(tok.decode(&cur, false).unwrap());
    }
    spans
}

#[test]
fn alpaca_trains_on_the_response_only() {
    let tok = smollm2_tokenizer();
    let r = record(r#"{"instruction": "Name a colour.", "input": "", "output": "Blue."}"#);
    let ex = build_example(Path::new("d.jsonl"), &r, DataFormat::Alpaca, &tok, opts(&tok, false)).unwrap();
    let prompt = tok.encode(&alpaca_prompt("Name a colour.", ""), true).unwrap();
    assert!(alpaca_prompt("Name a colour.", "").contains("### Response:\n"));
    assert_eq!(&ex.ids[..prompt.len()], &prompt[..]);
    assert!(ex.trained[..prompt.len()].iter().all(|t| !t));
    assert_eq!(trained_spans(&tok, &ex), vec!["Blue.<|im_end|>".to_string()]);
    let with_input = build_example(
        Path::new("d.jsonl"),
        &record(r#"{"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}"#),
        DataFormat::Alpaca,
        &tok,
        opts(&tok, true),
    )
    .unwrap();
    assert!(with_input.trained.iter().all(|&t| t), "train_on_input trains on everything");
    assert!(tok.decode(&with_input.ids, false).unwrap().contains("### Input:\nBonjour"));
}

#[test]
fn chat_trains_on_assistant_turns_only_and_ids_equal_the_whole_rendering() {
    let tok = smollm2_tokenizer();
    let r = record(
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                         {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A small model."}]}"#,
    );
    let ex = build_example(Path::new("d.jsonl"), &r, DataFormat::Chat, &tok, opts(&tok, false)).unwrap();
    assert_eq!(
        trained_spans(&tok, &ex),
        vec!["Hello there.<|im_end|>\n".to_string(), "A small model.<|im_end|>\n".to_string()]
    );
    // Tokenizing turn by turn gives the same ids as tokenizing the whole conversation.
    let messages: Vec<Message> = r.value["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    let full = tok.chat_template().unwrap().render(&messages, false).unwrap();
    assert_eq!(ex.ids, tok.encode(&full, false).unwrap());
}

#[test]
fn text_ids_end_with_one_eos() {
    let tok = smollm2_tokenizer();
    let eos = tok.eos_token_id().unwrap();
    let ex = build_example(Path::new("d"), &record(r#"{"text": "Hello world"}"#), DataFormat::Text, &tok, opts(&tok, false)).unwrap();
    assert_eq!(ex.ids, [tok.encode("Hello world", true).unwrap(), vec![eos]].concat());
    assert!(ex.trained.iter().all(|&t| t));
    let ex = build_example(Path::new("d"), &record(r#"{"text": "Hello<|im_end|>"}"#), DataFormat::Text, &tok, opts(&tok, false)).unwrap();
    assert_eq!(ex.ids.iter().filter(|&&i| i == eos).count(), 1, "EOS is never doubled");
}

#[test]
fn format_is_detected_from_the_first_record() {
    let p = Path::new("d.jsonl");
    assert_eq!(detect_format(p, &record(r#"{"text": "x"}"#)).unwrap(), DataFormat::Text);
    assert_eq!(detect_format(p, &record(r#"{"instruction": "x", "output": "y"}"#)).unwrap(), DataFormat::Alpaca);
    assert_eq!(detect_format(p, &record(r#"{"messages": []}"#)).unwrap(), DataFormat::Chat);
    assert!(detect_format(p, &record(r#"{"prompt": "x"}"#)).unwrap_err().to_string().contains("line 1"));
}

fn temp_file(name: &str, content: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tune-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

#[test]
fn bad_records_name_file_and_line() {
    let p = temp_file("bad.jsonl", "{\"text\": \"ok\"}\n\n{\"text\": 3}\n");
    let records = read_records(&p).unwrap();
    let tok = smollm2_tokenizer();
    let err = build_example(&p, &records[1], DataFormat::Text, &tok, opts(&tok, false)).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl") && err.contains("line 3") && err.contains("`text` must be a string"), "{err}");
    let p = temp_file("broken.jsonl", "{\"text\": \"ok\"}\n{\"text\": \"unterminated}\n");
    let err = read_records(&p).unwrap_err().to_string();
    assert!(err.contains("broken.jsonl") && err.contains("line 2"), "{err}");
    let err = build_example(&p, &record(r#"{"messages": [{"role": "user"}]}"#), DataFormat::Chat, &tok, opts(&tok, false))
        .unwrap_err()
        .to_string();
    assert!(err.contains("messages[0]"), "{err}");
    // JSON array files are read too.
    let p = temp_file("array.json", r#"[{"text": "a"}, {"text": "b"}]"#);
    assert_eq!(read_records(&p).unwrap().len(), 2);
}

fn recipe_for(data: &Path) -> Recipe {
    let text = format!(
        "model:\n  path: {}\ndataset:\n  path: {}\noutput:\n  dir: /tmp/unused\n",
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/smollm2-135m-instruct").display(),
        data.display()
    );
    Recipe::parse(&text, Path::new("r.yaml"), &[]).unwrap()
}

#[test]
fn empty_and_fully_masked_datasets_are_refused() {
    let tok = smollm2_tokenizer();
    let empty = temp_file("empty.jsonl", "\n");
    let err = tune::train::data::prepare(&recipe_for(&empty), &tok, None).err().unwrap().to_string();
    assert!(err.contains("empty"), "{err}");
    // Every response is cut off by max_seq_len: nothing is trained on.
    let masked = temp_file("masked.jsonl", "{\"instruction\": \"Say hi.\", \"output\": \"hi\"}\n");
    let mut recipe = recipe_for(&masked);
    recipe.dataset.max_seq_len = 8;
    let err = tune::train::data::prepare(&recipe, &tok, None).err().unwrap().to_string();
    assert!(err.contains("every label is masked"), "{err}");
}

/// A packed row must give each example exactly the losses it gets alone.
#[test]
fn packed_row_equals_examples_run_separately() {
    let device = Default::default();
    let model: CausalLm<B> = model::load(&tiny("llama"), &device).unwrap();
    let examples: Vec<Example> = [(3u32, 7usize), (50, 5), (101, 9)]
        .iter()
        .map(|&(start, n)| Example { ids: (start..start + n as u32).collect(), trained: vec![true; n] })
        .collect();
    let separate: Vec<f32> = examples
        .iter()
        .flat_map(|e| {
            let b = Batch::new(&[&Row::from_example(e)], 0);
            per_token_losses(&model, &b)
        })
        .collect();
    let rows = pack(&examples, 32);
    assert_eq!(rows.len(), 1);
    let packed = per_token_losses(&model, &Batch::new(&[&rows[0]], 0));
    assert_eq!(separate.len(), packed.len());
    let (diff, _) = max_abs_diff(&packed, &separate);
    assert!(diff < 1e-5, "packed vs separate losses differ by {diff}");
    // Without the block mask the packed row would see earlier examples: prove that matters.
    let mut leaky = Batch::new(&[&rows[0]], 0);
    leaky.segments = None;
    let (diff, _) = max_abs_diff(&per_token_losses(&model, &leaky), &separate);
    assert!(diff > 1e-3, "the block-diagonal mask made no difference ({diff})");
}

/// Loss of each labelled token (weight 1) of a batch, in order.
fn per_token_losses(model: &CausalLm<B>, batch: &Batch) -> Vec<f32> {
    let device = Default::default();
    let mask = match &batch.segments {
        Some(s) => tune::model::AttentionMask::packed(s, batch.seq, &device),
        None => tune::model::AttentionMask::Causal,
    };
    let h = model.forward_hidden(
        tune::model::token_tensor::<B>(&batch.ids, batch.rows, &device),
        &batch.positions,
        &mask,
        None,
    );
    let logits = model.lm_head(h.reshape([batch.rows * batch.seq, model.config.hidden_size]));
    let targets: Vec<i64> = batch.targets.iter().map(|&t| t as i64).collect();
    let targets = burn::tensor::Tensor::<B, 1, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(targets, [batch.targets.len()]),
        &device,
    );
    let nll: Vec<f32> = tune::eval::token_nll(logits, targets).into_data().iter::<f32>().collect();
    nll.into_iter().zip(&batch.weights).filter(|(_, &w)| w > 0.0).map(|(l, _)| l).collect()
}

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
    assert_eq!(trained_spans(&tok, &ex), vec!["Hello there.<|im_end|>\n".to_string(), "A small model.<|im_end|>\n".to_string()]);
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
    let h = model.forward_hidden(tune::model::token_tensor::<B>(&batch.ids, batch.rows, &device), &batch.positions, &mask, None);
    let logits = model.lm_head(h.reshape([batch.rows * batch.seq, model.config.hidden_size]));
    let targets: Vec<i64> = batch.targets.iter().map(|&t| t as i64).collect();
    let targets =
        burn::tensor::Tensor::<B, 1, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(targets, [batch.targets.len()]), &device);
    let nll: Vec<f32> = tune::eval::token_nll(logits, targets).into_data().iter::<f32>().collect();
    nll.into_iter().zip(&batch.weights).filter(|(_, &w)| w > 0.0).map(|(l, _)| l).collect()
}

/// Gemma 3's tokenizer (262k SentencePiece-style BPE): `$TUNE_GEMMA3` or scripts/gemma3-270m/,
/// a directory with tokenizer_config.json and tokenizer.json or tokenizer.json.gz (unpacked with
/// gzip into a temporary directory). None when neither is there.
fn gemma3_tokenizer() -> Option<Tokenizer> {
    let dir = std::env::var_os("TUNE_GEMMA3")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gemma3-270m"));
    if dir.join("tokenizer.json").is_file() {
        return Some(Tokenizer::from_model_dir(&dir).unwrap());
    }
    let gz = dir.join("tokenizer.json.gz");
    if !gz.is_file() {
        return None;
    }
    let tmp = std::env::temp_dir().join(format!("tune-gemma3-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let out = std::process::Command::new("gzip").arg("-dc").arg(&gz).output().expect("gzip unpacks tokenizer.json.gz");
    assert!(out.status.success(), "gzip -dc {}", gz.display());
    std::fs::write(tmp.join("tokenizer.json"), out.stdout).unwrap();
    std::fs::copy(dir.join("tokenizer_config.json"), tmp.join("tokenizer_config.json")).unwrap();
    let tok = Tokenizer::from_model_dir(&tmp).unwrap();
    let _ = std::fs::remove_dir_all(&tmp);
    Some(tok)
}

#[derive(serde::Deserialize)]
struct MaskFixture {
    templates: std::collections::HashMap<String, String>,
    cases: Vec<MaskCase>,
}

#[derive(serde::Deserialize, Clone)]
struct MaskCase {
    tokenizer: String,
    template: String,
    paired: Option<String>,
    conversation: usize,
    messages: Vec<Message>,
    text: String,
    ids: Vec<u32>,
    assistant_masks: Option<Vec<u8>>,
}

/// tests/fixtures/chat/masks.json (reference.py --chat-masks): for SmolLM2's byte-level BPE and
/// Gemma 3's SentencePiece-style tokenizer, chat examples have exactly transformers' ids (the
/// rendering tokenized once) and, with {% generation %} tags, exactly its
/// return_assistant_tokens_mask; without tags, the mask equals the tagged twin's (tags around
/// each assistant content and the template's end-of-turn text after it). Multi-turn, leading and
/// trailing spaces and newlines, an empty reply, unicode.
#[test]
fn chat_masks_match_transformers_for_every_tokenizer() {
    let fixture: MaskFixture = serde_json::from_str(&std::fs::read_to_string(fixtures().join("chat/masks.json")).unwrap()).unwrap();
    // scripts/gemma3-270m/ is committed, so the Gemma cases always run.
    let gemma = Some(gemma3_tokenizer().expect("no Gemma 3 tokenizer in scripts/gemma3-270m/ or $TUNE_GEMMA3"));
    let mut tokenizers = [("smollm2", Some(smollm2_tokenizer())), ("gemma3", gemma)];
    let (mut checked, mut masks, mut paired, mut split_differs) = (0, 0, 0, 0);
    let mut failures = Vec::new();
    for case in &fixture.cases {
        let Some(tok) = tokenizers.iter_mut().find(|(n, _)| *n == case.tokenizer).and_then(|(_, t)| t.as_mut()) else {
            continue;
        };
        tok.set_chat_template(&fixture.templates[&case.template], &case.template).unwrap();
        let label = format!("[{} / {} / conversation {}]", case.tokenizer, case.template, case.conversation);
        let template = tok.chat_template().unwrap();
        let text = template.render(&case.messages, false).unwrap();
        if text != case.text {
            failures.push(format!("{label} renders {text:?}, transformers {:?}", case.text));
            continue;
        }
        let messages = serde_json::json!({ "messages": case.messages }).to_string();
        let ex = build_example(Path::new("d.jsonl"), &record(&messages), DataFormat::Chat, tok, opts(tok, false)).unwrap();
        checked += 1;
        if ex.ids != case.ids {
            failures.push(format!("{label} ids differ from transformers'\n  tune {:?}\n  hf   {:?}", ex.ids, case.ids));
            continue;
        }
        let trained: Vec<u8> = ex.trained.iter().map(|&t| t as u8).collect();
        if let Some(expected) = &case.assistant_masks {
            masks += 1;
            if &trained != expected {
                failures.push(format!("{label} mask differs from return_assistant_tokens_mask\n  tune {trained:?}\n  hf   {expected:?}"));
            }
        }
        if let Some(twin) = &case.paired {
            let twin = fixture
                .cases
                .iter()
                .find(|c| c.tokenizer == case.tokenizer && &c.template == twin && c.conversation == case.conversation)
                .unwrap();
            assert_eq!(twin.text, case.text, "{label}: the tagged twin renders another text");
            paired += 1;
            if Some(&trained) != twin.assistant_masks.as_ref() {
                failures
                    .push(format!("{label} mask differs from its tagged twin's\n  tune {trained:?}\n  hf   {:?}", twin.assistant_masks));
            }
            // Tokenizing the rendering piece by piece (at the turn boundaries) is not the same.
            let (_, turns) = tune::data::examples::assistant_turns(template, &case.messages).unwrap();
            let mut cuts: Vec<usize> = turns.iter().flat_map(|t| [t.start, t.end]).collect();
            cuts.push(text.len());
            let (mut pieces, mut at) = (Vec::new(), 0);
            for c in cuts {
                pieces.extend(tok.encode(&text[at..c], false).unwrap());
                at = c;
            }
            split_differs += usize::from(pieces != case.ids);
        }
        // train_on_input: the same ids, every token trained.
        let all = build_example(Path::new("d.jsonl"), &record(&messages), DataFormat::Chat, tok, opts(tok, true)).unwrap();
        assert_eq!(all.ids, case.ids, "{label}");
        assert!(all.trained.iter().all(|&t| t), "{label}");
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    let expected = fixture.cases.iter().filter(|c| tokenizers.iter().any(|(n, t)| *n == c.tokenizer && t.is_some())).count();
    assert_eq!(checked, expected);
    assert!(masks > 0 && paired > 0, "{masks} masks, {paired} paired");
    assert!(split_differs > 0, "no case where tokenizing turn by turn differs: the fixture does not test the single tokenization");
    eprintln!(
        "{checked} cases: {masks} transformers masks, {paired} tagged twins; {split_differs} would tokenize differently turn by turn"
    );
}

//! Datasets: label masks for every format against transformers, parquet, mixtures of sources,
//! length statistics and skipped examples, text ids, packing equivalence, and bad input.
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
    Record::at_line(1, serde_json::from_str(json).unwrap())
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

#[derive(serde::Deserialize)]
struct FormatFixture {
    date: String,
    templates: std::collections::HashMap<String, String>,
    cases: Vec<FormatCase>,
}

#[derive(serde::Deserialize)]
struct FormatCase {
    format: DataFormat,
    record: serde_json::Value,
    template: Option<String>,
    text: String,
    ids: Vec<u32>,
    mask: Vec<u8>,
}

/// tests/fixtures/data/formats.json (data_reference.py): for chat with a system turn, OpenAI-style
/// tools on Qwen2.5's and Llama 3.2's templates, ShareGPT (roles mapped as axolotl's, the
/// record's `system`), and TRL's prompt/completion (strings and messages), on SmolLM2's
/// tokenizer: the detected format, transformers' text and ids, and the label mask as computed
/// with transformers' rendering and the tokenizer's offsets (TRL's prompt-token count for
/// prompt/completion).
#[test]
fn every_format_matches_transformers() {
    let fixture: FormatFixture = serde_json::from_str(&std::fs::read_to_string(fixtures().join("data/formats.json")).unwrap()).unwrap();
    let date: tune::hf::ChatDate = fixture.date.parse().unwrap();
    let mut failures = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (i, case) in fixture.cases.iter().enumerate() {
        let mut tok = smollm2_tokenizer();
        if let Some(t) = &case.template {
            tok.set_chat_template(&fixture.templates[t], t).unwrap();
        }
        tok.chat_template_mut().unwrap().set_date(Some(date));
        let r = Record::at_line(i + 1, case.record.clone());
        let label = format!("[case {i}: {:?} / {:?}]", case.format, case.template);
        assert_eq!(detect_format(Path::new("d.jsonl"), &r).unwrap(), case.format, "{label}");
        let ex = build_example(Path::new("d.jsonl"), &r, case.format, &tok, opts(&tok, false)).unwrap();
        if ex.ids != case.ids {
            failures.push(format!(
                "{label} ids differ\n  tune {:?}\n  hf   {:?}\n  text {:?}\n  hf   {:?}",
                ex.ids,
                case.ids,
                tok.decode(&ex.ids, false).unwrap(),
                case.text
            ));
            continue;
        }
        let trained: Vec<u8> = ex.trained.iter().map(|&t| t as u8).collect();
        if trained != case.mask {
            failures.push(format!(
                "{label} mask differs\n  tune {trained:?}\n  ref  {:?}\n  spans {:?}",
                case.mask,
                trained_spans(&tok, &ex)
            ));
        }
        assert_eq!(tok.decode(&ex.ids, false).unwrap(), case.text, "{label}");
        seen.insert(format!("{:?}/{}", case.format, case.template.as_deref().unwrap_or("-")));
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    assert!(seen.len() >= 6, "{seen:?}");
}

/// Known answers on the same fixtures: what is trained, decoded.
#[test]
fn trained_spans_of_each_format() {
    let fixture: FormatFixture = serde_json::from_str(&std::fs::read_to_string(fixtures().join("data/formats.json")).unwrap()).unwrap();
    let spans = |i: usize| {
        let case = &fixture.cases[i];
        let mut tok = smollm2_tokenizer();
        if let Some(t) = &case.template {
            tok.set_chat_template(&fixture.templates[t], t).unwrap();
        }
        tok.chat_template_mut().unwrap().set_date(Some(fixture.date.parse().unwrap()));
        let ex = build_example(Path::new("d"), &Record::at_line(1, case.record.clone()), case.format, &tok, opts(&tok, false)).unwrap();
        (case.template.clone(), trained_spans(&tok, &ex))
    };
    let find = |format: DataFormat, template: Option<&str>| {
        fixture.cases.iter().position(|c| c.format == format && c.template.as_deref() == template).unwrap()
    };
    assert_eq!(
        spans(find(DataFormat::Chat, Some("qwen2.5"))).1,
        vec![
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n".to_string(),
            "It is 21 °C and clear in Paris.<|im_end|>\n".to_string()
        ]
    );
    // SmolLM2's tokenizer does not know Llama's `<|eot_id|>`: its BPE merges `>` with the next
    // header's `<`, a token straddling the turn's end, trained by the overlap rule.
    assert_eq!(
        spans(find(DataFormat::Chat, Some("llama3.2"))).1,
        vec![
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eot_id|><".to_string(),
            "It is 21 °C and clear in Paris.<|eot_id|>".to_string()
        ]
    );
    assert_eq!(spans(find(DataFormat::Sharegpt, Some("smollm2"))).1, vec!["Blue.<|im_end|>\n".to_string()]);
    assert_eq!(spans(find(DataFormat::PromptCompletion, None)).1, vec![" blue.<|im_end|>".to_string()]);
    assert_eq!(spans(find(DataFormat::PromptCompletion, Some("smollm2"))).1, vec!["Blue.<|im_end|>\n".to_string()]);
}

/// A parquet file (written by pyarrow, data_reference.py) reads as the same records as its
/// JSON-lines twin: the same examples for every shape, and the same values where the JSON has no
/// nulls (parquet leaves a null struct field out, as an absent key).
#[test]
fn parquet_rows_are_the_jsonl_records() {
    let tok = smollm2_tokenizer();
    let dir = fixtures().join("data");
    for shape in ["chat", "sharegpt", "prompt_completion", "prompt_completion_chat", "alpaca"] {
        let jsonl = read_records(&dir.join(format!("{shape}.jsonl"))).unwrap();
        let parquet = read_records(&dir.join(format!("{shape}.parquet"))).unwrap();
        assert_eq!(jsonl.len(), parquet.len(), "{shape}");
        let format = detect_format(&dir, &parquet[0]).unwrap();
        assert_eq!(format, detect_format(&dir, &jsonl[0]).unwrap(), "{shape}");
        for (j, p) in jsonl.iter().zip(&parquet) {
            assert_eq!(p.at(), format!("row {}", p.line));
            let a = build_example(&dir, j, format, &tok, opts(&tok, false)).unwrap();
            let b = build_example(&dir, p, format, &tok, opts(&tok, false)).unwrap();
            assert_eq!(a, b, "{shape} {}", p.at());
            if shape != "chat" {
                assert_eq!(j.value, p.value, "{shape} {}", p.at());
            }
        }
    }
    // Detected by the magic bytes when the name says nothing.
    let copy = temp_file("no-extension.data", "");
    std::fs::copy(dir.join("sharegpt.parquet"), &copy).unwrap();
    assert!(tune::data::parquet::is_parquet(&copy));
    assert_eq!(read_records(&copy).unwrap().len(), 2);
    // A bad row is named by its row number.
    let records = read_records(&dir.join("alpaca.parquet")).unwrap();
    let err = build_example(&dir, &records[1], DataFormat::Chat, &tok, opts(&tok, false)).unwrap_err().to_string();
    assert!(err.contains("row 2") && err.contains("missing key `messages`"), "{err}");
}

#[test]
fn new_formats_are_detected_and_bad_input_names_the_key() {
    let p = Path::new("d.jsonl");
    assert_eq!(detect_format(p, &record(r#"{"conversations": []}"#)).unwrap(), DataFormat::Sharegpt);
    assert_eq!(detect_format(p, &record(r#"{"prompt": "a", "completion": "b"}"#)).unwrap(), DataFormat::PromptCompletion);
    let err = detect_format(p, &record(r#"{"question": "a"}"#)).unwrap_err().to_string();
    assert!(err.contains("question") && err.contains("conversations") && err.contains("dataset.format"), "{err}");
    let tok = smollm2_tokenizer();
    let bad = |json: &str, format: DataFormat| {
        let mut r = record(json);
        r.line = 7;
        build_example(p, &r, format, &tok, opts(&tok, false)).unwrap_err().to_string()
    };
    let err = bad(r#"{"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}"#, DataFormat::Sharegpt);
    assert!(err.contains("d.jsonl") && err.contains("line 7") && err.contains("conversations[1].from"), "{err}");
    assert!(err.contains("unknown role \"bot\"") && err.contains("human, user, gpt, assistant, system, tool"), "{err}");
    let err = bad(r#"{"prompt": "a", "completion": ["b"]}"#, DataFormat::PromptCompletion);
    assert!(err.contains("line 7") && err.contains("a string and an array"), "{err}");
    let err = bad(r#"{"messages": [{"role": "user", "content": "x"}], "tools": "not json"}"#, DataFormat::Chat);
    assert!(err.contains("line 7") && err.contains("`tools`"), "{err}");
    let err = bad(r#"{"messages": [{"role": "user", "content": [{"type": "text"}]}]}"#, DataFormat::Chat);
    assert!(err.contains("messages[0].content must be a string"), "{err}");
    // ShareGPT's `role`/`content` spelling and the record's system prompt.
    let ex = build_example(
        p,
        &record(r#"{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "system": "S"}"#),
        DataFormat::Sharegpt,
        &tok,
        opts(&tok, false),
    )
    .unwrap();
    let text = tok.decode(&ex.ids, false).unwrap();
    assert!(text.starts_with("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi"), "{text}");
}

#[test]
fn mixture_order_is_deterministic_and_hits_the_weights() {
    use tune::train::data::{mixture_counts, Order};
    assert_eq!(mixture_counts(&[3.0, 1.0], 40), vec![30, 10]);
    assert_eq!(mixture_counts(&[1.0, 1.0, 1.0], 10), vec![4, 3, 3]);
    // 3.5, 1.75, 1.75: floors 3, 1, 1 and the two largest remainders get the last two.
    assert_eq!(mixture_counts(&[0.5, 0.25, 0.25], 7), vec![3, 2, 2]);
    // 10 rows of source A (0..10), 30 of B (10..40), weighted 3:1: an epoch of 40 rows holds
    // 30 of A (each of its rows 3 times) and 10 distinct of B; 3 epochs see every B row once.
    let mut order = Order::mixture(&[10, 30], &[3.0, 1.0], true, 7);
    let stream: Vec<usize> = (0..120).map(|k| order.at(k)).collect();
    for epoch in stream.chunks(40) {
        let mut a = [0usize; 10];
        let mut b = Vec::new();
        for &r in epoch {
            if r < 10 {
                a[r] += 1;
            } else {
                b.push(r);
            }
        }
        assert_eq!(a, [3; 10]);
        assert_eq!(b.len(), 10);
    }
    let mut b: Vec<usize> = stream.iter().copied().filter(|&r| r >= 10).collect();
    b.sort();
    assert_eq!(b, (10..40).collect::<Vec<_>>());
    // A pure function of seed and position: a fresh order (a resumed run) agrees anywhere.
    let mut fresh = Order::mixture(&[10, 30], &[3.0, 1.0], true, 7);
    assert_eq!((0..120).rev().map(|k| fresh.at(k)).collect::<Vec<_>>(), stream.iter().rev().copied().collect::<Vec<_>>());
    let mut other = Order::mixture(&[10, 30], &[3.0, 1.0], true, 8);
    assert_ne!((0..40).map(|k| other.at(k)).collect::<Vec<_>>(), stream[..40].to_vec());
    // Unshuffled: the shares in source order, each source continuing where it stopped.
    let mut plain = Order::mixture(&[2, 4], &[1.0, 1.0], false, 0);
    assert_eq!((0..12).map(|k| plain.at(k)).collect::<Vec<_>>(), vec![0, 1, 0, 2, 3, 4, 1, 0, 1, 5, 2, 3]);
}

fn test_tokenizer() -> Tokenizer {
    Tokenizer::from_model_dir(&fixtures().join("tokenizer")).unwrap()
}

fn two_source_recipe(dir: &Path, extra: &str) -> Recipe {
    let text = format!(
        "model:\n  path: {}\ndataset:\n  sources:\n    - path: {}\n    - path: {}\n      format: prompt_completion\n{extra}output:\n  dir: /tmp/unused\n",
        fixtures().join("tokenizer").display(),
        dir.join("text.jsonl").display(),
        dir.join("pc.jsonl").display()
    );
    Recipe::parse(&text, Path::new("r.yaml"), &[]).unwrap()
}

/// Two sources with token lengths known by hand (the test tokenizer: <s>, `hello` `␣` `world`
/// one token each, </s>): text lengths 3, 5, 5, 9; prompt/completion 9 (prompt 6) and 5.
/// At max_seq_len 6 one text record and one prompt/completion record are truncated, and the
/// latter has no completion token left: it is skipped and counted.
fn write_length_fixture() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tune-data-lengths-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = ["hello", "hello world", "hello hello", "hello world hello world"];
    let lines: String = text.iter().map(|t| serde_json::json!({ "text": t }).to_string() + "\n").collect();
    std::fs::write(dir.join("text.jsonl"), lines).unwrap();
    std::fs::write(
        dir.join("pc.jsonl"),
        "{\"prompt\": \"hello hello hello\", \"completion\": \" world\"}\n{\"prompt\": \"hello\", \"completion\": \" world\"}\n",
    )
    .unwrap();
    dir
}

#[test]
fn length_statistics_and_skipped_examples() {
    let dir = write_length_fixture();
    let tok = test_tokenizer();
    let mut recipe = two_source_recipe(&dir, "  max_seq_len: 6\n");
    recipe.dataset.shuffle = false;
    let d = tune::train::data::prepare(&recipe, &tok, None).unwrap();
    let (text, pc) = (&d.sources[0], &d.sources[1]);
    assert_eq!(text.format, DataFormat::Text);
    assert_eq!(pc.format, DataFormat::PromptCompletion);
    let l = text.lengths;
    assert_eq!((l.min, l.median, l.p90, l.p99, l.max), (3, 5, 9, 9, 9));
    assert_eq!((text.records, text.truncated, text.skipped, text.rows), (4, 1, 0, 4));
    let l = pc.lengths;
    assert_eq!((l.min, l.median, l.max), (5, 5, 9));
    assert_eq!((pc.records, pc.truncated, pc.skipped, pc.rows), (2, 1, 1, 1));
    assert_eq!((d.examples, d.rows.len(), d.skipped()), (5, 5, 1));
    // The kept prompt/completion row is the short one, its completion trained.
    assert_eq!(d.rows[4].ids, vec![1, 16, 9, 20, 2]);
    assert_eq!(d.rows[4].weights, vec![0.0, 1.0, 1.0, 1.0, 0.0]);
    // Labels: text rows of 3, 5, 5, 6 tokens train on all but their first; then 3.
    assert_eq!(d.label_tokens, 2 + 4 + 4 + 5 + 3);
    // The summary is nearest-rank.
    let s = tune::data::LengthSummary::of(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    assert_eq!((s.min, s.median, s.p90, s.p99, s.max), (1, 5, 9, 10, 10));
}

/// `tune validate` prints each source's length distribution and its truncated and skipped
/// counts; `tune run` logs the skipped ones.
#[test]
fn validate_prints_lengths_and_run_logs_skips() {
    let dir = write_length_fixture();
    let model = dir.join("model");
    write_tiny_model(&model, 1);
    let recipe = format!(
        "model:\n  path: {}\ndataset:\n  sources:\n    - path: {}\n      weight: 1\n    - path: {}\n      weight: 1\n  max_seq_len: 6\ntrain:\n  batch_size: 1\n  max_steps: 1\noutput:\n  dir: {}\n  export: none\n",
        model.display(),
        dir.join("text.jsonl").display(),
        dir.join("pc.jsonl").display(),
        dir.join("run").display()
    );
    std::fs::write(dir.join("recipe.yaml"), recipe).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tune")).arg("validate").arg(dir.join("recipe.yaml")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("tokens per record: min 3, median 5, p90 9, p99 9, max 9"), "{stdout}");
    assert!(stdout.contains("truncated at max_seq_len 6: 1; no labelled token left (skipped): 0"), "{stdout}");
    assert!(stdout.contains("truncated at max_seq_len 6: 1; no labelled token left (skipped): 1"), "{stdout}");
    // 5 rows an epoch split 1:1 by largest remainders: 3 and 2.
    assert!(stdout.contains("weight 1: 3 rows an epoch") && stdout.contains("weight 1: 2 rows an epoch"), "{stdout}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tune"))
        .args(["run", dir.join("recipe.yaml").to_str().unwrap(), "--overwrite"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("pc.jsonl: skipped 1 of 2 records with no labelled token left after truncation"), "{stderr}");
}

#[test]
fn sources_recipe_keys() {
    let dir = write_length_fixture();
    let r = two_source_recipe(&dir, "");
    assert_eq!(r.dataset.sources().len(), 2);
    assert_eq!(r.dataset.weights(), None);
    assert_eq!(r.dataset.sources()[1].format, Some(DataFormat::PromptCompletion));
    let parse = |text: &str| Recipe::parse(text, Path::new("r.yaml"), &[]).map(|_| ()).unwrap_err().to_string();
    let err = parse("model:\n  path: /m\ndataset:\n  path: /a.jsonl\n  sources: [{path: /b.jsonl}]\noutput:\n  dir: /o\n");
    assert!(err.contains("dataset.path") && err.contains("not both"), "{err}");
    let err = parse("model:\n  path: /m\ndataset:\n  sources: [{path: /a.jsonl, weight: 2}, {path: /b.jsonl}]\noutput:\n  dir: /o\n");
    assert!(err.contains("dataset.sources[1].weight"), "{err}");
    let err = parse("model:\n  path: /m\ndataset:\n  sources: [{path: /a.jsonl, weight: 0}]\noutput:\n  dir: /o\n");
    assert!(err.contains("dataset.sources[0].weight") && err.contains("positive"), "{err}");
    let err = parse("model:\n  path: /m\ndataset:\n  max_seq_len: 8\noutput:\n  dir: /o\n");
    assert!(err.contains("`path`") && err.contains("`sources`"), "{err}");
    let err = parse("model:\n  path: /m\ndataset:\n  sources: [{path: /a.jsonl, wieght: 2}]\noutput:\n  dir: /o\n");
    assert!(err.contains("dataset.sources[0].wieght") && err.contains("line 4"), "{err}");
    // The unweighted mixture is the files concatenated: the same order as one file of all rows.
    let tok = test_tokenizer();
    let d = tune::train::data::prepare(&r, &tok, None).unwrap();
    let (mut a, mut b) = (d.order(true, 3), tune::train::data::Order::new(d.rows.len(), true, 3));
    assert_eq!((0..18).map(|k| a.at(k)).collect::<Vec<_>>(), (0..18).map(|k| b.at(k)).collect::<Vec<_>>());
}

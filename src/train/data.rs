//! The recipe's dataset, tokenized into rows, and the order rows are visited in.

use crate::checkpoint;
use crate::data::batch::{pack, Batch, Row};
use crate::data::examples::{build_example, detect_format, Example, ExampleOptions};
use crate::data::{read_records, Record};
use crate::error::{Error, Result};
use crate::hf::{adapter_template, ChatDate, Tokenizer};
use crate::recipe::{DataFormat, Recipe};
use crate::rng::Rng;

pub struct Prepared {
    pub format: DataFormat,
    pub rows: Vec<Row>,
    /// Examples read (before packing).
    pub examples: usize,
    pub label_tokens: usize,
    pub pad_id: u32,
    /// The chat template the run trains with, saved with its adapters (`chat_template.jinja`):
    /// set for chat data, and whenever the template is not the model's own.
    pub chat_template: Option<String>,
    /// The eval set, when the recipe has one.
    pub eval: Option<EvalSet>,
}

/// What the training loop evaluates on: examples built as the training ones (same format, mask
/// and EOS), but whole: `crate::eval` windows what is longer than the context.
pub struct EvalSet {
    pub examples: Vec<Example>,
    /// Where they come from, for messages: the file, or the hold-out of the training file.
    pub source: String,
}

/// Which of `n` records `dataset.eval_split` holds out (true) : round(n · fraction) of them, at
/// least one, drawn by a shuffle seeded from train.seed alone, so every run and resume with that
/// seed holds out the same records.
pub fn holdout(n: usize, fraction: f64, seed: u64) -> Vec<bool> {
    let k = ((n as f64 * fraction).round() as usize).clamp(1, n);
    let mut perm: Vec<usize> = (0..n).collect();
    Rng::new(seed ^ 0xE7A1_5EED_0D0C_5EED).shuffle(&mut perm);
    let mut held = vec![false; n];
    for &i in &perm[..k] {
        held[i] = true;
    }
    held
}

/// The chat template the recipe asks for instead of the model's, and where it comes from:
/// `dataset.chat_template`, else the `lora.init_from` adapter's `chat_template.jinja`.
fn chosen_template(recipe: &Recipe) -> Result<Option<(String, String)>> {
    if let Some(chosen) = recipe.dataset.chat_template_source()? {
        return Ok(Some(chosen));
    }
    match &recipe.lora.init_from {
        Some(dir) => Ok(adapter_template::read(dir)?.map(|(source, path)| (source, path.display().to_string()))),
        None => Ok(None),
    }
}

/// The model's tokenizer with the chat template the run renders chat with (see
/// [`chosen_template`], else the model's own), its `strftime_now` fixed to `chat_date`.
pub fn tokenizer(recipe: &Recipe, chat_date: ChatDate) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::from_model_dir(&recipe.model.path)?;
    if let Some((source, origin)) = chosen_template(recipe)? {
        tokenizer.set_chat_template(&source, &origin)?;
    }
    if let Some(t) = tokenizer.chat_template_mut() {
        t.set_date(Some(chat_date));
    }
    Ok(tokenizer)
}

/// The date a run's chat templates render `strftime_now` with: the one recorded in the
/// checkpoint a resumed run continues from, so that it tokenizes exactly as before on any day;
/// else (a fresh run, or a checkpoint from before tune recorded it) today's, in UTC.
pub fn chat_date(recipe: &Recipe, start: &super::Start) -> ChatDate {
    let state = match start {
        super::Start::Resume(Some(dir)) => checkpoint::open(dir).ok().map(|f| f.state),
        super::Start::Resume(None) => checkpoint::latest_quietly(&recipe.output.dir).map(|f| f.state),
        super::Start::Fresh | super::Start::Overwrite => None,
    };
    state.and_then(|s| s.chat_date).unwrap_or_else(ChatDate::today)
}

/// Reads, tokenizes, masks and (optionally) packs the recipe's dataset.
pub fn prepare(recipe: &Recipe, tokenizer: &Tokenizer, config_eos: Option<u32>) -> Result<Prepared> {
    let d = &recipe.dataset;
    let mut records = read_records(&d.path)?;
    let Some(first) = records.first() else {
        return Err(Error::format(&d.path, "the dataset is empty"));
    };
    let format = match d.format {
        Some(f) => f,
        None => detect_format(&d.path, first)?,
    };
    if format == DataFormat::Chat && tokenizer.chat_template().is_none() {
        return Err(Error::Model(format!(
            "{}: chat data needs a chat template, and the model in {} has none (no chat_template in tokenizer_config.json, no chat_template.jinja); set dataset.chat_template to a built-in (`chatml`) or a Jinja file",
            d.path.display(),
            recipe.model.path.display()
        )));
    }
    let eos = tokenizer.eos_token_id().or(config_eos);
    let opts = ExampleOptions { max_seq_len: d.max_seq_len, train_on_input: d.train_on_input, add_eos: d.add_eos, eos };
    // Eval examples are built whole: longer ones are scored in windows, not cut.
    let eval_opts = ExampleOptions { max_seq_len: usize::MAX, ..opts };
    let build = |path: &std::path::Path, records: &[Record], opts| {
        records.iter().map(|r| build_example(path, r, format, tokenizer, opts)).collect::<Result<Vec<_>>>()
    };
    let eval = match (&d.eval_path, d.eval_split) {
        (Some(path), _) => {
            let records = read_records(path)?;
            if records.is_empty() {
                return Err(Error::format(path, "dataset.eval_path: the eval set is empty"));
            }
            Some(EvalSet { examples: build(path, &records, eval_opts)?, source: path.display().to_string() })
        }
        (None, Some(fraction)) => {
            let held = holdout(records.len(), fraction, recipe.train.seed);
            let k = held.iter().filter(|&&h| h).count();
            if k == records.len() {
                return Err(Error::format(
                    &d.path,
                    format!("dataset.eval_split: {fraction} of {} records leaves none to train on", records.len()),
                ));
            }
            let (eval, train): (Vec<_>, Vec<_>) = records.into_iter().zip(held).partition(|(_, h)| *h);
            records = train.into_iter().map(|(r, _)| r).collect();
            let eval: Vec<Record> = eval.into_iter().map(|(r, _)| r).collect();
            let source = format!("{k} records held out of {}", d.path.display());
            Some(EvalSet { examples: build(&d.path, &eval, eval_opts)?, source })
        }
        (None, None) => None,
    };
    if let Some(e) = &eval {
        if e.examples.iter().all(|ex| ex.label_count() == 0) {
            return Err(Error::Model(format!("the eval set ({}) has no labelled token to score", e.source)));
        }
    }
    let examples = build(&d.path, &records, opts)?;
    let rows: Vec<Row> = if d.packed { pack(&examples, d.max_seq_len) } else { examples.iter().map(Row::from_example).collect() };
    let label_tokens: usize = rows.iter().map(|r| r.weights.iter().filter(|&&w| w > 0.0).count()).sum();
    if label_tokens == 0 {
        return Err(Error::format(
            &d.path,
            "every label is masked: no token is trained on (are the responses empty, or all cut off by max_seq_len?)",
        ));
    }
    let own_template = recipe.dataset.chat_template.is_none()
        && recipe.lora.init_from.as_ref().is_none_or(|dir| !dir.join(adapter_template::FILE).is_file());
    let chat_template =
        if format == DataFormat::Chat || !own_template { tokenizer.chat_template().map(|t| t.source().to_string()) } else { None };
    Ok(Prepared { format, rows, examples: examples.len(), label_tokens, pad_id: eos.unwrap_or(0), chat_template, eval })
}

/// The stream of row indices: epoch after epoch, each in file order or shuffled with a seed
/// derived from the run seed and the epoch number. Step s takes the next batch_size × grad_accum
/// rows of the stream, wrapping into the next epoch, so any step's rows can be recomputed from
/// the step number alone.
#[derive(Debug, Clone)]
pub struct Order {
    n: usize,
    shuffle: bool,
    seed: u64,
    cached: Option<(usize, Vec<usize>)>,
}

impl Order {
    pub fn new(n: usize, shuffle: bool, seed: u64) -> Self {
        Order { n, shuffle, seed, cached: None }
    }

    fn epoch(&mut self, e: usize) -> &[usize] {
        if self.cached.as_ref().is_none_or(|(ce, _)| *ce != e) {
            let mut perm: Vec<usize> = (0..self.n).collect();
            if self.shuffle {
                Rng::new(self.seed ^ (e as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).shuffle(&mut perm);
            }
            self.cached = Some((e, perm));
        }
        &self.cached.as_ref().expect("just set").1
    }

    /// Row index at position k of the stream.
    pub fn at(&mut self, k: usize) -> usize {
        let n = self.n;
        self.epoch(k / n)[k % n]
    }
}

/// Micro-batches for optimizer step `step` (0-based).
pub fn step_batches(prepared: &Prepared, order: &mut Order, step: usize, batch_size: usize, grad_accum: usize) -> Vec<Batch> {
    let per_step = batch_size * grad_accum;
    (0..grad_accum)
        .map(|m| {
            let rows: Vec<&Row> = (0..batch_size).map(|i| &prepared.rows[order.at(step * per_step + m * batch_size + i)]).collect();
            Batch::new(&rows, prepared.pad_id)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::TempDir;
    use crate::train::Start;

    /// A complete checkpoint directory (its files empty but trainer_state.json) recording
    /// `chat_date`, or none as tune wrote before it recorded one.
    fn fake_checkpoint(run_dir: &std::path::Path, step: usize, chat_date: Option<&str>) -> std::path::PathBuf {
        let dir = run_dir.join(format!("checkpoints/step_{step:06}"));
        std::fs::create_dir_all(dir.join("adapter")).unwrap();
        for f in [".complete", "optimizer.safetensors", "recipe.yaml", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        let mut state = serde_json::json!({
            "format_version": checkpoint::FORMAT_VERSION, "tune_version": "0", "step": step, "total_steps": 10,
            "epoch": 0.5, "stream_position": 8, "seed": 42, "adam_step": step, "elapsed_s": 1.0,
            "recipe_hash": "0", "dataset_hash": "0",
        });
        if let Some(d) = chat_date {
            state["chat_date"] = d.into();
        }
        std::fs::write(dir.join("trainer_state.json"), state.to_string()).unwrap();
        dir
    }

    /// A run resumed on another day renders `strftime_now` with the date its checkpoint
    /// recorded, so it tokenizes exactly as before; a fresh run (or an old checkpoint) uses today.
    #[test]
    fn resumed_runs_render_with_the_recorded_date() {
        let run = TempDir::new("chat-date", &[("date.jinja", "{{ strftime_now('%Y-%m-%d %H:%M') }}")]);
        let tokenizer_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer");
        let text = format!(
            "model:\n  path: {}\ndataset:\n  path: /d.jsonl\n  chat_template: {}\noutput:\n  dir: {}\n",
            tokenizer_dir.display(),
            run.0.join("date.jinja").display(),
            run.0.display()
        );
        let recipe = Recipe::parse(&text, std::path::Path::new("r.yaml"), &[]).unwrap();
        let today = ChatDate::today();
        assert_eq!(chat_date(&recipe, &Start::Fresh), today);
        assert_eq!(chat_date(&recipe, &Start::Resume(None)), today, "no checkpoint yet");

        let older = fake_checkpoint(&run.0, 2, Some("2001-02-03"));
        let latest = fake_checkpoint(&run.0, 4, Some("2001-02-04"));
        let recorded: ChatDate = "2001-02-04".parse().unwrap();
        assert_eq!(chat_date(&recipe, &Start::Resume(None)), recorded);
        assert_eq!(chat_date(&recipe, &Start::Resume(Some(latest.clone()))), recorded);
        assert_eq!(chat_date(&recipe, &Start::Resume(Some(older))), "2001-02-03".parse().unwrap());
        assert_eq!(chat_date(&recipe, &Start::Overwrite), today);
        assert_eq!(checkpoint::open(&latest).unwrap().state.chat_date, Some(recorded));

        // The tokenizer of the run renders that date, at midnight UTC.
        let tokenizer = tokenizer(&recipe, recorded).unwrap();
        assert_eq!(tokenizer.chat_template().unwrap().render(&[], false).unwrap(), "2001-02-04 00:00");

        // A checkpoint written before tune recorded the date: today's, as it did then.
        let old = fake_checkpoint(&run.0, 6, None);
        assert_eq!(checkpoint::open(&old).unwrap().state.chat_date, None);
        assert_eq!(chat_date(&recipe, &Start::Resume(None)), today);
    }

    /// round(n · fraction) records, at least one, the same for a seed, others for another.
    #[test]
    fn holdout_takes_a_seeded_fraction() {
        let count = |h: &[bool]| h.iter().filter(|&&x| x).count();
        assert_eq!(count(&holdout(40, 0.2, 1)), 8);
        assert_eq!(count(&holdout(100, 0.05, 1)), 5);
        assert_eq!(count(&holdout(10, 0.01, 1)), 1, "at least one");
        assert_eq!(holdout(40, 0.2, 1), holdout(40, 0.2, 1));
        assert_ne!(holdout(40, 0.2, 1), holdout(40, 0.2, 2));
    }

    #[test]
    fn unshuffled_order_is_file_order_wrapping() {
        let mut o = Order::new(3, false, 0);
        let v: Vec<usize> = (0..7).map(|k| o.at(k)).collect();
        assert_eq!(v, vec![0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn shuffled_epochs_are_permutations_that_differ_and_repeat_for_a_seed() {
        let mut o = Order::new(50, true, 7);
        let e0: Vec<usize> = (0..50).map(|k| o.at(k)).collect();
        let e1: Vec<usize> = (50..100).map(|k| o.at(k)).collect();
        let mut sorted = e0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(e0, e1);
        let mut again = Order::new(50, true, 7);
        assert_eq!(e1, (50..100).map(|k| again.at(k)).collect::<Vec<_>>());
    }
}

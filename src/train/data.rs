//! The recipe's dataset, tokenized into rows, and the order rows are visited in.

use crate::data::batch::{pack, Batch, Row};
use crate::data::examples::{build_full_example, detect_format, uses_chat_template, Example, ExampleOptions};
use crate::data::{read_records, LengthSummary, Record};
use crate::error::{Error, Result};
use crate::hf::{adapter_template, ChatDate, Tokenizer};
use crate::recipe::{DataFormat, Recipe};
use crate::rng::Rng;
use crate::train::checkpoint;

pub struct Prepared {
    /// The format of the first source (see `sources` for each).
    pub format: DataFormat,
    /// Every source's rows, source after source.
    pub rows: Vec<Row>,
    /// Examples kept (before packing): those with at least one labelled token.
    pub examples: usize,
    pub label_tokens: usize,
    pub pad_id: u32,
    /// The chat template the run trains with, saved with its adapters (`chat_template.jinja`):
    /// set for chat data, and whenever the template is not the model's own.
    pub chat_template: Option<String>,
    /// Each source: its file, format, counts and rows (`rows` holds them in this order).
    pub sources: Vec<SourceStats>,
    /// The sources' sampling weights, when the recipe gives them.
    pub weights: Option<Vec<f64>>,
    /// The eval set, when the recipe has one.
    pub eval: Option<EvalSet>,
}

/// What reading one dataset file found.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceStats {
    pub path: std::path::PathBuf,
    pub format: DataFormat,
    /// Records read.
    pub records: usize,
    /// Token lengths of the records before truncation.
    pub lengths: LengthSummary,
    /// Records longer than max_seq_len (cut to it).
    pub truncated: usize,
    /// Records with no labelled token once truncated (a response cut off, or empty): left out
    /// of training, since they would add nothing to the loss.
    pub skipped: usize,
    /// Rows this source contributes (examples, or packed rows).
    pub rows: usize,
}

impl Prepared {
    /// Records left out for having no labelled token, over all sources.
    pub fn skipped(&self) -> usize {
        self.sources.iter().map(|s| s.skipped).sum()
    }

    /// The order rows are visited in (see [`Order`]).
    pub fn order(&self, shuffle: bool, seed: u64) -> Order {
        match &self.weights {
            Some(w) => Order::mixture(&self.sources.iter().map(|s| s.rows).collect::<Vec<_>>(), w, shuffle, seed),
            None => Order::new(self.rows.len(), shuffle, seed),
        }
    }
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
        super::Start::Resume(None) => checkpoint::list(&recipe.output.dir).pop().map(|f| f.state),
        super::Start::Fresh | super::Start::Overwrite => None,
    };
    state.and_then(|s| s.chat_date).unwrap_or_else(ChatDate::today)
}

/// Reads, tokenizes, masks and (optionally) packs the recipe's datasets, each source on its
/// own (a packed row never mixes sources). Records left with no labelled token after
/// truncation are skipped and counted ([`SourceStats::skipped`]).
pub fn prepare(recipe: &Recipe, tokenizer: &Tokenizer, config_eos: Option<u32>) -> Result<Prepared> {
    let d = &recipe.dataset;
    let eos = tokenizer.eos_token_id().or(config_eos);
    let opts = ExampleOptions { max_seq_len: d.max_seq_len, train_on_input: d.train_on_input, add_eos: d.add_eos, eos };
    // Eval examples are built whole: longer ones are scored in windows, not cut.
    let eval_opts = ExampleOptions { max_seq_len: usize::MAX, ..opts };
    let build_whole = |path: &std::path::Path, records: &[Record], format| {
        records.iter().map(|r| build_full_example(path, r, format, tokenizer, eval_opts)).collect::<Result<Vec<_>>>()
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut sources = Vec::new();
    let mut examples_kept = 0;
    let mut any_chat = false;
    let mut held_out: Vec<Example> = Vec::new();
    let mut held_from = Vec::new();
    for (i, source) in d.sources().into_iter().enumerate() {
        let path = &source.path;
        let mut records = read_records(path)?;
        let Some(first) = records.first() else {
            return Err(Error::format(path, "the dataset is empty"));
        };
        let format = match source.format {
            Some(f) => f,
            None => detect_format(path, first)?,
        };
        let chat = uses_chat_template(format, first);
        any_chat |= chat;
        if chat && tokenizer.chat_template().is_none() {
            return Err(Error::Model(format!(
                "{}: chat data needs a chat template, and the model in {} has none (no chat_template in tokenizer_config.json, no chat_template.jinja); set dataset.chat_template to a built-in (`chatml`) or a Jinja file",
                path.display(),
                recipe.model.path.display()
            )));
        }
        if let Some(fraction) = d.eval_split {
            // Each source holds out its own share; the first is drawn with train.seed itself, so
            // a one-file recipe holds out the same records however many sources others have.
            let held = holdout(records.len(), fraction, recipe.train.seed ^ i as u64);
            let k = held.iter().filter(|&&h| h).count();
            if k == records.len() {
                return Err(Error::format(
                    path,
                    format!("dataset.eval_split: {fraction} of {} records leaves none to train on", records.len()),
                ));
            }
            let (eval, train): (Vec<_>, Vec<_>) = records.into_iter().zip(held).partition(|(_, h)| *h);
            records = train.into_iter().map(|(r, _)| r).collect();
            let eval: Vec<Record> = eval.into_iter().map(|(r, _)| r).collect();
            held_out.extend(build_whole(path, &eval, format)?);
            held_from.push(format!("{k} records held out of {}", path.display()));
        }
        let mut lengths = Vec::with_capacity(records.len());
        let (mut truncated, mut skipped) = (0, 0);
        let mut examples = Vec::with_capacity(records.len());
        for r in &records {
            let mut ex = build_full_example(path, r, format, tokenizer, opts)?;
            lengths.push(ex.ids.len());
            if ex.ids.len() > d.max_seq_len {
                truncated += 1;
                ex.ids.truncate(d.max_seq_len);
                ex.trained.truncate(d.max_seq_len);
            }
            if ex.label_count() == 0 {
                skipped += 1;
                continue;
            }
            examples.push(ex);
        }
        examples_kept += examples.len();
        let source_rows: Vec<Row> =
            if d.packed { pack(&examples, d.max_seq_len) } else { examples.iter().map(Row::from_example).collect() };
        sources.push(SourceStats {
            path: path.clone(),
            format,
            records: records.len(),
            lengths: LengthSummary::of(&lengths),
            truncated,
            skipped,
            rows: source_rows.len(),
        });
        rows.extend(source_rows);
    }
    let eval = match &d.eval_path {
        Some(path) => {
            let records = read_records(path)?;
            let Some(first) = records.first() else {
                return Err(Error::format(path, "dataset.eval_path: the eval set is empty"));
            };
            // dataset.format when it names one, else the eval file's own.
            let format = match d.format {
                Some(f) => f,
                None => detect_format(path, first)?,
            };
            Some(EvalSet { examples: build_whole(path, &records, format)?, source: path.display().to_string() })
        }
        None if d.eval_split.is_some() => Some(EvalSet { examples: held_out, source: held_from.join(", ") }),
        None => None,
    };
    if let Some(e) = &eval {
        if e.examples.iter().all(|ex| ex.label_count() == 0) {
            return Err(Error::Model(format!("the eval set ({}) has no labelled token to score", e.source)));
        }
    }
    let label_tokens: usize = rows.iter().map(|r| r.weights.iter().filter(|&&w| w > 0.0).count()).sum();
    if label_tokens == 0 {
        let path = sources.first().map(|s| s.path.clone()).unwrap_or_default();
        return Err(Error::format(
            &path,
            "every label is masked: no token is trained on (are the responses empty, or all cut off by max_seq_len?)",
        ));
    }
    let own_template = recipe.dataset.chat_template.is_none()
        && recipe.lora.init_from.as_ref().is_none_or(|dir| !dir.join(adapter_template::FILE).is_file());
    let chat_template = if any_chat || !own_template { tokenizer.chat_template().map(|t| t.source().to_string()) } else { None };
    Ok(Prepared {
        format: sources[0].format,
        rows,
        examples: examples_kept,
        label_tokens,
        pad_id: eos.unwrap_or(0),
        chat_template,
        sources,
        weights: d.weights(),
        eval,
    })
}

/// A fingerprint of the recipe's dataset files' contents: the file's own for one `path` (as
/// checkpoints recorded it before `sources`), else one over every source's, in order.
pub fn dataset_fingerprint(recipe: &Recipe) -> Result<String> {
    let sources = recipe.dataset.sources();
    if recipe.dataset.sources.is_none() && sources.len() == 1 {
        return checkpoint::file_fingerprint(&sources[0].path);
    }
    let all = sources.iter().map(|s| checkpoint::file_fingerprint(&s.path)).collect::<Result<Vec<_>>>()?;
    Ok(checkpoint::fingerprint(all.join(",").as_bytes()))
}

/// The stream of row indices: epoch after epoch, each in file order or shuffled with a seed
/// derived from the run seed and the epoch number. Step s takes the next batch_size × grad_accum
/// rows of the stream, wrapping into the next epoch, so any step's rows can be recomputed from
/// the step number alone.
///
/// With source weights (a mixture, see `dataset.sources`) an epoch has as many rows as all
/// sources together; source i fills `counts[i]` of them (its share by weight, largest
/// remainders), taken from its own stream (epochs of its rows, each shuffled with a seed from the
/// run seed, the source and that epoch) where the previous mixture epoch left it; the epoch's
/// rows are then shuffled together. Every step is a pure function of the seed and step number.
#[derive(Debug, Clone)]
pub struct Order {
    n: usize,
    shuffle: bool,
    seed: u64,
    /// A mixture: each source's row count and its rows per epoch.
    mixture: Option<(Vec<usize>, Vec<usize>)>,
    cached: Option<(usize, Vec<usize>)>,
}

fn epoch_seed(seed: u64, e: usize) -> u64 {
    seed ^ (e as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Rows per epoch from each source: the weights' shares of `total`, rounded by largest
/// remainders (ties to the earlier source), so they add up to `total`.
pub fn mixture_counts(weights: &[f64], total: usize) -> Vec<usize> {
    let sum: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| w / sum * total as f64).collect();
    let mut counts: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut by_remainder: Vec<usize> = (0..weights.len()).collect();
    by_remainder.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())).then(a.cmp(&b)));
    let missing = total.saturating_sub(counts.iter().sum());
    for &i in by_remainder.iter().take(missing) {
        counts[i] += 1;
    }
    counts
}

impl Order {
    pub fn new(n: usize, shuffle: bool, seed: u64) -> Self {
        Order { n, shuffle, seed, mixture: None, cached: None }
    }

    /// The order of a mixture of sources with `sizes[i]` rows each (stored source after
    /// source), weighted by `weights`.
    pub fn mixture(sizes: &[usize], weights: &[f64], shuffle: bool, seed: u64) -> Self {
        let n = sizes.iter().sum();
        let mut counts = mixture_counts(weights, n);
        // A source without rows (every record skipped) gives its share to the others.
        if sizes.contains(&0) {
            let kept: Vec<f64> = weights.iter().zip(sizes).map(|(&w, &s)| if s == 0 { 0.0 } else { w }).collect();
            counts = mixture_counts(&kept, n);
        }
        Order { n, shuffle, seed, mixture: Some((sizes.to_vec(), counts)), cached: None }
    }

    /// The rows each source contributes per epoch (its size when not a mixture).
    pub fn counts(&self) -> Option<&[usize]> {
        self.mixture.as_ref().map(|(_, c)| c.as_slice())
    }

    fn epoch(&mut self, e: usize) -> &[usize] {
        if self.cached.as_ref().is_none_or(|(ce, _)| *ce != e) {
            let mut perm: Vec<usize> = match &self.mixture {
                None => (0..self.n).collect(),
                Some((sizes, counts)) => {
                    let mut rows = Vec::with_capacity(self.n);
                    let mut offset = 0;
                    for (i, (&size, &count)) in sizes.iter().zip(counts).enumerate() {
                        let mut source_epoch: Option<(usize, Vec<usize>)> = None;
                        for k in e * count..(e + 1) * count {
                            let (se, at) = (k / size, k % size);
                            if source_epoch.as_ref().is_none_or(|(c, _)| *c != se) {
                                let mut p: Vec<usize> = (0..size).collect();
                                if self.shuffle {
                                    let source_seed = self.seed ^ ((i as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93));
                                    Rng::new(epoch_seed(source_seed, se)).shuffle(&mut p);
                                }
                                source_epoch = Some((se, p));
                            }
                            rows.push(offset + source_epoch.as_ref().expect("just set").1[at]);
                        }
                        offset += size;
                    }
                    rows
                }
            };
            if self.shuffle {
                Rng::new(epoch_seed(self.seed, e)).shuffle(&mut perm);
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

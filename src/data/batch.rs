//! Examples -> rows -> micro-batches the model consumes.
//!
//! A row holds one example (padded to the longest in its batch) or, when packed, several
//! examples back to back: positions restart at each, and the attention mask keeps each example
//! to itself. Targets are the next token; a target's weight is 1 when it is a label of the same
//! example, else 0 (prompt tokens, padding, and the seam between packed examples).

use super::examples::Example;

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub ids: Vec<u32>,
    pub positions: Vec<usize>,
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
    /// Lengths of the examples in this row, in order.
    pub segments: Vec<usize>,
}

impl Row {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn append(&mut self, ex: &Example) {
        let n = ex.ids.len();
        self.ids.extend_from_slice(&ex.ids);
        self.positions.extend(0..n);
        for i in 0..n {
            let next = i + 1;
            self.targets.push(ex.ids.get(next).copied().unwrap_or(0));
            self.weights.push(if next < n && ex.trained[next] { 1.0 } else { 0.0 });
        }
        self.segments.push(n);
    }

    pub fn from_example(ex: &Example) -> Row {
        let mut row = Row { ids: Vec::new(), positions: Vec::new(), targets: Vec::new(), weights: Vec::new(), segments: Vec::new() };
        row.append(ex);
        row
    }
}

/// Greedy packing in order: examples fill a row until the next would overflow `max_len`.
pub fn pack(examples: &[Example], max_len: usize) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut row = Row::from_example(&Example { ids: vec![], trained: vec![] });
    row.segments.clear();
    for ex in examples {
        if !row.is_empty() && row.len() + ex.ids.len() > max_len {
            rows.push(std::mem::replace(
                &mut row,
                Row { ids: vec![], positions: vec![], targets: vec![], weights: vec![], segments: vec![] },
            ));
        }
        row.append(ex);
    }
    if !row.is_empty() {
        rows.push(row);
    }
    rows
}

/// Rows padded to a common length, flattened row-major.
#[derive(Debug, Clone)]
pub struct Batch {
    pub rows: usize,
    pub seq: usize,
    pub ids: Vec<u32>,
    pub positions: Vec<usize>,
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
    /// Real (non-padding) tokens.
    pub tokens: usize,
    /// Example lengths per row when any row holds more than one example (needs a block mask).
    pub segments: Option<Vec<Vec<usize>>>,
}

impl Batch {
    pub fn new(rows: &[&Row], pad_id: u32) -> Batch {
        let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut b = Batch {
            rows: rows.len(),
            seq,
            ids: Vec::with_capacity(rows.len() * seq),
            positions: Vec::with_capacity(rows.len() * seq),
            targets: Vec::with_capacity(rows.len() * seq),
            weights: Vec::with_capacity(rows.len() * seq),
            tokens: rows.iter().map(|r| r.len()).sum(),
            segments: None,
        };
        for r in rows {
            let pad = seq - r.len();
            b.ids.extend(r.ids.iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
            // Padding sits after the row's tokens; under a causal mask no real token sees it.
            b.positions.extend(r.positions.iter().copied().chain(r.len()..seq));
            b.targets.extend(r.targets.iter().copied().chain(std::iter::repeat_n(0, pad)));
            b.weights.extend(r.weights.iter().copied().chain(std::iter::repeat_n(0.0, pad)));
        }
        if rows.iter().any(|r| r.segments.len() > 1) {
            b.segments = Some(rows.iter().map(|r| r.segments.clone()).collect());
        }
        b
    }

    pub fn label_count(&self) -> usize {
        self.weights.iter().filter(|&&w| w > 0.0).count()
    }

    /// Rows `first..first + rows`, padded to the whole batch's length as they were, so that
    /// their dropout masks are the whole batch's (see [`crate::adapter::DropoutDraw`]); the
    /// padding adds nothing to the loss or gradients, as it sits after each row's tokens.
    /// `tokens` is 0: which positions are padding is not kept, and a training step counts its
    /// tokens on the whole batches.
    pub fn rows(&self, first: usize, rows: usize) -> Batch {
        assert!(first + rows <= self.rows, "rows {first}..{} of a {}-row batch", first + rows, self.rows);
        let span = first * self.seq..(first + rows) * self.seq;
        Batch {
            rows,
            seq: self.seq,
            ids: self.ids[span.clone()].to_vec(),
            positions: self.positions[span.clone()].to_vec(),
            targets: self.targets[span.clone()].to_vec(),
            weights: self.weights[span].to_vec(),
            tokens: 0,
            segments: self.segments.as_ref().map(|s| s[first..first + rows].to_vec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32], trained: &[bool]) -> Example {
        Example { ids: ids.to_vec(), trained: trained.to_vec() }
    }

    #[test]
    fn targets_are_next_tokens_weighted_by_label() {
        let r = Row::from_example(&ex(&[5, 6, 7, 8], &[false, false, true, true]));
        assert_eq!(r.targets, vec![6, 7, 8, 0]);
        assert_eq!(r.weights, vec![0.0, 1.0, 1.0, 0.0]);
        assert_eq!(r.positions, vec![0, 1, 2, 3]);
    }

    #[test]
    fn packing_restarts_positions_and_never_predicts_across_examples() {
        let a = ex(&[1, 2, 3], &[true; 3]);
        let b = ex(&[4, 5], &[true; 2]);
        let c = ex(&[6, 7, 8, 9], &[true; 4]);
        let rows = pack(&[a, b, c], 6);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].ids, vec![1, 2, 3, 4, 5]);
        assert_eq!(rows[0].positions, vec![0, 1, 2, 0, 1]);
        assert_eq!(rows[0].segments, vec![3, 2]);
        // The last token of example a must not learn to predict example b's first token.
        assert_eq!(rows[0].weights, vec![1.0, 1.0, 0.0, 1.0, 0.0]);
        assert_eq!(rows[1].ids, vec![6, 7, 8, 9]);
    }

    #[test]
    fn a_slice_of_rows_keeps_the_batch_length_and_its_segments() {
        let a = Row::from_example(&ex(&[1, 2, 3], &[true; 3]));
        let b = Row::from_example(&ex(&[4, 5], &[true; 2]));
        let c = Row::from_example(&ex(&[6], &[true]));
        let mut batch = Batch::new(&[&a, &b, &c], 0);
        batch.segments = Some(vec![vec![3], vec![1, 1], vec![1]]);
        let slice = batch.rows(1, 2);
        assert_eq!((slice.rows, slice.seq), (2, 3));
        assert_eq!(slice.ids, vec![4, 5, 0, 6, 0, 0]);
        assert_eq!(slice.weights, batch.weights[3..].to_vec());
        assert_eq!(slice.positions, batch.positions[3..].to_vec());
        assert_eq!(slice.segments, Some(vec![vec![1, 1], vec![1]]));
    }

    #[test]
    fn batches_pad_right_with_zero_weight() {
        let a = Row::from_example(&ex(&[1, 2, 3], &[true; 3]));
        let b = Row::from_example(&ex(&[4, 5], &[true; 2]));
        let batch = Batch::new(&[&a, &b], 0);
        assert_eq!((batch.rows, batch.seq), (2, 3));
        assert_eq!(batch.ids, vec![1, 2, 3, 4, 5, 0]);
        assert_eq!(batch.weights, vec![1.0, 1.0, 0.0, 1.0, 0.0, 0.0]);
        assert_eq!(batch.label_count(), 3);
        assert!(batch.segments.is_none());
    }
}

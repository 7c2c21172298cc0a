//! Learning rate per optimizer step: linear warm-up from 0, then cosine or linear decay to 0, or
//! constant — the same curves as transformers' get_*_schedule_with_warmup.

use crate::recipe::Schedule;

/// Learning rate for optimizer step `step` (0-based) of `total`.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64, schedule: Schedule) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / decay_steps;
    match schedule {
        Schedule::Constant => peak,
        Schedule::Linear => peak * ((total.saturating_sub(step)) as f64 / decay_steps).max(0.0),
        Schedule::Cosine => peak * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let lr = |s, sch| lr_at(s, 10, 2, 1.0, sch);
        assert_eq!(lr(0, Schedule::Cosine), 0.0);
        assert_eq!(lr(1, Schedule::Cosine), 0.5);
        assert_eq!(lr(2, Schedule::Cosine), 1.0);
        assert!((lr(6, Schedule::Cosine) - 0.5).abs() < 1e-12);
        assert_eq!(lr(2, Schedule::Linear), 1.0);
        assert!((lr(6, Schedule::Linear) - 0.5).abs() < 1e-12);
        assert_eq!(lr(9, Schedule::Constant), 1.0);
        assert!(lr(9, Schedule::Cosine) > 0.0 && lr(9, Schedule::Cosine) < 0.05);
    }
}

//! Learning-rate schedules, as a multiplier of the phase's base rate at each step
//! (the shapes of diffusers' `get_scheduler`): linear warmup, then constant, linear
//! decay to 0, or a half cosine to 0.

use dreambooth_api::spec::LrScheduler;

/// The schedule of one training phase.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: LrScheduler,
    pub base_lr: f64,
    pub warmup_steps: u32,
    pub total_steps: u32,
}

impl LrSchedule {
    /// The rate for the optimizer step with 0-based index `step`.
    pub fn lr_at(&self, step: u32) -> f64 {
        self.base_lr * self.multiplier(step)
    }

    fn multiplier(&self, step: u32) -> f64 {
        if step < self.warmup_steps {
            return f64::from(step) / f64::from(self.warmup_steps);
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps);
        if decay_steps == 0 {
            return 1.0;
        }
        let progress = f64::from(step - self.warmup_steps) / f64::from(decay_steps);
        match self.kind {
            LrScheduler::Constant => 1.0,
            LrScheduler::Linear => (1.0 - progress).max(0.0),
            LrScheduler::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: LrScheduler, warmup_steps: u32) -> LrSchedule {
        LrSchedule {
            kind,
            base_lr: 2e-6,
            warmup_steps,
            total_steps: 100,
        }
    }

    #[test]
    fn constant_stays_at_the_base_rate() {
        let s = schedule(LrScheduler::Constant, 0);
        assert_eq!(s.lr_at(0), 2e-6);
        assert_eq!(s.lr_at(99), 2e-6);
    }

    #[test]
    fn linear_decays_to_zero_at_the_end() {
        let s = schedule(LrScheduler::Linear, 0);
        assert_eq!(s.lr_at(0), 2e-6);
        assert!((s.lr_at(50) - 1e-6).abs() < 1e-18);
        assert!((s.lr_at(99) - 2e-8).abs() < 1e-18);
        assert_eq!(s.lr_at(100), 0.0);
    }

    #[test]
    fn cosine_is_half_way_at_the_middle() {
        let s = schedule(LrScheduler::Cosine, 0);
        assert_eq!(s.lr_at(0), 2e-6);
        assert!((s.lr_at(50) - 1e-6).abs() < 1e-15);
        assert!(s.lr_at(100).abs() < 1e-15);
    }

    #[test]
    fn warmup_ramps_up_from_zero() {
        let s = schedule(LrScheduler::Linear, 10);
        assert_eq!(s.lr_at(0), 0.0);
        assert!((s.lr_at(5) - 1e-6).abs() < 1e-18);
        assert_eq!(s.lr_at(10), 2e-6);
        assert!(
            (s.lr_at(55) - 1e-6).abs() < 1e-18,
            "decay spans the 90 steps after warmup"
        );
    }
}

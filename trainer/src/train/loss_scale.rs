//! Dynamic loss scaling for fp16 autocast: fp16 gradients underflow unless the loss is
//! multiplied up before backward. The scale halves (and the step is skipped) whenever a
//! gradient overflows, and doubles after a run of clean steps, as `torch.amp.GradScaler`.

use serde::{Deserialize, Serialize};

/// GradScaler's defaults: start at 2^16, ×2 after 2000 clean steps, ÷2 on overflow.
const INITIAL_SCALE: f64 = 65536.0;
const GROWTH_INTERVAL: u32 = 2000;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LossScaler {
    pub scale: f64,
    /// Clean steps since the scale last changed.
    pub clean_steps: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: INITIAL_SCALE,
            clean_steps: 0,
        }
    }
}

impl LossScaler {
    /// Records a step whose unscaled gradient norm was `grad_norm`; returns whether the
    /// optimizer may apply it.
    pub fn update(&mut self, grad_norm: f64) -> bool {
        if !grad_norm.is_finite() {
            self.scale /= 2.0;
            self.clean_steps = 0;
            return false;
        }
        self.clean_steps += 1;
        if self.clean_steps == GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.clean_steps = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_halves_the_scale_and_skips_the_step() {
        let mut scaler = LossScaler::default();
        assert!(scaler.update(3.0));
        assert!(!scaler.update(f64::INFINITY));
        assert_eq!(scaler.scale, INITIAL_SCALE / 2.0);
        assert!(!scaler.update(f64::NAN));
        assert_eq!((scaler.scale, scaler.clean_steps), (INITIAL_SCALE / 4.0, 0));
    }

    #[test]
    fn a_run_of_clean_steps_doubles_the_scale() {
        let mut scaler = LossScaler::default();
        for _ in 0..GROWTH_INTERVAL - 1 {
            assert!(scaler.update(1.0));
        }
        assert_eq!(scaler.scale, INITIAL_SCALE);
        assert!(scaler.update(1.0));
        assert_eq!((scaler.scale, scaler.clean_steps), (INITIAL_SCALE * 2.0, 0));
    }
}

//! Training: the objective, the optimizer, learning-rate schedules, cached examples and
//! the two-phase loop.

pub mod examples;
pub mod export;
pub mod lr_schedule;
pub mod objective;
pub mod optimizer;
pub mod preemption;
pub mod session;
pub mod state;
pub mod trainer;

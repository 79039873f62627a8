//! Training: the objective, the learning-rate schedules and (next) the two-phase loop.

pub mod lr_schedule;
pub mod objective;

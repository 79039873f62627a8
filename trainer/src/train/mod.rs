//! Training: the objective, the optimizer, learning-rate schedules, cached examples,
//! the two-phase loop, training states and whole sessions.

mod adam_moments;
pub mod class_images;
pub mod examples;
pub mod inputs;
pub mod loss_scale;
pub mod low_memory;
pub mod lr_schedule;
pub mod objective;
pub mod optimizer;
pub mod packed_master;
pub mod preemption;
mod run_settings;
pub mod session;
pub mod state;
pub mod trainer;

//! The contract between the user, the operator and the trainer: the session spec with its
//! defaults, presets and validation, and what the trainer reports back (progress, manifest,
//! outcome). Plain serde + schemars types; the Kubernetes resource is behind `crd`.

#[cfg(feature = "crd")]
pub mod crd;
pub mod manifest;
pub mod outcome;
pub mod presets;
pub mod progress;
mod schema;
pub mod session_file;
pub mod spec;
pub mod status;
pub mod validation;

pub use manifest::{Artifact, ArtifactKind, DatasetReport, Manifest};
pub use outcome::{ExitKind, Outcome};
pub use presets::{ResolvedTraining, resolve};
pub use progress::{Progress, Stage};
pub use session_file::{Session, SessionFileError};
pub use spec::SessionSpec;
pub use status::{Condition, ConditionType, Phase, SessionStatus};
pub use validation::{Problem, Report, Severity, validate};

//! How a trainer run ends: its exit code and the summary it leaves in the pod's
//! termination message. The one place that maps exit codes to meanings, for both binaries.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Kubernetes keeps at most 4096 bytes of a termination message.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// Why a trainer process ended, and what the operator should do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ExitKind {
    Succeeded,
    /// A bug or an unexpected failure: retried, since it may not recur.
    Internal,
    /// The session config is invalid: retrying cannot help.
    BadConfig,
    /// The images or the base model are unusable: retrying cannot help.
    BadData,
    /// Storage unreachable, throttled past the retries, and the like: retry and resume.
    Retriable,
    /// SIGTERM (preemption, eviction) after the state was saved: retry and resume.
    Preempted,
}

impl ExitKind {
    pub const ALL: [ExitKind; 6] = [
        ExitKind::Succeeded,
        ExitKind::Internal,
        ExitKind::BadConfig,
        ExitKind::BadData,
        ExitKind::Retriable,
        ExitKind::Preempted,
    ];

    pub fn code(self) -> i32 {
        match self {
            ExitKind::Succeeded => 0,
            ExitKind::Internal => 1,
            ExitKind::BadConfig => 64,
            ExitKind::BadData => 65,
            ExitKind::Retriable => 75,
            ExitKind::Preempted => 76,
        }
    }

    /// The meaning of a container exit code; signals and unknown codes are internal.
    pub fn from_code(code: i32) -> ExitKind {
        ExitKind::ALL
            .into_iter()
            .find(|k| k.code() == code)
            .unwrap_or(ExitKind::Internal)
    }

    /// Whether another attempt (resuming from the latest state) can succeed.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            ExitKind::Internal | ExitKind::Retriable | ExitKind::Preempted
        )
    }
}

/// The JSON the trainer writes to its termination message file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    pub outcome: ExitKind,
    /// Optimizer steps done over both phases.
    pub step: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Outcome {
    /// Serialises within Kubernetes' limit, shortening the message if it must.
    pub fn to_termination_message(&self) -> String {
        let mut outcome = self.clone();
        loop {
            let json = serde_json::to_string(&outcome).expect("outcome serialises");
            let excess = json.len().saturating_sub(TERMINATION_MESSAGE_LIMIT);
            let Some(message) = outcome.message.as_mut().filter(|_| excess > 0) else {
                return json;
            };
            // Escapes can make the JSON longer than the text, so cut and measure again.
            let mut keep = message.len().saturating_sub(excess + 3);
            while !message.is_char_boundary(keep) {
                keep -= 1;
            }
            message.truncate(keep);
            message.push_str("...");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_and_round_trip() {
        let mut codes: Vec<i32> = ExitKind::ALL.iter().map(|k| k.code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), ExitKind::ALL.len());
        for kind in ExitKind::ALL {
            assert_eq!(ExitKind::from_code(kind.code()), kind);
        }
        assert_eq!(ExitKind::from_code(137), ExitKind::Internal);
    }

    #[test]
    fn only_infrastructure_failures_are_retried() {
        assert!(ExitKind::Preempted.is_retriable());
        assert!(ExitKind::Retriable.is_retriable());
        assert!(!ExitKind::BadConfig.is_retriable());
        assert!(!ExitKind::BadData.is_retriable());
        assert!(!ExitKind::Succeeded.is_retriable());
    }

    #[test]
    fn termination_message_fits_the_kubernetes_limit() {
        let outcome = Outcome {
            outcome: ExitKind::BadData,
            step: 0,
            manifest_uri: None,
            message: Some("\"é\" bad image; ".repeat(1000)),
        };
        let message = outcome.to_termination_message();
        assert!(
            message.len() <= TERMINATION_MESSAGE_LIMIT,
            "{} bytes",
            message.len()
        );
        let parsed: Outcome = serde_json::from_str(&message).unwrap();
        assert_eq!(parsed.outcome, ExitKind::BadData);
        assert!(parsed.message.unwrap().ends_with("..."));

        let short = Outcome {
            message: Some("ok".into()),
            ..outcome
        };
        assert!(
            short
                .to_termination_message()
                .contains("\"message\":\"ok\"")
        );
    }
}

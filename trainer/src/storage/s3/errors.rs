//! Sorting the SDK's errors into what the trainer acts on: retry (throttling, 5xx,
//! timeouts, dropped connections) or report a permanent error naming the URI.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

use crate::storage::StorageError;
use crate::storage::retry::Failure;

/// Error codes S3 and compatible servers use for "slow down".
const THROTTLING_CODES: &[&str] = &[
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestThrottled",
];

const DENIED_CODES: &[&str] = &[
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
];

/// Classifies one failed SDK call on `uri` in `bucket`.
pub(crate) fn classify<E>(
    error: SdkError<E, HttpResponse>,
    uri: &str,
    bucket: &str,
) -> Failure<StorageError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let transient = |kind, message: String| Failure::Transient { kind, message };
    match &error {
        SdkError::TimeoutError(_) => transient("timeout", describe(&error)),
        SdkError::DispatchFailure(failure) if failure.is_timeout() => {
            transient("timeout", describe(&error))
        }
        SdkError::DispatchFailure(failure) if failure.is_user() => {
            Failure::Permanent(StorageError::Rejected {
                uri: uri.to_string(),
                message: describe(&error),
            })
        }
        SdkError::DispatchFailure(_) => transient("connection", describe(&error)),
        // A response cut off or garbled in transit.
        SdkError::ResponseError(_) => transient("connection", describe(&error)),
        SdkError::ServiceError(context) => {
            let status = context.raw().status().as_u16();
            let code = context.err().code().unwrap_or("");
            let message = context.err().message().unwrap_or("").to_string();
            let detail = if message.is_empty() {
                format!("HTTP {status} {code}")
            } else {
                format!("HTTP {status} {code}: {message}")
            };
            if status == 429 || THROTTLING_CODES.contains(&code) {
                transient("throttled", detail)
            } else if status >= 500 {
                transient("server_error", detail)
            } else if code == "NoSuchBucket" {
                Failure::Permanent(StorageError::NoSuchBucket {
                    uri: uri.to_string(),
                    bucket: bucket.to_string(),
                })
            } else if code == "NoSuchKey" || code == "NotFound" || status == 404 {
                Failure::Permanent(StorageError::NotFound {
                    location: uri.to_string(),
                })
            } else if status == 403 || DENIED_CODES.contains(&code) {
                Failure::Permanent(StorageError::AccessDenied {
                    uri: uri.to_string(),
                    message: detail,
                })
            } else {
                Failure::Permanent(StorageError::Rejected {
                    uri: uri.to_string(),
                    message: detail,
                })
            }
        }
        _ => Failure::Permanent(StorageError::Rejected {
            uri: uri.to_string(),
            message: describe(&error),
        }),
    }
}

/// The SDK's `Display` says only "dispatch failure"; the chain of sources says why.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

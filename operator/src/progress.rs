//! Polls a running trainer's `GET http://<podIP>:9090/progress`. A poll that fails or
//! times out only leaves the status as it was: the pod's state, not the endpoint,
//! decides the phase.

use std::time::Duration;

use dreambooth_api::Progress;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("{url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    #[error("{url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: not a progress document: {source}")]
    Body {
        url: String,
        source: serde_json::Error,
    },
}

/// An HTTP client for trainer pods, reused across polls.
#[derive(Clone)]
pub struct ProgressClient {
    client: Client<HttpConnector, Empty<Bytes>>,
    port: u16,
    timeout: Duration,
}

impl ProgressClient {
    /// `port` is the trainer's (9090 in a cluster); tests point it at a local server.
    pub fn new(port: u16, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        ProgressClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
            port,
            timeout,
        }
    }

    pub fn url(&self, pod_ip: &str) -> String {
        // IPv6 pod addresses need brackets in a URL.
        let host = if pod_ip.contains(':') {
            format!("[{pod_ip}]")
        } else {
            pod_ip.to_owned()
        };
        format!("http://{host}:{}/progress", self.port)
    }

    pub async fn poll(&self, pod_ip: &str) -> Result<Progress, PollError> {
        let url = self.url(pod_ip);
        match tokio::time::timeout(self.timeout, self.fetch(&url)).await {
            Ok(result) => result,
            Err(_) => Err(PollError::Timeout {
                url,
                timeout: self.timeout,
            }),
        }
    }

    async fn fetch(&self, url: &str) -> Result<Progress, PollError> {
        let http = |e: &dyn std::fmt::Display| PollError::Http {
            url: url.to_owned(),
            message: e.to_string(),
        };
        let uri: hyper::Uri = url.parse().map_err(|e| http(&e))?;
        let response = self.client.get(uri).await.map_err(|e| http(&e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(PollError::Status {
                url: url.to_owned(),
                status: status.as_u16(),
            });
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| http(&e))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|source| PollError::Body {
            url: url.to_owned(),
            source,
        })
    }
}

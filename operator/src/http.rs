//! A minimal HTTP/1 server for GET endpoints: the operator's `/metrics`, `/healthz` and
//! `/readyz`, and in tests a stand-in for a trainer's `/progress`.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::OperatorMetrics;

/// An answer: status code, content type and body.
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    pub fn json(body: impl Into<String>) -> Reply {
        Reply {
            status: 200,
            content_type: "application/json",
            body: body.into(),
        }
    }
}

/// Serves `route(path)` for every request until the task is dropped.
pub async fn serve<F>(listener: TcpListener, route: F)
where
    F: Fn(&str) -> Reply + Send + Sync + 'static,
{
    let route = Arc::new(route);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let route = route.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let reply = route(request.uri().path());
                async move {
                    let response = Response::builder()
                        .status(StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK))
                        .header("content-type", reply.content_type)
                        .body(Full::new(Bytes::from(reply.body)))
                        .expect("a valid response");
                    Ok::<_, Infallible>(response)
                }
            });
            // A client that hangs up mid-request is its own problem.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The operator's own endpoints: `/metrics`, `/healthz` (the process serves) and
/// `/readyz` (once `ready` is set; a standby waiting for the Lease is ready too).
pub fn operator_routes(
    metrics: OperatorMetrics,
    ready: Arc<std::sync::atomic::AtomicBool>,
) -> impl Fn(&str) -> Reply + Send + Sync + 'static {
    move |path| match path {
        "/metrics" => Reply {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: metrics.render(),
        },
        "/healthz" => Reply::text(200, "ok"),
        "/readyz" if ready.load(std::sync::atomic::Ordering::Relaxed) => Reply::text(200, "ready"),
        "/readyz" => Reply::text(503, "starting"),
        _ => Reply::text(404, "not found"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::progress::{PollError, ProgressClient};

    async fn get(port: u16, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut response)
            .await
            .unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
        (status, body)
    }

    #[tokio::test]
    async fn operator_endpoints_serve_metrics_and_health() {
        let metrics = OperatorMetrics::new();
        metrics.jobs_created.inc();
        let ready = Arc::new(AtomicBool::new(false));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(serve(listener, operator_routes(metrics, ready.clone())));
        assert_eq!(get(port, "/healthz").await.0, 200);
        assert_eq!(get(port, "/readyz").await.0, 503);
        ready.store(true, Ordering::Relaxed);
        assert_eq!(get(port, "/readyz").await.0, 200);
        let (status, body) = get(port, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            body.contains("dreambooth_operator_jobs_created_total 1"),
            "{body}"
        );
        assert_eq!(get(port, "/nope").await.0, 404);
        server.abort();
    }

    #[tokio::test]
    async fn a_silent_trainer_times_out_and_garbage_is_reported() {
        // Accepts connections and never answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((stream, _)) = silent.accept().await {
                open.push(stream);
            }
        });
        let client = ProgressClient::new(port, Duration::from_millis(300));
        let started = std::time::Instant::now();
        let error = client.poll("127.0.0.1").await.unwrap_err();
        assert!(matches!(error, PollError::Timeout { .. }), "{error}");
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(
            error
                .to_string()
                .contains(&format!("127.0.0.1:{port}/progress"))
        );
        hold.abort();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(serve(listener, |_| Reply::json("{\"step\": \"many\"}")));
        let error = ProgressClient::new(port, Duration::from_secs(2))
            .poll("127.0.0.1")
            .await
            .unwrap_err();
        assert!(matches!(error, PollError::Body { .. }), "{error}");
        server.abort();
    }

    #[test]
    fn ipv6_pod_addresses_are_bracketed() {
        let client = ProgressClient::new(9090, Duration::from_secs(1));
        assert_eq!(client.url("10.1.2.3"), "http://10.1.2.3:9090/progress");
        assert_eq!(client.url("fd00::7"), "http://[fd00::7]:9090/progress");
    }
}

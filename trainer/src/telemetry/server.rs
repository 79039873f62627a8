//! The trainer's HTTP endpoints: `GET /metrics`, `GET /progress`, `GET /healthz`.
//!
//! A plain std listener on one thread: the only clients are Prometheus and the operator,
//! each asking every few seconds, so connections are served one at a time, each with
//! timeouts so a stuck client cannot block the next.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use super::Telemetry;

/// How long one client may take to send its request or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Request heads beyond this are refused; ours are a line and a few headers.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// A running server; it lives until the process exits.
#[derive(Debug)]
pub struct TelemetryServer {
    local_addr: SocketAddr,
}

impl TelemetryServer {
    /// The bound address (with the real port when `:0` was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

/// Binds `addr` (`0.0.0.0:9090`, `127.0.0.1:0`) and serves `telemetry` on a thread.
pub fn serve(addr: SocketAddr, telemetry: Arc<Telemetry>) -> io::Result<TelemetryServer> {
    let listener = TcpListener::bind(addr)?;
    let local_addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("telemetry-http".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if let Err(error) = handle(stream, &telemetry) {
                    tracing::debug!("telemetry client: {error}");
                }
            }
        })?;
    Ok(TelemetryServer { local_addr })
}

/// One answer: status line, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
        }
    }
}

/// What `method path` gets; the query string is ignored.
pub fn route(telemetry: &Telemetry, method: &str, target: &str) -> Response {
    let path = target.split(['?', '#']).next().unwrap_or_default();
    if !matches!(path, "/metrics" | "/progress" | "/healthz") {
        return Response::text(
            404,
            &format!("no such endpoint `{path}`: try /metrics, /progress or /healthz"),
        );
    }
    if method != "GET" {
        return Response::text(405, &format!("{path} answers GET only"));
    }
    match path {
        "/metrics" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: telemetry.render_metrics(),
        },
        "/progress" => Response {
            status: 200,
            content_type: "application/json",
            body: serde_json::to_string(&telemetry.progress()).expect("progress serialises"),
        },
        _ => Response::text(200, "ok"),
    }
}

fn handle(mut stream: TcpStream, telemetry: &Telemetry) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let response = match read_request_line(&mut stream)? {
        Some(line) => {
            let mut parts = line.split_ascii_whitespace();
            match (parts.next(), parts.next()) {
                (Some(method), Some(target)) => route(telemetry, method, target),
                _ => Response::text(400, "malformed request line"),
            }
        }
        None => Response::text(400, "request head too large or incomplete"),
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(response.body.as_bytes())?;
    stream.flush()
}

/// Reads the request head (up to the blank line) and returns its first line; `None`
/// when the client stopped early or sent too much.
fn read_request_line(stream: &mut TcpStream) -> io::Result<Option<String>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST_HEAD {
            return Ok(None);
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    Ok(text.lines().next().map(str::to_owned))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dreambooth_api::{Progress, Stage};

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn routes_answer_each_endpoint_and_refuse_the_rest() {
        let telemetry = Telemetry::new("anna", tch::Device::Cpu);
        assert_eq!(route(&telemetry, "GET", "/healthz").status, 200);
        assert_eq!(route(&telemetry, "GET", "/metrics?x=1").status, 200);
        assert_eq!(route(&telemetry, "POST", "/progress").status, 405);
        let missing = route(&telemetry, "GET", "/nope");
        assert_eq!(missing.status, 404);
        assert!(missing.body.contains("/nope"), "{}", missing.body);
    }

    #[test]
    fn a_live_server_serves_the_latest_progress_and_metrics() {
        let telemetry = Arc::new(Telemetry::new("anna", tch::Device::Cpu));
        let server = serve("127.0.0.1:0".parse().unwrap(), Arc::clone(&telemetry)).unwrap();
        assert_ne!(server.local_addr().port(), 0);
        telemetry.record(&Progress {
            session: "anna".into(),
            stage: Stage::Unet,
            step: 5,
            total_steps: 9,
            ..Progress::default()
        });

        let answer = get(
            server.local_addr(),
            "GET /progress HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        let progress: Progress = serde_json::from_str(body).unwrap();
        assert_eq!(
            (progress.step, progress.total_steps, progress.stage),
            (5, 9, Stage::Unet)
        );

        let metrics = get(server.local_addr(), "GET /metrics HTTP/1.0\r\n\r\n");
        assert!(
            metrics.contains("dreambooth_trainer_step{session=\"anna\"} 5"),
            "{metrics}"
        );
        let health = get(server.local_addr(), "GET /healthz HTTP/1.1\r\n\r\n");
        assert!(health.starts_with("HTTP/1.1 200 OK"), "{health}");
        // A garbage request gets a 400, and the server keeps serving.
        assert!(get(server.local_addr(), "nonsense\r\n\r\n").starts_with("HTTP/1.1 400"));
        assert!(get(server.local_addr(), "GET /healthz HTTP/1.1\r\n\r\n").contains("ok"));
    }
}

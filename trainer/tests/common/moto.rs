//! A real S3 server for tests: `moto_server` from the project's venv (installed by the
//! bootstrap), started on a free 127.0.0.1 port and killed when the handle drops.
//! Standard library only, so any test crate can include it with
//! `#[path = ".../trainer/tests/common/moto.rs"] mod moto;`.

#![allow(dead_code)] // each test binary uses a different subset

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Keys moto accepts (it does not check them unless told to).
pub const ACCESS_KEY_ID: &str = "testing";
pub const SECRET_ACCESS_KEY: &str = "testing";
pub const REGION: &str = "us-east-1";

pub struct MotoServer {
    child: Child,
    addr: SocketAddr,
}

/// `<workspace>/.venv/bin/moto_server`, or `$MOTO_SERVER` when set.
pub fn moto_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MOTO_SERVER") {
        return PathBuf::from(path);
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|dir| dir.join(".venv").is_dir())
        .map(PathBuf::from)
        .expect("no .venv above the crate: run the bootstrap first");
    workspace.join(".venv/bin/moto_server")
}

/// A port nobody listens on right now (the OS picks it; the listener is closed again).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

impl MotoServer {
    /// Starts a server and waits until it answers; panics with its output if it cannot.
    pub fn start() -> MotoServer {
        Self::start_with_env(&[])
    }

    /// A server that checks credentials: every request must be signed by an access key
    /// moto's IAM knows, and it knows none, so any key is refused.
    pub fn start_checking_credentials() -> MotoServer {
        Self::start_with_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")])
    }

    fn start_with_env(env: &[(&str, &str)]) -> MotoServer {
        let binary = moto_binary();
        assert!(
            binary.is_file(),
            "{} is missing: run the bootstrap (it installs moto[server])",
            binary.display()
        );
        // Another process may take the port between picking and binding: try again.
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(&binary)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if http(addr, "GET", "/", b"").is_ok_and(|(status, _)| status > 0) {
                    return MotoServer { child, addr };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("moto_server did not come up on 127.0.0.1");
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Creates a bucket (moto takes unsigned requests).
    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) = http(self.addr, "PUT", &format!("/{bucket}"), b"")
            .unwrap_or_else(|e| panic!("create bucket {bucket}: {e}"));
        assert!(
            (200..300).contains(&status),
            "create bucket {bucket}: HTTP {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// Stores an object with a raw, unsigned PUT, claiming `sha256` as its recorded hash
    /// whatever the body is: how a test makes an object whose bytes do not match.
    pub fn put_raw(&self, bucket: &str, key: &str, body: &[u8], sha256: &str) {
        let (status, reply) = http_with(
            self.addr,
            "PUT",
            &format!("/{bucket}/{key}"),
            &[("x-amz-meta-sha256", sha256)],
            body,
        )
        .unwrap_or_else(|e| panic!("put {bucket}/{key}: {e}"));
        assert!(
            (200..300).contains(&status),
            "put {bucket}/{key}: HTTP {status}: {}",
            String::from_utf8_lossy(&reply)
        );
    }

    /// Stops the server now (for fault tests); dropping does the same.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One plain HTTP/1.1 request; returns the status code and the body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    http_with(addr, method, path, &[], body)
}

/// `http` with extra request headers.
pub fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = match response.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(at) => response[at + 4..].to_vec(),
        None => Vec::new(),
    };
    Ok((status, body))
}

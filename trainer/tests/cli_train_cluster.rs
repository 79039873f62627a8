//! `dreambooth-trainer train` as the operator runs it in a pod: the session as a
//! kubectl-style manifest on stdin, `/metrics`, `/progress` and `/healthz` on a port
//! while it trains, and the termination message and exit code for every way it ends.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dreambooth_api::{ExitKind, Outcome, Progress, Stage};

const TRAINER: &str = env!("CARGO_BIN_EXE_dreambooth-trainer");

/// A tiny model and six demo photos in a temporary folder.
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        let photos = dir.path().join("photos");
        run_ok(&["tiny-model", "--out", &p(&model), "--seed", "1"]);
        run_ok(&[
            "demo-photos",
            "--out",
            &p(&photos),
            "--count",
            "6",
            "--size",
            "48",
        ]);
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The ConfigMap's `session.json`: a manifest whose spec trains `te + unet` steps
    /// from `photos` into `output`.
    fn manifest(&self, name: &str, photos: &str, output: &str, te: u32, unet: u32) -> String {
        serde_json::json!({
            "apiVersion": "dreambooth.dev/v1alpha1",
            "kind": "DreamBoothSession",
            "metadata": {"name": name, "namespace": "team-a"},
            "spec": {
                "baseModel": {"uri": format!("file://{}", p(&self.path("model")))},
                "dataset": {
                    "uri": format!("file://{}", p(&self.path(photos))),
                    "token": "zwxtoy",
                    "resolution": 64,
                    "skipInvalid": false,
                },
                "output": {"uri": format!("file://{}", p(&self.path(output)))},
                "training": {
                    "unet": {"steps": unet, "learningRate": 2.0e-4},
                    "textEncoder": {"steps": te, "learningRate": 1.0e-4},
                    "seed": 7,
                },
                "checkpoints": {"precision": "fp32"},
                "samples": {"steps": 2},
            }
        })
        .to_string()
    }
}

fn p(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

fn run_ok(args: &[&str]) {
    let out = Command::new(TRAINER).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running `train -` with its session on stdin and its log read on a thread.
struct Trainer {
    child: Child,
    log: mpsc::Receiver<String>,
    lines: Vec<String>,
}

impl Trainer {
    fn start(session: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(TRAINER)
            .args(["train", "-", "--device", "cpu"])
            .args(extra)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(session.as_bytes())
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::channel();
        // Read to the end even when nobody listens: a closed pipe would fail the child.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self {
            child,
            log,
            lines: Vec::new(),
        }
    }

    /// Waits for a log line containing `needle` and returns it.
    fn wait_for_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            match self.log.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    self.lines.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!("no line with `{needle}` in:\n{}", self.lines.join("\n"));
    }

    /// The address the telemetry server reports it bound.
    fn telemetry_addr(&mut self) -> SocketAddr {
        let line = self.wait_for_line("serving /metrics");
        let url = line.rsplit("http://").next().unwrap();
        let addr = url.trim_end_matches(|c: char| !c.is_ascii_digit());
        addr.parse()
            .unwrap_or_else(|e| panic!("`{addr}` in `{line}`: {e}"))
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Exit code and the whole log.
    fn finish(mut self) -> (i32, String) {
        let status = self.child.wait().unwrap();
        self.lines.extend(self.log.iter());
        (status.code().unwrap_or(-1), self.lines.join("\n"))
    }
}

/// A plain HTTP/1.1 GET: status code and body.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// The value of `name{...session="<session>"...}` in Prometheus text.
fn metric(text: &str, name: &str, session: &str) -> Option<f64> {
    let label = format!("session=\"{session}\"");
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn termination(path: &Path) -> Outcome {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.len() <= dreambooth_api::outcome::TERMINATION_MESSAGE_LIMIT);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn send_sigterm(pid: u32) {
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
}

#[test]
fn metrics_and_progress_answer_while_a_session_trains() {
    let ws = Workspace::new();
    let log = ws.path("termination.json");
    let mut trainer = Trainer::start(
        &ws.manifest("anna", "photos", "out", 2, 10),
        &["--listen", "127.0.0.1:0", "--termination-log", &p(&log)],
    );
    let addr = trainer.telemetry_addr();

    let (mut steps, mut progress_seen, mut healthy) = (Vec::new(), Vec::new(), false);
    let mut last_metrics = String::new();
    while trainer.running() {
        let Ok((status, body)) = get(addr, "/metrics") else {
            break; // the process exited between the check and the request
        };
        assert_eq!(status, 200, "{body}");
        if let Some(step) = metric(&body, "dreambooth_trainer_step", "anna") {
            steps.push(step);
        }
        last_metrics = body;
        if let Ok((200, body)) = get(addr, "/progress") {
            let progress: Progress =
                serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body}: {e}"));
            progress_seen.push(progress);
        }
        healthy |= matches!(get(addr, "/healthz"), Ok((200, _)));
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, output) = trainer.finish();
    assert_eq!(code, 0, "{output}");

    assert!(healthy, "/healthz never answered 200");
    assert!(
        steps.windows(2).all(|w| w[0] <= w[1]),
        "the step went backwards: {steps:?}"
    );
    let distinct: std::collections::BTreeSet<u64> = steps.iter().map(|s| *s as u64).collect();
    assert!(distinct.len() >= 2, "the step did not advance: {steps:?}");
    assert_eq!(
        metric(&last_metrics, "dreambooth_trainer_total_steps", "anna"),
        Some(12.0),
        "{last_metrics}"
    );
    for name in [
        "dreambooth_trainer_loss",
        "dreambooth_trainer_learning_rate",
        "dreambooth_trainer_steps_per_second",
        "dreambooth_trainer_upload_bytes_total",
        "dreambooth_trainer_data_preparation_seconds",
    ] {
        assert!(
            metric(&last_metrics, name, "anna").is_some(),
            "{name} missing:\n{last_metrics}"
        );
    }
    assert!(
        metric(
            &last_metrics,
            "dreambooth_trainer_data_preparation_seconds",
            "anna"
        )
        .unwrap()
            > 0.0
    );
    let training = progress_seen
        .iter()
        .find(|p| p.stage == Stage::Unet && p.loss.is_some())
        .unwrap_or_else(|| panic!("no UNet progress in {progress_seen:?}"));
    assert_eq!(
        (training.session.as_str(), training.total_steps),
        ("anna", 12)
    );
    assert!(training.steps_per_second.unwrap() > 0.0);
    assert!(training.updated_at.is_some(), "{training:?}");

    let outcome = termination(&log);
    assert_eq!(outcome.outcome, ExitKind::Succeeded);
    assert_eq!(outcome.step, 12);
    let manifest_uri = outcome.manifest_uri.unwrap();
    assert_eq!(
        manifest_uri,
        format!("file://{}", p(&ws.path("out/manifest.json")))
    );
    assert!(outcome.message.is_none());
}

#[test]
fn bad_config_bad_data_and_a_taken_port_end_with_their_codes_and_messages() {
    let ws = Workspace::new();

    // Not a session at all: the parser names the field.
    let log = ws.path("config.json");
    let broken = ws
        .manifest("bob", "photos", "out", 1, 1)
        .replace("\"resolution\":64", "\"resolution\":\"big\"");
    let trainer = Trainer::start(&broken, &["--termination-log", &p(&log)]);
    let (code, output) = trainer.finish();
    assert_eq!(code, ExitKind::BadConfig.code(), "{output}");
    let outcome = termination(&log);
    assert_eq!(outcome.outcome, ExitKind::BadConfig);
    let message = outcome.message.unwrap();
    assert!(
        message.contains("<stdin>") && message.contains("resolution"),
        "{message}"
    );

    // A session that parses but cannot train: zero steps in both phases.
    let trainer = Trainer::start(
        &ws.manifest("bob", "photos", "out", 0, 0),
        &["--termination-log", &p(&log)],
    );
    let (code, output) = trainer.finish();
    assert_eq!(code, ExitKind::BadConfig.code(), "{output}");
    assert_eq!(termination(&log).outcome, ExitKind::BadConfig);

    // A photo that is not an image, with skipInvalid off.
    let photos = ws.path("broken-photos");
    std::fs::create_dir_all(&photos).unwrap();
    for entry in std::fs::read_dir(ws.path("photos")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), photos.join(entry.file_name())).unwrap();
    }
    std::fs::write(
        photos.join("zz-truncated.png"),
        b"\x89PNG\r\n\x1a\nnot really",
    )
    .unwrap();
    let log = ws.path("data.json");
    let trainer = Trainer::start(
        &ws.manifest("bob", "broken-photos", "out", 1, 1),
        &["--termination-log", &p(&log)],
    );
    let (code, output) = trainer.finish();
    assert_eq!(code, ExitKind::BadData.code(), "{output}");
    let outcome = termination(&log);
    assert_eq!((outcome.outcome, outcome.step), (ExitKind::BadData, 0));
    assert!(
        outcome.message.unwrap().contains("zz-truncated.png"),
        "the message names the file"
    );
    assert!(!ws.path("out/manifest.json").exists());

    // The metrics port is taken: the host's problem, worth another attempt.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let log = ws.path("port.json");
    let trainer = Trainer::start(
        &ws.manifest("bob", "photos", "out", 1, 1),
        &["--listen", &addr, "--termination-log", &p(&log)],
    );
    let (code, output) = trainer.finish();
    assert_eq!(code, ExitKind::Retriable.code(), "{output}");
    let outcome = termination(&log);
    assert_eq!(outcome.outcome, ExitKind::Retriable);
    assert!(
        outcome
            .message
            .unwrap()
            .contains(&format!("--listen {addr}"))
    );
}

#[test]
fn sigterm_saves_a_state_exits_preempted_and_the_rerun_resumes() {
    let ws = Workspace::new();
    let session = ws.manifest("carl", "photos", "out", 1, 8);
    let log = ws.path("termination.json");
    let mut trainer = Trainer::start(
        &session,
        &["--listen", "127.0.0.1:0", "--termination-log", &p(&log)],
    );
    let addr = trainer.telemetry_addr();
    // Signal once the UNet phase is under way, as the progress endpoint reports it.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "the UNet phase never started");
        assert!(
            trainer.running(),
            "the run ended before it could be preempted"
        );
        if let Ok((200, body)) = get(addr, "/progress") {
            let progress: Progress = serde_json::from_str(&body).unwrap();
            if progress.stage == Stage::Unet && progress.step >= 2 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    send_sigterm(trainer.child.id());
    let (code, output) = trainer.finish();
    assert_eq!(code, ExitKind::Preempted.code(), "{output}");
    let outcome = termination(&log);
    assert_eq!(outcome.outcome, ExitKind::Preempted);
    assert!(
        outcome.step >= 2 && outcome.step < 9,
        "preempted at {}",
        outcome.step
    );
    let state = ws.path(&format!("out/state/step_{}/state.json", outcome.step));
    assert!(state.exists(), "{} was not saved", state.display());
    assert!(!ws.path("out/manifest.json").exists());

    // The next attempt continues from that state instead of starting over.
    let rerun = Trainer::start(&session, &["--termination-log", &p(&log)]);
    let (code, output) = rerun.finish();
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains(&format!("resuming from step {}", outcome.step)),
        "{output}"
    );
    let finished = termination(&log);
    assert_eq!((finished.outcome, finished.step), (ExitKind::Succeeded, 9));
}

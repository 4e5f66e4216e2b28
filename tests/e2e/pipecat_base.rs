//! Single use, enforced from outside (issue 10 §1; DESIGN §4 "the http handoff"), against a
//! real FastAPI + uvicorn app that behaves like the Pipecat Cloud base image's server
//! (`tests/handoff/app.py`): `/bot` is answered only when the session ends, a client that goes
//! away does not end it, the app itself takes any number of sessions, and on SIGTERM uvicorn
//! refuses new connections, lets the running session finish and exits.
//!
//! The real botdispatch binary runs that app with the local provider (`handoff = "http"`),
//! cold and from a hot reserve, and the tests check that the session is delivered; that right
//! after delivery the process got SIGTERM, so a second `/bot` sent straight to its port is
//! refused; that the session still runs to its end and the provider then reports it ended; and
//! that nothing is left running.
//!
//! These tests need python3 with the packages `tests/handoff/requirements.txt` pins (installed
//! by `./scripts/test`); without them they fail, saying so. They never skip.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{
    get_json, hs_token, nix_kill, session_key, Dispatcher, JWT_SECRET, SESSION_SECRET,
};

/// How long the app's stub bot "talks" in the sessions botdispatch starts.
const SESSION_SECS: f64 = 3.0;
/// The app's start-up: `/readyz` answers 503 until then.
const STARTUP_SECS: f64 = 0.5;

/// The python3 that runs the app (an absolute path: the local provider gives bots only PATH
/// and HOME). Fails the test, saying what to do, when python3 or the app's packages are
/// missing.
fn python() -> String {
    let probe = Command::new("python3")
        .args(["-c", "import sys, fastapi, uvicorn; print(sys.executable)"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "python3 is needed to run tests/handoff/app.py and could not be run ({e}); \
                 install it, then run ./scripts/test (it installs the app's packages)"
            )
        });
    assert!(
        probe.status.success(),
        "python3 cannot import fastapi and uvicorn, which tests/handoff/app.py needs: run \
         ./scripts/test, or python3 -m pip install -r tests/handoff/requirements.txt\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    String::from_utf8(probe.stdout).unwrap().trim().to_owned()
}

fn app_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/handoff/app.py")
}

/// The value of ` name=value` in one of the app's lines.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let start = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
        + name.len()
        + 2;
    line[start..].split(' ').next().unwrap()
}

/// Whether `pid` is a live process (a zombie is not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// The live child processes of `parent`: pid and command line.
fn children_of(parent: u32) -> Vec<(u32, String)> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) && state != "Z" {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            children.push((pid, cmdline));
        }
    }
    children
}

/// Waits until `pid` is gone; panics after `timeout`.
fn wait_gone(pid: u32, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while running(pid) {
        assert!(
            Instant::now() < deadline,
            "{what} (pid {pid}) still runs after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigkill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// The real botdispatch binary running the app with the local provider: `handoff = "http"`,
/// local rooms, and a hot reserve of `reserve` machines (none when 0).
struct PcBase {
    d: Dispatcher,
    base: String,
    http: reqwest::Client,
    token: String,
    _config: tempfile::NamedTempFile,
}

impl PcBase {
    fn start(reserve: u32) -> Self {
        let python = python();
        let app = app_path().display().to_string();
        let mut toml = format!(
            "provider = \"local\"\nrooms = \"local\"\n\n[agents.default]\n\
             cmd = [{python:?}, {app:?}]\nhandoff = \"http\"\n\n[agents.default.env]\n\
             SESSION_SECS = \"{SESSION_SECS}\"\nSTARTUP_SECS = \"{STARTUP_SECS}\"\n"
        );
        if reserve > 0 {
            toml += &format!("\n[agents.default.reserve]\ntier = \"hot\"\nsize = {reserve}\n");
        }
        let mut config = tempfile::Builder::new()
            .prefix("pcbase-")
            .suffix(".toml")
            .tempfile()
            .unwrap();
        config.write_all(toml.as_bytes()).unwrap();
        let path = config.path().display().to_string();
        let home = std::env::var("HOME").unwrap_or_default();
        let mut d = Dispatcher::spawn(&[
            ("BOTDISPATCH_CONFIG", &path),
            ("BOTDISPATCH_JWT_SECRET", JWT_SECRET),
            ("BOTDISPATCH_SESSION_SECRET", SESSION_SECRET),
            ("BOTDISPATCH_RESERVE_INTERVAL_MS", "100"),
            ("HOME", &home),
        ]);
        let base = d.wait_ready();
        Self {
            d,
            base,
            http: reqwest::Client::new(),
            token: hs_token("alice"),
            _config: config,
        }
    }

    /// The pids of every app process this dispatcher started (each logs one when it listens).
    fn app_pids(&mut self) -> BTreeSet<u32> {
        self.d
            .output()
            .lines()
            .filter(|l| l.starts_with("[pcbase -] pid=") && l.contains(" listening on "))
            .map(|l| field(l, "pid").parse().unwrap())
            .collect()
    }

    /// Waits until the hot reserve has a ready machine (the dispatcher's own gauge).
    async fn wait_reserve_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let metrics = self
                .http
                .get(format!("{}/metrics", self.base))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let ready = metrics.lines().any(|l| {
                l.starts_with("botdispatch_reserve_machines{")
                    && l.contains("state=\"ready\"")
                    && l.ends_with(" 1")
            });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the hot reserve never got ready:\n{metrics}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the dispatcher with SIGTERM; it exits cleanly.
    fn shut_down(&mut self) {
        nix_kill(self.d.child.id(), "TERM");
        let status = self.d.wait_exit(Duration::from_secs(20));
        assert!(status.success(), "dispatcher exit status {status}");
    }
}

impl Drop for PcBase {
    /// A test that fails half-way leaves no app behind (they run in their own process groups,
    /// so killing the dispatcher would not reach them).
    fn drop(&mut self) {
        for pid in self.app_pids() {
            if running(pid) {
                sigkill(pid);
            }
        }
    }
}

/// One session through botdispatch, checked from start to end; returns the app's pid.
async fn session_is_single_use_and_runs_to_its_end(pc: &mut PcBase, start_type: &str) -> u32 {
    let booted_before = pc.app_pids();
    let t0 = Instant::now();
    let resp = pc
        .http
        .post(format!("{}/start", pc.base))
        .bearer_auth(&pc.token)
        .json(&json!({"body": {"hello": "pipecat-base"}}))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let started: Value = resp.json().await.unwrap();
    let answered = Instant::now();
    assert_eq!(status, StatusCode::OK, "{started}\n{}", pc.d.output());
    assert_eq!(started["status"], "ready", "{started}");
    assert_eq!(started["startType"], start_type, "{started}");
    let key = session_key(started["sessionId"].as_str().unwrap()).to_owned();
    let room = started["dailyRoom"].as_str().unwrap().to_owned();
    println!(
        "pipecat-base {start_type}: POST /start answered in {} ms",
        (answered - t0).as_millis()
    );

    // (1) Delivered: the app's bot() got the session id, the room, the bot's token and the body.
    let line = pc.d.wait_for(
        &format!("[pcbase {key}] session started room={room} "),
        Duration::from_secs(10),
    );
    let port: u16 = field(&line, "port").parse().unwrap();
    let pid: u32 = field(&line, "pid").parse().unwrap();
    assert_eq!(
        field(&line, "n"),
        "1",
        "not the process's first session: {line}"
    );
    assert!(
        field(&line, "token_chars").parse::<usize>().unwrap() > 0,
        "no room token: {line}"
    );
    assert!(
        line.ends_with(r#" body={"hello": "pipecat-base"}"#),
        "{line}"
    );
    if start_type == "hot" {
        assert!(
            booted_before.contains(&pid),
            "a hot start went to pid {pid}, not to a process booted before the start ({booted_before:?})"
        );
    } else {
        assert!(!booted_before.contains(&pid), "{pid} in {booted_before:?}");
    }

    // (2) Right after delivery the process got SIGTERM: uvicorn closed its listener...
    pc.d.wait_for(
        &format!("[pcbase -] pid={pid} signal SIGTERM"),
        Duration::from_secs(5),
    );
    pc.d.wait_for(
        &format!("[pcbase -] pid={pid} listener closed"),
        Duration::from_secs(5),
    );
    println!(
        "pipecat-base {start_type}: listener of pid {pid} closed {} ms after the start's answer",
        answered.elapsed().as_millis()
    );
    // ... so a second /bot sent straight to its port is refused, though the app itself would
    // take it (the_app_alone_takes_a_second_session_and_drains_on_sigterm).
    let second = pc
        .http
        .post(format!("http://127.0.0.1:{port}/bot"))
        .header("x-daily-session-id", "second-session")
        .header("x-daily-room-url", &room)
        .header("x-daily-room-token", "intruder")
        .json(&json!({}))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    match second {
        Err(e) if e.is_connect() => {}
        other => panic!("a second /bot reached pid {pid} after the handoff: {other:?}"),
    }
    // The session goes on: SIGTERM did not end it.
    let status_url = format!("{}{}", pc.base, started["statusUrl"].as_str().unwrap());
    let view = get_json(&pc.http, &status_url, &pc.token).await;
    assert_eq!(view["status"], "ready", "{view}");
    assert!(
        !pc.d
            .output()
            .contains(&format!("[pcbase {key}] session ended")),
        "the session ended early"
    );

    // (3) It runs to its end, then the process exits and the provider says the session ended.
    let ended = pc.d.wait_for(
        &format!("[pcbase {key}] session ended after "),
        Duration::from_secs_f64(SESSION_SECS + 10.0),
    );
    let talked: f64 = ended
        .rsplit("after ")
        .next()
        .and_then(|s| s.strip_suffix(" s"))
        .unwrap()
        .parse()
        .unwrap();
    assert!(talked >= SESSION_SECS, "{ended}");
    assert!(
        answered.elapsed() >= Duration::from_secs_f64(SESSION_SECS - 0.3),
        "the session ended {:?} after the start's answer",
        answered.elapsed()
    );
    // uvicorn exits once its last connection is closed: botdispatch keeps the /bot connection
    // alive, so that is uvicorn's keep-alive timeout (5 s) after the answer.
    pc.d.wait_for(
        &format!("[pcbase -] pid={pid} server stopped after 1 session(s)"),
        Duration::from_secs(15),
    );
    wait_gone(pid, Duration::from_secs(5), "the session's process");
    let exited = answered.elapsed();
    let deadline = Instant::now() + Duration::from_secs(5);
    let view = loop {
        let view = get_json(&pc.http, &status_url, &pc.token).await;
        if view["status"] != "ready" || Instant::now() > deadline {
            break view;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        view["status"], "ended",
        "the session ran to its end and its process exited after the SIGTERM botdispatch sent, \
         but the session reads as {view}"
    );
    assert_eq!(view["startType"], start_type, "{view}");
    println!(
        "pipecat-base {start_type}: session {key} on pid {pid} talked {talked:.2} s; its process exited {} ms after the start's answer",
        exited.as_millis()
    );

    // One session in that process, ever; and none anywhere else.
    let output = pc.d.output();
    assert_eq!(output.matches("] session started ").count(), 1, "{output}");
    pid
}

#[tokio::test]
async fn pipecat_base_cold_http_start_is_single_use_and_runs_to_its_end() {
    let mut pc = PcBase::start(0);
    let pid = session_is_single_use_and_runs_to_its_end(&mut pc, "cold").await;
    // (4) Nothing left: the dispatcher has no child process, and after it stops no app runs.
    let children = children_of(pc.d.child.id());
    assert!(children.is_empty(), "left running: {children:?}");
    pc.shut_down();
    assert_eq!(pc.app_pids(), BTreeSet::from([pid]));
}

#[tokio::test]
async fn pipecat_base_hot_reserve_start_is_single_use_and_runs_to_its_end() {
    let mut pc = PcBase::start(1);
    pc.wait_reserve_ready().await;
    let pid = session_is_single_use_and_runs_to_its_end(&mut pc, "hot").await;
    // (4) What still runs is the reserve's refill: a process that never had a session.
    let output = pc.d.output();
    for (child, cmdline) in children_of(pc.d.child.id()) {
        assert_ne!(child, pid);
        assert!(
            cmdline.contains("tests/handoff/app.py"),
            "unexpected child {child}: {cmdline}"
        );
        assert!(
            !output.contains(&format!(" pid={child} n=")),
            "a process that had a session still runs: {child}"
        );
    }
    pc.shut_down();
    for pid in pc.app_pids() {
        wait_gone(pid, Duration::from_secs(5), "an app process");
    }
}

/// The app's output lines, read on a thread.
struct Lines {
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn of(child: &mut Child) -> Self {
        let (tx, rx) = mpsc::channel();
        let out: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().unwrap());
        for stream in [out, err] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Self {
            rx,
            seen: Vec::new(),
        }
    }

    fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {needle:?} within {timeout:?}; output:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

/// Kills the app if the test fails half-way.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The stand-in's own behaviour, without botdispatch, so that the tests above prove something:
/// `/readyz` answers 200 only after start-up; a client that goes away does not end its session;
/// after a session the same process takes another (the app does not enforce single use); on
/// SIGTERM it refuses new connections, finishes the running session and exits.
// Two threads: the session sent before SIGTERM runs while this test blocks reading lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_alone_takes_a_second_session_and_drains_on_sigterm() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(python())
        .arg(app_path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::var("HOME").unwrap_or_default())
        .env("PORT", port.to_string())
        .env("SESSION_SECS", "1")
        // Wide enough to see the 503 even on a loaded machine.
        .env("STARTUP_SECS", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Lines::of(&mut child);
    let mut app = Killed(child);
    let pid = app.0.id();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let bot = format!("{base}/bot");
    let post = |key: &str| {
        http.post(&bot)
            .header("x-daily-session-id", key)
            .header("x-daily-room-url", "https://example.invalid/room")
            .header("x-daily-room-token", "token")
            // Ignored, as the base image ignores it.
            .bearer_auth("not-the-handoff-secret")
            .json(&json!({"key": key}))
    };

    // /readyz: 503 during start-up, then 200.
    lines.wait_for(
        &format!("[pcbase -] pid={pid} listening on 127.0.0.1:{port}"),
        Duration::from_secs(20),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut answers = Vec::new();
    loop {
        let status = match http.get(format!("{base}/readyz")).send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        };
        answers.push(status);
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "/readyz answered {answers:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(answers.contains(&503), "/readyz answered {answers:?}");

    // A client that goes away does not end its session.
    let t = Instant::now();
    let gone = post("s1").timeout(Duration::from_millis(200)).send().await;
    assert!(gone.is_err_and(|e| e.is_timeout()), "/bot answered at once");
    lines.wait_for("[pcbase s1] session ended after ", Duration::from_secs(5));
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());

    // The same process takes a second session, and answers when it ends.
    let t = Instant::now();
    let resp = post("s2").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({}));
    let line = lines.wait_for("[pcbase s2] session started", Duration::from_secs(10));
    assert_eq!(field(&line, "n"), "2", "{line}");
    assert_eq!(field(&line, "pid"), pid.to_string(), "{line}");

    // SIGTERM during a session: no new connection, the session finishes, then the process
    // exits (killed by the SIGTERM uvicorn raises again once it has drained).
    let third = tokio::spawn(post("s3").send());
    lines.wait_for("[pcbase s3] session started", Duration::from_secs(5));
    nix_kill(pid, "TERM");
    lines.wait_for(
        &format!("[pcbase -] pid={pid} listener closed"),
        Duration::from_secs(5),
    );
    let refused = http.get(format!("{base}/readyz")).send().await;
    assert!(
        refused.as_ref().is_err_and(|e| e.is_connect()),
        "{refused:?}"
    );
    let resp = third.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    lines.wait_for("[pcbase s3] session ended after ", Duration::from_secs(10));
    lines.wait_for(
        &format!("[pcbase -] pid={pid} server stopped after 3 session(s)"),
        Duration::from_secs(15),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = app.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the app did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.signal(), Some(15), "exit status {status}");
}

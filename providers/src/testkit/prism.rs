//! Runs the real Stoplight Prism proxy (`@stoplight/prism-cli` 5.14.2) in front of a fake, so
//! that requests and the fake's responses are checked by an independent OpenAPI implementation.
//!
//! Install it with `npm install --no-save @stoplight/prism-cli@5.14.2` at the workspace root
//! (or point `PRISM_BIN` at a `prism` executable); without it [`PrismProxy::spawn`] returns
//! `None` and callers skip.
//!
//! What Prism 5.14.2's `prism proxy <spec> <upstream> --errors` does (observed):
//!
//! - It serves the spec's paths as written, i.e. for Fly **without** `/v1`: clients call
//!   `http://127.0.0.1:PORT/apps/...`; `/v1/apps/...` answers 404 `NO_PATH_MATCHED_ERROR`.
//! - It forwards a valid request to `upstream + request path`, keeping the upstream's own path
//!   prefix: with upstream `http://h/pfx`, `POST /apps/x/machines` goes to
//!   `http://h/pfx/apps/x/machines`. So a fake's `root_url()` and its `base_url()` (with `/v1`)
//!   both work as upstream. Query string and `Authorization` header are forwarded verbatim.
//! - An invalid request is not forwarded: it answers 422 with an `application/problem+json`
//!   body (`type: https://stoplight.io/prism/errors#UNPROCESSABLE_ENTITY`, and `validation`
//!   entries such as `{"location": ["body","config","restart","policy"], "code": "enum"}`).
//!   Checked: body types and enums, integer vs `1.5`, missing required body, query parameter
//!   types (`timeout=abc`, `include_deleted=yes`).
//! - It does **not** reject unknown body fields (the spec never says
//!   `additionalProperties: false`, so `auto_destory` passes) nor undeclared query parameters
//!   (forwarded as they are).
//!   [`OpenApiValidator`](super::validate::openapi::OpenApiValidator), used by the fakes, is
//!   strict about both.
//! - It rejects `state=started,stopped` (and repeated `state`) on `/wait`, although Fly
//!   documents comma-separated and repeated values there: the spec declares a plain string enum.
//! - It validates the upstream's responses too: a response whose body violates the declared
//!   schema becomes a 500 `#VIOLATIONS` problem; a status the spec does not declare (404, 408,
//!   409, 412, ...) only logs a warning and is passed through.
//! - Startup takes several seconds (it prints every route first).

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long [`PrismProxy::spawn`] waits for Prism to accept connections.
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);

/// A running `prism proxy` child process; killed when dropped.
#[derive(Debug)]
pub struct PrismProxy {
    child: Child,
    url: String,
    log_path: PathBuf,
}

/// Path of the embedded Fly Machines OpenAPI spec on disk.
pub fn fly_spec_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/testkit/specs/fly-machines-openapi.json")
}

impl PrismProxy {
    /// The Prism executable: `PRISM_BIN` if set, else `<workspace root>/node_modules/.bin/prism`.
    /// `None` if that file does not exist.
    pub fn binary() -> Option<PathBuf> {
        let path = match std::env::var_os("PRISM_BIN") {
            Some(bin) => PathBuf::from(bin),
            None => Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()?
                .join("node_modules/.bin/prism"),
        };
        path.is_file().then_some(path)
    }

    /// Starts `prism proxy <spec_path> <upstream> --errors` on a free local port and waits (at
    /// most 60 s) until it accepts connections. Returns `None` when Prism is not installed.
    ///
    /// Blocks the calling thread while Prism starts (seconds); from async code, call it through
    /// `tokio::task::spawn_blocking`.
    ///
    /// # Panics
    ///
    /// Panics, with Prism's output, if Prism is installed but exits or does not listen in time.
    pub fn spawn(spec_path: &Path, upstream: &str) -> Option<PrismProxy> {
        let binary = Self::binary()?;
        // The port is free when chosen but may be taken before Prism binds it: then Prism
        // exits with EADDRINUSE and another port is tried.
        for _ in 0..5 {
            if let Some(proxy) = Self::spawn_on(&binary, spec_path, upstream, free_port()) {
                return Some(proxy);
            }
        }
        panic!("prism found no free port in five tries");
    }

    /// One attempt; `None` when the port was taken under Prism's feet.
    fn spawn_on(binary: &Path, spec_path: &Path, upstream: &str, port: u16) -> Option<PrismProxy> {
        let log_path = std::env::temp_dir().join(format!(
            "botdispatch-prism-{}-{port}.log",
            std::process::id()
        ));
        let log = File::create(&log_path).expect("create the Prism log file");
        let child = Command::new(binary)
            .arg("proxy")
            .arg(spec_path)
            .arg(upstream)
            .args(["--errors", "--host", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                log.try_clone().expect("clone the Prism log file"),
            ))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        let mut proxy = PrismProxy {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log_path,
        };

        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            // Listening means Prism says so itself: something else may hold the port.
            if proxy.log().contains("is listening on")
                && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            {
                return Some(proxy);
            }
            if let Ok(Some(status)) = proxy.child.try_wait() {
                if proxy.log().contains("EADDRINUSE") {
                    return None;
                }
                panic!(
                    "prism exited with {status} before listening:\n{}",
                    proxy.log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "prism did not listen on {addr} within {STARTUP_DEADLINE:?}:\n{}",
                    proxy.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `http://127.0.0.1:PORT` (no `/v1`: Prism serves the spec's paths as written).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Prism's output so far (it logs every request and every violation).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for PrismProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log_path);
    }
}

/// A port that was free a moment ago (bound to `127.0.0.1:0`, then released).
fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free local port")
}

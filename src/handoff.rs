//! The `http` handoff (DESIGN §4): wait until a booted machine's bot answers `GET /readyz`, then
//! deliver the session with `POST /bot`, the way images built `FROM dailyco/pipecat-base`
//! expect it. Pipecat Cloud base images answer `/bot` only when the session ends, so a session
//! counts as delivered once its request was sent and no error came back at once; an error that
//! comes later is reported to a callback.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use providers::Deadline;
use sha2::Sha256;
use tokio::sync::oneshot;
use url::Url;

/// After the request was sent, how long an answer may take to count as "at once" (a refusal
/// before the session began) rather than "later".
const REFUSAL_WINDOW: Duration = Duration::from_millis(30);
/// Polling of `/readyz`: first interval, then growing to at most this.
const READY_POLL_FIRST: Duration = Duration::from_millis(10);
const READY_POLL_MAX: Duration = Duration::from_millis(250);

/// Why a handoff did not happen.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The bot never answered `/readyz` 200 before the deadline.
    #[error("the bot was not ready before the deadline ({0})")]
    NotReady(String),
    /// The bot's server could not be reached to deliver the session.
    #[error("the bot's server could not be reached: {0}")]
    Unreachable(String),
    /// The bot refused the session at once (`status`).
    #[error("the bot refused the session with HTTP {0}")]
    Refused(u16),
}

/// The per-machine secrets a bot checks `/bot`'s bearer token against: derived statelessly
/// from the session signing key and the machine's name, so every replica knows them.
#[derive(Clone)]
pub struct HandoffSecrets {
    key: Vec<u8>,
}

impl HandoffSecrets {
    pub fn new(session_key: &[u8]) -> Self {
        Self {
            key: session_key.to_vec(),
        }
    }

    /// The secret of the machine named `name` (64 hex characters).
    pub fn for_machine(&self, name: &str) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(b"handoff\0");
        mac.update(name.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// One session to deliver.
#[derive(Debug, Clone)]
pub struct Session<'a> {
    pub room_url: Option<&'a str>,
    pub room_token: Option<&'a str>,
    pub session_key: &'a str,
    /// The start request's `body` (`{}` when none), as JSON.
    pub body_json: &'a str,
    /// The machine's handoff secret.
    pub secret: &'a str,
}

/// What `/bot` answered once the session is over (or failed later).
pub type LaterAnswer = Result<u16, String>;

/// The HTTP side of the handoff, on the dispatcher's shared client.
#[derive(Clone)]
pub struct HandoffClient {
    http: reqwest::Client,
}

impl HandoffClient {
    pub fn new(http: reqwest::Client) -> Self {
        Self { http }
    }

    /// `base` with `segment` appended to its path (`/readyz`, `/bot`).
    fn url(base: &Url, segment: &str) -> Url {
        let mut url = base.clone();
        let path = format!("{}/{segment}", url.path().trim_end_matches('/'));
        url.set_path(&path);
        url
    }

    /// Polls `GET /readyz` until it answers 200 or `deadline`. A refused connection is a bot
    /// still booting.
    pub async fn wait_ready(&self, base: &Url, deadline: Deadline) -> Result<(), HandoffError> {
        let url = Self::url(base, "readyz");
        let mut delay = READY_POLL_FIRST;
        let mut last = "no answer yet".to_owned();
        loop {
            let left = deadline.remaining();
            if left.is_zero() {
                return Err(HandoffError::NotReady(last));
            }
            let answer = self
                .http
                .get(url.clone())
                .timeout(left.min(Duration::from_secs(2)))
                .send()
                .await;
            match answer {
                Ok(resp) if resp.status().is_success() => return Ok(()),
                Ok(resp) => last = format!("/readyz answered {}", resp.status().as_u16()),
                Err(e) => last = providers::http::transport_message(&e),
            }
            tokio::time::sleep(delay.min(deadline.remaining())).await;
            delay = (delay * 2).min(READY_POLL_MAX);
        }
    }

    /// Sends `POST /bot` and returns once the session counts as delivered: the request was
    /// sent and the bot did not refuse it at once. The answer that comes when the session
    /// ends (or an error that comes later) goes to `later`, from a task that outlives this
    /// call, so a client that stays connected for an hour costs nothing here.
    pub async fn deliver(
        &self,
        base: &Url,
        session: &Session<'_>,
        later: impl FnOnce(LaterAnswer) + Send + 'static,
    ) -> Result<(), HandoffError> {
        let (sent_tx, sent_rx) = oneshot::channel();
        let body = reqwest::Body::wrap_stream(SentSignal {
            body: Some(Bytes::from(session.body_json.to_owned())),
            sent: Some(sent_tx),
        });
        let mut req = self
            .http
            .post(Self::url(base, "bot"))
            .header("content-type", "application/json")
            .header("content-length", session.body_json.len())
            // The connection serves this one request: a bot server waiting for its open
            // connections before it exits (uvicorn, after SIGTERM) is not held by it.
            .header("connection", "close")
            .bearer_auth(session.secret)
            .header("x-daily-session-id", session.session_key)
            .body(body);
        if let (Some(url), Some(token)) = (session.room_url, session.room_token) {
            req = req
                .header("x-daily-room-url", url)
                .header("x-daily-room-token", token);
        }
        let (answer_tx, mut answer_rx) = oneshot::channel();
        tokio::spawn(async move {
            let answer = match req.send().await {
                Ok(resp) => Ok(resp.status().as_u16()),
                Err(e) => Err(providers::http::transport_message(&e)),
            };
            if let Err(answer) = answer_tx.send(answer) {
                later(answer);
            }
        });
        // Until the body is sent, any answer is a refusal; afterwards, only one that comes
        // within the refusal window.
        tokio::select! {
            sent = sent_rx => if sent.is_err() {
                return Err(early(answer_rx.await));
            },
            answer = &mut answer_rx => return refused_or_ok(answer),
        }
        match tokio::time::timeout(REFUSAL_WINDOW, &mut answer_rx).await {
            Ok(answer) => refused_or_ok(answer),
            // Still running: the bot has its session. The spawned task reports the end.
            Err(_) => {
                drop(answer_rx);
                Ok(())
            }
        }
    }
}

/// What an answer that came before the session counted as delivered means.
fn refused_or_ok(
    answer: Result<LaterAnswer, oneshot::error::RecvError>,
) -> Result<(), HandoffError> {
    match answer {
        Ok(Ok(status)) if (200..300).contains(&status) => Ok(()),
        other => Err(early(other)),
    }
}

fn early(answer: Result<LaterAnswer, oneshot::error::RecvError>) -> HandoffError {
    match answer {
        Ok(Ok(status)) => HandoffError::Refused(status),
        Ok(Err(transport)) => HandoffError::Unreachable(transport),
        Err(_) => HandoffError::Unreachable("the request ended without an answer".to_owned()),
    }
}

/// A one-chunk request body that says when the HTTP client takes it: the connection is up,
/// the head is written and the body goes on the wire. Dropped untaken (a refused connection),
/// it says nothing.
struct SentSignal {
    body: Option<Bytes>,
    sent: Option<oneshot::Sender<()>>,
}

impl futures_util::Stream for SentSignal {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(sent) = self.sent.take() {
            let _ = sent.send(());
        }
        Poll::Ready(self.body.take().map(Ok))
    }
}

/// Handoff secrets and client together, as the start flow uses them.
#[derive(Clone)]
pub struct Handoff {
    pub client: HandoffClient,
    pub secrets: Arc<HandoffSecrets>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_per_machine_and_stable() {
        let secrets = HandoffSecrets::new(b"k");
        assert_eq!(secrets.for_machine("a"), secrets.for_machine("a"));
        assert_ne!(secrets.for_machine("a"), secrets.for_machine("b"));
        assert_ne!(
            secrets.for_machine("a"),
            HandoffSecrets::new(b"other").for_machine("a")
        );
        assert_eq!(secrets.for_machine("a").len(), 64);
    }

    #[test]
    fn paths_are_appended_to_the_base() {
        let base = Url::parse("http://gw.internal/machines/abc").unwrap();
        assert_eq!(
            HandoffClient::url(&base, "readyz").as_str(),
            "http://gw.internal/machines/abc/readyz"
        );
        let root = Url::parse("http://10.0.0.1:8080").unwrap();
        assert_eq!(
            HandoffClient::url(&root, "bot").as_str(),
            "http://10.0.0.1:8080/bot"
        );
    }
}

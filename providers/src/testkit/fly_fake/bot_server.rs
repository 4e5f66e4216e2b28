//! Each machine's bot HTTP server, served under `/_bot/{machine_id}`: `GET /readyz`,
//! `GET /livez` and `POST /bot`, behaving like the Pipecat Cloud base image
//! (`pipecat-base/app.py` of daily-co/pipecat-cloud-images):
//!
//! - `/readyz` is 200 `{"status": "ok"}` once the app booted, 503 `{"status": "not ready"}`
//!   before;
//! - `/bot` (a JSON object body; `X-Daily-Room-Url`, `X-Daily-Room-Token`,
//!   `X-Daily-Session-Id` headers) runs the session and answers 200 `{}` only when it ended; a
//!   body that is not an object is 422 (FastAPI's `body: dict`);
//! - a second `/bot` in the same boot is accepted too (recorded as a violation);
//! - a server that is not up (machine not `started`) or draining (SIGTERM, stop) takes no
//!   request: the connection is reset. A session whose process dies or is frozen has its
//!   connection reset as well.
//!
//! On top of the base image: `/bot` before the app is ready answers 503, and with
//! [`check_handoff_secret`](super::FakeFlyWarmConfig::check_handoff_secret) a wrong or missing
//! `Authorization: Bearer <BOTDISPATCH_HANDOFF_SECRET>` answers 401 (botdispatch's example
//! bot).

use std::sync::Arc;

use axum::http::header::AUTHORIZATION;
use chrono::Utc;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::super::faults;
use super::super::server::{Reply, Request};
use super::state::{Session, SessionEnd, Shared};
use super::{Delivery, HandoffAuth, ViolationKind};

/// What the bot server does with a request: answer now, or once a session ends.
enum BotAnswer {
    Now(Reply),
    Session(oneshot::Receiver<SessionEnd>),
}

impl Shared {
    /// A request to `/_bot/{rest}`.
    pub(super) async fn serve_bot(self: &Arc<Self>, request: &Request, rest: &str) -> Reply {
        let (id, path) = rest.split_once('/').unwrap_or((rest, ""));
        let answer = self.bot_request(request, id, path);
        self.notify();
        match answer {
            BotAnswer::Now(reply) => reply,
            BotAnswer::Session(done) => match done.await {
                Ok(SessionEnd::Finished) => Reply::json(200, json!({})),
                Ok(SessionEnd::Killed) | Err(_) => Reply::Reset,
            },
        }
    }

    fn bot_request(self: &Arc<Self>, request: &Request, id: &str, path: &str) -> BotAnswer {
        let mut state = self.lock();
        let Some(i) = state.machines.iter().position(|r| r.machine.id == id) else {
            // No such machine: nothing listens there.
            return BotAnswer::Now(Reply::Reset);
        };
        let record = &mut state.machines[i];
        let ready = record.ready();
        let Some(process) = record
            .process
            .as_ref()
            .filter(|p| !p.draining && record.machine.state == "started")
        else {
            return BotAnswer::Now(Reply::Reset);
        };
        match (request.method.as_str(), path) {
            ("GET", "readyz") => {
                return BotAnswer::Now(if ready {
                    Reply::json(200, json!({"status": "ok"}))
                } else {
                    Reply::json(503, json!({"status": "not ready"}))
                })
            }
            ("GET", "livez") => return BotAnswer::Now(Reply::json(200, json!({"status": "ok"}))),
            ("POST", "bot") => {}
            (_, "readyz" | "livez" | "bot") => {
                return BotAnswer::Now(Reply::json(405, json!({"detail": "Method Not Allowed"})))
            }
            _ => return BotAnswer::Now(Reply::json(404, json!({"detail": "Not Found"}))),
        }

        let auth = match (record.handoff_secret(), request.header(AUTHORIZATION)) {
            (None, _) => HandoffAuth::NoSecret,
            (Some(_), None) => HandoffAuth::Missing,
            (Some(secret), Some(header)) if header.strip_prefix("Bearer ") == Some(secret) => {
                HandoffAuth::Matched
            }
            (Some(_), Some(_)) => HandoffAuth::Mismatched,
        };
        let body = request.json_body().ok().flatten();
        let header = |name: &str| request.header(name).map(str::to_owned);
        let mut delivery = Delivery {
            boot_id: process.boot_id.clone(),
            image_boot_id: process.image_boot_id.clone(),
            session_id: header("x-daily-session-id"),
            room_url: header("x-daily-room-url"),
            room_token: header("x-daily-room-token"),
            auth,
            body: body.clone(),
            accepted: false,
            status: None,
            at: Utc::now(),
        };

        let refusal = if let Some(status) = record.bot_refusal.take() {
            Some((status, json!({"detail": faults::reason(status)})))
        } else if !ready {
            Some((503, json!({"status": "not ready"})))
        } else if !body.as_ref().is_some_and(Value::is_object) {
            Some((
                422,
                json!({"detail": [{
                    "type": "dict_type",
                    "loc": ["body"],
                    "msg": "Input should be a valid dictionary",
                    "input": body,
                }]}),
            ))
        } else if self.warm.check_handoff_secret
            && matches!(auth, HandoffAuth::Missing | HandoffAuth::Mismatched)
        {
            Some((401, json!({"detail": "invalid handoff secret"})))
        } else {
            None
        };
        if let Some((status, answer)) = refusal {
            delivery.status = Some(status);
            record.machine.deliveries.push(delivery);
            return BotAnswer::Now(Reply::json(status, answer));
        }

        // Accepted: a session runs in this boot.
        delivery.accepted = true;
        let earlier = record.machine.deliveries.iter().filter(|d| d.accepted);
        let violation = if earlier.clone().any(|d| d.boot_id == delivery.boot_id) {
            Some((
                ViolationKind::SecondSessionInBoot,
                format!(
                    "/bot (session {:?}) accepted by boot {} after an earlier session",
                    delivery.session_id, delivery.boot_id
                ),
            ))
        } else if earlier
            .clone()
            .any(|d| d.image_boot_id == delivery.image_boot_id)
        {
            Some((
                ViolationKind::SessionWithoutFreshBoot,
                format!(
                    "/bot (session {:?}) reached boot {}, resumed from the memory of boot {} \
                     that already served a session",
                    delivery.session_id, delivery.boot_id, delivery.image_boot_id
                ),
            ))
        } else {
            None
        };
        let index = record.machine.deliveries.len();
        record.machine.deliveries.push(delivery);
        state.sessions += 1;
        let session_id = state.sessions;
        let record = &mut state.machines[i];
        let (done, waiting) = oneshot::channel();
        if let Some(process) = record.process.as_mut() {
            process.sessions.push(Session {
                id: session_id,
                delivery: index,
                done,
            });
        }
        if let Some((kind, detail)) = violation {
            state.violation(id, kind, detail);
        }
        drop(state);

        if let Some(duration) = self.warm.session_duration {
            let this = self.clone();
            let id = id.to_owned();
            tokio::spawn(async move {
                tokio::time::sleep(duration).await;
                this.end_sessions(&id, Some(session_id));
            });
        }
        BotAnswer::Session(waiting)
    }
}

//! Tests of what the Fly fake offers warm starts, through real HTTP: `skip_launch`, start,
//! suspend/resume, signals, leases, multi-key metadata, updates, and each machine's bot HTTP
//! server (`/readyz`, `/bot`) with its observability (boots, deliveries, violations).

#![cfg(feature = "testkit")]

use std::time::Duration;

use providers::testkit::fly_fake::{
    BootKind, FakeFly, FakeFlyConfig, FakeFlyWarmConfig, FlyOp, HandoffAuth, ViolationKind,
};
use providers::testkit::prism::{fly_spec_path, PrismProxy};
use providers::testkit::Fault;
use serde_json::{json, Value};

const APP: &str = "bots";
const TOKEN: &str = "fly-secret";
const SECRET: &str = "handoff-secret-1";
const NONCE: &str = "fly-machine-lease-nonce";
const PATIENCE: Duration = Duration::from_secs(10);

fn fly_config() -> FakeFlyConfig {
    FakeFlyConfig {
        token: TOKEN.to_owned(),
        apps: vec![APP.to_owned()],
        boot_delay: Duration::from_millis(10),
        starting_for: Duration::from_millis(10),
        stop_delay: Duration::from_millis(10),
        wait_second: Duration::from_millis(200),
        ..FakeFlyConfig::default()
    }
}

fn warm_config() -> FakeFlyWarmConfig {
    FakeFlyWarmConfig {
        start_delay: Duration::from_millis(10),
        resume_delay: Duration::from_millis(10),
        suspend_delay: Duration::from_millis(10),
        ..FakeFlyWarmConfig::default()
    }
}

fn machine_body(auto_destroy: bool, skip_launch: bool) -> Value {
    json!({
        "region": "ams",
        "skip_launch": skip_launch,
        "config": {
            "image": "registry.fly.io/bot:1",
            "env": {"BOTDISPATCH_HANDOFF_SECRET": SECRET},
            "guest": {"cpus": 1, "memory_mb": 1024, "cpu_kind": "shared"},
            "metadata": {"managed_by": "botdispatch", "botdispatch_tier": "reserve"},
            "auto_destroy": auto_destroy,
            "restart": {"policy": "no"}
        }
    })
}

struct Answer {
    status: u16,
    body: Value,
}

/// A small client for the fake's API and its machines' bot servers.
struct Fly {
    fake: FakeFly,
    http: reqwest::Client,
}

impl Fly {
    async fn start(warm: FakeFlyWarmConfig) -> Self {
        Self {
            fake: FakeFly::start_with(fly_config(), warm).await,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/apps/{APP}/machines{path}", self.fake.base_url())
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.bearer_auth(TOKEN).send().await.unwrap();
        answer(response).await
    }

    async fn post(&self, path: &str, body: Option<Value>, nonce: Option<&str>) -> Answer {
        let mut request = self.http.post(self.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        if let Some(nonce) = nonce {
            request = request.header(NONCE, nonce);
        }
        self.send(request).await
    }

    async fn create(&self, body: Value) -> (String, Value) {
        let created = self.post("", Some(body), None).await;
        assert_eq!(created.status, 200, "{}", created.body);
        (
            created.body["id"].as_str().unwrap().to_owned(),
            created.body,
        )
    }

    async fn get(&self, id: &str) -> Value {
        let got = self.send(self.http.get(self.url(&format!("/{id}")))).await;
        assert_eq!(got.status, 200, "{}", got.body);
        got.body
    }

    async fn wait(&self, id: &str, state: &str) {
        let waited = self
            .send(
                self.http
                    .get(self.url(&format!("/{id}/wait")))
                    .query(&[("state", state), ("timeout", "30")]),
            )
            .await;
        assert_eq!(waited.status, 200, "waiting for {state}: {}", waited.body);
    }

    async fn start_machine(&self, id: &str, nonce: Option<&str>) -> Answer {
        self.post(&format!("/{id}/start"), None, nonce).await
    }

    async fn suspend(&self, id: &str, nonce: Option<&str>) -> Answer {
        self.post(&format!("/{id}/suspend"), None, nonce).await
    }

    async fn stop(&self, id: &str, nonce: Option<&str>) -> Answer {
        self.post(&format!("/{id}/stop"), None, nonce).await
    }

    async fn signal(&self, id: &str, signal: &str) -> Answer {
        self.post(
            &format!("/{id}/signal"),
            Some(json!({ "signal": signal })),
            None,
        )
        .await
    }

    async fn metadata(&self, method: reqwest::Method, id: &str, body: Value) -> Answer {
        self.send(
            self.http
                .request(method, self.url(&format!("/{id}/metadata")))
                .json(&body),
        )
        .await
    }

    /// A launched machine that is `started`.
    async fn started(&self, auto_destroy: bool) -> String {
        let (id, _) = self.create(machine_body(auto_destroy, false)).await;
        self.wait(&id, "started").await;
        id
    }

    /// `GET {machine}/readyz`: `Err` when the connection failed.
    async fn readyz(&self, id: &str) -> Result<Answer, reqwest::Error> {
        let url = format!("{}/readyz", self.fake.machine_url(id));
        let response = self.http.get(url).send().await?;
        Ok(answer(response).await)
    }

    /// Polls `/readyz` until it answers 200.
    async fn until_ready(&self, id: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok(Answer { status: 200, .. }) = self.readyz(id).await {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "machine {id} never got ready"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `POST {machine}/bot` as botdispatch sends it; `Err` when the connection failed.
    async fn bot(
        &self,
        id: &str,
        session: &str,
        secret: &str,
        body: Value,
    ) -> Result<Answer, reqwest::Error> {
        let url = format!("{}/bot", self.fake.machine_url(id));
        let response = self
            .http
            .post(url)
            .header("X-Daily-Room-Url", format!("https://x.daily.co/{session}"))
            .header("X-Daily-Room-Token", "owner-token")
            .header("X-Daily-Session-Id", session)
            .bearer_auth(secret)
            .json(&body)
            .send()
            .await?;
        Ok(answer(response).await)
    }

    /// Delivers a session whose `/bot` stays open; returns the task awaiting its answer once
    /// the fake recorded the delivery.
    async fn deliver(
        &self,
        id: &str,
        session: &str,
    ) -> tokio::task::JoinHandle<Result<Answer, reqwest::Error>> {
        let before = self.fake.deliveries(id).len();
        let this = Self {
            fake: self.fake.clone(),
            http: self.http.clone(),
        };
        let (id_owned, session) = (id.to_owned(), session.to_owned());
        let task = tokio::spawn(async move {
            this.bot(&id_owned, &session, SECRET, json!({"greeting": "hi"}))
                .await
        });
        assert!(
            self.fake
                .wait_for_deliveries(id, before + 1, PATIENCE)
                .await
        );
        task
    }

    fn assert_clean(&self) {
        assert!(
            self.fake.spec_violations().is_empty(),
            "{:#?}",
            self.fake.spec_violations()
        );
    }
}

async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Answer { status, body }
}

async fn finished(
    task: tokio::task::JoinHandle<Result<Answer, reqwest::Error>>,
) -> Result<Answer, reqwest::Error> {
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("the /bot request ended")
        .unwrap()
}

#[tokio::test]
async fn skip_launch_stays_stopped_then_start_boots_fresh_and_the_app_boots() {
    let fly = Fly::start(FakeFlyWarmConfig {
        app_boot: Duration::from_millis(300),
        start_delay: Duration::from_millis(150),
        ..warm_config()
    })
    .await;
    let (id, created) = fly.create(machine_body(false, true)).await;
    assert_eq!(created["state"], "stopped");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fly.get(&id).await["state"], "stopped", "never launched");
    assert_eq!(fly.fake.boots(&id), 0);
    assert!(
        fly.readyz(&id).await.is_err(),
        "no server on a stopped machine"
    );

    let started = fly.start_machine(&id, None).await;
    assert_eq!(started.status, 200, "{}", started.body);
    assert_eq!(started.body["previous_state"], "stopped");
    assert_eq!(fly.get(&id).await["state"], "starting");
    fly.wait(&id, "started").await;

    // Up, but the app is still booting.
    let booting = fly.readyz(&id).await.unwrap();
    assert_eq!(booting.status, 503);
    assert_eq!(booting.body, json!({"status": "not ready"}));
    let early = fly.bot(&id, "s-early", SECRET, json!({})).await.unwrap();
    assert_eq!(early.status, 503, "{}", early.body);
    fly.until_ready(&id).await;
    let ready = fly.readyz(&id).await.unwrap();
    assert_eq!(ready.body, json!({"status": "ok"}));

    let machine = fly.fake.machine(&id).unwrap();
    assert_eq!(machine.boots, 1);
    assert_eq!(machine.boot_log.len(), 1);
    assert_eq!(machine.boot_log[0].kind, BootKind::Fresh);
    assert_eq!(machine.deliveries.len(), 1);
    assert!(!machine.deliveries[0].accepted);
    assert_eq!(machine.deliveries[0].status, Some(503));

    // A second start of a running machine is refused.
    let again = fly.start_machine(&id, None).await;
    assert_eq!(again.status, 412, "{}", again.body);
    assert!(again.body["error"]
        .as_str()
        .unwrap()
        .starts_with("failed_precondition"));
    assert!(fly.fake.violations().is_empty());
    fly.assert_clean();
}

#[tokio::test]
async fn bot_holds_the_answer_until_the_session_ends_and_records_the_delivery() {
    let fly = Fly::start(warm_config()).await;
    let id = fly.started(true).await;
    fly.until_ready(&id).await;

    let task = fly.deliver(&id, "sess-1").await;
    assert_eq!(fly.fake.running_sessions(&id), 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !task.is_finished(),
        "/bot answers only when the session ends"
    );

    assert_eq!(fly.fake.end_session(&id), 1);
    let done = finished(task).await.unwrap();
    assert_eq!(done.status, 200);
    assert_eq!(done.body, json!({}));

    let machine = fly.fake.machine(&id).unwrap();
    let delivery = &machine.deliveries[0];
    assert!(delivery.accepted);
    assert_eq!(delivery.status, Some(200));
    assert_eq!(delivery.session_id.as_deref(), Some("sess-1"));
    assert_eq!(
        delivery.room_url.as_deref(),
        Some("https://x.daily.co/sess-1")
    );
    assert_eq!(delivery.room_token.as_deref(), Some("owner-token"));
    assert_eq!(delivery.auth, HandoffAuth::Matched);
    assert_eq!(delivery.body, Some(json!({"greeting": "hi"})));
    assert_eq!(delivery.boot_id, machine.boot_log[0].id);
    assert_eq!(delivery.image_boot_id, delivery.boot_id);
    // The session ended without SIGTERM: the server is still up (as the base image).
    assert_eq!(machine.state, "started");
    assert_eq!(fly.readyz(&id).await.unwrap().status, 200);
    assert!(fly.fake.violations().is_empty());
    let bot_calls = fly.fake.bot_requests();
    assert!(bot_calls
        .iter()
        .any(|r| r.path.ends_with("/bot") && r.status == 200));
    fly.assert_clean();
}

#[tokio::test]
async fn session_duration_ends_sessions_by_themselves() {
    let fly = Fly::start(FakeFlyWarmConfig {
        session_duration: Some(Duration::from_millis(100)),
        ..warm_config()
    })
    .await;
    let id = fly.started(false).await;
    let started = tokio::time::Instant::now();
    let done = fly
        .bot(&id, "s", SECRET, json!({}))
        .await
        .expect("answered");
    assert_eq!(done.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(fly.fake.running_sessions(&id), 0);
}

#[tokio::test]
async fn sigterm_refuses_new_requests_finishes_the_session_then_exits_and_auto_destroys() {
    let fly = Fly::start(warm_config()).await;
    let id = fly.started(true).await;
    let task = fly.deliver(&id, "sess-term").await;

    let signalled = fly.signal(&id, "SIGTERM").await;
    assert_eq!(signalled.status, 200, "{}", signalled.body);
    // Draining: the session runs on, the server takes no new request.
    assert_eq!(fly.get(&id).await["state"], "started");
    assert!(fly.readyz(&id).await.is_err());
    assert!(fly.bot(&id, "intruder", SECRET, json!({})).await.is_err());
    assert_eq!(fly.fake.running_sessions(&id), 1);

    fly.fake.end_session(&id);
    let done = finished(task).await.unwrap();
    assert_eq!(done.status, 200);
    fly.wait(&id, "destroyed").await;
    let machine = fly.fake.machine(&id).unwrap();
    assert_eq!(machine.signals, ["SIGTERM"]);
    let exit = machine.events.iter().find(|e| e["type"] == "exit").unwrap();
    assert_eq!(exit["request"]["exit_event"]["exit_code"], 0);
    assert_eq!(
        machine.deliveries.len(),
        1,
        "the intruder never got through"
    );
    assert!(fly.fake.violations().is_empty());

    // A destroyed machine takes no signal.
    assert_eq!(fly.signal(&id, "SIGTERM").await.status, 404);
    fly.assert_clean();
}

#[tokio::test]
async fn sigterm_without_a_session_exits_at_once_and_a_restart_is_a_fresh_boot() {
    let fly = Fly::start(warm_config()).await;
    let id = fly.started(false).await;
    assert_eq!(fly.signal(&id, "SIGTERM").await.status, 200);
    assert_eq!(fly.get(&id).await["state"], "stopped", "exited at once");
    // A stopped machine takes no signal.
    let refused = fly.signal(&id, "SIGTERM").await;
    assert_eq!(refused.status, 412, "{}", refused.body);

    assert_eq!(fly.start_machine(&id, None).await.status, 200);
    fly.wait(&id, "started").await;
    fly.until_ready(&id).await;
    let machine = fly.fake.machine(&id).unwrap();
    assert_eq!(machine.boots, 2);
    let kinds: Vec<BootKind> = machine.boot_log.iter().map(|b| b.kind).collect();
    assert_eq!(kinds, [BootKind::Fresh, BootKind::Fresh]);
    assert_ne!(machine.boot_log[0].id, machine.boot_log[1].id);
    fly.assert_clean();
}

#[tokio::test]
async fn sigkill_and_exits_reset_the_running_session() {
    let fly = Fly::start(warm_config()).await;
    let killed = fly.started(false).await;
    let task = fly.deliver(&killed, "s-kill").await;
    assert_eq!(fly.signal(&killed, "SIGKILL").await.status, 200);
    assert!(finished(task).await.is_err(), "connection reset");
    let machine = fly.fake.machine(&killed).unwrap();
    assert_eq!(machine.state, "stopped");
    let exit = machine.events.iter().find(|e| e["type"] == "exit").unwrap();
    assert_eq!(exit["request"]["exit_event"]["exit_code"], 137);
    assert_eq!(exit["request"]["exit_event"]["signal"], 9);
    assert_eq!(machine.deliveries[0].status, None);

    let exited = fly.started(true).await;
    let task = fly.deliver(&exited, "s-exit").await;
    assert!(fly.fake.exit_machine(&exited, 1));
    assert!(finished(task).await.is_err());
    assert_eq!(fly.fake.machine(&exited).unwrap().state, "destroyed");

    let stopped = fly.started(false).await;
    let task = fly.deliver(&stopped, "s-stop").await;
    assert_eq!(fly.stop(&stopped, None).await.status, 200);
    assert!(
        fly.readyz(&stopped).await.is_err(),
        "stopping: no new request"
    );
    assert!(finished(task).await.is_err());
    fly.wait(&stopped, "stopped").await;
    fly.assert_clean();
}

#[tokio::test]
async fn a_second_bot_in_one_boot_is_accepted_and_recorded_as_a_violation() {
    let fly = Fly::start(warm_config()).await;
    let id = fly.started(false).await;
    let first = fly.deliver(&id, "first").await;
    fly.fake.end_session(&id);
    assert_eq!(finished(first).await.unwrap().status, 200);

    let second = fly.deliver(&id, "second").await;
    assert_eq!(
        fly.fake.running_sessions(&id),
        1,
        "accepted, like the base image"
    );
    let violations = fly.fake.violations();
    assert_eq!(violations.len(), 1, "{violations:#?}");
    assert_eq!(violations[0].kind, ViolationKind::SecondSessionInBoot);
    assert_eq!(violations[0].machine_id, id);
    fly.fake.end_session(&id);
    assert_eq!(finished(second).await.unwrap().status, 200);
}

#[tokio::test]
async fn suspend_then_start_resumes_ready_and_a_cold_resume_boots_again() {
    let fly = Fly::start(FakeFlyWarmConfig {
        app_boot: Duration::from_millis(300),
        suspend_delay: Duration::from_millis(150),
        ..warm_config()
    })
    .await;
    let id = fly.started(false).await;
    fly.until_ready(&id).await;

    let suspended = fly.suspend(&id, None).await;
    assert_eq!(suspended.status, 200, "{}", suspended.body);
    assert_eq!(fly.get(&id).await["state"], "suspending");
    fly.wait(&id, "suspended").await;
    assert!(
        fly.readyz(&id).await.is_err(),
        "a suspended VM serves nothing"
    );

    let resumed = fly.start_machine(&id, None).await;
    assert_eq!(resumed.status, 200);
    assert_eq!(resumed.body["previous_state"], "suspended");
    fly.wait(&id, "started").await;
    let ready = fly.readyz(&id).await.unwrap();
    assert_eq!(ready.status, 200, "the snapshot was ready: no app boot");

    assert_eq!(fly.suspend(&id, None).await.status, 200);
    fly.wait(&id, "suspended").await;
    fly.fake.set_cold_resume(&id);
    assert_eq!(fly.start_machine(&id, None).await.status, 200);
    fly.wait(&id, "started").await;
    assert_eq!(fly.readyz(&id).await.unwrap().status, 503, "booting again");
    fly.until_ready(&id).await;

    let machine = fly.fake.machine(&id).unwrap();
    let kinds: Vec<BootKind> = machine.boot_log.iter().map(|b| b.kind).collect();
    assert_eq!(
        kinds,
        [BootKind::Fresh, BootKind::Resume, BootKind::ColdResume]
    );
    assert_eq!(machine.boots, 2);
    assert_eq!(machine.suspends, 2);
    fly.assert_clean();
}

#[tokio::test]
async fn cold_resumes_by_config() {
    let fly = Fly::start(FakeFlyWarmConfig {
        cold_resume: true,
        ..warm_config()
    })
    .await;
    let id = fly.started(false).await;
    assert_eq!(fly.suspend(&id, None).await.status, 200);
    fly.wait(&id, "suspended").await;
    assert_eq!(fly.start_machine(&id, None).await.status, 200);
    fly.wait(&id, "started").await;
    let kinds: Vec<BootKind> = fly.fake.boot_log(&id).iter().map(|b| b.kind).collect();
    assert_eq!(kinds, [BootKind::Fresh, BootKind::ColdResume]);
}

#[tokio::test]
async fn a_session_on_a_resumed_boot_that_served_one_is_a_violation_a_fresh_boot_is_not() {
    let fly = Fly::start(warm_config()).await;
    let id = fly.started(false).await;
    let first = fly.deliver(&id, "one").await;
    fly.fake.end_session(&id);
    finished(first).await.unwrap();

    assert_eq!(fly.suspend(&id, None).await.status, 200);
    fly.wait(&id, "suspended").await;
    assert_eq!(fly.start_machine(&id, None).await.status, 200);
    fly.wait(&id, "started").await;
    let second = fly.deliver(&id, "two").await;
    let violations = fly.fake.violations();
    assert_eq!(violations.len(), 1, "{violations:#?}");
    assert_eq!(violations[0].kind, ViolationKind::SessionWithoutFreshBoot);

    // Recycled properly: stopped and started from the image.
    assert_eq!(fly.stop(&id, None).await.status, 200);
    assert!(finished(second).await.is_err());
    fly.wait(&id, "stopped").await;
    assert_eq!(fly.start_machine(&id, None).await.status, 200);
    fly.wait(&id, "started").await;
    let third = fly.deliver(&id, "three").await;
    assert_eq!(fly.fake.violations().len(), 1, "no new violation");
    fly.fake.end_session(&id);
    finished(third).await.unwrap();
    fly.assert_clean();
}

#[tokio::test]
async fn suspend_is_refused_for_big_machines_and_machines_not_started() {
    let fly = Fly::start(warm_config()).await;
    let mut big = machine_body(false, false);
    big["config"]["guest"]["memory_mb"] = json!(4096);
    let (big, _) = fly.create(big).await;
    fly.wait(&big, "started").await;
    let refused = fly.suspend(&big, None).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(refused.body["error"].as_str().unwrap().contains("2048"));
    assert_eq!(fly.get(&big).await["state"], "started");

    let mut swap = machine_body(false, false);
    swap["config"]["init"] = json!({"swap_size_mb": 512});
    let (swap, _) = fly.create(swap).await;
    fly.wait(&swap, "started").await;
    assert_eq!(fly.suspend(&swap, None).await.status, 400);

    let (stopped, _) = fly.create(machine_body(false, true)).await;
    let not_started = fly.suspend(&stopped, None).await;
    assert_eq!(not_started.status, 412, "{}", not_started.body);
    fly.assert_clean();
}

#[tokio::test]
async fn leases_are_exclusive_refreshable_and_guard_every_write() {
    let fly = Fly::start(warm_config()).await;
    let id = fly.started(false).await;
    let instance = fly.get(&id).await["instance_id"].clone();

    let lease = fly
        .post(
            &format!("/{id}/lease"),
            Some(json!({"ttl": 30, "description": "claim"})),
            None,
        )
        .await;
    assert_eq!(lease.status, 201, "{}", lease.body);
    let nonce = lease.body["nonce"].as_str().unwrap().to_owned();
    assert_eq!(nonce.len(), 12);
    assert_eq!(lease.body["data"]["nonce"], nonce.as_str());
    assert_eq!(lease.body["version"], instance);
    assert_eq!(lease.body["description"], "claim");
    let expires = lease.body["expires_at"].as_i64().unwrap();
    assert!((expires - chrono::Utc::now().timestamp() - 30).abs() <= 2);
    assert!(lease.body["owner"].as_str().unwrap().contains('@'));

    // A second taker loses.
    let lost = fly
        .post(&format!("/{id}/lease"), Some(json!({"ttl": 30})), None)
        .await;
    assert_eq!(lost.status, 409, "{}", lost.body);
    assert!(lost.body["error"]
        .as_str()
        .unwrap()
        .contains("lease currently held by"));
    let shown = fly
        .send(fly.http.get(fly.url(&format!("/{id}/lease"))))
        .await;
    assert_eq!(shown.status, 200);
    assert_eq!(shown.body["nonce"], nonce.as_str());

    // The holder refreshes.
    let refreshed = fly
        .post(
            &format!("/{id}/lease"),
            Some(json!({"ttl": 60})),
            Some(&nonce),
        )
        .await;
    assert_eq!(refreshed.status, 201, "{}", refreshed.body);
    assert_eq!(refreshed.body["nonce"], nonce.as_str());
    assert!(refreshed.body["expires_at"].as_i64().unwrap() > expires);
    assert!(
        fly.fake.violations().is_empty(),
        "losing a race is no fault"
    );

    // Writes without (or with a wrong) nonce are refused, and recorded.
    assert_eq!(fly.stop(&id, None).await.status, 409);
    assert_eq!(fly.suspend(&id, Some("000000000000")).await.status, 409);
    assert_eq!(fly.signal(&id, "SIGTERM").await.status, 409);
    let metadata = fly
        .metadata(
            reqwest::Method::PATCH,
            &id,
            json!({"metadata": {"claimed": "yes"}}),
        )
        .await;
    assert_eq!(metadata.status, 409);
    let delete = fly
        .send(
            fly.http
                .delete(fly.url(&format!("/{id}")))
                .query(&[("force", "true")]),
        )
        .await;
    assert_eq!(delete.status, 409);
    let violations = fly.fake.violations();
    assert_eq!(violations.len(), 5, "{violations:#?}");
    assert!(violations
        .iter()
        .all(|v| v.kind == ViolationKind::WriteWithoutLeaseNonce && v.machine_id == id));
    assert_eq!(fly.get(&id).await["state"], "started", "nothing happened");

    // With the nonce they go through.
    let claimed = fly
        .send(
            fly.http
                .patch(fly.url(&format!("/{id}/metadata")))
                .header(NONCE, &nonce)
                .json(&json!({"metadata": {"claimed": "yes"}})),
        )
        .await;
    assert_eq!(claimed.status, 204, "{}", claimed.body);
    let released_wrong = fly
        .send(
            fly.http
                .delete(fly.url(&format!("/{id}/lease")))
                .header(NONCE, "ffffffffffff"),
        )
        .await;
    assert_eq!(released_wrong.status, 409);
    let released = fly
        .send(
            fly.http
                .delete(fly.url(&format!("/{id}/lease")))
                .header(NONCE, &nonce),
        )
        .await;
    assert_eq!(released.status, 200, "{}", released.body);
    assert!(fly.fake.lease(&id).is_none());
    let none = fly
        .send(fly.http.get(fly.url(&format!("/{id}/lease"))))
        .await;
    assert_eq!(none.status, 404);
    assert_eq!(fly.stop(&id, None).await.status, 200, "unleased again");
    assert_eq!(fly.fake.violations().len(), 6);
    fly.assert_clean();
}

#[tokio::test]
async fn leases_expire_after_their_ttl() {
    let fly = Fly::start(FakeFlyWarmConfig {
        lease_second: Duration::from_millis(30),
        ..warm_config()
    })
    .await;
    let (id, _) = fly.create(machine_body(false, true)).await;
    let lease = fly
        .post(&format!("/{id}/lease"), Some(json!({"ttl": 1})), None)
        .await;
    assert_eq!(lease.status, 201);
    assert!(fly.fake.lease(&id).is_some());
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(fly.fake.lease(&id).is_none());
    let taken = fly
        .post(&format!("/{id}/lease"), Some(json!({"ttl": 1})), None)
        .await;
    assert_eq!(taken.status, 201, "the expired lease no longer counts");
    assert_ne!(taken.body["nonce"], lease.body["nonce"]);
    fly.assert_clean();
}

#[tokio::test]
async fn release_without_the_nonce_header_is_a_spec_violation() {
    let fly = Fly::start(warm_config()).await;
    let (id, _) = fly.create(machine_body(false, true)).await;
    let released = fly
        .send(fly.http.delete(fly.url(&format!("/{id}/lease"))))
        .await;
    assert_eq!(released.status, 400);
    let violations = fly.fake.spec_violations();
    assert_eq!(violations.len(), 1);
    assert!(violations[0].contains(NONCE), "{violations:?}");
}

#[tokio::test]
async fn create_with_lease_ttl_starts_out_leased_by_the_creator() {
    let fly = Fly::start(warm_config()).await;
    let mut body = machine_body(false, true);
    body["lease_ttl"] = json!(30);
    let (id, created) = fly.create(body).await;
    let nonce = created["nonce"].as_str().unwrap().to_owned();
    assert_eq!(fly.fake.lease(&id).unwrap().nonce, nonce);
    assert!(fly.get(&id).await.get("nonce").is_none(), "only on create");

    assert_eq!(fly.start_machine(&id, None).await.status, 409);
    assert_eq!(fly.start_machine(&id, Some(&nonce)).await.status, 200);
    fly.wait(&id, "started").await;
    fly.assert_clean();
}

#[tokio::test]
async fn metadata_sets_and_removes_keys_without_restarting() {
    let fly = Fly::start(warm_config()).await;
    let id = fly.started(false).await;
    let before = fly.get(&id).await;

    let set = fly
        .metadata(
            reqwest::Method::PATCH,
            &id,
            json!({"metadata": {"claimed_by": "replica-1", "session": "s-1"}}),
        )
        .await;
    assert_eq!(set.status, 204, "{}", set.body);
    let removed = fly
        .metadata(
            reqwest::Method::PUT,
            &id,
            json!({
                "metadata": {"botdispatch_tier": "", "session": "s-2"},
                "machine_version": before["instance_id"],
            }),
        )
        .await;
    assert_eq!(removed.status, 204, "{}", removed.body);
    let stale = fly
        .metadata(
            reqwest::Method::PATCH,
            &id,
            json!({"metadata": {"x": "y"}, "machine_version": "01ARZ3NDEKTSV4RRFFQ69G5FAV"}),
        )
        .await;
    assert_eq!(stale.status, 412, "{}", stale.body);

    let shown = fly
        .send(fly.http.get(fly.url(&format!("/{id}/metadata"))))
        .await;
    assert_eq!(shown.status, 200);
    assert_eq!(
        shown.body,
        json!({"managed_by": "botdispatch", "claimed_by": "replica-1", "session": "s-2"})
    );
    // The single-key calls still work.
    let one = fly
        .post(
            &format!("/{id}/metadata/extra"),
            Some(json!({"value": "1"})),
            None,
        )
        .await;
    assert_eq!(one.status, 204);
    let got = fly
        .send(fly.http.get(fly.url(&format!("/{id}/metadata/extra"))))
        .await;
    assert_eq!(got.body, json!({"value": "1"}));
    let deleted = fly
        .send(fly.http.delete(fly.url(&format!("/{id}/metadata/extra"))))
        .await;
    assert_eq!(deleted.status, 204);
    let missing = fly
        .send(fly.http.get(fly.url(&format!("/{id}/metadata/extra"))))
        .await;
    assert_eq!(missing.status, 404);

    let after = fly.get(&id).await;
    assert_eq!(after["state"], "started");
    assert_eq!(after["instance_id"], before["instance_id"]);
    assert_eq!(fly.fake.boots(&id), 1, "no restart");
    let listed = fly
        .send(
            fly.http
                .get(fly.url(""))
                .query(&[("metadata.claimed_by", "replica-1")]),
        )
        .await;
    assert_eq!(listed.body.as_array().unwrap().len(), 1);
    fly.assert_clean();
}

#[tokio::test]
async fn bot_refusals_never_ready_and_the_handoff_secret() {
    let fly = Fly::start(warm_config()).await;
    let id = fly.started(false).await;

    fly.fake.set_bot_refusal(&id, Some(500));
    let refused = fly.bot(&id, "s", SECRET, json!({})).await.unwrap();
    assert_eq!(refused.status, 500);

    let wrong = fly
        .bot(&id, "s", "not-the-secret", json!({}))
        .await
        .unwrap();
    assert_eq!(wrong.status, 401);
    let not_object = fly.bot(&id, "s", SECRET, json!([1])).await.unwrap();
    assert_eq!(not_object.status, 422);

    fly.fake.set_never_ready(&id, true);
    assert_eq!(fly.readyz(&id).await.unwrap().status, 503);
    assert_eq!(
        fly.bot(&id, "s", SECRET, json!({})).await.unwrap().status,
        503
    );
    fly.fake.set_never_ready(&id, false);

    let deliveries = fly.fake.deliveries(&id);
    let statuses: Vec<Option<u16>> = deliveries.iter().map(|d| d.status).collect();
    assert_eq!(statuses, [Some(500), Some(401), Some(422), Some(503)]);
    assert!(deliveries.iter().all(|d| !d.accepted));
    assert_eq!(deliveries[1].auth, HandoffAuth::Mismatched);
    assert_eq!(fly.fake.running_sessions(&id), 0);

    // The Pipecat Cloud base image ignores Authorization.
    let lax = Fly::start(FakeFlyWarmConfig {
        check_handoff_secret: false,
        ..warm_config()
    })
    .await;
    let id = lax.started(false).await;
    let url = format!("{}/bot", lax.fake.machine_url(&id));
    let http = lax.http.clone();
    let task = tokio::spawn(async move { http.post(url).json(&json!({})).send().await });
    assert!(lax.fake.wait_for_deliveries(&id, 1, PATIENCE).await);
    let delivery = &lax.fake.deliveries(&id)[0];
    assert!(delivery.accepted);
    assert_eq!(delivery.auth, HandoffAuth::Missing);
    lax.fake.end_session(&id);
    assert_eq!(task.await.unwrap().unwrap().status(), 200);
    fly.assert_clean();
}

#[tokio::test]
async fn unknown_machines_and_paths_of_the_bot_server() {
    let fly = Fly::start(warm_config()).await;
    assert!(fly.readyz("0123456789abcd").await.is_err());
    let id = fly.started(false).await;
    let base = fly.fake.machine_url(&id);
    assert_eq!(
        fly.fake.machine_url_template().replace("{machine_id}", &id),
        base
    );
    assert!(fly
        .fake
        .machine_url_template()
        .starts_with(&fly.fake.root_url()));
    let other = fly.http.get(format!("{base}/nope")).send().await.unwrap();
    assert_eq!(other.status(), 404);
    let wrong_method = fly.http.get(format!("{base}/bot")).send().await.unwrap();
    assert_eq!(wrong_method.status(), 405);
    let livez = fly.http.get(format!("{base}/livez")).send().await.unwrap();
    assert_eq!(livez.status(), 200);
    // Bot calls are not API calls.
    assert!(fly.fake.requests().iter().all(|r| !r.path.contains("_bot")));
}

#[tokio::test]
async fn update_restarts_from_the_image_and_skip_launch_keeps_it_stopped() {
    let fly = Fly::start(warm_config()).await;
    let id = fly.started(false).await;
    let before = fly.get(&id).await;
    let mut config = machine_body(false, false)["config"].clone();
    config["image"] = json!("registry.fly.io/bot:2");
    let updated = fly
        .post(&format!("/{id}"), Some(json!({"config": config})), None)
        .await;
    assert_eq!(updated.status, 200, "{}", updated.body);
    assert_ne!(updated.body["instance_id"], before["instance_id"]);
    assert_eq!(updated.body["config"]["image"], "registry.fly.io/bot:2");
    fly.wait(&id, "started").await;
    assert_eq!(fly.fake.boots(&id), 2);

    let (stopped, _) = fly.create(machine_body(false, true)).await;
    let kept = fly
        .post(
            &format!("/{stopped}"),
            Some(json!({"config": config, "skip_launch": true})),
            None,
        )
        .await;
    assert_eq!(kept.status, 200);
    assert_eq!(kept.body["state"], "stopped");
    assert_eq!(fly.fake.boots(&stopped), 0);
    fly.assert_clean();
}

#[tokio::test]
async fn machines_have_distinct_private_ips_and_new_ops_take_faults() {
    let fly = Fly::start(warm_config()).await;
    let mut ips = Vec::new();
    for _ in 0..3 {
        let (_, created) = fly.create(machine_body(false, true)).await;
        ips.push(created["private_ip"].as_str().unwrap().to_owned());
    }
    assert!(ips.iter().all(|ip| ip.starts_with("fdaa:")));
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 3);

    let id = fly.fake.machines()[0].id.clone();
    fly.fake.set_fault(
        FlyOp::Start,
        Fault::Status {
            status: 503,
            retry_after: None,
        },
        1,
    );
    assert_eq!(fly.start_machine(&id, None).await.status, 503);
    assert_eq!(fly.get(&id).await["state"], "stopped");
    fly.fake.set_fault(FlyOp::Lease, Fault::Reset, 1);
    assert!(fly
        .http
        .post(fly.url(&format!("/{id}/lease")))
        .bearer_auth(TOKEN)
        .json(&json!({"ttl": 5}))
        .send()
        .await
        .is_err());
    assert!(fly.fake.lease(&id).is_none());
    fly.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prism_accepts_the_warm_endpoints_and_the_fake_s_answers() {
    let fly = FakeFly::start_with(fly_config(), warm_config()).await;
    let upstream = fly.root_url();
    let spawned =
        tokio::task::spawn_blocking(move || PrismProxy::spawn(&fly_spec_path(), &upstream))
            .await
            .unwrap();
    // Never skipped: a test that cannot run must not read as passed.
    let prism = spawned
        .expect("Prism is not installed: run ./scripts/test (it runs `npm ci`), or set PRISM_BIN");
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{}/apps/{APP}/machines{path}", prism.url());
    let call = |request: reqwest::RequestBuilder| async move {
        answer(request.bearer_auth(TOKEN).send().await.unwrap()).await
    };

    let mut body = machine_body(false, true);
    body["lease_ttl"] = json!(30);
    let created = call(http.post(url("")).json(&body)).await;
    assert_eq!(created.status, 200, "{}\n{}", created.body, prism.log());
    let id = created.body["id"].as_str().unwrap().to_owned();
    let nonce = created.body["nonce"].as_str().unwrap().to_owned();

    let lease = call(
        http.post(url(&format!("/{id}/lease")))
            .header(NONCE, &nonce)
            .json(&json!({"ttl": 30, "description": "claim"})),
    )
    .await;
    assert_eq!(lease.status, 201, "{}\n{}", lease.body, prism.log());
    let shown = call(http.get(url(&format!("/{id}/lease")))).await;
    assert_eq!(shown.status, 200, "{}\n{}", shown.body, prism.log());
    let metadata = call(
        http.patch(url(&format!("/{id}/metadata")))
            .header(NONCE, &nonce)
            .json(&json!({"metadata": {"claimed": "yes"}})),
    )
    .await;
    assert_eq!(metadata.status, 204, "{}\n{}", metadata.body, prism.log());
    let started = call(
        http.post(url(&format!("/{id}/start")))
            .header(NONCE, &nonce),
    )
    .await;
    assert_eq!(started.status, 200, "{}\n{}", started.body, prism.log());
    let waited = call(
        http.get(url(&format!("/{id}/wait")))
            .query(&[("state", "started"), ("timeout", "30")]),
    )
    .await;
    assert_eq!(waited.status, 200, "{}\n{}", waited.body, prism.log());
    let suspended = call(
        http.post(url(&format!("/{id}/suspend")))
            .header(NONCE, &nonce),
    )
    .await;
    assert_eq!(suspended.status, 200, "{}\n{}", suspended.body, prism.log());
    let waited = call(
        http.get(url(&format!("/{id}/wait")))
            .query(&[("state", "suspended"), ("timeout", "30")]),
    )
    .await;
    assert_eq!(waited.status, 200, "{}\n{}", waited.body, prism.log());
    let resumed = call(
        http.post(url(&format!("/{id}/start")))
            .header(NONCE, &nonce),
    )
    .await;
    assert_eq!(resumed.status, 200, "{}\n{}", resumed.body, prism.log());
    let signalled = call(
        http.post(url(&format!("/{id}/signal")))
            .header(NONCE, &nonce)
            .json(&json!({"signal": "SIGTERM"})),
    )
    .await;
    assert_eq!(signalled.status, 200, "{}\n{}", signalled.body, prism.log());
    let released = call(
        http.delete(url(&format!("/{id}/lease")))
            .header(NONCE, &nonce),
    )
    .await;
    assert_eq!(released.status, 200, "{}\n{}", released.body, prism.log());
    let got = call(http.get(url(&format!("/{id}")))).await;
    assert_eq!(got.status, 200, "{}\n{}", got.body, prism.log());

    // An invalid signal never reaches the fake.
    let invalid = call(
        http.post(url(&format!("/{id}/signal")))
            .json(&json!({"signal": "SIGSTOP"})),
    )
    .await;
    assert_eq!(invalid.status, 422, "{}\n{}", invalid.body, prism.log());
    assert!(
        fly.spec_violations().is_empty(),
        "{:?}",
        fly.spec_violations()
    );
    assert!(fly.violations().is_empty(), "{:?}", fly.violations());
}

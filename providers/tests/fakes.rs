//! Tests of the testkit fakes (Fly Machines, Daily) through real HTTP, and of Prism in front of
//! the Fly fake.

#![cfg(feature = "testkit")]

use std::time::{Duration, Instant};

use providers::testkit::daily_fake::{DailyOp, FakeDaily, FakeDailyConfig};
use providers::testkit::fly_fake::{FakeFly, FakeFlyConfig, FlyOp};
use providers::testkit::prism::{fly_spec_path, PrismProxy};
use providers::testkit::Fault;
use serde_json::{json, Value};

const APP: &str = "bots";
const TOKEN: &str = "fly-secret";

fn fly_config() -> FakeFlyConfig {
    FakeFlyConfig {
        token: TOKEN.to_owned(),
        apps: vec![APP.to_owned()],
        boot_delay: Duration::from_millis(30),
        starting_for: Duration::from_millis(20),
        bot_lifetime: None,
        stop_delay: Duration::from_millis(10),
        // `timeout=1` on /wait lasts 100 ms.
        wait_second: Duration::from_millis(100),
    }
}

fn create_body(name: &str, session: &str, auto_destroy: bool) -> Value {
    json!({
        "name": name,
        "region": "ams",
        "config": {
            "image": "registry.fly.io/bot:1",
            "env": {"BOTDISPATCH_SESSION_ID": session},
            "guest": {"cpus": 1, "memory_mb": 1024, "cpu_kind": "shared"},
            "metadata": {"botdispatch_session": session, "managed_by": "botdispatch"},
            "auto_destroy": auto_destroy,
            "restart": {"policy": "no"}
        }
    })
}

/// A small client for the Fly fake.
struct Fly {
    fake: FakeFly,
    http: reqwest::Client,
    base: String,
    token: String,
}

struct Answer {
    status: u16,
    body: Value,
    retry_after: Option<String>,
}

impl Fly {
    async fn start(config: FakeFlyConfig) -> Self {
        let fake = FakeFly::start(config).await;
        Self {
            base: fake.base_url(),
            token: fake.token().to_owned(),
            fake,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/apps/{APP}{path}", self.base)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.bearer_auth(&self.token).send().await.unwrap();
        answer(response).await
    }

    async fn create(&self, body: &Value) -> Answer {
        self.send(self.http.post(self.url("/machines")).json(body))
            .await
    }

    async fn get(&self, id: &str) -> Answer {
        self.send(self.http.get(self.url(&format!("/machines/{id}"))))
            .await
    }

    async fn wait(&self, id: &str, query: &[(&str, &str)]) -> Answer {
        self.send(
            self.http
                .get(self.url(&format!("/machines/{id}/wait")))
                .query(query),
        )
        .await
    }

    async fn stop(&self, id: &str) -> Answer {
        self.send(self.http.post(self.url(&format!("/machines/{id}/stop"))))
            .await
    }

    async fn delete(&self, id: &str, force: bool) -> Answer {
        let mut request = self.http.delete(self.url(&format!("/machines/{id}")));
        if force {
            request = request.query(&[("force", "true")]);
        }
        self.send(request).await
    }

    async fn list(&self, query: &[(&str, &str)]) -> Vec<Value> {
        let answer = self
            .send(self.http.get(self.url("/machines")).query(query))
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        answer.body.as_array().unwrap().clone()
    }

    /// Creates a machine and waits until it is started; returns `(id, instance_id)`.
    async fn started(&self, name: &str, auto_destroy: bool) -> (String, String) {
        let created = self.create(&create_body(name, name, auto_destroy)).await;
        assert_eq!(created.status, 200, "{}", created.body);
        let id = created.body["id"].as_str().unwrap().to_owned();
        let instance = created.body["instance_id"].as_str().unwrap().to_owned();
        let waited = self
            .wait(
                &id,
                &[
                    ("state", "started"),
                    ("timeout", "30"),
                    ("instance_id", &instance),
                ],
            )
            .await;
        assert_eq!(waited.status, 200, "{}", waited.body);
        (id, instance)
    }
}

async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Answer {
        status,
        body,
        retry_after,
    }
}

#[tokio::test]
async fn fly_create_then_wait_until_started() {
    let fly = Fly::start(fly_config()).await;
    let created = fly.create(&create_body("bot-a", "s-a", true)).await;
    assert_eq!(created.status, 200, "{}", created.body);
    let machine = &created.body;
    assert_eq!(machine["state"], "created");
    assert_eq!(machine["name"], "bot-a");
    assert_eq!(machine["region"], "ams");
    assert_eq!(
        machine["config"],
        create_body("bot-a", "s-a", true)["config"]
    );
    let id = machine["id"].as_str().unwrap();
    assert_eq!(id.len(), 14);
    assert!(id
        .chars()
        .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
    let instance = machine["instance_id"].as_str().unwrap();
    assert_eq!(instance.len(), 26);
    assert!(instance
        .chars()
        .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase()));
    assert!(chrono::DateTime::parse_from_rfc3339(machine["created_at"].as_str().unwrap()).is_ok());
    assert_eq!(machine["events"][0]["type"], "launch");
    assert_eq!(machine["events"][0]["status"], "created");
    assert!(machine["events"][0]["timestamp"].as_i64().unwrap() > 1_600_000_000_000);

    let waited = fly
        .wait(
            id,
            &[
                ("state", "started"),
                ("timeout", "30"),
                ("instance_id", instance),
            ],
        )
        .await;
    assert_eq!(waited.status, 200, "{}", waited.body);
    assert_eq!(waited.body["ok"], true);
    assert_eq!(waited.body["state"], "started");
    assert_eq!(waited.body["version"], instance);

    let got = fly.get(id).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body["state"], "started");
    let statuses: Vec<&str> = got.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["started", "starting", "created"], "newest first");
    assert_eq!(fly.fake.live_machines().len(), 1);
    assert_eq!(fly.fake.machine(id).unwrap().state, "started");
    assert!(fly.fake.spec_violations().is_empty());
}

#[tokio::test]
async fn fly_serves_the_api_with_and_without_v1() {
    let fly = Fly::start(fly_config()).await;
    let root = reqwest::Client::new()
        .get(format!("{}/apps/{APP}/machines", fly.fake.root_url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(root.status(), 200);
    assert!(fly.list(&[]).await.is_empty());
    let paths: Vec<String> = fly.fake.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        [
            format!("/apps/{APP}/machines"),
            format!("/v1/apps/{APP}/machines")
        ]
    );
}

#[tokio::test]
async fn fly_duplicate_name_conflicts_until_destroyed() {
    let fly = Fly::start(fly_config()).await;
    let first = fly.create(&create_body("bot-dup", "s1", false)).await;
    assert_eq!(first.status, 200);
    let second = fly.create(&create_body("bot-dup", "s2", false)).await;
    assert_eq!(second.status, 409, "{}", second.body);
    assert!(second.body["error"]
        .as_str()
        .unwrap()
        .starts_with("already exists"));
    assert_eq!(fly.fake.machines().len(), 1);

    let id = first.body["id"].as_str().unwrap();
    assert_eq!(fly.delete(id, true).await.status, 200);
    let third = fly.create(&create_body("bot-dup", "s3", false)).await;
    assert_eq!(third.status, 200, "{}", third.body);
    assert_eq!(fly.fake.machines().len(), 2);
    assert_eq!(fly.fake.live_machines().len(), 1);
}

#[tokio::test]
async fn fly_rejects_wrong_or_missing_token_and_unknown_app() {
    let fly = Fly::start(fly_config()).await;
    let http = reqwest::Client::new();
    let wrong = answer(
        http.post(fly.url("/machines"))
            .bearer_auth("not-the-token")
            .json(&create_body("x", "x", true))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.body["error"].is_string());
    let missing = answer(http.get(fly.url("/machines")).send().await.unwrap()).await;
    assert_eq!(missing.status, 401);
    assert!(fly.fake.machines().is_empty());

    let other_app = fly
        .send(http.get(format!("{}/apps/other/machines", fly.base)))
        .await;
    assert_eq!(other_app.status, 404);
    assert_eq!(other_app.body["error"], "app not found");
    let recorded: Vec<u16> = fly.fake.requests().iter().map(|r| r.status).collect();
    assert_eq!(recorded, [401, 401, 404]);
}

#[tokio::test]
async fn fly_wait_times_out_with_408_when_machine_never_starts() {
    let fly = Fly::start(fly_config()).await;
    fly.fake.set_never_start(true);
    let created = fly.create(&create_body("stuck", "s", true)).await;
    let id = created.body["id"].as_str().unwrap();
    let began = Instant::now();
    // One "second" is 100 ms in this configuration.
    let waited = fly
        .wait(id, &[("state", "started"), ("timeout", "2")])
        .await;
    let elapsed = began.elapsed();
    assert_eq!(waited.status, 408, "{}", waited.body);
    assert_eq!(
        waited.body["error"],
        "deadline_exceeded: timeout waiting for machine to be started"
    );
    assert!(
        elapsed >= Duration::from_millis(190) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    assert_eq!(fly.fake.machine(id).unwrap().state, "starting");

    // Machines created after switching it off start again.
    fly.fake.set_never_start(false);
    fly.started("fine", true).await;
}

#[tokio::test]
async fn fly_wait_checks_version_and_unknown_machines() {
    let fly = Fly::start(fly_config()).await;
    let (id, _) = fly.started("v", false).await;
    let mismatch = fly
        .wait(
            &id,
            &[
                ("state", "started"),
                ("version", "01ARZ3NDEKTSV4RRFFQ69G5FAV"),
            ],
        )
        .await;
    assert_eq!(mismatch.status, 400, "{}", mismatch.body);
    let unknown = fly.wait("0123456789abcd", &[("state", "started")]).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.body["error"], "machine not found");
    assert_eq!(fly.get("0123456789abcd").await.status, 404);
    // Comma-separated states, as Fly documents.
    let either = fly.wait(&id, &[("state", "stopped,started")]).await;
    assert_eq!(either.status, 200);
    assert_eq!(either.body["state"], "started");
}

#[tokio::test]
async fn fly_stop_and_delete_semantics() {
    let fly = Fly::start(fly_config()).await;
    let (id, _) = fly.started("keep", false).await;

    let refused = fly.delete(&id, false).await;
    assert_eq!(refused.status, 412, "{}", refused.body);
    assert!(refused.body["error"]
        .as_str()
        .unwrap()
        .starts_with("failed_precondition"));

    assert_eq!(fly.stop(&id).await.status, 200);
    let stopped = fly
        .wait(&id, &[("state", "stopped"), ("timeout", "30")])
        .await;
    assert_eq!(stopped.status, 200, "{}", stopped.body);
    assert_eq!(fly.get(&id).await.body["state"], "stopped");
    // Stopping again is a no-op; waiting for `started` on a stopped machine is hopeless.
    assert_eq!(fly.stop(&id).await.status, 200);
    let hopeless = fly
        .wait(&id, &[("state", "started"), ("timeout", "30")])
        .await;
    assert_eq!(hopeless.status, 400, "{}", hopeless.body);

    assert_eq!(fly.delete(&id, false).await.status, 200);
    let destroyed = fly.get(&id).await;
    assert_eq!(destroyed.status, 200);
    assert_eq!(destroyed.body["state"], "destroyed");
    assert_eq!(fly.delete(&id, false).await.status, 404);
    assert!(fly.fake.live_machines().is_empty());

    // Force destroys a running machine.
    let (forced, _) = fly.started("forced", false).await;
    assert_eq!(fly.delete(&forced, true).await.status, 200);
    assert_eq!(fly.fake.machine(&forced).unwrap().state, "destroyed");
    let gone = fly.wait(&forced, &[("state", "started")]).await;
    assert_eq!(gone.status, 400);
    assert!(gone.body["error"].as_str().unwrap().contains("destroyed"));
}

#[tokio::test]
async fn fly_stop_with_auto_destroy_destroys() {
    let fly = Fly::start(fly_config()).await;
    let (id, _) = fly.started("ephemeral", true).await;
    let stop = fly
        .send(
            fly.http
                .post(fly.url(&format!("/machines/{id}/stop")))
                .json(&json!({"signal": "SIGTERM", "timeout": "5s"})),
        )
        .await;
    assert_eq!(stop.status, 200);
    let destroyed = fly
        .wait(&id, &[("state", "destroyed"), ("timeout", "30")])
        .await;
    assert_eq!(destroyed.status, 200, "{}", destroyed.body);
    assert!(fly.fake.live_machines().is_empty());
}

#[tokio::test]
async fn fly_exit_with_auto_destroy_destroys_and_records_exit_code() {
    let fly = Fly::start(fly_config()).await;
    let (id, _) = fly.started("bot-exit", true).await;
    assert!(fly.fake.exit_machine(&id, 3));
    assert!(!fly.fake.exit_machine(&id, 3), "not running any more");

    let machine = fly.fake.machine(&id).unwrap();
    assert_eq!(machine.state, "destroyed");
    let exit = machine
        .events
        .iter()
        .find(|e| e["type"] == "exit")
        .expect("an exit event");
    assert_eq!(exit["status"], "stopped");
    assert_eq!(exit["request"]["exit_event"]["exit_code"], 3);
    assert_eq!(machine.events[0]["type"], "destroy", "newest first");

    let waited = fly.wait(&id, &[("state", "destroyed")]).await;
    assert_eq!(waited.status, 200);
    assert!(fly.list(&[]).await.is_empty());
    assert_eq!(fly.list(&[("include_deleted", "true")]).await.len(), 1);
}

#[tokio::test]
async fn fly_exit_without_auto_destroy_stops() {
    let fly = Fly::start(fly_config()).await;
    let (id, _) = fly.started("bot-keep", false).await;
    assert!(fly.fake.exit_machine(&id, 0));
    assert_eq!(fly.fake.machine(&id).unwrap().state, "stopped");
    assert_eq!(fly.fake.live_machines().len(), 1);
}

#[tokio::test]
async fn fly_bot_lifetime_ends_the_machine_by_itself() {
    let fly = Fly::start(FakeFlyConfig {
        bot_lifetime: Some(Duration::from_millis(50)),
        ..fly_config()
    })
    .await;
    let (id, _) = fly.started("short", true).await;
    assert!(
        fly.fake
            .wait_for_state(&id, "destroyed", Duration::from_secs(5))
            .await
    );
    let machine = fly.fake.machine(&id).unwrap();
    let statuses: Vec<&str> = machine
        .events
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["destroyed", "stopped", "started", "starting", "created"]
    );
}

#[tokio::test]
async fn fly_list_filters_by_metadata_region_and_state() {
    let fly = Fly::start(fly_config()).await;
    let (a, _) = fly.started("bot-1", false).await;
    let mut other = create_body("bot-2", "s-2", false);
    other["region"] = json!("fra");
    other["skip_launch"] = json!(true);
    let b = fly.create(&other).await;
    assert_eq!(b.status, 200);
    assert_eq!(b.body["state"], "stopped", "skip_launch");

    let by_session = fly.list(&[("metadata.botdispatch_session", "bot-1")]).await;
    assert_eq!(by_session.len(), 1);
    assert_eq!(by_session[0]["id"], a.as_str());
    let managed = fly.list(&[("metadata.managed_by", "botdispatch")]).await;
    assert_eq!(managed.len(), 2);
    let both = fly
        .list(&[
            ("metadata.managed_by", "botdispatch"),
            ("metadata.botdispatch_session", "nope"),
        ])
        .await;
    assert!(both.is_empty());
    assert_eq!(fly.list(&[("region", "fra")]).await.len(), 1);
    assert_eq!(fly.list(&[("state", "started")]).await.len(), 1);
    assert_eq!(fly.list(&[("state", "started,stopped")]).await.len(), 2);

    let summary = fly.list(&[("summary", "true")]).await;
    assert!(summary[0].get("config").is_none());
    assert!(summary[0]["id"].is_string());
}

#[tokio::test]
async fn fly_spec_violations_are_answered_400_and_recorded() {
    let fly = Fly::start(fly_config()).await;
    let mut body = create_body("bad", "s", true);
    body["config"]["restart"]["policy"] = json!("never");
    let bad = fly.create(&body).await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body["error"]
        .as_str()
        .unwrap()
        .contains("/config/restart/policy"));
    assert_eq!(bad.body["status"], "unknown");

    let mut typo = create_body("typo", "s", true);
    typo["config"]["auto_destory"] = json!(true);
    assert_eq!(fly.create(&typo).await.status, 400);

    let bad_query = fly
        .send(fly.http.get(fly.url("/machines")).query(&[("bogus", "1")]))
        .await;
    assert_eq!(bad_query.status, 400);

    let violations = fly.fake.spec_violations();
    assert_eq!(violations.len(), 3, "{violations:#?}");
    assert!(violations[0].contains("POST /apps/bots/machines"));
    assert!(violations[0].contains("/config/restart/policy"));
    assert!(violations[1].contains("auto_destory"));
    assert!(violations[2].contains("bogus"));
    assert!(fly.fake.machines().is_empty());
}

#[tokio::test]
async fn fly_fail_create_creates_nothing() {
    let fly = Fly::start(fly_config()).await;
    fly.fake
        .set_fail_create(Some((503, "insufficient capacity".to_owned())));
    let failed = fly.create(&create_body("nope", "s", true)).await;
    assert_eq!(failed.status, 503);
    assert_eq!(failed.body, json!({"error": "insufficient capacity"}));
    assert!(fly.fake.machines().is_empty());
    fly.fake.set_fail_create(None);
    assert_eq!(fly.create(&create_body("yes", "s", true)).await.status, 200);
}

#[tokio::test]
async fn fly_slow_create_exists_before_it_answers() {
    let fly = Fly::start(fly_config()).await;
    fly.fake.set_create_delay(Duration::from_millis(300));
    let body = create_body("slow", "s", true);
    let answered = std::sync::atomic::AtomicBool::new(false);
    let began = Instant::now();
    let request = async {
        let created = fly.create(&body).await;
        answered.store(true, std::sync::atomic::Ordering::SeqCst);
        created
    };
    // Whether the machine was visible while the create was still pending.
    let observer = async {
        loop {
            let done = answered.load(std::sync::atomic::Ordering::SeqCst);
            if !fly.fake.machines().is_empty() {
                return !done;
            }
            if done {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let (created, seen_while_pending) = tokio::join!(request, observer);
    assert_eq!(created.status, 200);
    assert!(began.elapsed() >= Duration::from_millis(300));
    assert!(
        seen_while_pending,
        "the machine exists while the create is pending"
    );
}

#[tokio::test]
async fn fly_injected_faults_apply_to_the_next_requests_only() {
    let fly = Fly::start(fly_config()).await;

    fly.fake.set_fault(
        FlyOp::Create,
        Fault::Status {
            status: 429,
            retry_after: Some(7),
        },
        2,
    );
    for _ in 0..2 {
        let throttled = fly.create(&create_body("t", "s", true)).await;
        assert_eq!(throttled.status, 429);
        assert_eq!(throttled.retry_after.as_deref(), Some("7"));
        assert!(throttled.body["error"].is_string());
    }
    assert!(fly.fake.machines().is_empty());

    fly.fake
        .set_fault(FlyOp::Create, Fault::GhostCreate { status: 500 }, 1);
    let ghost = fly.create(&create_body("ghost", "s", true)).await;
    assert_eq!(ghost.status, 500);
    assert_eq!(fly.fake.machines().len(), 1, "created despite the 500");
    assert_eq!(fly.fake.machines()[0].name, "ghost");

    let id = fly.fake.machines()[0].id.clone();
    fly.fake
        .set_fault(FlyOp::Get, Fault::Stall(Duration::from_millis(150)), 1);
    let began = Instant::now();
    assert_eq!(fly.get(&id).await.status, 200);
    assert!(began.elapsed() >= Duration::from_millis(150));

    fly.fake.set_fault(FlyOp::Create, Fault::Reset, 1);
    let reset = fly
        .http
        .post(fly.url("/machines"))
        .bearer_auth(TOKEN)
        .json(&create_body("reset", "s", true))
        .send()
        .await;
    assert!(reset.is_err(), "connection reset: {reset:?}");
    assert_eq!(fly.fake.machines().len(), 1, "nothing created by a reset");
    assert_eq!(fly.fake.requests().last().unwrap().status, 0);

    // Faults are used up: everything is normal again.
    assert_eq!(
        fly.create(&create_body("normal", "s", true)).await.status,
        200
    );
    assert_eq!(fly.get(&id).await.status, 200);
}

#[tokio::test]
async fn fly_stop_while_starting_wins_over_boot() {
    let fly = Fly::start(FakeFlyConfig {
        boot_delay: Duration::from_millis(100),
        ..fly_config()
    })
    .await;
    let created = fly.create(&create_body("early", "s", false)).await;
    let id = created.body["id"].as_str().unwrap();
    assert_eq!(fly.stop(id).await.status, 200);
    assert!(
        fly.fake
            .wait_for_state(id, "stopped", Duration::from_secs(5))
            .await
    );
    // Well after the boot delay, it is still stopped: the boot task gave up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fly.fake.machine(id).unwrap().state, "stopped");
}

// ---------------------------------------------------------------------------------------------
// Daily

const DAILY_KEY: &str = "daily-secret";

async fn daily() -> (FakeDaily, reqwest::Client) {
    let fake = FakeDaily::start(FakeDailyConfig {
        api_key: DAILY_KEY.to_owned(),
        domain_name: "acme".to_owned(),
        domain_id: "d-123".to_owned(),
    })
    .await;
    (fake, reqwest::Client::new())
}

async fn daily_send(request: reqwest::RequestBuilder) -> Answer {
    answer(request.bearer_auth(DAILY_KEY).send().await.unwrap()).await
}

fn in_an_hour() -> i64 {
    chrono::Utc::now().timestamp() + 3600
}

#[tokio::test]
async fn daily_domain_and_auth() {
    let (fake, http) = daily().await;
    let domain = daily_send(http.get(format!("{}/", fake.base_url()))).await;
    assert_eq!(domain.status, 200);
    assert_eq!(
        domain.body,
        json!({"domain_name": "acme", "domain_id": "d-123", "config": {}})
    );
    let unauthorized = answer(
        http.get(format!("{}/", fake.base_url()))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(unauthorized.status, 401);
    assert_eq!(unauthorized.body["error"], "authentication-error");
    assert!(unauthorized.body["info"].is_string());
    let anonymous = answer(
        http.post(format!("{}/rooms", fake.base_url()))
            .json(&json!({"name": "r"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(anonymous.status, 401);
    assert!(fake.rooms().is_empty());
}

#[tokio::test]
async fn daily_room_lifecycle() {
    let (fake, http) = daily().await;
    let rooms = format!("{}/rooms", fake.base_url());
    let exp = in_an_hour();
    let body = json!({
        "name": "bd-01K0ABC",
        "privacy": "private",
        "properties": {"exp": exp, "eject_at_room_exp": true, "max_participants": 2,
                       "enable_chat": false, "start_video_off": true}
    });
    let created = daily_send(http.post(&rooms).json(&body)).await;
    assert_eq!(created.status, 200, "{}", created.body);
    assert_eq!(created.body["name"], "bd-01K0ABC");
    assert_eq!(created.body["privacy"], "private");
    assert_eq!(created.body["api_created"], true);
    assert_eq!(created.body["url"], "https://acme.daily.co/bd-01K0ABC");
    assert_eq!(created.body["config"]["exp"], exp);
    assert_eq!(created.body["id"].as_str().unwrap().len(), 36);
    assert!(
        chrono::DateTime::parse_from_rfc3339(created.body["created_at"].as_str().unwrap()).is_ok()
    );

    let duplicate = daily_send(http.post(&rooms).json(&body)).await;
    assert_eq!(duplicate.status, 400);
    assert_eq!(
        duplicate.body,
        json!({"error": "invalid-request-error", "info": "a room named bd-01K0ABC already exists"})
    );

    let got = daily_send(http.get(format!("{rooms}/bd-01K0ABC"))).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body["url"], "https://acme.daily.co/bd-01K0ABC");

    let unnamed = daily_send(http.post(&rooms)).await;
    assert_eq!(unnamed.status, 200);
    assert_eq!(unnamed.body["privacy"], "public");
    assert_eq!(unnamed.body["name"].as_str().unwrap().len(), 20);

    let list = daily_send(http.get(&rooms)).await;
    assert_eq!(list.body["total_count"], 2);
    assert_eq!(list.body["data"].as_array().unwrap().len(), 2);

    let deleted = daily_send(http.delete(format!("{rooms}/bd-01K0ABC"))).await;
    assert_eq!(deleted.status, 200);
    assert_eq!(deleted.body, json!({"deleted": true, "name": "bd-01K0ABC"}));
    let again = daily_send(http.delete(format!("{rooms}/bd-01K0ABC"))).await;
    assert_eq!(again.status, 404);
    assert_eq!(
        again.body,
        json!({"error": "not-found", "info": "room bd-01K0ABC was not found"})
    );
    assert_eq!(
        daily_send(http.get(format!("{rooms}/bd-01K0ABC")))
            .await
            .status,
        404
    );
    assert_eq!(fake.rooms().len(), 1);
    assert_eq!(fake.requests().len(), 8);
}

#[tokio::test]
async fn daily_rejects_invalid_rooms() {
    let (fake, http) = daily().await;
    let rooms = format!("{}/rooms", fake.base_url());
    for body in [
        json!({"name": "has space"}),
        json!({"name": "dot.ted"}),
        json!({"name": "a".repeat(129)}),
        json!({"name": "r", "privacy": "secret"}),
        json!({"name": "r", "properties": {"exp": chrono::Utc::now().timestamp() - 10}}),
        json!({"name": "r", "properties": {"exp": "tomorrow"}}),
        json!({"name": "r", "properties": {"enable_teleport": true}}),
        json!({"name": "r", "properties": {"enable_chat": "yes"}}),
        json!({"name": "r", "propreties": {}}),
    ] {
        let rejected = daily_send(http.post(&rooms).json(&body)).await;
        assert_eq!(rejected.status, 400, "{body}");
        assert_eq!(rejected.body["error"], "invalid-request-error", "{body}");
        assert!(rejected.body["info"].is_string());
    }
    assert!(fake.rooms().is_empty());
}

#[tokio::test]
async fn daily_rooms_expire() {
    let (fake, http) = daily().await;
    let rooms = format!("{}/rooms", fake.base_url());
    let body = json!({"name": "short", "properties": {"exp": chrono::Utc::now().timestamp() + 60}});
    assert_eq!(daily_send(http.post(&rooms).json(&body)).await.status, 200);
    assert!(fake.room("short").is_some());
    fake.advance_clock(Duration::from_secs(61));
    assert_eq!(
        daily_send(http.get(format!("{rooms}/short"))).await.status,
        404
    );
    assert!(fake.rooms().is_empty());
    // The name is free again (exp relative to the fake's clock).
    let body =
        json!({"name": "short", "properties": {"exp": chrono::Utc::now().timestamp() + 120}});
    assert_eq!(daily_send(http.post(&rooms).json(&body)).await.status, 200);
}

#[tokio::test]
async fn daily_failures_delays_and_faults() {
    let (fake, http) = daily().await;
    let rooms = format!("{}/rooms", fake.base_url());

    fake.set_fail_create(Some((500, "boom".to_owned())));
    let failed = daily_send(http.post(&rooms).json(&json!({"name": "a"}))).await;
    assert_eq!(failed.status, 500);
    assert_eq!(
        failed.body,
        json!({"error": "server-error", "info": "boom"})
    );
    assert!(fake.rooms().is_empty());
    fake.set_fail_create(None);

    fake.set_create_delay(Duration::from_millis(150));
    let began = Instant::now();
    assert_eq!(
        daily_send(http.post(&rooms).json(&json!({"name": "slow"})))
            .await
            .status,
        200
    );
    assert!(began.elapsed() >= Duration::from_millis(150));
    fake.set_create_delay(Duration::ZERO);

    fake.set_fault(
        DailyOp::CreateRoom,
        Fault::Status {
            status: 429,
            retry_after: Some(2),
        },
        1,
    );
    let throttled = daily_send(http.post(&rooms).json(&json!({"name": "b"}))).await;
    assert_eq!(throttled.status, 429);
    assert_eq!(throttled.retry_after.as_deref(), Some("2"));
    assert_eq!(throttled.body["error"], "rate-limit-error");

    fake.set_fault(DailyOp::CreateRoom, Fault::GhostCreate { status: 502 }, 1);
    let ghost = daily_send(http.post(&rooms).json(&json!({"name": "ghost"}))).await;
    assert_eq!(ghost.status, 502);
    assert!(fake.room("ghost").is_some());

    fake.set_fault(DailyOp::DeleteRoom, Fault::Reset, 1);
    let reset = http
        .delete(format!("{rooms}/ghost"))
        .bearer_auth(DAILY_KEY)
        .send()
        .await;
    assert!(reset.is_err());
    assert!(fake.room("ghost").is_some(), "a reset performs nothing");

    fake.set_fault(
        DailyOp::Domain,
        Fault::Status {
            status: 503,
            retry_after: None,
        },
        1,
    );
    let domain = daily_send(http.get(format!("{}/", fake.base_url()))).await;
    assert_eq!(domain.status, 503);
    assert!(domain.retry_after.is_none());

    assert_eq!(
        daily_send(http.delete(format!("{rooms}/ghost")))
            .await
            .status,
        200
    );
    let names: Vec<String> = fake.rooms().into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["slow"]);
}

// ---------------------------------------------------------------------------------------------
// Prism

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prism_in_front_of_fake_fly_rejects_invalid_requests() {
    let fly = FakeFly::start(fly_config()).await;
    let upstream = fly.root_url();
    let spawned =
        tokio::task::spawn_blocking(move || PrismProxy::spawn(&fly_spec_path(), &upstream))
            .await
            .unwrap();
    // Never skipped: a test that cannot run must not read as passed.
    let prism = spawned.expect(
        "Prism is not installed: run ./scripts/test (it runs `npm ci`, which installs @stoplight/prism-cli@5.14.2), or set PRISM_BIN",
    );
    let http = reqwest::Client::new();
    let url = format!("{}/apps/{APP}/machines", prism.url());

    let valid = answer(
        http.post(&url)
            .bearer_auth(TOKEN)
            .json(&create_body("through-prism", "s", true))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(valid.status, 200, "{}\n{}", valid.body, prism.log());
    assert_eq!(valid.body["name"], "through-prism");

    let mut body = create_body("invalid", "s", true);
    body["config"]["restart"]["policy"] = json!("never");
    let invalid = answer(
        http.post(&url)
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(invalid.status, 422, "{}\n{}", invalid.body, prism.log());
    assert!(invalid.body["type"]
        .as_str()
        .unwrap()
        .ends_with("UNPROCESSABLE_ENTITY"));
    assert_eq!(
        invalid.body["validation"][0]["location"],
        json!(["body", "config", "restart", "policy"])
    );

    // The fake's own responses pass Prism's response validation too.
    let id = valid.body["id"].as_str().unwrap();
    let got = answer(
        http.get(format!("{url}/{id}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200, "{}\n{}", got.body, prism.log());
    let listed = answer(http.get(&url).bearer_auth(TOKEN).send().await.unwrap()).await;
    assert_eq!(listed.status, 200, "{}\n{}", listed.body, prism.log());
    let waited = answer(
        http.get(format!("{url}/{id}/wait"))
            .query(&[("state", "started"), ("timeout", "30")])
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(waited.status, 200, "{}\n{}", waited.body, prism.log());
    assert_eq!(waited.body["state"], "started");

    // Only the valid requests reached the fake.
    let creates = fly
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(creates, 1);
    assert_eq!(fly.machines().len(), 1);
    assert!(fly.spec_violations().is_empty());
}

use super::*;

fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let env: BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::parse(toml, &|k| env.get(k).cloned())
}

fn message(r: Result<Config, ConfigError>) -> String {
    r.expect_err("config should be refused").to_string()
}

#[test]
fn empty_config_is_the_embedded_default() {
    let c = load("", &[]).unwrap();
    assert_eq!(c.provider.name(), "local");
    assert_eq!(c.rooms_kind(), RoomsKind::Local);
    assert_eq!(c.listen, "127.0.0.1:7860");
    assert!(c.agents["default"].cmd.is_some());
}

#[test]
fn env_overrides_file() {
    let c = load(
        "provider = \"local\"\nmax_sessions = 5\n",
        &[
            ("BOTDISPATCH_MAX_SESSIONS", "7"),
            ("BOTDISPATCH_LISTEN", "0.0.0.0:8080"),
        ],
    )
    .unwrap();
    assert_eq!(c.max_sessions, 7);
    assert_eq!(c.listen, "0.0.0.0:8080");
}

#[test]
fn messages_name_the_bad_key() {
    assert!(message(load("", &[("BOTDISPATCH_PROVIDER", "fly")])).contains("FLY_API_TOKEN"));
    assert!(message(load(
        "",
        &[("BOTDISPATCH_PROVIDER", "fly"), ("FLY_API_TOKEN", "t")]
    ))
    .contains("FLY_APP_NAME"));
    assert!(message(load(
        "",
        &[
            ("BOTDISPATCH_PROVIDER", "fly"),
            ("FLY_API_TOKEN", "t"),
            ("FLY_APP_NAME", "bots")
        ]
    ))
    .contains("BOTDISPATCH_BOT_IMAGE"));
    assert!(message(load("", &[("BOTDISPATCH_MAX_SESSIONS", "lots")]))
        .contains("BOTDISPATCH_MAX_SESSIONS"));
    assert!(message(load("colour = 1", &[])).contains("colour"));
    assert!(message(load("[fly]\ncolour = 1", &[])).contains("colour"));
    assert!(message(load("", &[("BOTDISPATCH_JWT_SECRET", "short")])).contains("32 bytes"));
    assert!(message(load(
        "[agents.default]\nimage = \"x\"\nenv = { DAILY_ROOM_URL = \"x\" }",
        &[]
    ))
    .contains("agents.default.env.DAILY_ROOM_URL"));
    assert!(message(load("allowed_regions = [\"IAD!\"]", &[])).contains("allowed_regions"));
    assert!(message(load("", &[("BOTDISPATCH_PROVIDER", "mainframe")]))
        .contains("BOTDISPATCH_PROVIDER=\"mainframe\" is not a provider"));
}

#[test]
fn provider_reserved_env_names_are_refused_for_every_provider() {
    // The Cloud Run provider carries the session labels in BOTDISPATCH_LABELS: an agent that
    // set it used to pass validation and then fail every start with 502.
    let m = message(load(
        "[agents.default]\nimage = \"x\"\nenv = { BOTDISPATCH_LABELS = \"{}\" }",
        &[],
    ));
    assert!(m.contains("agents.default.env.BOTDISPATCH_LABELS"), "{m}");
}

#[test]
fn production_refuses_local_backends_and_generated_secrets() {
    let secret = "0123456789abcdef0123456789abcdef";
    let m = message(load(
        "",
        &[
            ("APP_ENV", "production"),
            ("BOTDISPATCH_JWT_SECRET", secret),
        ],
    ));
    assert!(m.contains("local"), "{m}");
    let fly = [
        ("APP_ENV", "production"),
        ("BOTDISPATCH_PROVIDER", "fly"),
        ("FLY_API_TOKEN", "t"),
        ("FLY_APP_NAME", "bots"),
        ("BOTDISPATCH_BOT_IMAGE", "registry.fly.io/bots:1"),
    ];
    let m = message(load("", &fly));
    assert!(m.contains("BOTDISPATCH_JWT_SECRET"), "{m}");
    let with_secret = [&fly[..], &[("BOTDISPATCH_JWT_SECRET", secret)]].concat();
    let m = message(load("", &with_secret));
    assert!(m.contains("rooms"), "{m}");
    let with_daily = [&with_secret[..], &[("DAILY_API_KEY", "k")]].concat();
    // Session ids need their own secret in production, never the JWT secret.
    let m = message(load("", &with_daily));
    assert!(m.contains("BOTDISPATCH_SESSION_SECRET"), "{m}");
    let m = message(load(
        "",
        &[&with_daily[..], &[("BOTDISPATCH_SESSION_SECRET", secret)]].concat(),
    ));
    assert!(
        m.contains("BOTDISPATCH_SESSION_SECRET") && m.contains("JWT"),
        "{m}"
    );
    let session = (
        "BOTDISPATCH_SESSION_SECRET",
        "fedcba9876543210fedcba9876543210",
    );
    // Tokens must name this service, unless the operator says they need not.
    let with_session = [&with_daily[..], &[session]].concat();
    let m = message(load("", &with_session));
    assert!(m.contains("BOTDISPATCH_JWT_AUDIENCE"), "{m}");
    load(
        "",
        &[
            &with_session[..],
            &[("BOTDISPATCH_JWT_AUDIENCE", "botdispatch")],
        ]
        .concat(),
    )
    .unwrap();
    load(
        "",
        &[
            &with_session[..],
            &[("BOTDISPATCH_JWT_ALLOW_NO_AUDIENCE", "true")],
        ]
        .concat(),
    )
    .unwrap();
}

#[test]
fn session_secrets_are_a_rotation_list() {
    let c = load(
        "",
        &[(
            "BOTDISPATCH_SESSION_SECRET",
            "new-0123456789abcdef0123456789abcdef, old-0123456789abcdef0123456789abcdef",
        )],
    )
    .unwrap();
    assert_eq!(c.session_secret.len(), 2);
    assert_eq!(
        c.session_secret[0].expose(),
        "new-0123456789abcdef0123456789abcdef"
    );
    let m = message(load(
        "",
        &[(
            "BOTDISPATCH_SESSION_SECRET",
            "new-0123456789abcdef0123456789abcdef,short",
        )],
    ));
    assert!(m.contains("32 bytes"), "{m}");
    let c = load(
        "session_secret = [\"0123456789abcdef0123456789abcdef\"]",
        &[],
    )
    .unwrap();
    assert_eq!(c.session_secret.len(), 1);
}

#[test]
fn the_deployment_names_machines_and_rooms() {
    assert_eq!(load("", &[]).unwrap().deployment, "default");
    assert_eq!(
        load("", &[("BOTDISPATCH_DEPLOYMENT", "staging-eu")])
            .unwrap()
            .deployment,
        "staging-eu"
    );
    for bad in ["Prod", "a_b", "-x", "x-", "", "thisnameiswaytoolong-x"] {
        let m = message(load(&format!("deployment = {bad:?}"), &[]));
        assert!(
            m.contains("deployment (BOTDISPATCH_DEPLOYMENT)"),
            "{bad}: {m}"
        );
    }
}

#[test]
fn example_configs_are_valid() {
    let secrets = [
        ("BOTDISPATCH_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
        (
            "BOTDISPATCH_SESSION_SECRET",
            "fedcba9876543210fedcba9876543210",
        ),
        ("DAILY_API_KEY", "k"),
        ("FLY_API_TOKEN", "t"),
    ];
    let mut examples = vec![
        ("fly", include_str!("../../examples/fly.toml")),
        ("local", include_str!("../../examples/local.toml")),
    ];
    if cfg!(feature = "fargate") {
        examples.push(("fargate", include_str!("../../examples/fargate.toml")));
    }
    if cfg!(feature = "cloudrun") {
        examples.push(("cloudrun", include_str!("../../examples/cloudrun.toml")));
    }
    for (name, text) in examples {
        let c = load(text, &secrets).unwrap_or_else(|e| panic!("examples/{name}.toml: {e}"));
        assert_eq!(c.provider.name(), name);
    }
}

#[test]
fn provider_sections_name_their_missing_keys() {
    if cfg!(feature = "fargate") {
        let m = message(load("", &[("BOTDISPATCH_PROVIDER", "fargate")]));
        assert!(m.contains("BOTDISPATCH_FARGATE_CLUSTER"), "{m}");
        let m = message(load(
            "",
            &[
                ("BOTDISPATCH_PROVIDER", "fargate"),
                ("BOTDISPATCH_FARGATE_CLUSTER", "c"),
            ],
        ));
        assert!(m.contains("BOTDISPATCH_FARGATE_SUBNETS"), "{m}");
    }
    if cfg!(feature = "cloudrun") {
        let m = message(load("", &[("BOTDISPATCH_PROVIDER", "cloudrun")]));
        assert!(m.contains("BOTDISPATCH_CLOUDRUN_PROJECT"), "{m}");
    }
    // On Fly the reserved FLY_APP_NAME is the dispatcher's own app: ours wins.
    let c = load(
        "",
        &[
            ("BOTDISPATCH_PROVIDER", "fly"),
            ("FLY_API_TOKEN", "t"),
            ("BOTDISPATCH_BOT_IMAGE", "registry.fly.io/bots:1"),
            ("FLY_APP_NAME", "dispatcher"),
            ("BOTDISPATCH_FLY_APP", "bots"),
        ],
    )
    .unwrap();
    match &c.provider {
        ProviderConfig::Fly(fly) => assert_eq!(fly.app_name.as_deref(), Some("bots")),
        other => panic!("{other:?}"),
    }
}

/// A dispatcher on Fly whose bots would run in its own app (they would inherit its secrets:
/// the Fly token, the Daily key, the JWT secret) is refused, saying why.
#[test]
fn on_fly_the_bots_app_must_not_be_the_dispatchers_own() {
    let on_fly = |extra: &[(&'static str, &'static str)]| {
        let mut env = vec![
            ("BOTDISPATCH_PROVIDER", "fly"),
            ("FLY_API_TOKEN", "t"),
            ("BOTDISPATCH_BOT_IMAGE", "registry.fly.io/bots:1"),
            // What Fly sets on every machine of the dispatcher's app.
            ("FLY_APP_NAME", "dispatcher"),
            ("FLY_MACHINE_ID", "148ed193b95089"),
        ];
        env.extend_from_slice(extra);
        load("", &env)
    };
    let m = message(on_fly(&[]));
    assert!(m.contains("dispatcher's own app"), "{m}");
    assert!(m.contains("BOTDISPATCH_FLY_APP"), "{m}");
    let m = message(on_fly(&[("BOTDISPATCH_FLY_APP", "dispatcher")]));
    assert!(m.contains("secrets"), "{m}");
    assert!(on_fly(&[("BOTDISPATCH_FLY_APP", "bots")]).is_ok());
    // Off Fly (no FLY_MACHINE_ID), FLY_APP_NAME simply names the bots' app.
    let off_fly = load(
        "",
        &[
            ("BOTDISPATCH_PROVIDER", "fly"),
            ("FLY_API_TOKEN", "t"),
            ("BOTDISPATCH_BOT_IMAGE", "registry.fly.io/bots:1"),
            ("FLY_APP_NAME", "bots"),
        ],
    );
    assert!(off_fly.is_ok());
}

#[cfg(feature = "cloudrun")]
#[tokio::test]
async fn a_config_that_validates_builds_its_provider() {
    // Agents that each name their job, and no default job: valid, and the provider builds
    // (it used to pass validation and then fail in App::build on the empty default job).
    let c = load(
        "provider = \"cloudrun\"\ndefault_agent = \"support\"\n[cloudrun]\nproject = \"p\"\nregion = \"europe-west1\"\nmetadata_host = \"127.0.0.1:9\"\n[agents.support]\nimage = \"support-bot\"\n",
        &[],
    )
    .unwrap();
    let templates = c.templates().unwrap();
    assert_eq!(
        templates["support"].workload,
        providers::Workload::Job("support-bot".into())
    );
    let ctx = providers::BuildContext::new(reqwest::Client::new());
    c.provider.settings().build(&ctx).await.unwrap();
    // A job name the provider would refuse is refused here, naming the key.
    let m = message(load(
        "provider = \"cloudrun\"\n[cloudrun]\nproject = \"p\"\nregion = \"r\"\n[agents.default]\nimage = \"us-docker.pkg.dev/p/bot:1\"\n",
        &[],
    ));
    assert!(m.contains("agents.default.image"), "{m}");
}

#[test]
fn secrets_are_redacted_in_debug() {
    let c = load(
        "",
        &[(
            "BOTDISPATCH_JWT_SECRET",
            "0123456789abcdef0123456789abcdef-x",
        )],
    )
    .unwrap();
    assert!(!format!("{c:?}").contains("0123456789abcdef"));
}

/// The `http` handoff and reserves (DESIGN §4, §10): what a provider cannot do, and a reserve
/// without the handoff it needs, are refused at load, naming the key.
#[test]
fn warm_start_settings_are_checked_against_the_provider() {
    let fly = [
        ("BOTDISPATCH_PROVIDER", "fly"),
        ("FLY_API_TOKEN", "t"),
        ("FLY_APP_NAME", "bots"),
        ("BOTDISPATCH_BOT_IMAGE", "registry.fly.io/bots:1"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut env = fly.to_vec();
        env.extend_from_slice(extra);
        load("", &env)
    };
    // A reserve needs the http handoff.
    let m = message(with(&[("BOTDISPATCH_RESERVE_SIZE", "2")]));
    assert!(
        m.contains("agents.default.reserve needs handoff = \"http\""),
        "{m}"
    );
    // Every tier works on Fly; the template gets PORT and its handoff port.
    for tier in ["hot", "suspended", "stopped"] {
        let c = with(&[
            ("BOTDISPATCH_HANDOFF", "http"),
            ("BOTDISPATCH_RESERVE_TIER", tier),
            ("BOTDISPATCH_RESERVE_SIZE", "3"),
        ])
        .unwrap();
        let reserve = c.agents["default"].reserve.as_ref().unwrap();
        assert_eq!(
            (reserve.tier.0.as_str(), reserve.size, reserve.rooms),
            (tier, 3, true)
        );
        let template = &c.templates().unwrap()["default"];
        assert_eq!(template.handoff_port, Some(8080));
        assert_eq!(template.env["PORT"], "8080");
    }
    let m = message(with(&[
        ("BOTDISPATCH_HANDOFF", "http"),
        ("BOTDISPATCH_RESERVE_TIER", "lukewarm"),
    ]));
    assert!(m.contains("BOTDISPATCH_RESERVE_TIER"), "{m}");
    // A suspended machine's snapshot is at most 2 GB.
    let m = message(load(
        "provider = \"fly\"\n[agents.default]\nimage = \"i\"\nhandoff = \"http\"\nguest = { cpus = 2, memory_mb = 4096 }\nreserve = { tier = \"suspended\", size = 1 }\n",
        &fly[..3],
    ));
    assert!(m.contains("memory_mb ≤ 2048"), "{m}");
    // PORT is the handoff's in http mode.
    let m = message(load(
        "provider = \"fly\"\n[agents.default]\nimage = \"i\"\nhandoff = \"http\"\nenv = { PORT = \"9000\" }\n",
        &fly[..3],
    ));
    assert!(m.contains("PORT"), "{m}");
    // Size 0 means no reserve.
    let c = with(&[
        ("BOTDISPATCH_HANDOFF", "http"),
        ("BOTDISPATCH_RESERVE_SIZE", "0"),
    ])
    .unwrap();
    assert!(c.agents["default"].reserve.is_none());
    if cfg!(feature = "cloudrun") {
        // Cloud Run jobs take no inbound traffic.
        let m = message(load(
            "provider = \"cloudrun\"\n[cloudrun]\nproject = \"p\"\nregion = \"europe-west1\"\njob = \"j\"\n[agents.default]\nhandoff = \"http\"\n",
            &[],
        ));
        assert!(
            m.contains("handoff (BOTDISPATCH_HANDOFF) = \"http\""),
            "{m}"
        );
        assert!(m.contains("cloudrun"), "{m}");
    }
}

/// Recycling (issue 11 §1) needs a reserve, and a provider that can boot a machine again.
#[test]
fn recycling_settings_are_checked() {
    let fly = [
        ("BOTDISPATCH_PROVIDER", "fly"),
        ("FLY_API_TOKEN", "t"),
        ("FLY_APP_NAME", "bots"),
        ("BOTDISPATCH_BOT_IMAGE", "registry.fly.io/bots:1"),
        ("BOTDISPATCH_HANDOFF", "http"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut env = fly.to_vec();
        env.extend_from_slice(extra);
        load("", &env)
    };
    let c = with(&[
        ("BOTDISPATCH_RESERVE_SIZE", "4"),
        ("BOTDISPATCH_RESERVE_RECYCLE", "true"),
    ])
    .unwrap();
    assert!(c.agents["default"].reserve.as_ref().unwrap().recycle);
    // Nothing to recycle: a clear error, not a setting silently ignored.
    let m = message(with(&[("BOTDISPATCH_RESERVE_RECYCLE", "true")]));
    assert!(m.contains("BOTDISPATCH_RESERVE_SIZE"), "{m}");
    // A reserve switched off with size 0 may keep its recycle setting.
    let c = with(&[
        ("BOTDISPATCH_RESERVE_SIZE", "0"),
        ("BOTDISPATCH_RESERVE_RECYCLE", "true"),
    ])
    .unwrap();
    assert!(c.agents["default"].reserve.is_none());
    let m = message(with(&[
        ("BOTDISPATCH_RESERVE_SIZE", "4"),
        ("BOTDISPATCH_RESERVE_RECYCLE", "maybe"),
    ]));
    assert!(m.contains("BOTDISPATCH_RESERVE_RECYCLE"), "{m}");
    if cfg!(feature = "kubernetes") {
        // A pod runs once (restartPolicy Never): every session gets a new one.
        let m = message(load(
            "provider = \"kubernetes\"\n[kubernetes]\nnamespace = \"bots\"\n[agents.default]\nimage = \"bot:1\"\nhandoff = \"http\"\nreserve = { tier = \"hot\", size = 2, recycle = true }\n",
            &[],
        ));
        assert!(
            m.contains("agents.default.reserve.recycle (BOTDISPATCH_RESERVE_RECYCLE)"),
            "{m}"
        );
        assert!(m.contains("kubernetes"), "{m}");
    }
}

"""CI check of the deploy files: fly.toml and every examples/*.toml parse as TOML, and fly.toml
keeps the rules docs/deploy-fly.md relies on. (Whether the example configs are valid
botdispatch configurations is checked by the Rust tests, src/config/tests.rs.)

Run from the repository root: python3 .ci/check_deploy_files.py
"""

import glob
import sys
import tomllib


def load(path):
    with open(path, "rb") as f:
        return tomllib.load(f)


def check_fly_toml(doc):
    """The mistakes issue 13 found, kept out of fly.toml."""
    problems = []
    env = doc.get("env", {})
    fly_names = sorted(k for k in env if k.upper().startswith("FLY_"))
    if fly_names:
        problems.append(f"[env] names must not begin with FLY_ (Fly refuses them): {fly_names}")
    bots_app = env.get("BOTDISPATCH_FLY_APP")
    if not bots_app:
        problems.append(
            "[env] BOTDISPATCH_FLY_APP is missing: Fly sets FLY_APP_NAME to the dispatcher's own app on every machine"
        )
    elif bots_app == doc.get("app"):
        problems.append("BOTDISPATCH_FLY_APP names the dispatcher's own app: bots would get its secrets")
    image = env.get("BOTDISPATCH_BOT_IMAGE", "")
    if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
        problems.append(f"BOTDISPATCH_BOT_IMAGE {image!r} needs an explicit tag other than latest")
    if env.get("APP_ENV") != "production":
        problems.append("[env] APP_ENV must be production")
    listen_port = int(env.get("BOTDISPATCH_LISTEN", ":0").rsplit(":", 1)[-1])
    internal_port = doc.get("http_service", {}).get("internal_port")
    if listen_port != internal_port:
        problems.append(f"http_service.internal_port {internal_port} is not BOTDISPATCH_LISTEN's port {listen_port}")
    if not 0 < int(doc.get("kill_timeout", 0)) <= 300:
        problems.append("kill_timeout must be set, at most 300 (Fly's maximum)")
    dockerfile = doc.get("build", {}).get("dockerfile")
    if not dockerfile or not glob.glob(dockerfile):
        problems.append(f"[build] dockerfile {dockerfile!r} does not exist")
    return problems


def check_example(doc):
    problems = []
    for name, agent in doc.get("agents", {}).items():
        image = agent.get("image", "")
        if image.endswith(":latest"):
            problems.append(f"agents.{name}.image {image!r}: use an explicit tag, not latest")
    return problems


def main():
    failures = 0
    for path in ["fly.toml", *sorted(glob.glob("examples/*.toml"))]:
        try:
            doc = load(path)
        except (OSError, tomllib.TOMLDecodeError) as e:
            print(f"FAIL {path}: {e}")
            failures += 1
            continue
        problems = check_fly_toml(doc) if path == "fly.toml" else check_example(doc)
        for problem in problems:
            print(f"FAIL {path}: {problem}")
        failures += len(problems)
        if not problems:
            print(f"ok   {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

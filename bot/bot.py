"""Example Pipecat bot for botdispatch (the image Dockerfile.bot builds).

botdispatch starts one machine per session and hands the bot its session through the
environment, never argv (README.md, "The bot contract"):

    DAILY_ROOM_URL           the private Daily room of this session
    DAILY_ROOM_TOKEN         an owner meeting token for that room (a secret: never logged)
    BOTDISPATCH_SESSION_ID   the plain session key (the room is named after it)
    BOTDISPATCH_BODY         the client's `body` from POST /start, a JSON object

The bot joins the room with Pipecat's DailyTransport, greets the first participant and leaves
when the last participant has left, when Daily ejects it (the room and the token expire at the
session deadline), when nobody joins within BOT_JOIN_TIMEOUT_SECS, after BOT_IDLE_TIMEOUT_SECS
without speech, or on SIGTERM/SIGINT (botdispatch stopping the session). When the process exits,
Fly destroys the machine (`auto_destroy`).

The greeting is spoken with OpenAI text-to-speech when OPENAI_API_KEY is set (a paid key; the
only one this bot can use). Without it the bot still joins and leaves correctly and sends the
greeting as a Daily app message (`{"type": "botdispatch-greeting", "text": ...}`) instead of
speaking it. Optional settings, all from the environment:

    BOT_NAME                 display name in the call (default "Pipecat bot")
    BOT_GREETING             greeting text; the client may override it with body.greeting
    BOT_JOIN_TIMEOUT_SECS    leave when nobody joined after this long (default 120)
    BOT_IDLE_TIMEOUT_SECS    leave after this long without speech; 0 disables (default 300)
    OPENAI_API_KEY           enables the spoken greeting
    OPENAI_TTS_VOICE         OpenAI voice (default "alloy")
    OPENAI_TTS_MODEL         OpenAI TTS model (default: Pipecat's default for OpenAITTSService)
    LOG_LEVEL                TRACE, DEBUG, INFO (default), WARNING or ERROR

The same file also runs on Pipecat Cloud's base image, which imports this module and calls
`bot(runner_args)` (see `bot` at the end).

Configuration parsing is pure (`load_config(environ)`), and Pipecat is imported only inside
`run_bot`, so `python -m py_compile bot/bot.py` and the unit tests in test_bot.py run without
Pipecat installed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

DEFAULT_BOT_NAME = "Pipecat bot"
DEFAULT_GREETING = "Hello! I'm the botdispatch example bot. This call runs on its own machine."
DEFAULT_JOIN_TIMEOUT_SECS = 120.0
DEFAULT_IDLE_TIMEOUT_SECS = 300.0
DEFAULT_OPENAI_VOICE = "alloy"
MAX_GREETING_CHARS = 500
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR")

# Exit codes of `main`.
EXIT_OK = 0
EXIT_RUNTIME_ERROR = 1
EXIT_CONFIG_ERROR = 2


class ConfigError(ValueError):
    """The environment does not hold a usable bot configuration; the message names the variable."""


@dataclass(frozen=True)
class TtsConfig:
    """OpenAI text-to-speech settings (only present when OPENAI_API_KEY is set)."""

    api_key: str = field(repr=False)
    voice: str = DEFAULT_OPENAI_VOICE
    model: str | None = None


@dataclass(frozen=True)
class BotConfig:
    """Everything the bot needs, parsed and validated. Secrets are left out of repr()."""

    room_url: str
    token: str = field(repr=False)
    session_id: str
    body: dict[str, Any]
    bot_name: str = DEFAULT_BOT_NAME
    greeting: str = DEFAULT_GREETING
    tts: TtsConfig | None = None
    join_timeout_secs: float = DEFAULT_JOIN_TIMEOUT_SECS
    # None: no idle timeout.
    idle_timeout_secs: float | None = DEFAULT_IDLE_TIMEOUT_SECS
    log_level: str = "INFO"


def _get(environ: Mapping[str, str], name: str) -> str | None:
    """The variable's value, or None when it is unset or blank."""
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _required(environ: Mapping[str, str], name: str, what: str) -> str:
    value = _get(environ, name)
    if value is None:
        raise ConfigError(f"{name} is not set: {what} (botdispatch sets it for every session)")
    return value


def parse_room_url(value: str, name: str = "DAILY_ROOM_URL") -> str:
    """A room URL must be an absolute http(s) URL with a host (Daily rooms are https)."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http(s) URL like https://DOMAIN.daily.co/ROOM, got {value!r}")
    return value


def parse_body(raw: str | None, name: str = "BOTDISPATCH_BODY") -> dict[str, Any]:
    """The client's body: a JSON object; unset or blank means {}."""
    if raw is None or not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{name} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(body, dict):
        raise ConfigError(f"{name} must be a JSON object, got {_json_type(body)}")
    return body


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _seconds(environ: Mapping[str, str], name: str, default: float, *, zero_disables: bool) -> float | None:
    raw = _get(environ, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{name}={raw!r} is not a number of seconds")
    if zero_disables and value == 0:
        return None
    if value <= 0:
        hint = " (0 disables it)" if zero_disables else ""
        raise ConfigError(f"{name}={raw!r} must be greater than 0{hint}")
    return value


def _greeting(body: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    if "greeting" in body:
        greeting = body["greeting"]
        source = "BOTDISPATCH_BODY.greeting"
        if not isinstance(greeting, str):
            raise ConfigError(f"{source} must be a string, got {_json_type(greeting)}")
    else:
        greeting = _get(environ, "BOT_GREETING") or DEFAULT_GREETING
        source = "BOT_GREETING"
    greeting = greeting.strip()
    if not greeting:
        raise ConfigError(f"{source} is empty")
    if len(greeting) > MAX_GREETING_CHARS:
        raise ConfigError(f"{source} is longer than {MAX_GREETING_CHARS} characters")
    return greeting


def _settings(environ: Mapping[str, str], body: Mapping[str, Any]) -> dict[str, Any]:
    """The optional settings shared by both entry points (environment variables and Pipecat Cloud)."""
    api_key = _get(environ, "OPENAI_API_KEY")
    tts = None
    if api_key is not None:
        tts = TtsConfig(
            api_key=api_key,
            voice=_get(environ, "OPENAI_TTS_VOICE") or DEFAULT_OPENAI_VOICE,
            model=_get(environ, "OPENAI_TTS_MODEL"),
        )
    log_level = (_get(environ, "LOG_LEVEL") or "INFO").upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL={log_level!r} must be one of {', '.join(LOG_LEVELS)}")
    return {
        "bot_name": _get(environ, "BOT_NAME") or DEFAULT_BOT_NAME,
        "greeting": _greeting(body, environ),
        "tts": tts,
        "join_timeout_secs": _seconds(
            environ, "BOT_JOIN_TIMEOUT_SECS", DEFAULT_JOIN_TIMEOUT_SECS, zero_disables=False
        ),
        "idle_timeout_secs": _seconds(
            environ, "BOT_IDLE_TIMEOUT_SECS", DEFAULT_IDLE_TIMEOUT_SECS, zero_disables=True
        ),
        "log_level": log_level,
    }


def load_config(environ: Mapping[str, str]) -> BotConfig:
    """Parses the botdispatch bot contract from an environment mapping (pure: no I/O).

    Raises ConfigError, whose message names the offending variable and never contains a secret.
    """
    room_url = parse_room_url(_required(environ, "DAILY_ROOM_URL", "the Daily room to join"))
    token = _required(environ, "DAILY_ROOM_TOKEN", "the meeting token for the room")
    session_id = _required(environ, "BOTDISPATCH_SESSION_ID", "the session this bot serves")
    body = parse_body(environ.get("BOTDISPATCH_BODY"))
    return BotConfig(room_url=room_url, token=token, session_id=session_id, body=body, **_settings(environ, body))


def config_from_runner_args(runner_args: Any, environ: Mapping[str, str]) -> BotConfig:
    """The same configuration from Pipecat Cloud's `runner_args` (DailyRunnerArguments): the
    room, token, body and session id come from the runner, the optional settings from the
    environment. Pure, like `load_config`.
    """
    room_url = getattr(runner_args, "room_url", None)
    if not isinstance(room_url, str) or not room_url.strip():
        raise ConfigError("runner_args.room_url is not set: this bot needs a Daily room (Daily transport)")
    token = getattr(runner_args, "token", None)
    if not isinstance(token, str) or not token.strip():
        raise ConfigError("runner_args.token is not set: the bot needs a meeting token for the room")
    body = getattr(runner_args, "body", None)
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise ConfigError(f"runner_args.body must be a JSON object, got {_json_type(body)}")
    session_id = getattr(runner_args, "session_id", None) or environ.get("BOTDISPATCH_SESSION_ID") or "unknown"
    return BotConfig(
        room_url=parse_room_url(room_url.strip(), "runner_args.room_url"),
        token=token.strip(),
        session_id=str(session_id),
        body=body,
        **_settings(environ, body),
    )


class Presence:
    """Who besides the bot is in the call; tells when the last participant has left (pure)."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self.anyone_joined = False

    def joined(self, participant_id: str) -> None:
        self._ids.add(participant_id)
        self.anyone_joined = True

    def left(self, participant_id: str) -> bool:
        """Records a departure; True when the room is now empty of participants."""
        self._ids.discard(participant_id)
        return not self._ids

    def __len__(self) -> int:
        return len(self._ids)


def remote_participant_ids(participants: Mapping[str, Any]) -> list[str]:
    """Ids of the other participants in a Daily `participants()` map (the bot is "local")."""
    ids = []
    for key, participant in participants.items():
        info = participant.get("info", {}) if isinstance(participant, Mapping) else {}
        if key == "local" or info.get("isLocal"):
            continue
        ids.append(str(participant.get("id", key)) if isinstance(participant, Mapping) else str(key))
    return ids


def greeting_message(config: BotConfig) -> dict[str, Any]:
    """The app message every participant receives when the bot greets (spoken or not)."""
    return {
        "type": "botdispatch-greeting",
        "text": config.greeting,
        "spoken": config.tts is not None,
        "sessionId": config.session_id,
    }


async def run_bot(config: BotConfig, *, handle_signals: bool = True) -> int:
    """Joins the room, greets, and returns an exit code when the session is over."""
    import asyncio

    from loguru import logger
    from pipecat.frames.frames import OutputTransportMessageUrgentFrame, TTSSpeakFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineWorker
    from pipecat.transports.daily.transport import DailyParams, DailyTransport
    from pipecat.workers.runner import WorkerRunner

    logger.remove()
    logger.add(sys.stderr, level=config.log_level)
    log = logger.bind(session=config.session_id)
    log.info(
        "joining {} as {!r} (body keys: {}; spoken greeting: {})",
        config.room_url,
        config.bot_name,
        sorted(config.body),
        config.tts is not None,
    )

    transport = DailyTransport(
        config.room_url,
        config.token,
        config.bot_name,
        DailyParams(
            # This example only speaks. A conversational bot enables audio input and adds
            # speech-to-text and an LLM between input and output.
            audio_in_enabled=False,
            audio_out_enabled=True,
            camera_out_enabled=False,
        ),
    )
    processors: list[Any] = [transport.input()]
    if config.tts is not None:
        from pipecat.services.openai.tts import OpenAITTSService

        settings: dict[str, Any] = {"voice": config.tts.voice}
        if config.tts.model:
            settings["model"] = config.tts.model
        processors.append(
            OpenAITTSService(api_key=config.tts.api_key, settings=OpenAITTSService.Settings(**settings))
        )
    processors.append(transport.output())

    worker = PipelineWorker(
        Pipeline(processors),
        idle_timeout_secs=config.idle_timeout_secs,
        cancel_on_idle_timeout=config.idle_timeout_secs is not None,
    )
    presence = Presence()
    outcome = {"code": EXIT_OK, "joined": False, "greeted": False}

    async def finish(reason: str, *, code: int = EXIT_OK) -> None:
        if code != EXIT_OK:
            outcome["code"] = code
        log.info("leaving: {}", reason)
        await worker.cancel(reason=reason)

    async def join_deadline() -> None:
        await asyncio.sleep(config.join_timeout_secs)
        if not presence.anyone_joined:
            await finish(f"nobody joined within {config.join_timeout_secs:g} s")

    async def greet() -> None:
        if outcome["greeted"]:
            return
        outcome["greeted"] = True
        log.info("greeting ({} participant(s) in the call)", len(presence))
        await worker.queue_frame(OutputTransportMessageUrgentFrame(message=greeting_message(config)))
        if config.tts is not None:
            await worker.queue_frame(TTSSpeakFrame(config.greeting))

    @transport.event_handler("on_joined")
    async def on_joined(transport: Any, _data: Any) -> None:
        outcome["joined"] = True
        # The client may have joined first: /start answers as soon as the machine has started.
        for participant_id in remote_participant_ids(transport.participants()):
            presence.joined(participant_id)
        if presence.anyone_joined:
            await greet()
        else:
            log.info("joined the room; waiting for a participant")

    @transport.event_handler("on_participant_joined")
    async def on_participant_joined(_transport: Any, participant: Mapping[str, Any]) -> None:
        presence.joined(str(participant.get("id")))
        await greet()

    @transport.event_handler("on_participant_left")
    async def on_participant_left(_transport: Any, participant: Mapping[str, Any], reason: Any) -> None:
        if presence.left(str(participant.get("id"))):
            await finish(f"the last participant left ({reason})")

    @transport.event_handler("on_call_state_updated")
    async def on_call_state_updated(_transport: Any, state: str) -> None:
        # "left" also arrives when Daily ejects the bot: the room or its token expired.
        if state == "left":
            await finish("the bot left the call (ejected at room or token expiry, or stopped)")

    @transport.event_handler("on_error")
    async def on_error(_transport: Any, error: str) -> None:
        log.error("transport error: {}", error)
        if not outcome["joined"]:
            await finish("could not join the room", code=EXIT_RUNTIME_ERROR)

    runner = WorkerRunner(handle_sigint=handle_signals, handle_sigterm=handle_signals)
    await runner.add_workers(worker)
    deadline = asyncio.create_task(join_deadline())
    try:
        await runner.run()
    finally:
        deadline.cancel()
    log.info("session over (exit code {})", outcome["code"])
    return int(outcome["code"])


async def bot(runner_args: Any) -> None:
    """Entry point of Pipecat Cloud's base image (and of Pipecat's development runner with
    `-t daily`): the room, token and body come from `runner_args` instead of the environment.
    """
    import os

    config = config_from_runner_args(runner_args, os.environ)
    # The hosting runner owns the process and its signals.
    await run_bot(config, handle_signals=False)


def main(environ: Mapping[str, str] | None = None) -> int:
    import asyncio
    import os

    try:
        config = load_config(os.environ if environ is None else environ)
    except ConfigError as e:
        print(f"bot: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return asyncio.run(run_bot(config))


if __name__ == "__main__":
    sys.exit(main())

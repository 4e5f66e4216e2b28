"""Example Pipecat bot for botdispatch (the image Dockerfile.bot builds).

botdispatch starts one machine per session and hands the bot its session in one of two ways
(README.md, "The bot contract"); the environment says which:

`env` handoff (DAILY_ROOM_URL is set): the session is in the environment, never argv:

    DAILY_ROOM_URL           the private Daily room of this session
    DAILY_ROOM_TOKEN         an owner meeting token for that room (a secret: never logged)
    BOTDISPATCH_SESSION_ID   the plain session key (the room is named after it)
    BOTDISPATCH_BODY         the client's `body` from POST /start, a JSON object

`http` handoff (no DAILY_ROOM_URL, BOTDISPATCH_HANDOFF_SECRET set): the machine boots ahead of
its session (a warm reserve) and serves GET /readyz and POST /bot on PORT (default 8080); the
session arrives in POST /bot's headers and body (see handoff.py for the status codes):

    BOTDISPATCH_HANDOFF_SECRET   the bearer secret POST /bot must carry (a secret)
    PORT                         the port to serve on (default 8080)
    BOT_LISTEN_HOST              the address to serve on (default "::": every interface,
                                 IPv6 and IPv4; Fly's private network is IPv6)

Either way the bot gets exactly one session and exits when it is over.

The bot joins the room with Pipecat's DailyTransport and greets the first participant: the
greeting is spoken with OpenAI text-to-speech when OPENAI_API_KEY is set (a paid key; the only
one this bot can use); without it the bot plays a short two-note chime instead. Either way the
greeting's text goes to Daily Prebuilt's chat (shown when the room has chat enabled:
`dailyRoomProperties: {"enable_chat": true}`) and, as a Daily app message
(`{"type": "botdispatch-greeting", "text": ...}`), to custom clients.

It listens too: a voice activity detector (Silero, shipped inside pipecat-ai: no download)
runs on the participants' audio, so a user who is talking keeps the session alive. It leaves
when the last participant has left, when Daily ejects it (the room and the token expire at the
session deadline), when nobody joined within BOT_JOIN_TIMEOUT_SECS, after BOT_IDLE_TIMEOUT_SECS
in which nobody spoke (neither the bot nor a participant), or on a stop signal (env handoff:
SIGTERM or SIGINT end the session; http handoff: SIGTERM lets it finish, SIGINT ends it). When
the process exits, Fly destroys the machine (`auto_destroy`).

Optional settings, all from the environment:

    BOT_NAME                 display name in the call (default "Pipecat bot")
    BOT_GREETING             greeting text; the client may override it with body.greeting
    BOT_JOIN_TIMEOUT_SECS    leave when nobody joined after this long (default 120)
    BOT_IDLE_TIMEOUT_SECS    leave after this long with nobody speaking; 0 disables (default 300)
    OPENAI_API_KEY           enables the spoken greeting
    OPENAI_TTS_VOICE         OpenAI voice (default "alloy")
    OPENAI_TTS_MODEL         OpenAI TTS model (default: Pipecat's default for OpenAITTSService)
    LOG_LEVEL                TRACE, DEBUG, INFO (default), WARNING or ERROR

Exit codes: 0 the session ended normally (or, http handoff, SIGTERM before any session);
1 the bot failed (could not join the room, a crash); 2 the environment is not a usable
configuration (the message names the variable).

The same file also runs on Pipecat Cloud's base image, which imports this module and calls
`bot(runner_args)` (see `bot` at the end).

Configuration parsing is pure (`load_config(environ)`, `load_handoff_config(environ)`), and
Pipecat is imported only inside the functions that run a session, so
`python -m py_compile bot/bot.py` and most unit tests run without Pipecat installed.
"""

from __future__ import annotations

import json
import math
import struct
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
DEFAULT_PORT = 8080
DEFAULT_LISTEN_HOST = "::"

# The two ways botdispatch hands a session over (README.md, "The bot contract").
HANDOFF_ENV = "env"
HANDOFF_HTTP = "http"

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


@dataclass(frozen=True)
class HandoffConfig:
    """The http handoff's own settings (the session's come with POST /bot)."""

    secret: str = field(repr=False)
    port: int = DEFAULT_PORT
    host: str = DEFAULT_LISTEN_HOST
    log_level: str = "INFO"


def handoff_mode(environ: Mapping[str, str]) -> str:
    """`env` when the session is in the environment (DAILY_ROOM_URL), `http` when the machine
    boots ahead of its session (BOTDISPATCH_HANDOFF_SECRET without DAILY_ROOM_URL)."""
    if _get(environ, "DAILY_ROOM_URL") is not None:
        return HANDOFF_ENV
    if _get(environ, "BOTDISPATCH_HANDOFF_SECRET") is not None:
        return HANDOFF_HTTP
    raise ConfigError(
        "DAILY_ROOM_URL is not set (the room, when botdispatch hands the session over in the "
        "environment) and neither is BOTDISPATCH_HANDOFF_SECRET (when it hands it over with "
        "POST /bot): this bot runs under botdispatch, one session per machine"
    )


def load_handoff_config(environ: Mapping[str, str]) -> HandoffConfig:
    """The http handoff's settings, and every optional setting checked now rather than at the
    first session (pure: no I/O)."""
    secret = _required(environ, "BOTDISPATCH_HANDOFF_SECRET", "the secret POST /bot must carry")
    raw_port = _get(environ, "PORT")
    port = DEFAULT_PORT
    if raw_port is not None:
        if not raw_port.isdigit() or not 0 < int(raw_port) < 65536:
            raise ConfigError(f"PORT={raw_port!r} must be a port number (1-65535)")
        port = int(raw_port)
    settings = _settings(environ, {})
    return HandoffConfig(
        secret=secret,
        port=port,
        host=_get(environ, "BOT_LISTEN_HOST") or DEFAULT_LISTEN_HOST,
        log_level=settings["log_level"],
    )


def config_from_handoff(headers: Mapping[str, str], body: dict[str, Any], environ: Mapping[str, str]) -> BotConfig:
    """The session POST /bot delivered: the room, token and session id from its headers, the
    client's body, the optional settings from the environment. Pure, like `load_config`.
    Raises ConfigError naming the header or field."""

    def header(name: str, what: str) -> str:
        value = (headers.get(name) or "").strip()
        if not value:
            raise ConfigError(f"the {name} header is missing: {what}")
        return value

    room_url = parse_room_url(header("X-Daily-Room-Url", "the Daily room to join"), "X-Daily-Room-Url")
    token = header("X-Daily-Room-Token", "the meeting token for the room")
    session_id = (headers.get("X-Daily-Session-Id") or "").strip() or "unknown"
    if not isinstance(body, dict):
        raise ConfigError(f"the body must be a JSON object, got {_json_type(body)}")
    try:
        settings = _settings(environ, body)
    except ConfigError as e:
        raise ConfigError(str(e).replace("BOTDISPATCH_BODY.", "body.")) from None
    return BotConfig(room_url=room_url, token=token, session_id=session_id, body=body, **settings)


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


CHIME_SAMPLE_RATE = 16000


def chime_pcm(sample_rate: int = CHIME_SAMPLE_RATE) -> bytes:
    """What the bot plays instead of a spoken greeting without OPENAI_API_KEY: two rising notes
    (E5 then A5, 180 ms each, soft attack and release), 16-bit mono PCM, made here: no file, no
    network, no key."""
    notes = (659.25, 880.0)
    note_secs, fade_secs, gap_secs, peak = 0.18, 0.02, 0.04, 0.3 * 32767
    samples: list[int] = []
    for freq in notes:
        n = int(note_secs * sample_rate)
        fade = int(fade_secs * sample_rate)
        for i in range(n):
            envelope = min(1.0, i / fade, (n - 1 - i) / fade)
            samples.append(int(peak * envelope * math.sin(2 * math.pi * freq * i / sample_rate)))
        samples.extend([0] * int(gap_secs * sample_rate))
    return struct.pack(f"<{len(samples)}h", *samples)


class Prepared:
    """What a session needs that does not depend on the session: Pipecat's modules imported
    and the voice activity model loaded. The http handoff prepares it before /readyz answers
    200, so a delivered session starts at once; the env handoff prepares it per session."""

    def __init__(self) -> None:
        # The heavy imports (numpy, onnxruntime, daily) happen here.
        from pipecat.audio.vad.silero import SileroVADAnalyzer
        from pipecat.transports.daily.transport import DailyTransport  # noqa: F401

        self.vad_analyzer = SileroVADAnalyzer()


def new_worker(pipeline: Any, idle_timeout_secs: float | None) -> Any:
    """The session's PipelineWorker. Either side speaking counts as activity (the bot's
    BotSpeakingFrame, the VAD's UserSpeakingFrame while a participant talks): the call ends
    after `idle_timeout_secs` in which nobody spoke; None disables that."""
    from pipecat.frames.frames import BotSpeakingFrame, UserSpeakingFrame
    from pipecat.pipeline.worker import PipelineWorker

    return PipelineWorker(
        pipeline,
        idle_timeout_frames=(BotSpeakingFrame, UserSpeakingFrame),
        idle_timeout_secs=idle_timeout_secs,
        cancel_on_idle_timeout=idle_timeout_secs is not None,
    )


def build_session(config: BotConfig, prepared: Prepared) -> Any:
    """The session's Pipecat objects, built without any I/O (the room is joined when the
    pipeline starts): the transport, the pipeline and its worker, with their event handlers.
    Returns a namespace with `transport`, `processors`, `worker`, `outcome` and
    `join_deadline` (a coroutine function)."""
    import asyncio
    import types

    from loguru import logger
    from pipecat.frames.frames import OutputAudioRawFrame, OutputTransportMessageUrgentFrame, TTSSpeakFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.processors.audio.vad_processor import VADProcessor
    from pipecat.transports.daily.transport import DailyParams, DailyTransport

    log = logger.bind(session=config.session_id)
    transport = DailyTransport(
        config.room_url,
        config.token,
        config.bot_name,
        DailyParams(
            # Audio in feeds the voice activity detector: a user who talks keeps the session
            # alive. A conversational bot adds speech-to-text and an LLM after it.
            audio_in_enabled=True,
            audio_out_enabled=True,
            camera_out_enabled=False,
        ),
    )
    processors: list[Any] = [
        transport.input(),
        # Pushes UserSpeakingFrame while someone talks, which resets the idle timer.
        VADProcessor(vad_analyzer=prepared.vad_analyzer),
    ]
    if config.tts is not None:
        from pipecat.services.openai.tts import OpenAITTSService

        settings: dict[str, Any] = {"voice": config.tts.voice}
        if config.tts.model:
            settings["model"] = config.tts.model
        processors.append(
            OpenAITTSService(api_key=config.tts.api_key, settings=OpenAITTSService.Settings(**settings))
        )
    processors.append(transport.output())

    worker = new_worker(Pipeline(processors), config.idle_timeout_secs)
    presence = Presence()
    outcome = {"code": EXIT_OK, "joined": False, "greeted": False}

    async def finish(reason: str, *, code: int = EXIT_OK) -> None:
        if code != EXIT_OK:
            outcome["code"] = code
        log.info("leaving: {}", reason)
        await worker.cancel(reason=reason)

    async def join_deadline() -> None:
        await asyncio.sleep(config.join_timeout_secs)
        if not outcome["joined"]:
            await finish(f"could not join the room within {config.join_timeout_secs:g} s", code=EXIT_RUNTIME_ERROR)
        elif not presence.anyone_joined:
            await finish(f"nobody joined within {config.join_timeout_secs:g} s")

    async def greet() -> None:
        if outcome["greeted"]:
            return
        outcome["greeted"] = True
        log.info("greeting ({} participant(s) in the call)", len(presence))
        await worker.queue_frame(OutputTransportMessageUrgentFrame(message=greeting_message(config)))
        # Shown by Daily Prebuilt when the room has chat enabled; ignored by other clients.
        await transport.send_prebuilt_chat_message(config.greeting, user_name=config.bot_name)
        if config.tts is not None:
            await worker.queue_frame(TTSSpeakFrame(config.greeting))
        else:
            await worker.queue_frame(OutputAudioRawFrame(audio=chime_pcm(), sample_rate=CHIME_SAMPLE_RATE, num_channels=1))

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

    return types.SimpleNamespace(
        transport=transport,
        processors=processors,
        worker=worker,
        outcome=outcome,
        join_deadline=join_deadline,
    )


def setup_logging(level: str) -> None:
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level=level)


async def run_bot(config: BotConfig, *, handle_signals: bool = True, prepared: Prepared | None = None) -> int:
    """Joins the room, greets, and returns an exit code when the session is over."""
    import asyncio

    from loguru import logger
    from pipecat.workers.runner import WorkerRunner

    log = logger.bind(session=config.session_id)
    log.info(
        "joining {} as {!r} (body keys: {}; spoken greeting: {})",
        config.room_url,
        config.bot_name,
        sorted(config.body),
        config.tts is not None,
    )
    session = build_session(config, prepared or Prepared())
    runner = WorkerRunner(handle_sigint=handle_signals, handle_sigterm=handle_signals)
    await runner.add_workers(session.worker)
    deadline = asyncio.create_task(session.join_deadline())
    try:
        await runner.run()
    finally:
        deadline.cancel()
    log.info("session over (exit code {})", session.outcome["code"])
    return int(session.outcome["code"])


async def bot(runner_args: Any) -> None:
    """Entry point of Pipecat Cloud's base image (and of Pipecat's development runner with
    `-t daily`): the room, token and body come from `runner_args` instead of the environment.
    """
    import os

    config = config_from_runner_args(runner_args, os.environ)
    # The hosting runner owns the process and its signals.
    await run_bot(config, handle_signals=False)


async def serve_handoff(handoff: HandoffConfig, environ: Mapping[str, str]) -> int:
    """The http handoff: serve /readyz and /bot until this boot's one session is over."""
    import handoff as http_handoff

    prepared: list[Prepared] = []

    def parse_session(headers: Mapping[str, str], body: dict[str, Any]) -> BotConfig:
        try:
            return config_from_handoff(headers, body, environ)
        except ConfigError as e:
            raise http_handoff.SessionRefused(str(e)) from None

    async def run_session(config: BotConfig) -> int:
        # The http server owns the signals: SIGTERM lets the session finish.
        return await run_bot(config, handle_signals=False, prepared=prepared[0])

    server = http_handoff.HandoffServer(secret=handoff.secret, parse_session=parse_session, run_session=run_session)
    return await http_handoff.serve(
        server,
        host=handoff.host,
        port=handoff.port,
        warm_up=lambda: prepared.append(Prepared()),
    )


def main(environ: Mapping[str, str] | None = None) -> int:
    import asyncio
    import os

    env = os.environ if environ is None else environ
    try:
        if handoff_mode(env) == HANDOFF_HTTP:
            handoff = load_handoff_config(env)
            setup_logging(handoff.log_level)
            return asyncio.run(serve_handoff(handoff, env))
        config = load_config(env)
    except ConfigError as e:
        print(f"bot: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    setup_logging(config.log_level)
    return asyncio.run(run_bot(config))


if __name__ == "__main__":
    sys.exit(main())

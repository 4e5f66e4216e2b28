"""Unit tests of the example bot's configuration parsing (both handoffs) and its pure helpers;
Pipecat is not needed (test_pipeline.py builds the Pipecat objects, test_handoff.py serves
the http handoff).

Run: python3 -m unittest discover -s bot -p 'test_*.py'
"""

import json
import os
import sys
import types
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bot  # noqa: E402  (the path above makes bot/ importable from the repository root)
from bot import ConfigError, load_config  # noqa: E402

TOKEN = "eyJhbGciOiJIUzI1NiJ9.secret-meeting-token.sig"
KEY = "sk-secret-openai-key"

CONTRACT = {
    "DAILY_ROOM_URL": "https://example.daily.co/bd-01k0session",
    "DAILY_ROOM_TOKEN": TOKEN,
    "BOTDISPATCH_SESSION_ID": "01k0session",
    "BOTDISPATCH_BODY": '{"hello": "world"}',
}


def env(**overrides):
    """The contract with overrides; a value of None removes the variable."""
    result = dict(CONTRACT)
    for name, value in overrides.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = value
    return result


class LoadConfigTest(unittest.TestCase):
    def refused(self, environ):
        with self.assertRaises(ConfigError) as caught:
            load_config(environ)
        return str(caught.exception)

    def test_the_contract_is_read(self):
        config = load_config(env())
        self.assertEqual(config.room_url, "https://example.daily.co/bd-01k0session")
        self.assertEqual(config.token, TOKEN)
        self.assertEqual(config.session_id, "01k0session")
        self.assertEqual(config.body, {"hello": "world"})
        self.assertEqual(config.bot_name, bot.DEFAULT_BOT_NAME)
        self.assertEqual(config.greeting, bot.DEFAULT_GREETING)
        self.assertIsNone(config.tts)
        self.assertEqual(config.join_timeout_secs, 120)
        self.assertEqual(config.idle_timeout_secs, 300)
        self.assertEqual(config.log_level, "INFO")

    def test_values_are_trimmed(self):
        config = load_config(env(DAILY_ROOM_URL="  https://example.daily.co/r  \n", BOTDISPATCH_SESSION_ID=" s1 "))
        self.assertEqual(config.room_url, "https://example.daily.co/r")
        self.assertEqual(config.session_id, "s1")

    def test_missing_contract_variables_are_named(self):
        for name in ("DAILY_ROOM_URL", "DAILY_ROOM_TOKEN", "BOTDISPATCH_SESSION_ID"):
            with self.subTest(name=name):
                self.assertIn(name, self.refused(env(**{name: None})))
                self.assertIn(name, self.refused(env(**{name: "   "})))

    def test_room_url_must_be_an_http_url(self):
        for bad in ("example.daily.co/room", "ftp://example.daily.co/room", "https://", "room"):
            with self.subTest(url=bad):
                message = self.refused(env(DAILY_ROOM_URL=bad))
                self.assertIn("DAILY_ROOM_URL", message)
        self.assertEqual(load_config(env(DAILY_ROOM_URL="http://127.0.0.1:9/r")).room_url, "http://127.0.0.1:9/r")

    def test_body_is_optional(self):
        self.assertEqual(load_config(env(BOTDISPATCH_BODY=None)).body, {})
        self.assertEqual(load_config(env(BOTDISPATCH_BODY="")).body, {})
        self.assertEqual(load_config(env(BOTDISPATCH_BODY="{}")).body, {})

    def test_body_keeps_nested_json(self):
        body = {"user": {"name": "Ada", "langs": ["en", "fr"]}, "n": 1.5, "ok": True, "none": None}
        self.assertEqual(load_config(env(BOTDISPATCH_BODY=json.dumps(body))).body, body)

    def test_body_must_be_a_json_object(self):
        for raw, kind in (("[1, 2]", "an array"), ('"text"', "a string"), ("42", "a number"), ("null", "null"), ("true", "a boolean")):
            with self.subTest(body=raw):
                message = self.refused(env(BOTDISPATCH_BODY=raw))
                self.assertIn("BOTDISPATCH_BODY must be a JSON object", message)
                self.assertIn(kind, message)

    def test_body_must_be_valid_json(self):
        message = self.refused(env(BOTDISPATCH_BODY='{"hello": '))
        self.assertIn("BOTDISPATCH_BODY is not valid JSON", message)
        self.assertIn("line 1", message)

    def test_greeting_comes_from_the_body_then_the_environment(self):
        self.assertEqual(load_config(env(BOT_GREETING="Hi from env")).greeting, "Hi from env")
        both = env(BOT_GREETING="Hi from env", BOTDISPATCH_BODY='{"greeting": "Hi from the client"}')
        self.assertEqual(load_config(both).greeting, "Hi from the client")

    def test_greeting_is_validated(self):
        self.assertIn("BOTDISPATCH_BODY.greeting must be a string", self.refused(env(BOTDISPATCH_BODY='{"greeting": 5}')))
        self.assertIn("BOTDISPATCH_BODY.greeting is empty", self.refused(env(BOTDISPATCH_BODY='{"greeting": "  "}')))
        too_long = json.dumps({"greeting": "x" * (bot.MAX_GREETING_CHARS + 1)})
        self.assertIn("longer than", self.refused(env(BOTDISPATCH_BODY=too_long)))

    def test_spoken_greeting_needs_an_openai_key(self):
        self.assertIsNone(load_config(env(OPENAI_TTS_VOICE="nova")).tts)
        config = load_config(env(OPENAI_API_KEY=KEY, OPENAI_TTS_VOICE="nova", OPENAI_TTS_MODEL="tts-1"))
        self.assertEqual(config.tts.api_key, KEY)
        self.assertEqual(config.tts.voice, "nova")
        self.assertEqual(config.tts.model, "tts-1")
        defaults = load_config(env(OPENAI_API_KEY=KEY)).tts
        self.assertEqual(defaults.voice, "alloy")
        self.assertIsNone(defaults.model)

    def test_timeouts(self):
        config = load_config(env(BOT_JOIN_TIMEOUT_SECS="30", BOT_IDLE_TIMEOUT_SECS="0"))
        self.assertEqual(config.join_timeout_secs, 30)
        self.assertIsNone(config.idle_timeout_secs)
        self.assertEqual(load_config(env(BOT_IDLE_TIMEOUT_SECS="12.5")).idle_timeout_secs, 12.5)
        self.assertIn("BOT_JOIN_TIMEOUT_SECS", self.refused(env(BOT_JOIN_TIMEOUT_SECS="soon")))
        self.assertIn("greater than 0", self.refused(env(BOT_JOIN_TIMEOUT_SECS="0")))
        self.assertIn("0 disables it", self.refused(env(BOT_IDLE_TIMEOUT_SECS="-1")))
        self.assertIn("BOT_IDLE_TIMEOUT_SECS", self.refused(env(BOT_IDLE_TIMEOUT_SECS="nan")))

    def test_bot_name_and_log_level(self):
        config = load_config(env(BOT_NAME="Ada", LOG_LEVEL="debug"))
        self.assertEqual(config.bot_name, "Ada")
        self.assertEqual(config.log_level, "DEBUG")
        self.assertIn("LOG_LEVEL", self.refused(env(LOG_LEVEL="chatty")))

    def test_secrets_stay_out_of_repr_and_errors(self):
        config = load_config(env(OPENAI_API_KEY=KEY))
        self.assertNotIn(TOKEN, repr(config))
        self.assertNotIn(KEY, repr(config))
        message = self.refused(env(DAILY_ROOM_URL="nope", OPENAI_API_KEY=KEY))
        self.assertNotIn(TOKEN, message)
        self.assertNotIn(KEY, message)

    def test_argv_is_never_read(self):
        # The contract travels in the environment only: the same environment gives the same
        # configuration whatever the command line says.
        saved = sys.argv
        sys.argv = ["bot.py", "--room", "https://other.daily.co/x", "--token", "t"]
        try:
            self.assertEqual(load_config(env()).room_url, CONTRACT["DAILY_ROOM_URL"])
        finally:
            sys.argv = saved


class RunnerArgsTest(unittest.TestCase):
    """Pipecat Cloud's base image calls bot(runner_args) with DailyRunnerArguments."""

    def args(self, **fields):
        values = {"room_url": "https://example.daily.co/r", "token": TOKEN, "body": {"a": 1}, "session_id": "pcc-1"}
        values.update(fields)
        return types.SimpleNamespace(**values)

    def test_runner_args_supply_the_session(self):
        config = bot.config_from_runner_args(self.args(), {"BOT_NAME": "Ada"})
        self.assertEqual((config.room_url, config.token, config.session_id, config.body), ("https://example.daily.co/r", TOKEN, "pcc-1", {"a": 1}))
        self.assertEqual(config.bot_name, "Ada")

    def test_missing_pieces(self):
        with self.assertRaisesRegex(ConfigError, "runner_args.room_url"):
            bot.config_from_runner_args(self.args(room_url=None), {})
        with self.assertRaisesRegex(ConfigError, "runner_args.token"):
            bot.config_from_runner_args(self.args(token=""), {})
        with self.assertRaisesRegex(ConfigError, "runner_args.body must be a JSON object"):
            bot.config_from_runner_args(self.args(body=["x"]), {})
        self.assertEqual(bot.config_from_runner_args(self.args(body=None), {}).body, {})
        self.assertEqual(bot.config_from_runner_args(self.args(session_id=None), {}).session_id, "unknown")


class PresenceTest(unittest.TestCase):
    def test_the_room_is_empty_when_the_last_participant_leaves(self):
        presence = bot.Presence()
        self.assertFalse(presence.anyone_joined)
        presence.joined("a")
        presence.joined("b")
        presence.joined("b")
        self.assertEqual(len(presence), 2)
        self.assertFalse(presence.left("a"))
        self.assertTrue(presence.left("b"))
        self.assertTrue(presence.anyone_joined)

    def test_remote_participants_exclude_the_bot(self):
        participants = {
            "local": {"id": "bot-id", "info": {"isLocal": True}},
            "u1": {"id": "u1", "info": {"isLocal": False, "userName": "Ada"}},
            "u2": {"id": "u2"},
        }
        self.assertEqual(sorted(bot.remote_participant_ids(participants)), ["u1", "u2"])
        self.assertEqual(bot.remote_participant_ids({"local": {"id": "x"}}), [])

    def test_greeting_message(self):
        config = load_config(env(BOT_GREETING="Hi"))
        self.assertEqual(
            bot.greeting_message(config),
            {"type": "botdispatch-greeting", "text": "Hi", "spoken": False, "sessionId": "01k0session"},
        )


HANDOFF_SECRET = "handoff-secret-0123456789abcdef"


class HandoffModeTest(unittest.TestCase):
    def test_the_environment_says_which_handoff(self):
        self.assertEqual(bot.handoff_mode(env()), bot.HANDOFF_ENV)
        self.assertEqual(bot.handoff_mode({"BOTDISPATCH_HANDOFF_SECRET": HANDOFF_SECRET}), bot.HANDOFF_HTTP)
        # A session in the environment wins: the machine was launched for it.
        self.assertEqual(bot.handoff_mode(env(BOTDISPATCH_HANDOFF_SECRET=HANDOFF_SECRET)), bot.HANDOFF_ENV)

    def test_neither_is_an_error_naming_both(self):
        for environ in ({}, {"DAILY_ROOM_URL": " ", "BOTDISPATCH_HANDOFF_SECRET": ""}):
            with self.assertRaises(ConfigError) as caught:
                bot.handoff_mode(environ)
            self.assertIn("DAILY_ROOM_URL", str(caught.exception))
            self.assertIn("BOTDISPATCH_HANDOFF_SECRET", str(caught.exception))

    def test_http_settings(self):
        config = bot.load_handoff_config({"BOTDISPATCH_HANDOFF_SECRET": HANDOFF_SECRET})
        self.assertEqual((config.port, config.host, config.log_level), (8080, "::", "INFO"))
        self.assertNotIn(HANDOFF_SECRET, repr(config))
        config = bot.load_handoff_config(
            {"BOTDISPATCH_HANDOFF_SECRET": HANDOFF_SECRET, "PORT": "9000", "BOT_LISTEN_HOST": "127.0.0.1"}
        )
        self.assertEqual((config.port, config.host), (9000, "127.0.0.1"))
        for bad in ("0", "65536", "http", "-1"):
            with self.subTest(port=bad), self.assertRaisesRegex(ConfigError, "PORT"):
                bot.load_handoff_config({"BOTDISPATCH_HANDOFF_SECRET": HANDOFF_SECRET, "PORT": bad})

    def test_optional_settings_are_checked_at_boot_not_at_the_first_session(self):
        with self.assertRaisesRegex(ConfigError, "BOT_IDLE_TIMEOUT_SECS"):
            bot.load_handoff_config({"BOTDISPATCH_HANDOFF_SECRET": HANDOFF_SECRET, "BOT_IDLE_TIMEOUT_SECS": "-1"})


DELIVERY = {
    "X-Daily-Room-Url": "https://example.daily.co/bd-01k0warm",
    "X-Daily-Room-Token": TOKEN,
    "X-Daily-Session-Id": "01k0warm",
}


class HandoffSessionTest(unittest.TestCase):
    def test_the_delivery_is_the_session(self):
        config = bot.config_from_handoff(DELIVERY, {"greeting": "Hi there"}, {"BOT_NAME": "Ada"})
        self.assertEqual(config.room_url, "https://example.daily.co/bd-01k0warm")
        self.assertEqual(config.token, TOKEN)
        self.assertEqual(config.session_id, "01k0warm")
        self.assertEqual(config.body, {"greeting": "Hi there"})
        self.assertEqual((config.greeting, config.bot_name), ("Hi there", "Ada"))

    def test_missing_headers_are_named(self):
        for name in ("X-Daily-Room-Url", "X-Daily-Room-Token"):
            headers = {k: v for k, v in DELIVERY.items() if k != name}
            with self.subTest(header=name), self.assertRaisesRegex(ConfigError, name):
                bot.config_from_handoff(headers, {}, {})
        without_id = {k: v for k, v in DELIVERY.items() if k != "X-Daily-Session-Id"}
        self.assertEqual(bot.config_from_handoff(without_id, {}, {}).session_id, "unknown")

    def test_bad_values_are_named_as_the_client_sent_them(self):
        with self.assertRaisesRegex(ConfigError, "X-Daily-Room-Url must be an http"):
            bot.config_from_handoff({**DELIVERY, "X-Daily-Room-Url": "room"}, {}, {})
        with self.assertRaisesRegex(ConfigError, "^body.greeting must be a string"):
            bot.config_from_handoff(DELIVERY, {"greeting": 5}, {})
        with self.assertRaisesRegex(ConfigError, "must be a JSON object"):
            bot.config_from_handoff(DELIVERY, ["x"], {})

    def test_secrets_stay_out_of_errors(self):
        try:
            bot.config_from_handoff({**DELIVERY, "X-Daily-Room-Url": "nope"}, {}, {"OPENAI_API_KEY": KEY})
        except ConfigError as e:
            self.assertNotIn(TOKEN, str(e))
            self.assertNotIn(KEY, str(e))


class ChimeTest(unittest.TestCase):
    def test_the_chime_is_two_soft_notes(self):
        import array

        pcm = array.array("h")
        pcm.frombytes(bot.chime_pcm())
        if sys.byteorder == "big":
            pcm.byteswap()
        rate = bot.CHIME_SAMPLE_RATE
        self.assertAlmostEqual(len(pcm) / rate, 2 * (0.18 + 0.04), places=2)
        self.assertLessEqual(max(abs(x) for x in pcm), int(0.3 * 32767))
        self.assertGreater(max(abs(x) for x in pcm), 5000, "audible")
        # Soft attack and release: no click at either end of a note.
        self.assertLess(abs(pcm[0]), 200)
        self.assertEqual(pcm[-1], 0)


class MainTest(unittest.TestCase):
    def test_no_session_and_no_secret_exits_with_a_message(self):
        import contextlib
        import io

        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            code = bot.main({})
        self.assertEqual(code, bot.EXIT_CONFIG_ERROR)
        self.assertIn("BOTDISPATCH_HANDOFF_SECRET", stderr.getvalue())

    def test_a_bad_http_handoff_setting_exits_before_serving(self):
        import contextlib
        import io

        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            code = bot.main({"BOTDISPATCH_HANDOFF_SECRET": HANDOFF_SECRET, "PORT": "eighty"})
        self.assertEqual(code, bot.EXIT_CONFIG_ERROR)
        self.assertIn("PORT", stderr.getvalue())
        self.assertNotIn(HANDOFF_SECRET, stderr.getvalue())

    def test_a_bad_environment_exits_with_a_message_naming_the_variable(self):
        import contextlib
        import io

        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            code = bot.main(env(BOTDISPATCH_BODY="[]"))
        self.assertEqual(code, bot.EXIT_CONFIG_ERROR)
        self.assertIn("BOTDISPATCH_BODY must be a JSON object", stderr.getvalue())
        self.assertNotIn(TOKEN, stderr.getvalue())


if __name__ == "__main__":
    unittest.main()

"""The bot against the pinned Pipecat (bot/requirements.txt): its Pipecat objects are built as
a session builds them, without network and without Daily, and the idle timer is run for real.

Skipped where Pipecat is not installed (a plain `python3 -m unittest`); .ci/run runs it in a
throwaway virtualenv made from the lock file, with BOT_REQUIRE_PIPECAT=1, where a skip would
be a failure.
"""

import asyncio
import importlib.util
import os
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("LOGURU_LEVEL", "WARNING")  # Pipecat logs every link at DEBUG

import bot  # noqa: E402

HAVE_PIPECAT = importlib.util.find_spec("pipecat") is not None
if not HAVE_PIPECAT and os.environ.get("BOT_REQUIRE_PIPECAT") == "1":
    raise ImportError("BOT_REQUIRE_PIPECAT=1 but pipecat is not importable")

CONTRACT = {
    "DAILY_ROOM_URL": "https://example.daily.co/bd-01k0session",
    "DAILY_ROOM_TOKEN": "eyJhbGciOiJIUzI1NiJ9.token.sig",
    "BOTDISPATCH_SESSION_ID": "01k0session",
    "BOT_IDLE_TIMEOUT_SECS": "42",
}


@unittest.skipUnless(HAVE_PIPECAT, "pipecat-ai is not installed (.ci/run installs the lock in a venv)")
class PipelineTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.prepared = bot.Prepared()

    def test_a_session_without_an_openai_key(self):
        from pipecat.processors.audio.vad_processor import VADProcessor
        from pipecat.transports.daily.transport import DailyInputTransport, DailyOutputTransport

        session = bot.build_session(bot.load_config(CONTRACT), self.prepared)
        kinds = [type(p) for p in session.processors]
        self.assertEqual(kinds, [DailyInputTransport, VADProcessor, DailyOutputTransport])
        params = session.transport._params
        self.assertTrue(params.audio_in_enabled, "the VAD needs the participants' audio")
        self.assertTrue(params.audio_out_enabled)

    def test_a_session_with_an_openai_key_speaks(self):
        from pipecat.services.openai.tts import OpenAITTSService

        config = bot.load_config({**CONTRACT, "OPENAI_API_KEY": "sk-test", "OPENAI_TTS_VOICE": "nova"})
        session = bot.build_session(config, self.prepared)
        self.assertIsInstance(session.processors[2], OpenAITTSService)

    def test_the_session_worker_has_the_idle_timer(self):
        # new_worker's behaviour is IdleTimerTest's; here: the session is built with it.
        from unittest import mock

        with mock.patch.object(bot, "new_worker", wraps=bot.new_worker) as new_worker:
            bot.build_session(bot.load_config(CONTRACT), self.prepared)
        new_worker.assert_called_once()
        self.assertEqual(new_worker.call_args.args[1], 42)

    def test_the_chime_is_a_valid_audio_frame(self):
        from pipecat.frames.frames import OutputAudioRawFrame

        frame = OutputAudioRawFrame(audio=bot.chime_pcm(), sample_rate=bot.CHIME_SAMPLE_RATE, num_channels=1)
        self.assertGreater(frame.num_frames, 0)


@unittest.skipUnless(HAVE_PIPECAT, "pipecat-ai is not installed (.ci/run installs the lock in a venv)")
class IdleTimerTest(unittest.IsolatedAsyncioTestCase):
    """Issue 13, defect 6: a user who talks keeps the bot; silence on both sides ends it."""

    async def run_worker(self, talk_secs, idle_secs):
        from pipecat.frames.frames import StartFrame, UserSpeakingFrame
        from pipecat.pipeline.pipeline import Pipeline
        from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
        from pipecat.workers.runner import WorkerRunner

        class TalkingUser(FrameProcessor):
            """What the VAD does while a participant talks: UserSpeakingFrame every 0.2 s."""

            async def process_frame(self, frame, direction):
                await super().process_frame(frame, direction)
                await self.push_frame(frame, direction)
                if isinstance(frame, StartFrame):
                    self.create_task(self.talk())

            async def talk(self):
                end = time.monotonic() + talk_secs
                while time.monotonic() < end:
                    await self.broadcast_frame(UserSpeakingFrame)
                    await asyncio.sleep(0.2)

        _ = FrameDirection
        worker = bot.new_worker(Pipeline([TalkingUser()]), idle_secs)
        runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
        await runner.add_workers(worker)
        began = time.monotonic()
        await asyncio.wait_for(runner.run(), talk_secs + idle_secs + 10)
        return time.monotonic() - began

    async def test_talking_keeps_the_session_and_silence_ends_it(self):
        elapsed = await self.run_worker(talk_secs=2.0, idle_secs=0.6)
        self.assertGreaterEqual(elapsed, 2.0, "ended while the user was talking")
        self.assertLess(elapsed, 2.0 + 0.6 + 2.0, "silence did not end it")


if __name__ == "__main__":
    unittest.main()

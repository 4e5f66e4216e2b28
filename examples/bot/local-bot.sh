#!/bin/sh
# Example bot for the `local` provider (the embedded default runs this script).
# It shows the bot contract a real bot reads from its environment, then stays "in the call"
# for BOT_LIFETIME_SECS (default 60) or until botdispatch stops it with SIGTERM.
# The meeting token is a secret: only its length is printed.
sid="${BOTDISPATCH_SESSION_ID:-?}"
echo "[local-bot $sid] started: DAILY_ROOM_URL=${DAILY_ROOM_URL:-<none>}"
echo "[local-bot $sid] DAILY_ROOM_TOKEN: ${#DAILY_ROOM_TOKEN} characters (not printed)"
echo "[local-bot $sid] BOTDISPATCH_BODY=${BOTDISPATCH_BODY:-<none>}"
trap 'echo "[local-bot $sid] SIGTERM: leaving the room"; exit 0' TERM INT
sleep "${BOT_LIFETIME_SECS:-60}" &
wait $!
echo "[local-bot $sid] lifetime over: leaving the room"

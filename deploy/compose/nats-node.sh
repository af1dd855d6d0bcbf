#!/bin/sh
# One NATS node of compose.nats.yaml. It waits for the users file an edgefleet controller
# writes (broker_auth_format "nats"), runs nats-server on it, and makes the server reload
# whenever the file changes: the controller replaces it after every enrollment and
# revocation (docs/broker.md, "NATS"). Watching the file's checksum needs no shared pid
# namespace with the controllers, and works wherever the shared volume does.
set -u
config=${NATS_CONFIG:-/etc/nats/nats.conf}
users=${NATS_USERS_FILE:-/etc/nats/auth/nats-users.conf}
every=${NATS_RELOAD_POLL_S:-1}

if [ ! -s "$users" ]; then
  echo "waiting for $users: an edgefleet controller writes it when it starts" >&2
  until [ -s "$users" ]; do sleep "$every"; done
fi
# Read before the server reads the file: a change in between costs one extra reload,
# never a missed one.
seen=$(cksum < "$users")
nats-server -c "$config" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null' TERM INT
while kill -0 "$server" 2>/dev/null; do
  sleep "$every"
  now=$(cksum < "$users" 2>/dev/null) || continue
  if [ "$now" != "$seen" ]; then
    seen=$now
    echo "$users changed: reloading" >&2
    kill -HUP "$server"
  fi
done
wait "$server"

#!/usr/bin/env bash
# A real n8n 1.123.0 for the end-to-end suite (test/n8n.test.ts), kept outside the
# repository in a cache folder that later runs reuse (KEYGATE_CACHE_DIR, default
# ~/.cache/keygate). The install is about 1.6 GB and takes minutes, so it happens once.
#
#   .ci/n8n.sh install            install when missing; prints the install folder
#   .ci/n8n.sh run PORT FOLDER    run n8n in the foreground on 127.0.0.1:PORT with FOLDER as its
#                                 user folder (empty, or a copy of the migrated template)
#   .ci/n8n.sh tied PORT FOLDER   as run, until its standard input ends: then n8n is stopped
#                                 (SIGTERM, SIGKILL 10 s later), and this ends when n8n does. The
#                                 tests give it a pipe whose other end the kernel closes however
#                                 the test process ends, killed included, so n8n never outlives it
#   .ci/n8n.sh template           prints a user folder whose SQLite migrations are already done,
#                                 making it on first use (copy it; never run n8n in it)
#   .ci/n8n.sh start              start n8n on a free loopback port in the background from a copy of
#                                 the template, wait until it answers, and set up its owner when
#                                 N8N_EMAIL and N8N_PASSWORD are set (upper case, digit, 8+
#                                 characters); prints N8N_URL, N8N_PID and N8N_USER_FOLDER lines
#                                 (stop it with kill N8N_PID)
#
# n8n 2.x does not install from the registry here, and 1.123.0 only with xlsx overridden
# (its default source is a CDN that cannot be reached): see shared/integrations/N8N.md.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=node.sh
. "$root/.ci/node.sh"
ensure_node

version=1.123.0
cache="${KEYGATE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/keygate}"
dir="$cache/n8n-$version"
bin="$dir/node_modules/n8n/bin/n8n"

free_port() {
  node -e 'const s = require("node:net").createServer(); s.listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); })'
}

# /healthz answers before the REST routes are mounted; /rest/settings answers once they are, with
# JSON. While it starts (its migrations among other things), n8n answers every path 200 with the
# text "n8n is starting up. Please wait": taken for the settings, a template was stopped in the
# middle of its migrations, and the tests' owner setup and login got that text.
healthy() { # port
  node -e 'fetch(`http://127.0.0.1:${process.argv[1]}/rest/settings`).then((r) => process.exit(r.status === 200 && (r.headers.get("content-type") ?? "").startsWith("application/json") ? 0 : 1), () => process.exit(1))' "$1"
}

install() {
  [ -f "$dir/.installed" ] && return 0
  mkdir -p "$cache"
  # Two suites may ask at once: one installs, the other waits for it.
  exec 9>"$cache/n8n-$version.lock"
  flock 9
  if [ ! -f "$dir/.installed" ]; then
    echo "n8n.sh: installing n8n@$version into $dir (about 1.6 GB, a few minutes)" >&2
    rm -rf "$dir"
    mkdir -p "$dir"
    cat >"$dir/package.json" <<JSON
{
  "name": "keygate-n8n-$version",
  "private": true,
  "dependencies": { "n8n": "$version" },
  "overrides": { "xlsx": "0.18.5" }
}
JSON
    (cd "$dir" && npm install --no-audit --no-fund --loglevel=error >&2) || {
      echo "n8n.sh: npm install of n8n@$version failed; $dir is left for inspection and is retried next run" >&2
      exit 1
    }
    [ -x "$bin" ] || { echo "n8n.sh: $bin is missing after the install" >&2; exit 1; }
    touch "$dir/.installed"
  fi
  exec 9>&-
}

run() { # port, user folder
  install
  # n8n rate-limits logins only when NODE_ENV=production; keygate's CLI logs in once per process.
  unset NODE_ENV
  N8N_USER_FOLDER="$2" N8N_PORT="$1" N8N_LISTEN_ADDRESS=127.0.0.1 N8N_HOST=127.0.0.1 \
    N8N_DIAGNOSTICS_ENABLED=false N8N_PERSONALIZATION_ENABLED=false N8N_SECURE_COOKIE=false \
    N8N_VERSION_NOTIFICATIONS_ENABLED=false N8N_TEMPLATES_ENABLED=false \
    N8N_RUNNERS_ENABLED=false N8N_ENFORCE_SETTINGS_FILE_PERMISSIONS=false \
    DB_SQLITE_POOL_SIZE=0 N8N_BLOCK_ENV_ACCESS_IN_NODE=false \
    exec node "$bin" start
}

# n8n in the background, stopped once standard input ends (nothing is ever written to it: the
# read sees the end when the process holding the other end closes it, or dies, SIGKILL included).
# Before (found by a review), the tests stopped n8n from their teardown or an exit handler only,
# neither of which runs when tap kills a test file at its timeout (SIGALRM, then SIGKILL): n8n was
# left running, its parent PID 1.
tied() { # port, user folder
  install
  exec 3<&0
  bash "$0" run "$1" "$2" </dev/null 3<&- &
  local n8n=$!
  {
    while read -r -u 3 _; do :; done
    kill -TERM "$n8n" 2>/dev/null || exit 0
    for _ in $(seq 100); do
      kill -0 "$n8n" 2>/dev/null || exit 0
      sleep 0.1
    done
    kill -KILL "$n8n" 2>/dev/null || true
  } &
  local watcher=$!
  exec 3<&-
  local status=0
  wait "$n8n" || status=$?
  # n8n ended on its own (a failed start): the watcher has nothing left to stop.
  kill "$watcher" 2>/dev/null || true
  exit "$status"
}

start_background() { # user folder; prints the port and pid lines
  local folder=$1 port pid
  port=$(free_port)
  mkdir -p "$folder"
  bash "$0" run "$port" "$folder" >"$folder/n8n.log" 2>&1 &
  pid=$!
  for _ in $(seq 180); do
    if healthy "$port" >/dev/null 2>&1; then
      echo "N8N_URL=http://127.0.0.1:$port"
      echo "N8N_PID=$pid"
      echo "N8N_USER_FOLDER=$folder"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || { echo "n8n.sh: n8n exited during start-up; its log:" >&2; tail -n 40 "$folder/n8n.log" >&2; return 1; }
    sleep 1
  done
  echo "n8n.sh: n8n did not answer /rest/settings within 180 s; its log:" >&2
  tail -n 40 "$folder/n8n.log" >&2
  kill "$pid" 2>/dev/null || true
  return 1
}

template() {
  install
  local tpl="$dir/template-user-folder"
  if [ ! -f "$tpl/.migrated" ]; then
    exec 8>"$cache/n8n-$version.template.lock"
    flock 8
    if [ ! -f "$tpl/.migrated" ]; then
      echo "n8n.sh: first start of n8n to run its migrations into $tpl (about a minute)" >&2
      rm -rf "$tpl"
      local out pid
      out=$(start_background "$tpl")
      pid=$(sed -n 's/^N8N_PID=//p' <<<"$out")
      kill "$pid"
      while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
      rm -f "$tpl/n8n.log"
      touch "$tpl/.migrated"
    fi
    exec 8>&-
  fi
  echo "$tpl"
}

case "${1:-}" in
  install) install; echo "$dir" ;;
  run) [ $# -eq 3 ] || { echo "usage: .ci/n8n.sh run PORT USER_FOLDER" >&2; exit 2; }; run "$2" "$3" ;;
  tied) [ $# -eq 3 ] || { echo "usage: .ci/n8n.sh tied PORT USER_FOLDER" >&2; exit 2; }; tied "$2" "$3" ;;
  template) template ;;
  start)
    tpl=$(template)
    folder=$(mktemp -d "${TMPDIR:-/tmp}/keygate-n8n.XXXXXX")
    cp -a "$tpl/." "$folder/"
    rm -f "$folder/.migrated"
    out=$(start_background "$folder")
    echo "$out"
    if [ -n "${N8N_EMAIL:-}" ] && [ -n "${N8N_PASSWORD:-}" ]; then
      url=$(sed -n 's/^N8N_URL=//p' <<<"$out")
      node -e '
        const [url, email, password] = process.argv.slice(1)
        // A 404, or a 200 that is not JSON ("n8n is starting up"), means n8n is not ready yet: ask
        // again for up to 30 s.
        const setUp = async (tries) => {
          const r = await fetch(`${url}/rest/owner/setup`, { method: "POST", headers: { "content-type": "application/json" },
            body: JSON.stringify({ email, firstName: "keygate", lastName: "owner", password }) })
          const json = (r.headers.get("content-type") ?? "").startsWith("application/json")
          if ((r.status === 404 || (r.status === 200 && !json)) && tries > 0) { await new Promise((ok) => setTimeout(ok, 250)); return setUp(tries - 1) }
          if (r.status !== 200 || !json) { console.error(`n8n.sh: owner setup answered ${r.status}`); process.exit(1) }
        }
        setUp(120)
      ' "$url" "$N8N_EMAIL" "$N8N_PASSWORD"
      echo "n8n.sh: owner $N8N_EMAIL set up" >&2
    fi
    ;;
  *) echo "usage: .ci/n8n.sh install | run PORT USER_FOLDER | tied PORT USER_FOLDER | template | start" >&2; exit 2 ;;
esac

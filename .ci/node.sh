# Sourced by bin/dev and .ci/run: puts a Node.js that can run keygate (>= 22.18, which runs
# TypeScript by type stripping) first on PATH. When the machine's node is older, Node 24 is
# installed from the npm registry package node-linux-<arch>@24 into a cache folder outside the
# repository (KEYGATE_CACHE_DIR, default ~/.cache/keygate) and reused on later runs.

node_ok() {
  command -v node >/dev/null 2>&1 &&
    node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 22 || (a === 22 && b >= 18) ? 0 : 1)' 2>/dev/null
}

ensure_node() {
  if node_ok; then return 0; fi
  local cache="${KEYGATE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/keygate}"
  local arch
  case "$(uname -m)" in
    x86_64) arch=x64 ;;
    aarch64 | arm64) arch=arm64 ;;
    *) echo "keygate: no Node 24 package for $(uname -m); install Node.js >= 22.18 yourself" >&2; return 1 ;;
  esac
  local found
  # Under the callers' set -euo pipefail, ls finding nothing (a fresh machine) must not end the script.
  found=$(ls -d "$cache"/node-24.*/ 2>/dev/null | sort -V | tail -n 1) || true
  if [ -z "$found" ] || ! "${found%/}/bin/node" --version >/dev/null 2>&1; then
    command -v npm >/dev/null 2>&1 || { echo "keygate: npm is needed to fetch Node 24 (node-linux-$arch@24)" >&2; return 1; }
    echo "keygate: node $(node --version 2>/dev/null || echo missing) is too old; installing Node 24 into $cache" >&2
    mkdir -p "$cache"
    local tmp
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "node-linux-$arch@24" >/dev/null) || { echo "keygate: could not fetch node-linux-$arch@24 from the npm registry" >&2; rm -rf "$tmp"; return 1; }
    tar xzf "$tmp"/node-linux-"$arch"-*.tgz -C "$tmp"
    local version
    version=$("$tmp/package/bin/node" --version) || { echo "keygate: the fetched node does not run here" >&2; rm -rf "$tmp"; return 1; }
    rm -rf "$cache/node-${version#v}"
    mv "$tmp/package" "$cache/node-${version#v}"
    rm -rf "$tmp"
    found="$cache/node-${version#v}/"
  fi
  export PATH="${found%/}/bin:$PATH"
  node_ok || { echo "keygate: $(command -v node) still does not run keygate" >&2; return 1; }
}

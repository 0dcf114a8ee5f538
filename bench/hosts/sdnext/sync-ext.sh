#!/usr/bin/env bash
# Copy the project's working tree (tracked and untracked-but-not-ignored files) into
# ROOT/D/extensions/sdnext-hybrid-vae and commit it there, as a user's `git clone`/`git pull` would leave it.
# A new commit changes SD.Next's installer state, so the next start is a full launch and runs install.py.
# Also installs the test-only fault extension (fault-ext/) as <data>/extensions/hv-fault-injector.
# usage: sync-ext.sh ROOT [PROJECT_DIR]
set -euo pipefail
ROOT=${1:?usage: sync-ext.sh ROOT [PROJECT_DIR]}
HERE=$(cd "$(dirname "$0")" && pwd)
PROJECT=${2:-$(cd "$HERE/../../.." && pwd)}
EXT="$ROOT/D/extensions/sdnext-hybrid-vae"
mkdir -p "$EXT"
find "$EXT" -mindepth 1 -maxdepth 1 ! -name .git -exec rm -rf {} +
(cd "$PROJECT" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar --ignore-failed-read -cf - 2>/dev/null) | tar -x -C "$EXT"
cd "$EXT"
[ -d .git ] || git init -q
git add -A >/dev/null
git -c user.email=host@local -c user.name=host commit -q -m "hybrid-vae $(git -C "$PROJECT" rev-parse --short HEAD) + working tree" || true
echo "extension at $EXT: $(git rev-parse --short HEAD)"
# the test-only fault extension (check.py: every decode runs out of memory while <data>/hv-fault-oom exists)
rm -rf "$ROOT/D/extensions/hv-fault-injector"; cp -a "$HERE/fault-ext" "$ROOT/D/extensions/hv-fault-injector"

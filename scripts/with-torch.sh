#!/usr/bin/env bash
# Runs a command with the pinned libtorch set up (installing it on first use):
#   scripts/with-torch.sh cargo test --workspace
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
eval "$("$here/bootstrap-libtorch.sh")"
exec "$@"

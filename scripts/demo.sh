#!/usr/bin/env bash
# Builds the kvortex-demo example (Release, in build/) and runs it; arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build --target kvortex-demo -j "$(nproc 2>/dev/null || echo 2)"
exec ./build/examples/kvortex-demo "$@"

#!/usr/bin/env bash
# The README's two commands: `bash tools/dev.sh test` and `bash tools/dev.sh main`.
# Each sets the machine up first (idempotent), then runs the tests or the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

bash tools/setup.sh
case "${1:-}" in
  test)
    shift
    # pytest exits 5 when it collects nothing: treat that as a failure too, like any other.
    $PY -m pytest -q test "$@"
    ;;
  main)
    shift
    $PY -m featmap_ros.cli main "$@"
    ;;
  *)
    echo "usage: bash tools/dev.sh test|main [args...]" >&2
    exit 2
    ;;
esac

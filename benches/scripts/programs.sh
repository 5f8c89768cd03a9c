#!/usr/bin/env bash
# The programs harness: see programs.py (python3 benches/scripts/programs.py --help).
exec python3 "$(dirname "$0")/programs.py" "$@"

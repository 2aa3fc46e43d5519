#!/usr/bin/env bash
# Start (or stop) local development services on loopback only: an S3 endpoint
# (moto's server, in memory) and a Ray head with a dashboard for job
# submission. Prints the settings to export.
#
#   infra/dev/local-cluster.sh start     # then: eval "$(infra/dev/local-cluster.sh env)"
#   ctfactory submit examples/jobs/generate-local.yaml --wait
#   infra/dev/local-cluster.sh stop
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
S3_PORT=${S3_PORT:-9000}
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
STATE=${STATE:-.local-cluster}

env_lines() {
  cat <<ENV
export AWS_ENDPOINT_URL=http://127.0.0.1:${S3_PORT}
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-dev}
export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-dev}
export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}
export RAY_ADDRESS=http://127.0.0.1:${DASHBOARD_PORT}
export RAY_AUTH_MODE=disabled
ENV
}

case "${1:-}" in
  start)
    mkdir -p "$STATE"
    nohup "$VENV/bin/python" -m moto.server -H 127.0.0.1 -p "$S3_PORT" >"$STATE/moto.log" 2>&1 &
    echo $! >"$STATE/moto.pid"
    eval "$(env_lines)"
    PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/ray" start --head --node-ip-address=127.0.0.1 \
      --port="$RAY_PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
      --include-dashboard=true --disable-usage-stats
    env_lines
    ;;
  stop)
    RAY_AUTH_MODE=disabled "$VENV/bin/ray" stop || true
    if [ -f "$STATE/moto.pid" ]; then kill "$(cat "$STATE/moto.pid")" 2>/dev/null || true; rm -f "$STATE/moto.pid"; fi
    ;;
  env) env_lines ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac

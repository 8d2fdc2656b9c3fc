#!/usr/bin/env bash
# Choose, then Reward, over nextbest's HTTP/JSON door with curl: the same calls as choose.mjs.
#
#   nextbest serve --http-port 8080 --init-config scripts/demo.yaml
#   NEXTBEST_HTTP=http://127.0.0.1:8080 bash docs/examples/choose.sh
#
# NEXTBEST_TOKEN, when set, is sent as a Bearer token. A failure is a google.rpc.Status JSON body
# ({"code": 5, "message": "...", "details": []}) with an HTTP status of 400 or more: curl --fail-with-body
# prints it and the script exits non-zero.
set -euo pipefail

base="${NEXTBEST_HTTP:-http://127.0.0.1:8080}"
auth=()
if [[ -n "${NEXTBEST_TOKEN:-}" ]]; then auth=(-H "Authorization: Bearer ${NEXTBEST_TOKEN}"); fi
event="curl-$(date +%s)-$RANDOM"

curl -sS --fail-with-body "${auth[@]}" -H 'Content-Type: application/json' \
  -X POST "$base/v1/placements/app_home_banner:choose" \
  -d '{"customerId": "c-1042", "eventId": "'"$event"'", "features": [
        {"namespace": "customer", "name": "segment", "text": "youth"},
        {"namespace": "customer", "name": "tenure_months", "number": 14},
        {"namespace": "device", "name": "tier", "text": "4g"}]}'
echo

# The customer took the offer: reward the decision by its event id.
curl -sS --fail-with-body "${auth[@]}" -H 'Content-Type: application/json' \
  -X POST "$base/v1/events/$event:reward" -d '{"reward": 1}'
echo

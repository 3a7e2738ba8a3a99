#!/bin/sh
# Sample events for the compose demo: one order.created and one payment.captured (tenants acme/globex
# alternating) per second, through kcat.
set -eu
i=0
while true; do
  i=$((i + 1))
  if [ $((i % 2)) -eq 0 ]; then tenant=acme; else tenant=globex; fi
  printf '{"id":"ord-%s","type":"order.created","tenant":"%s","data":{"order":%s}}\n' "$i" "$tenant" "$i" \
    | kcat -P -b kafka:9092 -t orders
  printf '{"id":"pay-%s","type":"payment.captured","tenant":"%s","data":{"amount":%s}}\n' "$i" "$tenant" "$((i * 7))" \
    | kcat -P -b kafka:9092 -t payments
  sleep 1
done

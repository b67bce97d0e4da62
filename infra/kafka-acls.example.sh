#!/usr/bin/env bash
# Kafka ACLs for a production aisemble deployment: what each principal may do, and nothing more.
#
# An example to adapt, not run blindly: it assumes a cluster with an authorizer
# (authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer, allow.everyone.if.no.acl.found=false),
# SASL principals User:aisemble-edge, User:aisemble-agent-<service> and User:client-<name>, the default topic
# prefix "aisemble", and topics created beforehand by an admin with `aisemble topics create` (the broker
# creates no topic on demand, so no aisemble principal needs Create on the cluster).
# tests/test_acl_example.py checks that every topic and group named here is one aisemble really uses.
#
#   BOOTSTRAP=broker:9093 ADMIN_CONFIG=admin.properties ./kafka-acls.example.sh
set -euo pipefail

BOOTSTRAP=${BOOTSTRAP:-127.0.0.1:9092}
ADMIN_CONFIG=${ADMIN_CONFIG:-admin.properties}
EDGE_ID=${EDGE_ID:-edge-1}

acl() { kafka-acls.sh --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add "$@"; }

# --- The edge: produces requests, reads its own reply topic (manual assignment: no consumer group).
acl --allow-principal User:aisemble-edge --operation Write --operation Describe \
    --topic aisemble.llm.requests --topic aisemble.vision.requests \
    --topic aisemble.nlp.requests --topic aisemble.data.requests
acl --allow-principal User:aisemble-edge --operation Read --operation Describe \
    --topic "aisemble.edge.${EDGE_ID}.replies"
# Idempotent producers need IdempotentWrite on the cluster with brokers before 2.8 only (KIP-679 folds it
# into Write since); harmless to grant.
acl --allow-principal User:aisemble-edge --operation IdempotentWrite --cluster

# --- Each service's agents (shown for nlp; repeat with llm, vision, data).
SERVICE=nlp
acl --allow-principal "User:aisemble-agent-${SERVICE}" --operation Read --operation Describe \
    --topic "aisemble.${SERVICE}.requests"
acl --allow-principal "User:aisemble-agent-${SERVICE}" --operation Read --group "aisemble-${SERVICE}-agents"
# Faust's partition-assignment leader topic for the group (Faust declares it at start-up).
acl --allow-principal "User:aisemble-agent-${SERVICE}" --operation Create --operation Read --operation Write \
    --operation Describe --topic "aisemble-${SERVICE}-agents-__assignor-__leader"
# Replies and dead letters: its own results and DLQ topics, and the reply topics the reply-topic rule allows
# (AISEMBLE_REPLY_TO_ALLOW). The prefixed grants mirror the default patterns; narrow both together.
acl --allow-principal "User:aisemble-agent-${SERVICE}" --operation Write --operation Describe \
    --topic "aisemble.${SERVICE}.results" --topic "aisemble.${SERVICE}.dlq"
acl --allow-principal "User:aisemble-agent-${SERVICE}" --operation Write --operation Describe \
    --resource-pattern-type prefixed --topic aisemble.replies. --topic aisemble.edge.
acl --allow-principal "User:aisemble-agent-${SERVICE}" --operation IdempotentWrite --cluster

# --- A raw client "acme": produces to the services it may call, reads only its own reply topic.
acl --allow-principal User:client-acme --operation Write --operation Describe --topic aisemble.data.requests
acl --allow-principal User:client-acme --operation Read --operation Describe --topic aisemble.replies.acme
acl --allow-principal User:client-acme --operation Read --resource-pattern-type prefixed --group client-acme-

# --- Operators: read the dead letters of every service (with a group of their own).
acl --allow-principal User:aisemble-operator --operation Read --operation Describe \
    --topic aisemble.llm.dlq --topic aisemble.vision.dlq --topic aisemble.nlp.dlq --topic aisemble.data.dlq
acl --allow-principal User:aisemble-operator --operation Read --resource-pattern-type prefixed \
    --group aisemble-operator-

"""The ACL example (infra/kafka-acls.example.sh) names only topics and groups aisemble really uses, and
its prefixed reply grants match the default reply-topic rule, so the example cannot drift from the code."""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
from pathlib import Path

from schemas import SERVICES
from streams.policy import ReplyTopicPolicy
from streams.settings import Settings
from streams.topics import consumer_group, edge_reply_topic, reply_topic_name, service_topics

EXAMPLE = Path(__file__).parents[1] / "infra" / "kafka-acls.example.sh"
PREFIX = "aisemble"


def _grants() -> list[tuple[bool, str, str]]:
    """(prefixed, kind, name) for every --topic/--group in the example, once per service."""
    text = EXAMPLE.read_text().replace("\\\n", " ")
    out: list[tuple[bool, str, str]] = []
    for line in text.splitlines():
        if not line.lstrip().startswith("acl "):
            continue
        for service in SERVICES:
            words = shlex.split(line.replace("${SERVICE}", service).replace("${EDGE_ID}", "edge-1"))
            prefixed = "prefixed" in words
            for flag, name in itertools.pairwise(words):
                if flag in ("--topic", "--group"):
                    out.append((prefixed, flag[2:], name))
    return out


def test_the_example_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(EXAMPLE)], check=True)


def test_every_literal_topic_and_group_is_one_aisemble_uses() -> None:
    topics = {edge_reply_topic(PREFIX, "edge-1"), reply_topic_name(PREFIX, "acme")}
    groups = set()
    for service in SERVICES:
        names = service_topics(PREFIX, service)
        topics |= {names.requests, names.results, names.dlq}
        group = consumer_group(PREFIX, service)
        groups.add(group)
        topics.add(f"{group}-__assignor-__leader")
    literal = [(kind, name) for prefixed, kind, name in _grants() if not prefixed]
    assert literal
    unknown = [(k, n) for k, n in literal if n not in (topics if k == "topic" else groups)]
    assert unknown == []


def test_prefixed_reply_grants_cover_exactly_the_default_reply_rule() -> None:
    policy = ReplyTopicPolicy.build(PREFIX, Settings().reply_to_allow)
    prefixes = {name for prefixed, kind, name in _grants() if prefixed and kind == "topic"}
    assert prefixes == {"aisemble.replies.", "aisemble.edge."}
    for topic in (reply_topic_name(PREFIX, "acme"), edge_reply_topic(PREFIX, "edge-1")):
        assert policy.refusal(topic) is None and any(topic.startswith(p) for p in prefixes)
    assert not re.search(r"--operation (All|Alter|Delete)", EXAMPLE.read_text())

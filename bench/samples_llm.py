"""Benchmark inputs for the llm runner: short, realistic completion requests.

Prompts are the kind of one-line questions and instructions the edge sees; every request asks for at
most 32 tokens. Even positions are greedy (``temperature`` 0, reproducible and cacheable), odd ones
sample at 0.7 without a seed, so a batch of ``n`` exercises both generation groups.
"""

from __future__ import annotations

from agents.runner import Item

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what Apache Kafka is in one sentence.",
    "Give me three tips for writing clean Python code.",
    "Translate 'good morning' into Spanish.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What is the difference between a list and a tuple in Python?",
    "Suggest a name for a friendly robot.",
    "Why is the sky blue?",
    "List three healthy breakfast ideas.",
    "How many legs does a spider have?",
    "Write a short thank-you note to a colleague.",
)

MAX_TOKENS = 32


def sample_items(n: int, *, greedy_only: bool = False) -> list[Item]:
    """``n`` completion items cycling through ``PROMPTS``; every other one samples unless ``greedy_only``."""
    items = []
    for i in range(n):
        temperature = 0.0 if greedy_only or i % 2 == 0 else 0.7
        payload: dict[str, object] = {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": MAX_TOKENS,
            "temperature": temperature,
        }
        items.append(Item("completion", payload))
    return items

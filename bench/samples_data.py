"""Benchmark inputs for the data runner: ``analyze`` on tables of 100 to 1,000 mixed records."""

from __future__ import annotations

import random

from agents.runner import Item


def sample_items(n: int) -> list[Item]:
    """``n`` distinct analyze requests (deterministic for a given ``n``)."""
    rng = random.Random(n)
    items = []
    for i in range(n):
        rows = rng.randint(100, 1000)
        records: list[dict[str, object]] = [
            {
                "id": j,
                "price": round(rng.uniform(1, 500), 2),
                "qty": rng.randint(0, 20) if rng.random() > 0.05 else None,
                "category": rng.choice(["books", "toys", "garden", "food"]),
                "in_stock": rng.random() > 0.3,
                "batch": i,
            }
            for j in range(rows)
        ]
        items.append(Item("analyze", {"records": records}))
    return items

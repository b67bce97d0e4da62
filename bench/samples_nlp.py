"""Benchmark inputs for the nlp runner: review-length texts in a realistic mix of tasks, and short texts.

Out of every 20 items: 9 sentiment and 7 embed of one review, 1 embed of four reviews, 1 similarity and
2 classify. Reviews are composed from fragments (subject, experience, detail, verdict) so that the
first 9,600 are distinct (a result cache never short-cuts a benchmark) and 16 to 32 words long, like
the product and service reviews the service sees. The fragments are mixed freely, so the texts are for
timing only, not for judging accuracy. Deterministic: the same ``n`` gives the same items.

Short texts (``short_text``, ``short_items``): 9 to 15 words, like the search queries, titles and chat turns
users send too; the first 9,600 are distinct. At that length the model is fast enough that the pipeline's
own cost per item shows (issue #15), so the benchmarks run them beside the reviews, the same texts for the
model alone and for the pipeline.
"""

from __future__ import annotations

from agents.runner import Item

SUBJECTS = (
    "The wireless headphones",
    "This coffee grinder",
    "Our hotel room",
    "The delivery",
    "The banking app",
    "Dinner at the new Thai place",
    "The running shoes",
    "Customer support",
    "The office chair",
    "The airport shuttle",
    "The kids' tablet",
    "The meal kit subscription",
)
EXPERIENCES = (
    "arrived a day early and worked right out of the box,",
    "took three weeks to show up and the box was damaged,",
    "was exactly as described and easy to set up,",
    "stopped working after a month of light use,",
    "was friendly, quick and solved the problem on the first call,",
    "kept us waiting for over an hour without any explanation,",
    "feels solid and well made for the price,",
    "was noisy, cramped and not very clean,",
    "has been reliable every single day since I bought it,",
    "crashed twice during checkout and charged me double,",
)
DETAILS = (
    "and the battery easily lasts a full week",
    "although the instructions could be clearer",
    "but the replacement part never arrived",
    "and the staff remembered our names by the second day",
    "even though the price went up last month",
    "and nobody answered my emails about it",
    "and the quality is better than the brand I used before",
    "while the app keeps logging me out",
    "and the portions were generous",
    "but the refund took weeks",
)
VERDICTS = (
    "Would recommend.",
    "Never again.",
    "Five stars from me.",
    "Very disappointed.",
    "Great value overall.",
    "Returning it tomorrow.",
    "I'll definitely order again.",
    "Not worth the money.",
)
TOPICS = ["product quality", "delivery", "customer service", "price", "food", "accommodation"]
MIX = ("sentiment",) * 9 + ("embed",) * 7 + ("embed_batch", "similarity", "classify", "classify")
COMBINATIONS = len(SUBJECTS) * len(EXPERIENCES) * len(DETAILS) * len(VERDICTS)


def review(i: int) -> str:
    """The ``i``-th synthetic review; distinct for ``i`` below ``COMBINATIONS`` (9,600)."""
    k = (i * 7_919) % COMBINATIONS  # a stride coprime with every list length: neighbours differ in all parts
    k, s = divmod(k, len(SUBJECTS))
    k, e = divmod(k, len(EXPERIENCES))
    v, d = divmod(k, len(DETAILS))
    return f"{SUBJECTS[s]} {EXPERIENCES[e]} {DETAILS[d]}. {VERDICTS[v % len(VERDICTS)]}"


def sample_items(n: int, *, task: str | None = None) -> list[Item]:
    """``n`` nlp items in the mix above, or only of ``task`` (``sentiment``, ``embed``, ...) when given."""
    items = []
    for i in range(n):
        kind = task or MIX[i % len(MIX)]
        text = review(i)
        if kind == "embed_batch":
            items.append(Item("embed", {"texts": [review(i * 4 + j + COMBINATIONS // 2) for j in range(4)]}))
        elif kind == "similarity":
            items.append(Item("similarity", {"text": text, "text_pair": review(i + 1)}))
        elif kind == "classify":
            items.append(Item("classify", {"text": text, "labels": TOPICS}))
        else:
            items.append(Item(kind, {"text": text}))
    return items


SHORT_OPENERS = (
    "how do I",
    "is it possible to",
    "anyone know how to",
    "fastest way to",
    "best way to",
    "how should I",
    "how can I",
    "please help me",
)
SHORT_ACTIONS = (
    "reset my password",
    "cancel the order",
    "change the delivery address",
    "get a refund",
    "update the banking app",
    "book a table",
    "return the running shoes",
    "pair the wireless headphones",
    "track my parcel",
    "upgrade my subscription",
)
SHORT_CONTEXTS = (
    "on my phone",
    "after the latest update",
    "without losing my data",
    "before the weekend",
    "from another country",
    "with a gift card",
    "if the app crashes",
    "when support is closed",
    "for my office team",
    "using the website",
    "in the new store",
    "on a shared account",
)
SHORT_ENDINGS = ("today?", "right now?", "again?", "please?", "this week?")
SHORT_COMBINATIONS = len(SHORT_OPENERS) * len(SHORT_ACTIONS) * len(SHORT_CONTEXTS) * len(SHORT_ENDINGS)


def short_text(i: int) -> str:
    """The ``i``-th short text (9 to 15 words); distinct for ``i`` below ``SHORT_COMBINATIONS`` (4,800)."""
    k = (i * 7_919) % SHORT_COMBINATIONS
    k, o = divmod(k, len(SHORT_OPENERS))
    k, a = divmod(k, len(SHORT_ACTIONS))
    e, c = divmod(k, len(SHORT_CONTEXTS))
    return f"{SHORT_OPENERS[o]} {SHORT_ACTIONS[a]} {SHORT_CONTEXTS[c]} {SHORT_ENDINGS[e % len(SHORT_ENDINGS)]}"


def short_items(n: int, task: str = "embed") -> list[Item]:
    """``n`` items of ``task`` (``embed`` or ``sentiment``) on short texts (``short_text``)."""
    return [Item(task, {"text": short_text(i)}) for i in range(n)]

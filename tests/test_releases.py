"""``agents.loops.releases.DeferredReleases``: a batch's release waits for its partitions' commits (pure)."""

from __future__ import annotations

from agents.loops.releases import DeferredReleases


def test_a_release_waits_until_every_partition_of_its_batch_is_committed_past_it() -> None:
    releases: DeferredReleases[str] = DeferredReleases()
    assert releases.add({"p0": 10, "p1": 4}, "batch-a") == []
    assert releases.committed({"p0": 11}) == []  # p1 not committed yet
    assert releases.committed({"p1": 4}) == []  # committed offset 4 = offset 4 not yet committed
    assert releases.committed({"p1": 5}) == ["batch-a"]
    assert len(releases) == 0


def test_releases_come_due_oldest_first_and_only_once() -> None:
    releases: DeferredReleases[str] = DeferredReleases()
    releases.add({"p0": 1}, "a")
    releases.add({"p0": 3}, "b")
    releases.add({"p0": 7}, "c")
    assert releases.committed({"p0": 4}) == ["a", "b"]
    assert releases.committed({"p0": 4}) == []
    assert releases.committed({"p0": 8}) == ["c"]


def test_a_commit_never_moves_backwards() -> None:
    releases: DeferredReleases[str] = DeferredReleases()
    releases.committed({"p0": 9})
    releases.committed({"p0": 2})  # an older commit reported late
    assert releases.add({"p0": 5}, "a") == ["a"]  # already committed past 5: due at once


def test_a_revoked_partition_drops_its_pending_releases_and_its_commits() -> None:
    releases: DeferredReleases[str] = DeferredReleases()
    releases.add({"p0": 5}, "a")
    releases.add({"p0": 6, "p1": 2}, "b")
    releases.add({"p1": 3}, "c")
    releases.committed({"p0": 3})
    assert releases.revoke({"p0"}) == 2
    assert releases.committed({"p0": 100, "p1": 4}) == ["c"]  # a and b are never released here
    assert releases.add({"p0": 50}, "d") == ["d"]  # p0 came back and is committed past 50
    releases.revoke({"p0"})
    assert releases.add({"p0": 50}, "e") == []  # its earlier commits were forgotten with it

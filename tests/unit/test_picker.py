import random
import time
from dataclasses import dataclass

from services.router.picker import pick


@dataclass
class C:
    server_id: str
    outstanding: int = 0
    ejected_until: float = 0.0

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until


def test_least_outstanding_wins():
    cs = [C("a", 3), C("b", 1), C("c", 2)]
    assert pick(cs).server_id == "b"


def test_ties_are_spread():
    cs = [C("a"), C("b"), C("c")]
    rng = random.Random(7)
    assert {pick(cs, rng=rng).server_id for _ in range(60)} == {"a", "b", "c"}


def test_excluded_servers_are_skipped_and_none_when_exhausted():
    cs = [C("a"), C("b")]
    assert pick(cs, exclude={"a"}).server_id == "b"
    assert pick(cs, exclude={"a", "b"}) is None
    assert pick([]) is None


def test_ejected_server_is_avoided_unless_it_is_the_only_one():
    later = time.monotonic() + 60
    cs = [C("a", 0, ejected_until=later), C("b", 5)]
    assert pick(cs).server_id == "b"
    assert pick([C("a", 0, ejected_until=later)]).server_id == "a"

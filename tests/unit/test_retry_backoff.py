"""``retry.Backoff`` over long polls: the delay stays at its cap however many attempts were made."""

from __future__ import annotations

from p2ptrain import retry


def test_the_delay_of_a_very_late_attempt_is_the_cap_not_an_overflow() -> None:
    backoff = retry.Backoff(first=0.01, cap=0.1)
    # A peer polling the ps aggregator's Redis every 0.1 s for minutes makes thousands of attempts.
    assert backoff.delay(10_000) == 0.1
    assert retry.Backoff(first=0.1, cap=2.0, jitter=True).delay(5_000) <= 4.0
    assert backoff.delay(0) == 0.01 and backoff.delay(1) == 0.02

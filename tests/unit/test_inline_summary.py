"""What ``p2ptrain run`` says about ``function.mode``: the start line, the waiting line and the summary."""

from __future__ import annotations

import io

from p2ptrain.spec import parse_manifest
from p2ptrain.summary import ProgressDisplay, format_summary, starting_line


def _spec(mode: str):  # type: ignore[no-untyped-def]
    return parse_manifest({"apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "metadata": {"name": "d"},
                           "spec": {"model": {"name": "mlp"}, "dataset": {"name": "digits"}, "functionsPerPeer": 3,
                                    "function": {"mode": mode, "maxScale": 5}}})


def _summary(mode: str) -> dict:
    phases = {p: 0.001 for p in ("publish", "fanout", "average", "exchange", "aggregate", "update", "evaluate")}
    return {
        "job": "d", "mode": mode, "rounds": 10, "peers": 4, "functions_per_peer": 3, "aggregation": "mean",
        "wall_seconds": 5.0, "test_accuracy": 0.95, "final_loss": 0.2, "round_seconds": 0.006, "phases": phases,
        "first_round_seconds": 0.5, "model": "m.safetensors", "rejected_events": {}, "excluded_peers": {},
        "function": {"cold_starts": 0, "cold_start_seconds_mean": None, "max_instances": 0, "scaled_to_zero": 0,
                     "warm_request_seconds_mean": None},
    }


def test_the_start_line_names_what_computes_the_gradients() -> None:
    assert starting_line(_spec("inline"), module=True) == (
        "starting 4 Redis servers and 4 peers (function.mode=inline: gradients computed in the peers, "
        "3 micro-batches each; accumulator: module)")
    assert "the gradient function (0..5 instances; accumulator: lua)" in starting_line(_spec("serverless"), module=False)


def test_the_summary_says_the_mode() -> None:
    inline, serverless = format_summary(_summary("inline")), format_summary(_summary("serverless"))
    assert "4 peers x 3 micro-batches inline" in inline
    assert "functions     none: function.mode=inline" in inline and "cold start" not in inline
    assert "4 peers x 3 functions" in serverless and "instances started from cold" in serverless


def test_the_first_round_wait_names_what_it_waits_for() -> None:
    inline, serverless = (ProgressDisplay(io.StringIO(), quiet=False, inline=i) for i in (True, False))
    assert "inline" in inline.waiting and "cold start" not in inline.waiting
    assert "functions starting from zero" in serverless.waiting

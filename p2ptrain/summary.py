"""What the local runner shows: the progress line while a job trains, counts summed over peers and
the closing report."""

from __future__ import annotations

import time
from typing import Any, TextIO

from p2ptrain.metrics import ROUND_PHASES
from p2ptrain.status import StatusDict


def sum_counts(dicts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + int(v)
    return total


def format_summary(summary: dict[str, Any]) -> str:
    phases = summary["phases"]
    fn = summary["function"]
    acc = summary["test_accuracy"]
    reached = ", ".join(
        f"{float(milestone):.2f} at round {at['round']} ({at['seconds']:.1f} s)"
        for milestone, at in summary.get("time_to_accuracy", {}).items()
    )
    lines = [
        f"job {summary['job']}: {summary['rounds']} rounds on {summary['peers']} peers x "
        f"{summary['functions_per_peer']} functions ({summary['aggregation']}) in {summary['wall_seconds']:.1f}s",
        f"  test accuracy {acc:.4f}" if acc is not None else "  test accuracy n/a",
        f"  final loss    {summary['final_loss']:.4f}" if summary["final_loss"] is not None else "  final loss n/a",
        f"  round time    {summary['round_seconds'] * 1000:.1f} ms mean after the first round: "
        + ", ".join(f"{p} {phases[p] * 1000:.1f} ms" for p in ROUND_PHASES),
        f"  first round   {summary['first_round_seconds']:.2f} s (includes function cold starts)",
        *([f"  reached       {reached} test accuracy"] if reached else []),
        f"  functions     {fn['cold_starts']} cold starts (mean {fn['cold_start_seconds_mean'] or 0:.2f}s), "
        f"max {fn['max_instances']} instances, {fn['scaled_to_zero']} scaled to zero, "
        f"warm request {1000 * (fn['warm_request_seconds_mean'] or 0):.1f} ms",
        f"  model         {summary['model']}",
    ]
    if summary.get("peer_restarts"):
        lines.append(f"  peers         restarted {summary['peer_restarts']} time(s) after being killed; they caught up")
    if summary["rejected_events"] or summary["excluded_peers"]:
        lines.append(f"  rejected events {summary['rejected_events']}, excluded gradients {summary['excluded_peers']}")
    if summary.get("function_failures") or summary.get("send_failures") or summary.get("skipped_updates"):
        lines.append(
            f"  failures      function calls {summary.get('function_failures', {})}, "
            f"unsent gradients {summary.get('send_failures', 0)}, skipped updates {summary.get('skipped_updates', {})}"
        )
    return "\n".join(lines)


class ProgressDisplay:
    """One progress line per update: rewritten in place on a terminal, every 2 s or on change otherwise."""

    def __init__(self, out: TextIO, *, quiet: bool) -> None:
        self.out = out
        self.quiet = quiet
        self._tty = out.isatty()
        self._last_line = ""
        self._last_print = 0.0
        self._said_waiting = False

    def say(self, message: str) -> None:
        if not self.quiet:
            self.out.write(message + "\n")
            self.out.flush()

    def show(self, statuses: list[StatusDict], instances: int, cold: int, *, final: bool = False) -> None:
        if self.quiet or not statuses:
            return
        rounds = statuses[0]["rounds"]
        done = min(s["round"] for s in statuses)
        if done == 0 and not final:
            if not self._said_waiting:
                self.say("round 0: functions starting from zero (cold start) ...")
                self._said_waiting = True
            return
        losses = [s["loss"] for s in statuses if s["loss"] is not None]
        accuracy = statuses[0]["accuracy"]
        phases = statuses[0]["phases"]
        line = (
            f"round {done:>4}/{rounds}  loss {sum(losses) / len(losses):.4f}  " if losses else f"round {done:>4}/{rounds}  "
        )
        line += f"acc {accuracy:.4f}  " if accuracy is not None else "acc   --    "
        line += f"round {sum(phases.values()):.3f}s [" + " ".join(
            f"{p} {phases.get(p, 0.0) * 1000:.0f}ms" for p in ROUND_PHASES
        ) + f"]  functions {instances} up, {cold} cold starts"
        now = time.monotonic()
        if self._tty:
            self.out.write("\r" + line.ljust(len(self._last_line)))
            if final:
                self.out.write("\n")
            self.out.flush()
            self._last_line = line
        elif line != self._last_line and (final or now - self._last_print >= 2.0):
            self.out.write(line + "\n")
            self.out.flush()
            self._last_print = now
            self._last_line = line

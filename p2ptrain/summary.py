"""What the local runner shows: the progress line while a job trains, counts summed over peers and
the closing report."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, TextIO

from p2ptrain.cost import format_cost
from p2ptrain.metrics import ROUND_PHASES
from p2ptrain.spec import JobSpec
from p2ptrain.status import ReplicaCheck, StatusDict

log = logging.getLogger("p2ptrain.local")


def sum_counts(dicts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + int(v)
    return total


def starting_line(spec: JobSpec, module: bool) -> str:
    """What the run starts, in one line: the gradient function's instances, or the mode that needs none."""
    accumulator = f"accumulator: {'module' if module else 'lua'}"
    if spec.function.inline:
        return (f"starting {spec.peers} Redis servers and {spec.peers} peers (function.mode=inline: gradients "
                f"computed in the peers, {spec.functions_per_peer} micro-batches each; {accumulator})")
    return (f"starting {spec.peers} Redis servers, {spec.peers} peers and the gradient function "
            f"(0..{spec.function.max_scale} instances; {accumulator})")


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
        f"{summary['functions_per_peer']} {'micro-batches inline' if summary.get('mode') == 'inline' else 'functions'} "
        f"({summary['aggregation']}) in {summary['wall_seconds']:.1f}s",
        f"  test accuracy {acc:.4f}" if acc is not None else "  test accuracy n/a",
        f"  final loss    {summary['final_loss']:.4f} (training loss of the last round, mean over peers)"
        if summary["final_loss"] is not None else "  final loss n/a",
        f"  round time    {summary['round_seconds'] * 1000:.1f} ms mean after the first round: "
        + ", ".join(f"{p} {phases[p] * 1000:.1f} ms" for p in ROUND_PHASES),
        f"  first round   {summary['first_round_seconds']:.2f} s"
        + ("" if summary.get("mode") == "inline" else " (includes function cold starts)"),
        *([f"  reached       {reached} test accuracy"] if reached else []),
        f"  functions     none: function.mode=inline, each peer computed its {summary['functions_per_peer']} "
        "micro-batches itself" if summary.get("mode") == "inline" else
        f"  functions     {fn['cold_starts']} instances started from cold (mean {fn['cold_start_seconds_mean'] or 0:.2f}s "
        f"to ready), at most {fn['max_instances']} ready at once, {fn['scaled_to_zero']} scaled to zero, "
        f"warm request {1000 * (fn['warm_request_seconds_mean'] or 0):.1f} ms",
        f"  model         {summary['model']}",
    ]
    replicas = summary.get("replicas")
    if replicas:
        lines.append(
            f"  replicas      identical (parameter hashes equal in {replicas['rounds_compared']} rounds compared)"
            if replicas["identical"]
            else f"  replicas      DRIFTED: parameter hashes differ after rounds {replicas['drift_rounds']}"
        )
    if summary.get("peer_restarts"):
        lines.append(f"  peers         restarted {summary['peer_restarts']} time(s) after being killed; they caught up")
    if summary["rejected_events"] or summary["excluded_peers"]:
        lines.append(f"  rejected events {summary['rejected_events']}, excluded gradients {summary['excluded_peers']}")
    if summary.get("function_failures") or summary.get("send_failures") or summary.get("skipped_updates"):
        lines.append(
            f"  failures      function calls {summary.get('function_failures', {})}, "
            f"unsent gradients {summary.get('send_failures', 0)}, skipped updates {summary.get('skipped_updates', {})}"
        )
    if summary.get("cost"):
        lines.extend(format_cost(summary["cost"], summary["cost"].get("money")))
    return "\n".join(lines)


class ProgressDisplay:
    """The progress line.

    On a terminal it is rewritten in place and always fits the terminal's width on one row: fields are
    dropped, least important first, until it does (a longer line would wrap and ``\r`` would rewrite
    only its last row). Otherwise (a pipe, a file) one line is written every ``every_rounds`` rounds
    and at the end, never the same round twice. The loss shown is the mean over peers of their last
    round's training loss, the same quantity as the summary's "final loss".
    """

    def __init__(self, out: TextIO, *, quiet: bool, every_rounds: int | None = None, inline: bool = False) -> None:
        self.out = out
        # said once while no peer has finished a round: what the first round waits for
        self.waiting = ("round 0: peers computing their first micro-batches inline (function.mode=inline) ..."
                        if inline else "round 0: functions starting from zero (cold start) ...")
        self.quiet = quiet
        self.every_rounds = every_rounds
        self._tty = out.isatty()
        self._last_line = ""
        self._last_round = -1
        self._said_waiting = False

    def say(self, message: str) -> None:
        if not self.quiet:
            if self._tty and self._last_line:
                self.out.write("\r\x1b[K")  # a message never shares a row with the progress line
                self._last_line = ""
            self.out.write(message + "\n")
            self.out.flush()

    def width(self) -> int:
        try:
            return os.get_terminal_size(self.out.fileno()).columns
        except (OSError, ValueError, AttributeError):
            return shutil.get_terminal_size().columns

    def show(self, statuses: list[StatusDict], instances: int, cold: int, *, final: bool = False) -> None:
        if self.quiet or not statuses:
            return
        rounds = statuses[0]["rounds"]
        done = min(s["round"] for s in statuses)
        if done == 0 and not final:
            if not self._said_waiting:
                self.say(self.waiting)
                self._said_waiting = True
            return
        if self._tty:
            line = progress_line(statuses, instances, cold, self.width() - 1)  # the last column would wrap
            if line != self._last_line or final:
                self.out.write("\r\x1b[K" + line + ("\n" if final else ""))
                self.out.flush()
                self._last_line = "" if final else line
            return
        every = self.every_rounds or max(1, rounds // 20)
        crossed = done // every > max(self._last_round, 0) // every  # polls may skip rounds
        if done == self._last_round or not (final or crossed or done == rounds):
            return
        self.out.write(progress_line(statuses, instances, cold, None) + "\n")
        self.out.flush()
        self._last_round = done


def progress_line(statuses: list[StatusDict], instances: int, cold: int, width: int | None) -> str:
    """The progress fields that fit in ``width`` characters (all of them for None), in display order.

    Priority, highest first: round, loss, accuracy, round time, function instances, phase timings.
    """
    rounds = statuses[0]["rounds"]
    done = min(s["round"] for s in statuses)
    losses = [s["loss"] for s in statuses if s["loss"] is not None]
    accuracy = statuses[0]["accuracy"]
    phases = statuses[0]["phases"]
    fields = [  # (priority, text) in display order
        (0, f"round {done}/{rounds}"),
        (1, f"loss {sum(losses) / len(losses):.4f}" if losses else "loss --"),
        (2, f"acc {accuracy:.4f}" if accuracy is not None else "acc --"),
        (3, f"round {sum(phases.values()):.3f}s"),
        (5, "[" + " ".join(f"{p} {phases.get(p, 0.0) * 1000:.0f}ms" for p in ROUND_PHASES) + "]"),
        (4, f"functions {instances} up, {cold} started"),
    ]
    kept = sorted(fields, key=lambda f: f[0])
    while width is not None and len(kept) > 1 and len("  ".join(t for _, t in _in_order(fields, kept))) > width:
        kept.pop()
    line = "  ".join(t for _, t in _in_order(fields, kept))
    return line if width is None else line[: max(0, width)]


def _in_order(fields: list[tuple[int, str]], kept: list[tuple[int, str]]) -> list[tuple[int, str]]:
    return [f for f in fields if f in kept]


def checked_replicas(replicas: ReplicaCheck, display: ProgressDisplay) -> dict[str, Any]:
    """The replicas' parameter hashes compared round by round; drift is logged, shown and reported."""
    result = replicas.result()
    compared = [r for r, h in replicas.hashes.items() if len(h) == replicas.peers]
    last = max(compared, default=None)
    # With a partial quorum replicas may differ between sync rounds (training.resyncEveryRounds): what
    # matters is that the last round compared ended identical.
    result["identical_at_end"] = last is not None and last not in result["drift_rounds"]
    if not result["identical"] and result["identical_at_end"]:
        display.say(f"replicas differed after rounds {result['drift_rounds']} and were re-synchronised: "
                    f"identical after round {last}")
    elif not result["identical"]:
        log.warning("replicas drifted apart: parameter hashes differ after rounds %s", result["drift_rounds"])
        display.say(f"warning: replicas drifted apart: parameter hashes differ after rounds {result['drift_rounds']}")
    return result


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])

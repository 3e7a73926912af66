"""The local runner's progress line: one row in an 80-column terminal, one line per N rounds in a pipe,
and the summary's wording."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import termios
from typing import Any

from p2ptrain.status import PeerStatus, StatusDict
from p2ptrain.summary import ProgressDisplay, format_summary, progress_line


def _statuses(done: int, rounds: int = 100, peers: int = 4) -> list[StatusDict]:
    out = []
    for peer in range(peers):
        status = PeerStatus(peer=peer, round=done, rounds=rounds, loss=1.0 + peer, accuracy=0.9123)
        status.phases_last = {"publish": 0.0012, "fanout": 0.123, "average": 0.004, "exchange": 0.0456,
                              "aggregate": 0.0007, "update": 0.0101, "evaluate": 0.0023}
        out.append(status.as_dict())
    return out


def test_the_line_shows_the_mean_loss_over_peers_and_drops_fields_to_fit() -> None:
    full = progress_line(_statuses(7), 3, 4, None)
    assert full.startswith("round 7/100  loss 2.5000  acc 0.9123") and "fanout 123ms" in full
    assert len(full) > 80
    fitted = progress_line(_statuses(7), 3, 4, 79)
    assert len(fitted) <= 79 and fitted.startswith("round 7/100  loss 2.5000  acc 0.9123")
    assert "fanout" not in fitted  # the phase timings go first
    assert len(progress_line(_statuses(7), 3, 4, 20)) <= 20


def _pty(columns: int) -> tuple[int, int]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST  # keep "\n" as sent, to split rows exactly
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    return master, slave


def _read_all(master: int) -> str:
    chunks = []
    os.set_blocking(master, False)
    while True:
        try:
            chunk = os.read(master, 65536)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_on_an_80_column_terminal_every_rewrite_fits_one_row() -> None:
    master, slave = _pty(80)
    try:
        with open(slave, "w", encoding="utf-8", closefd=False) as out:
            assert out.isatty()
            display = ProgressDisplay(out, quiet=False)
            display.say("starting 4 Redis servers")
            for done in range(1, 31):
                display.show(_statuses(done), 4, 4, final=done == 30)
        written = _read_all(master)
    finally:
        os.close(master)
        os.close(slave)
    rows = written.split("\n")
    assert rows[0] == "starting 4 Redis servers"
    progress = rows[1]
    assert rows[2:] == [""], rows  # one row of progress, ended once at the end
    rewrites = [re.sub(r"\x1b\[K", "", part) for part in progress.split("\r") if part]
    assert len(rewrites) == 30
    assert all(len(text) < 80 for text in rewrites), max(rewrites, key=len)
    assert rewrites[-1].startswith("round 30/100")


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_piped_output_is_one_line_per_n_rounds_and_never_repeats_a_round() -> None:
    out = _Pipe()
    display = ProgressDisplay(out, quiet=False, every_rounds=10)
    for done in [1, 1, 1, 2, 5, 10, 10, 11, 19, 20, 20, 25]:
        display.show(_statuses(done, rounds=25), 2, 2)
    display.show(_statuses(25, rounds=25), 2, 2, final=True)
    lines = out.getvalue().splitlines()
    rounds = [int(re.match(r"round (\d+)/25", line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert rounds == [10, 20, 25], lines  # each multiple of 10 once, then the end


def _summary(**changes: Any) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "job": "j", "rounds": 3, "peers": 2, "functions_per_peer": 1, "aggregation": "mean", "wall_seconds": 1.0,
        "test_accuracy": 0.5, "final_loss": 2.5, "round_seconds": 0.1, "first_round_seconds": 1.0,
        "phases": dict.fromkeys(["publish", "fanout", "average", "exchange", "aggregate", "update", "evaluate"], 0.01),
        "function": {"cold_starts": 2, "cold_start_seconds_mean": 1.0, "max_instances": 2, "scaled_to_zero": 0,
                     "warm_request_seconds_mean": 0.01},
        "model": "m.safetensors", "rejected_events": {}, "excluded_peers": {},
        "replicas": {"rounds_compared": 3, "identical": True, "drift_rounds": []},
    }
    summary.update(changes)
    return summary


def test_the_summary_says_what_final_loss_and_instance_counts_mean() -> None:
    text = format_summary(_summary())
    assert "final loss    2.5000 (training loss of the last round, mean over peers)" in text
    assert "2 instances started from cold" in text and "at most 2 ready at once" in text
    assert "replicas      identical (parameter hashes equal in 3 rounds compared)" in text
    drifted = format_summary(_summary(replicas={"rounds_compared": 3, "identical": False, "drift_rounds": [2, 3]}))
    assert "replicas      DRIFTED: parameter hashes differ after rounds [2, 3]" in drifted

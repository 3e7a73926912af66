"""``p2ptrain run --signing-key-file``: the run signs and checks events with the key from the file (so
another client holding the file can sign to it), bad files are refused with exit 2 naming the option,
and the key appears in no output and no log."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from p2ptrain import wire

from .test_local_run import _wait_training, _write_job

KEY = "k3y-from-a-file-0123456789abcdef"


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2ptrain", "run", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def test_a_missing_or_short_key_file_exits_2_naming_the_option(tmp_path: Path) -> None:
    job = _write_job(tmp_path, name="badkey")
    missing = _run(tmp_path, str(job), "--signing-key-file", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert f"--signing-key-file {tmp_path / 'nope'}: cannot read the file" in missing.stderr
    short = tmp_path / "short.key"
    short.write_text("tooshort-secret\n")
    result = _run(tmp_path, str(job), "--signing-key-file", str(short))
    assert result.returncode == 2
    assert "the key has 15 characters; expected at least 16" in result.stderr
    assert "tooshort-secret" not in result.stderr + result.stdout


def _signed(function_url: str, key: bytes) -> httpx.Response:
    event = wire.build_event(
        wire.GRADIENT_REQUESTED, "urn:foreign-client", data={"peer": 0, "round": 0},
        extensions={"round": 0, "peer": 0}, key=key,
    )
    headers, body = wire.to_http(event)
    return httpx.post(function_url, headers=headers, content=body, timeout=60)


def test_the_run_uses_the_key_from_the_file_and_never_shows_it(tmp_path: Path) -> None:
    key_file = tmp_path / "signing.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    job = _write_job(tmp_path, name="keyfile", rounds=100000)
    workdir = tmp_path / "work"
    process = subprocess.Popen(
        [sys.executable, "-m", "p2ptrain", "run", str(job), "--workdir", str(workdir), "--signing-key-file", str(key_file)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert _wait_training(workdir), "training did not start"  # the peers accept each other's events
        function_url = json.loads((workdir / "job.json").read_text())["functionUrl"]
        foreign = _signed(function_url, KEY.encode())
        # signed right: refused for its incomplete data, never for its signature
        assert foreign.status_code == 400 and foreign.headers.get("x-p2ptrain-reason") != "signature", foreign.text
        wrong = _signed(function_url, b"another-key-0123456789abcdef")
        assert wrong.status_code == 401 and wrong.headers.get("x-p2ptrain-reason") == "signature"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    shown = stdout + stderr + "".join(p.read_text(errors="replace") for p in workdir.iterdir() if p.is_file())
    assert KEY not in shown

"""The ``p2ptrain`` command: run a job locally, or serve one part of a job (peer, function, operator).

Configuration enters here — arguments, environment, files — and becomes typed objects; nothing
below re-reads the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from pathlib import Path

from p2ptrain import logs
from p2ptrain.config import ConfigError, RuntimeConfig, Secrets, peer_index_from_hostname
from p2ptrain.spec import SpecError, load_manifest

RUN_EPILOG = """\
what it starts (all on 127.0.0.1, all stopped at the end, on failure and on Ctrl-C):
  - one redis-server per peer on a free port, password-protected, with the p2ptrain module loaded
    (built with gcc on first use; falls back to a Lua function when it cannot be built)
  - the gradient function as a local stand-in for its Knative Service: instances start on the first
    request (cold start, timed), at most function.maxScale of them, each serving
    function.containerConcurrency requests, and stop after function.idleSeconds without work
  - one process per peer (spec.peers); a peer killed by a signal is restarted, like a pod, up to
    runPolicy.backoffLimit times in all, and catches up from its checkpoint and the other peers

the manifest is the same P2PTrainingJob you would `kubectl apply`; cluster-only fields (images,
resources, storage) are ignored here.

exit codes: 0 trained, 1 failed (the message names the failing part and its log), 2 bad manifest
or option, 3 training diverged (non-finite or exploding loss or gradient, with training.onDivergence:
fail; the message names the cause and the round), 130 interrupted (SIGINT, Ctrl-C), 143 terminated
(SIGTERM).

signing: events are signed with a fresh random key unless --signing-key-file names a file holding
the key (its text, surrounding whitespace removed); a client that is not p2ptrain can then sign
events to this run's peers and function. The key is never printed or logged.

examples:
  p2ptrain run examples/digits.yaml
  p2ptrain run examples/digits.yaml --summary out/summary.json --output out/model.safetensors
"""


MIN_SIGNING_KEY_LENGTH = 16


def read_signing_key(path: Path) -> str:
    """The signing key in ``path`` (``--signing-key-file``); a ValueError names the option and the fault.

    The key travels to peers and functions in an environment variable, as text: the file's text with
    surrounding whitespace (a trailing newline) removed. Error messages never quote the key.
    """
    where = f"--signing-key-file {path}"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{where}: cannot read the file: {exc.strerror or exc}") from exc
    try:
        key = raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: the key must be UTF-8 text (for example hex), not binary") from exc
    if "\x00" in key:
        raise ValueError(f"{where}: the key must not contain NUL characters")
    if len(key) < MIN_SIGNING_KEY_LENGTH:
        raise ValueError(f"{where}: the key has {len(key)} characters; expected at least {MIN_SIGNING_KEY_LENGTH}")
    return key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="p2ptrain",
        description="Peer-to-peer, serverless, Byzantine-robust distributed training (SPIRT on Kubernetes).",
    )
    parser.add_argument("--log-level", default=os.environ.get("P2PTRAIN_LOG_LEVEL", "WARNING"), help="logging level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="train a job on this machine (local Redis servers, peers and functions)",
        description="Train a P2PTrainingJob on this machine with no cluster: local Redis servers, "
        "peers and gradient functions that scale from and to zero. Shows live progress "
        "(round, loss, accuracy, phase timings) and a final summary, and writes the trained model.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("manifest", type=Path, help="P2PTrainingJob manifest (YAML), as for kubectl apply")
    run.add_argument("--summary", type=Path, help="write the outcome as JSON here (rounds, test_accuracy, "
                     "final_loss, wall_seconds, phases: mean seconds per round for each phase, ...)")
    run.add_argument("--output", "-o", type=Path, help="where to write the trained model "
                     "(safetensors; default ./<job>-model.safetensors)")
    run.add_argument("--workdir", type=Path, help="keep logs and the runtime config here (default: a "
                     "temporary directory, removed after a successful run)")
    run.add_argument("--keep-logs", action="store_true", help="keep the temporary log directory after success")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress display, only the summary")
    run.add_argument("--signing-key-file", type=Path, metavar="FILE", help="sign events with the key in "
                     "FILE (at least 16 characters) instead of a random one, so other clients can sign too")

    peer = sub.add_parser("peer", help="serve one peer of a job (what a peer pod runs)")
    peer.add_argument("--config", type=Path, required=True, help="runtime config (job.json)")
    peer.add_argument("--index", help="peer number (default: the StatefulSet ordinal of $HOSTNAME)")
    peer.add_argument("--listen", default="0.0.0.0", help="address for the peer's HTTP endpoint")
    peer.add_argument("--port", type=int, default=8080, help="port for events, /status, /healthz, /metrics")
    peer.add_argument("--metrics-port", type=int, help="also serve /metrics on this port (pods: spec.metrics.port)")
    peer.add_argument("--exit-when-done", action="store_true", help="exit after training instead of lingering")

    export = sub.add_parser("export", help="write a peer's trained model from its Redis to a safetensors file "
                            "(what the export Job runs when a job with spec.output succeeds)")
    export.add_argument("--config", type=Path, required=True, help="runtime config (job.json)")
    export.add_argument("--output", type=Path, required=True, help="where to write the model (.safetensors)")
    export.add_argument("--peer", type=int, default=0, help="whose replica (default 0)")

    sub.add_parser("function", help="serve the gradient function (what the Knative Service runs; "
                   "env P2PTRAIN_CONFIG, LISTEN_ADDRESS)")
    sub.add_parser("operator", help="run the Kubernetes operator (kopf)", add_help=False)
    sub.add_parser("redis-module", help="print the path of the p2ptrain Redis module, building it if needed")
    validate = sub.add_parser("validate", help="check a manifest against the CRD and print the resolved spec")
    validate.add_argument("manifest", type=Path)

    args, rest = parser.parse_known_args(argv)
    if args.command != "operator" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logs.configure(args.log_level)

    if args.command == "run":
        from p2ptrain.local import RunOptions, run_job

        try:
            spec = load_manifest(args.manifest)
        except SpecError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            key = read_signing_key(args.signing_key_file) if args.signing_key_file is not None else None
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        options = RunOptions(
            output=args.output, summary=args.summary, workdir=args.workdir, quiet=args.quiet,
            keep_logs=args.keep_logs, signing_key=key,
        )
        return run_job(spec, options)

    if args.command == "validate":
        try:
            spec = load_manifest(args.manifest)
        except SpecError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        import json

        print(json.dumps(spec.to_dict(), indent=2))
        return 0

    if args.command == "peer":
        from p2ptrain.peer import Peer, serve_peer

        try:
            config = RuntimeConfig.from_file(args.config)
            index = int(args.index) if args.index is not None else peer_index_from_hostname(socket.gethostname())
            secrets = Secrets.from_env()
        except (ConfigError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        logs.set_context(job=config.spec.name, peer=index)
        try:
            peer_process = Peer(config, index, secrets)
        except Exception as exc:  # the process edge: one clear line instead of a traceback
            logging.getLogger("p2ptrain.peer").error("peer %d cannot start: %s", index, exc)
            print(f"error: peer {index} cannot start: {exc}", file=sys.stderr)
            return 1
        return asyncio.run(
            serve_peer(
                peer_process,
                host=args.listen,
                port=args.port,
                metrics_port=args.metrics_port,
                linger=not args.exit_when_done,
            )
        )

    if args.command == "export":
        import json

        import redis

        from p2ptrain.checkpoint import CheckpointError
        from p2ptrain.store import Keys, export_model

        try:
            config = RuntimeConfig.from_file(args.config)
            secrets = Secrets.from_env()
            if not 0 <= args.peer < config.spec.peers:
                raise ConfigError(f"--peer {args.peer} is not a peer of this job (peers={config.spec.peers})")
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        address = config.redis[args.peer]
        client = redis.Redis(host=address.host, port=address.port, password=secrets.redis_password, socket_timeout=60)
        try:
            metadata = {"p2ptrain.job": json.dumps(config.spec.to_dict())}
            round_index = export_model(client, Keys(config.spec.name, args.peer), args.output, metadata)
        except (CheckpointError, redis.RedisError, OSError) as exc:
            print(f"error: cannot export peer {args.peer}'s model from {address}: {exc}", file=sys.stderr)
            return 1
        finally:
            client.close()
        print(f"wrote {args.output} (job {config.spec.name}, peer {args.peer}, after round {round_index + 1})")
        return 0

    if args.command == "function":
        from p2ptrain.gradient import serve

        serve()
        return 0

    if args.command == "operator":
        try:
            from p2ptrain_operator.main import main as operator_main
        except ImportError as exc:
            print(f"error: the operator is not installed: {exc}", file=sys.stderr)
            return 2
        return operator_main(rest)

    if args.command == "redis-module":
        from p2ptrain import native

        path = native.module_path()
        if path is None:
            print("error: the p2ptrain Redis module could not be built (needs gcc)", file=sys.stderr)
            return 1
        print(path)
        return 0

    parser.error(f"unknown command {args.command}")
    return 2

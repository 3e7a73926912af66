"""The ``p2ptrain`` command: run a job locally, or serve one part of a job (peer, function, operator).

Configuration enters here — arguments, environment, files — and becomes typed objects; nothing
below re-reads the environment. Each command imports what it runs when it runs, so ``p2ptrain operator``
and its cleanup hook load no training or serving stack (tests/unit/test_operator_imports.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from p2ptrain import __version__, logs, memory
from p2ptrain.config import (
    CONFIG_ENV,
    PEER_PORT,
    REDIS_PASSWORD_ENV,
    SIGNING_KEY_ENV,
    ConfigError,
    RuntimeConfig,
    Secrets,
    peer_index_from_hostname,
)
from p2ptrain.spec import JobSpec, SpecError, load_manifest

RUN_EPILOG = """\
what it starts (all on 127.0.0.1, all stopped at the end, on failure and on Ctrl-C):
  - one redis-server per peer on a free port, password-protected, with the p2ptrain module loaded (built with gcc on first use; falls back to a Lua function when it cannot be built)
  - the gradient function as a local stand-in for its Knative Service: instances start on the first request (cold start, timed), at most function.maxScale of them, each serving function.containerConcurrency requests, and stop after function.idleSeconds without work
  - one process per peer (spec.peers); a peer killed by a signal is restarted, like a pod, up to runPolicy.backoffLimit times in all, and catches up from its checkpoint and the other peers
  - with spec.topology: ps, the aggregator and one more redis-server for it; killed by a signal it is restarted too (the same runPolicy.backoffLimit budget) and resumes from its checkpoint, while the peers wait for it (docs/topology.md)

before starting anything it checks what `p2ptrain validate` checks: the manifest against the CRD, the data set (exists, readable, well-formed) and the model (built once on the CPU and given two samples).

the manifest is the same P2PTrainingJob you would `kubectl apply`; cluster-only fields (images, resources, storage) are ignored here.

exit codes: 0 trained, 1 failed (the message names the failing part and its log), 2 bad manifest, model, data or option, 3 training diverged (non-finite or exploding loss or gradient, with training.onDivergence: fail; the message names the cause and the round), 130 interrupted (SIGINT, Ctrl-C), 143 terminated (SIGTERM).

signing: events are signed with a fresh random key unless --signing-key-file names a file holding the key (its text, surrounding whitespace removed); a client that is not p2ptrain can then sign events to this run's peers and function (docs/wire.md). The key is never printed or logged.

examples:
  p2ptrain run examples/digits.yaml
  p2ptrain run examples/digits.yaml --summary out/summary.json --output out/model.safetensors
  p2ptrain run examples/digits-ps.yaml       # topology: ps, with a parameter server
"""


FUNCTION_EPILOG = f"""\
environment:
  {CONFIG_ENV}  the job's runtime config (job.json), as the operator's ConfigMap provides it
  {REDIS_PASSWORD_ENV}, {SIGNING_KEY_ENV}  the job's secrets (from its Kubernetes Secret)
  LISTEN_ADDRESS  where to listen, host:port[,host:port] (default [::]:8080,0.0.0.0:8080)
  P2PTRAIN_TORCH_THREADS  torch threads per instance (default 1)

it serves CloudEvents (gradient requests) at /, /health/liveness, /health/readiness and /metrics.
"""


class _Formatter(argparse.HelpFormatter):
    """Wraps each line of a description or epilog to the terminal, keeping its indent and list hangs."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            stripped = line.lstrip()
            if not stripped:
                lines.append("")
                continue
            lead = indent + line[: len(line) - len(stripped)]
            # A list item hangs under its text; other indented lines (examples, definitions) hang deeper.
            hang = "  " if stripped.startswith("- ") else "    " if lead != indent else ""
            lines.append(textwrap.fill(stripped, max(width, 20), initial_indent=lead, subsequent_indent=lead + hang,
                                       break_long_words=False, break_on_hyphens=False))
        return "\n".join(lines)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2ptrain",
        description="Peer-to-peer, serverless, Byzantine-robust distributed training (SPIRT on Kubernetes).",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("P2PTRAIN_LOG_LEVEL", "WARNING"), help="logging level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="train a job on this machine (local Redis servers, peers and functions)",
        description="Train a P2PTrainingJob on this machine with no cluster: local Redis servers, "
        "peers and gradient functions that scale from and to zero. Shows live progress "
        "(round, loss, accuracy, phase timings) and a final summary, and writes the trained model.",
        epilog=RUN_EPILOG,
        formatter_class=_Formatter,
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
    run.add_argument("--prices", type=Path, metavar="FILE", help="price the summary's cost block with this price "
                     "list (YAML; see examples/prices/)")
    run.set_defaults(func=_run)

    peer = sub.add_parser("peer", help="serve one peer of a job (what a peer pod runs)", formatter_class=_Formatter)
    peer.add_argument("--config", type=Path, required=True, help="runtime config (job.json)")
    peer.add_argument("--index", help="peer number (default: the StatefulSet ordinal of $HOSTNAME)")
    peer.add_argument("--listen", default="0.0.0.0", help="address for the peer's HTTP endpoint")
    peer.add_argument("--port", type=int, default=PEER_PORT, help="port for events, /status, /healthz, /metrics")
    peer.add_argument("--metrics-port", type=int, help="also serve /metrics on this port (pods: spec.metrics.port)")
    peer.add_argument("--exit-when-done", action="store_true", help="exit after training instead of lingering")
    peer.set_defaults(func=_peer)

    aggregator = sub.add_parser(
        "aggregator",
        help="serve the aggregator of a topology: ps job (what the aggregator pod runs)",
        description="Serve the parameter server of a job with spec.topology: ps: take every peer's averaged "
        "gradient (signed gradient.averaged CloudEvents), aggregate with the job's rule, update the model and "
        "checkpoint it to the aggregator's Redis, from where the peers read it. See docs/topology.md.",
        epilog="exit codes: 0 served every round, 1 failed, 2 bad config, 143 stopped.",
        formatter_class=_Formatter,
    )
    aggregator.add_argument("--config", type=Path, required=True, help="runtime config (job.json)")
    aggregator.add_argument("--listen", default="0.0.0.0", help="address for the aggregator's HTTP endpoint")
    aggregator.add_argument("--port", type=int, default=PEER_PORT, help="port for events, /status, /healthz, /metrics")
    aggregator.add_argument("--metrics-port", type=int, help="also serve /metrics on this port (pods: spec.metrics.port)")
    aggregator.add_argument("--exit-when-done", action="store_true", help="exit after the last round instead of lingering")
    aggregator.set_defaults(func=_aggregator)

    export = sub.add_parser("export", help="write a peer's trained model from its Redis to a safetensors file "
                            "(what the export Job runs when a job with spec.output succeeds)",
                            formatter_class=_Formatter)
    export.add_argument("--config", type=Path, required=True, help="runtime config (job.json)")
    export.add_argument("--output", type=Path, required=True, help="where to write the model (.safetensors)")
    export.add_argument("--peer", type=int, default=0, help="whose replica (default 0)")
    export.set_defaults(func=_export)

    function = sub.add_parser(
        "function",
        help=f"serve the gradient function (what the Knative Service runs; env {CONFIG_ENV}, LISTEN_ADDRESS)",
        description="Serve the gradient function: each gradient.requested CloudEvent names a peer, a model version "
        "and sample indices; the function loads that version from the peer's Redis, computes the gradient, adds it "
        "into the peer's accumulator in Redis and answers with a gradient.computed event. This is what the job's "
        "Knative Service runs; `p2ptrain run` starts it locally.",
        epilog=FUNCTION_EPILOG,
        formatter_class=_Formatter,
    )
    function.set_defaults(func=_function)
    operator = sub.add_parser("operator", help="run the Kubernetes operator (kopf)", add_help=False)
    operator.set_defaults(func=_operator)
    redis_module = sub.add_parser("redis-module", help="print the path of the p2ptrain Redis module, building it if needed")
    redis_module.set_defaults(func=_redis_module)
    validate = sub.add_parser(
        "validate",
        help="check a manifest, its model and data set, and print the resolved spec",
        description="Check a manifest as `p2ptrain run` and the API server would, without starting anything: "
        "the CRD's schema, defaults and rules, then the data set (exists, readable, well-formed) and the model "
        "(built once on the CPU and given two samples). Prints the resolved spec as JSON.",
        epilog="exit codes: 0 valid, 2 bad manifest, model or data.",
        formatter_class=_Formatter,
    )
    validate.add_argument("manifest", type=Path)
    validate.set_defaults(func=_validate)
    cost = sub.add_parser(
        "cost",
        help="what a job used and, with --prices, what it cost",
        description="Print a job's usage (function invocations, CPU-seconds, GB-seconds, cold starts, pod-seconds, "
        "bytes moved) from a `p2ptrain run --summary` file or a job as `kubectl get p2pjob NAME -o json` prints it "
        "('-' reads standard input), priced with --prices.",
        epilog="exit codes: 0 printed, 2 unreadable file, no cost block or bad price list.",
        formatter_class=_Formatter,
    )
    cost.add_argument("source", help="summary JSON, P2PTrainingJob JSON/YAML, or - for standard input")
    cost.add_argument("--prices", type=Path, metavar="FILE", help="price list (YAML; see examples/prices/)")
    cost.add_argument("--json", action="store_true", help="print the figures (and money) as JSON")
    cost.set_defaults(func=_cost)
    return parser


def main(argv: list[str] | None = None) -> int:
    memory.keep_freed_buffers()  # every role moves model-sized buffers: reuse them (p2ptrain.memory)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "operator" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    logs.configure(args.log_level)
    command: Callable[[argparse.Namespace], int] = args.func
    return command(args)


# --- the commands ------------------------------------------------------------------------------------------

def _checked_job(manifest: Path, *, local: bool) -> tuple[JobSpec, str] | None:
    """The parsed job and what was resolved about it, or None after printing why it can never run."""
    try:
        spec = load_manifest(manifest)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    from p2ptrain.preflight import DataError, ModelError, check_job  # torch: only once the manifest is good

    try:
        # Peers and functions start as `python -m p2ptrain` in this directory, which puts it on
        # sys.path (the `p2ptrain` script does not): resolve `module:factory` the way they will.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        resolved = check_job(spec, local=local)
    except (DataError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    return spec, resolved.describe()


def _run(args: argparse.Namespace) -> int:
    try:
        key = read_signing_key(args.signing_key_file) if args.signing_key_file is not None else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from p2ptrain.cost import CostError, load_prices

    try:
        prices = load_prices(args.prices) if args.prices is not None else None
    except CostError as exc:
        print(f"error: --prices: {exc}", file=sys.stderr)
        return 2
    checked = _checked_job(args.manifest, local=True)
    if checked is None:
        return 2
    from p2ptrain.local import RunOptions, run_job

    options = RunOptions(
        output=args.output, summary=args.summary, workdir=args.workdir, quiet=args.quiet,
        keep_logs=args.keep_logs, signing_key=key, prices=prices,
    )
    return run_job(checked[0], options)


def _validate(args: argparse.Namespace) -> int:
    checked = _checked_job(args.manifest, local=False)
    if checked is None:
        return 2
    import json

    spec, resolved = checked
    print(json.dumps(spec.to_dict(), indent=2))
    print(f"valid: {resolved}", file=sys.stderr)
    return 0


def _cost(args: argparse.Namespace) -> int:
    import json

    import yaml

    from p2ptrain.cost import CostError, cost_of, format_cost, load_prices

    try:
        text = sys.stdin.read() if args.source == "-" else Path(args.source).read_text(encoding="utf-8")
        block = cost_of(yaml.safe_load(text), args.source)  # JSON is YAML
        money = load_prices(args.prices).price(block) if args.prices is not None else None
    except (OSError, yaml.YAMLError, CostError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**block, **({"money": money} if money else {})}, indent=2))
    else:
        print("\n".join(line.strip() for line in format_cost(block, money)))
    return 0


def _peer(args: argparse.Namespace) -> int:
    return _serve_trainer(args, aggregator=False)


def _aggregator(args: argparse.Namespace) -> int:
    return _serve_trainer(args, aggregator=True)


def _serve_trainer(args: argparse.Namespace, *, aggregator: bool) -> int:
    """A peer, or the aggregator of a topology ps job: the same configuration, secrets and serving."""
    from p2ptrain import asgi
    from p2ptrain.peer import Peer, serve_peer
    from p2ptrain.ps import Aggregator

    try:
        config = RuntimeConfig.from_file(args.config)
        index = None if aggregator else (
            int(args.index) if args.index is not None else peer_index_from_hostname(socket.gethostname()))
        secrets = Secrets.from_env()
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = "the aggregator" if index is None else f"peer {index}"
    logs.set_context(job=config.spec.name, peer="aggregator" if index is None else index)
    try:
        process: Peer | Aggregator = Aggregator(config, secrets) if index is None else Peer(config, index, secrets)
    except Exception as exc:  # the process edge: one clear line instead of a traceback
        logging.getLogger("p2ptrain.ps" if index is None else "p2ptrain.peer").error("%s cannot start: %s", name, exc)
        print(f"error: {name} cannot start: {exc}", file=sys.stderr)
        return 1
    return asgi.run(
        serve_peer(process, host=args.listen, port=args.port, metrics_port=args.metrics_port,
                   linger=not args.exit_when_done)
    )


def _export(args: argparse.Namespace) -> int:
    import json

    import redis

    from p2ptrain.checkpoint import CheckpointError
    from p2ptrain.store import Keys, connect, export_model

    try:
        config = RuntimeConfig.from_file(args.config)
        secrets = Secrets.from_env()
        if not 0 <= args.peer < config.spec.peers:
            raise ConfigError(f"--peer {args.peer} is not a peer of this job (peers={config.spec.peers})")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    address = config.redis[args.peer]
    client = connect(address, secrets.redis_password, socket_timeout=60)
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


def _function(args: argparse.Namespace) -> int:
    from p2ptrain.function_server import serve

    serve()
    return 0


def _operator(args: argparse.Namespace) -> int:
    try:
        from p2ptrain_operator.main import main as operator_main
    except ImportError as exc:
        print(f"error: the operator is not installed: {exc}", file=sys.stderr)
        return 2
    return operator_main(args.rest)


def _redis_module(args: argparse.Namespace) -> int:
    from p2ptrain import native

    path = native.module_path()
    if path is None:
        print("error: the p2ptrain Redis module could not be built (needs gcc)", file=sys.stderr)
        return 1
    print(path)
    return 0

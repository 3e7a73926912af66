"""Robustness of every aggregation rule under every attack of p2ptrain.attack, on digits.

For f Byzantine peers of n (2 of 7 and 3 of 10), trains the digits MLP once per rule and attack (and
once per rule with no attack, the clean reference) and reports the test accuracy over rounds (PNG
plots) and a rule x attack table of final accuracy. Writes docs/robustness.md and its plots.

The peers are simulated in one process with the peer's own code: each peer's minibatch of its own
shard (``shard_indices``, ``batch_indices``), its real torch gradient (``compute_gradient``, what the
gradient function runs), the attackers' ``p2ptrain.attack.Attacker`` (label-flip: the same
``flip_labels``), the rule through ``Replica.aggregate`` (with its centered-clipping state) and the step and evaluation of a
``Replica`` (same model, optimizer, seed). One replica stands for all honest peers: in the real
system every peer aggregates the same gradients and the replicas stay bit-identical (checked by
parameter hashes). Not simulated: the network, the Redis averaging and the function calls, whose
effect on the numbers is float rounding (tests/integration/test_attack_run.py runs the real path).
Usage: ``python bench/robustness.py [--rounds 100] [--out docs/robustness.md]``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from report import publish

from p2ptrain.aggregate import MINIMUM, RULES
from p2ptrain.attack import KINDS, Attacker, flip_labels
from p2ptrain.data import batch_indices, shard_indices
from p2ptrain.gradient import compute_gradient
from p2ptrain.peer.replica import Replica, SkipUpdate
from p2ptrain.spec import JobSpec, parse_manifest

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ((7, 2), (10, 3))  # (peers n, Byzantine f)
RULE_ORDER = ("mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan", "geometric-median",
              "centered-clipping")
# Columns: (label, kind, parameters beyond the CRD defaults). IPM twice: Xie et al.'s small epsilon
# (aimed at Krum and the median) and a large one, the only way IPM moves the plain mean.
ATTACK_COLUMNS: tuple[tuple[str, str, dict[str, float]], ...] = (
    ("clean", "clean", {}),
    *((kind, kind, {}) for kind in KINDS if kind != "ipm"),
    ("ipm e=0.1", "ipm", {}),
    ("ipm e=4", "ipm", {"epsilon": 4.0}),
)
ATTACKS = tuple(label for label, _, _ in ATTACK_COLUMNS)
WITHIN_POINTS = 2.0  # "stays within 2 points of the clean run"


@dataclass
class Run:
    rule: str
    attack: str
    accuracy: list[tuple[int, float]]  # (round, test accuracy)
    skipped: int  # rounds without an update (non-finite aggregate, or the rule refused)

    @property
    def final(self) -> float:
        return self.accuracy[-1][1]


def job_spec(n: int, f: int, rule: str, column: str, rounds: int, every: int, seed: int = 0) -> JobSpec:
    _, attack, parameters = next(c for c in ATTACK_COLUMNS if c[0] == column)
    spec: dict[str, Any] = {
        "peers": n, "functionsPerPeer": 1, "batchSize": 32, "rounds": rounds, "seed": seed,
        "model": {"name": "mlp", "args": {"hidden": 64}}, "dataset": {"name": "digits"},
        "optimizer": {"name": "sgd", "learningRate": 0.1, "momentum": 0.9},
        # Every rule is told the true f; the plain mean tolerates none and is told 0 (the CRD insists).
        "aggregation": {"rule": rule, "byzantine": 0 if rule == "mean" else f},
        "evaluation": {"everyRounds": every},
    }
    if attack != "clean":
        spec["evaluation"]["attack"] = {"acknowledge": "evaluation-only", "kind": attack,
                                        "peers": list(range(n - f, n)), **parameters}
    return parse_manifest({"apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob",
                           "metadata": {"name": "robustness"}, "spec": spec})


def admissible(rule: str, n: int, f: int) -> bool:
    return n >= MINIMUM[rule](0 if rule == "mean" else f)


def train(spec: JobSpec, label: str) -> Run:
    replica = Replica(spec)
    data = replica.dataset
    skeleton = copy.deepcopy(replica.model)
    n, attack = spec.peers, spec.evaluation.attack
    shards = [shard_indices(len(data.y_train), n, p, spec.dataset.split_seed) for p in range(n)]
    attackers: dict[int, Attacker] = {}
    if attack is not None:
        attackers = {
            p: Attacker(attack.kind, factor=attack.factor, sigma=attack.sigma, z=attack.z, epsilon=attack.epsilon,
                        stale_rounds=attack.stale_rounds, seed=spec.seed * 1_000_003 + p)  # as p2ptrain.peer.attacker
            for p in attack.peers
        }
    accuracy: list[tuple[int, float]] = []
    skipped = 0
    rounds = spec.rounds or 1
    for round_index in range(rounds):
        params = torch.from_numpy(replica.parameters())
        own: dict[int, np.ndarray] = {}
        for p in range(n):
            indices = batch_indices(shards[p], round_index, spec.batch_size, spec.seed + p)
            labels = data.y_train[indices]
            if p in attackers and attackers[p].kind == "label-flip":
                labels = flip_labels(labels, data.num_classes)
            _, _, gradient = compute_gradient(skeleton, params, data.x_train[indices], labels)
            own[p] = gradient.numpy()
        honest_peers = [p for p in range(n) if p not in attackers]
        gradients = {p: own[p] for p in honest_peers}
        honest = np.stack([own[p] for p in honest_peers])  # all of them reach the attackers in time
        for p, attacker in attackers.items():
            sent = attacker.craft(own[p], honest)
            if sent is not None:
                gradients[p] = sent
        try:
            combined = replica.aggregate(gradients)  # as the peer: centered clipping keeps its center
        except SkipUpdate:
            combined = None
        if combined is not None and bool(torch.isfinite(combined).all()):
            replica.apply(combined)  # a non-finite aggregate is left out, as training.onDivergence=skipRound does
        else:
            skipped += 1
        if (round_index + 1) % spec.evaluation.every_rounds == 0 or round_index + 1 == rounds:
            result = replica.evaluate()
            assert result is not None
            accuracy.append((round_index + 1, result[0]))
    return Run(spec.aggregation.rule, label, accuracy, skipped)


def averaged(runs: list[Run]) -> Run:
    """The seeds' runs as one: mean accuracy at each evaluated round, skipped rounds summed."""
    curves = np.array([[a for _, a in run.accuracy] for run in runs])
    rounds = [r for r, _ in runs[0].accuracy]
    return Run(runs[0].rule, runs[0].attack, list(zip(rounds, curves.mean(axis=0).tolist(), strict=True)),
               sum(run.skipped for run in runs))


def plot(runs: dict[tuple[str, str], Run], n: int, f: int, path: Path) -> None:
    columns = 3
    rows = -(-len(ATTACKS) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), sharex=True, sharey=True)
    for ax, attack in zip(axes.flat, ATTACKS, strict=False):
        for rule in RULE_ORDER:
            run = runs.get((rule, attack))
            if run is not None:
                ax.plot([r for r, _ in run.accuracy], [a for _, a in run.accuracy], label=rule,
                        linewidth=2.2 if rule == "mean" else 1.2, linestyle="--" if rule == "mean" else "-")
        ax.set_title(attack if attack == "clean" else f"{attack} ({f} of {n})", fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(ATTACKS):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("round")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    figure.suptitle(f"digits, {n} peers of which {f} Byzantine: test accuracy per rule")
    figure.tight_layout(rect=(0, 0.05, 1, 0.97))
    figure.savefig(path, dpi=90)
    plt.close(figure)


def table(runs: dict[tuple[str, str], Run], n: int, f: int) -> tuple[list[str], list[str]]:
    """The rule x attack table of final accuracy, and the done-when verdict per attack."""
    rules = [r for r in RULE_ORDER if (r, "clean") in runs]
    lines = [f"| rule \\ attack ({f} of {n}) | " + " | ".join(ATTACKS) + " |",
             "|---|" + "---:|" * len(ATTACKS)]
    for rule in RULE_ORDER:
        if rule not in rules:
            lines.append(f"| {rule} | " + " | ".join(["n/a"] * len(ATTACKS)) + " |")
            continue
        cells = []
        for attack in ATTACKS:
            run = runs[(rule, attack)]
            mark = f" ({run.skipped} skipped)" if run.skipped else ""
            cells.append(f"{100 * run.final:.1f}{mark}")
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    clean = runs[("mean", "clean")].final
    verdicts = []
    for attack in ATTACKS[1:]:
        mean_drop = 100 * (clean - runs[("mean", attack)].final)
        best = max((r for r in rules if r != "mean"), key=lambda r: runs[(r, attack)].final)
        gap = 100 * (clean - runs[(best, attack)].final)
        ok = gap <= WITHIN_POINTS
        verdicts.append(
            f"| {attack} | {mean_drop:+.1f} | {best} | {gap:+.1f} | {'yes' if ok else '**no**'} |"
        )
    return lines, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100, help="training rounds per run")
    parser.add_argument("--every", type=int, default=5, help="evaluate every this many rounds")
    parser.add_argument("--seeds", type=int, default=1, help="runs per cell (seeds 0, 1, ...), averaged")
    parser.add_argument("--out", default=str(ROOT / "docs" / "robustness.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # many tiny steps: threads only contend (and the machine is shared)
    out = Path(args.out)
    started = time.perf_counter()
    sections: list[str] = []
    for n, f in SETTINGS:
        runs: dict[tuple[str, str], Run] = {}
        for rule in RULE_ORDER:
            if rule not in RULES or not admissible(rule, n, f):
                continue
            for attack in ATTACKS:
                runs[(rule, attack)] = averaged([
                    train(job_spec(n, f, rule, attack, args.rounds, args.every, seed), attack) for seed in range(args.seeds)
                ])
                print(f"n={n} f={f} {rule:>17} {attack:>10}: {100 * runs[(rule, attack)].final:5.1f}%", flush=True)
        image = out.with_name(f"robustness-{n}-peers-{f}-byzantine.png")
        plot(runs, n, f, image)
        lines, verdicts = table(runs, n, f)
        missing = [r for r in RULE_ORDER if (r, "clean") not in runs]
        sections += [
            f"## {f} Byzantine of {n} peers",
            "",
            f"![accuracy over rounds, {f} of {n}]({image.name})",
            "",
            "Final test accuracy (%) after the last round; *skipped* counts rounds whose aggregate was "
            "non-finite or refused, so no step was taken.",
            "",
            *lines,
            "",
            *([f"n/a: {', '.join(missing)} cannot tolerate f={f} with n={n} (needs more peers)", ""] if missing else []),
            f"Against the clean plain mean ({100 * runs[('mean', 'clean')].final:.1f}%): how far the mean "
            f"falls, the best robust rule, and whether it stays within {WITHIN_POINTS:g} points.",
            "",
            "| attack | mean vs clean (points) | best robust rule | its gap to clean (points) | within 2 |",
            "|---|---:|---|---:|---|",
            *verdicts,
            "",
        ]
    elapsed = time.perf_counter() - started
    publish(_header(args.rounds, args.every, args.seeds, elapsed) + sections + _notes(), str(out))


def _header(rounds: int, every: int, seeds: int, elapsed: float) -> list[str]:
    return [
        "# Robustness: aggregation rules under attack",
        "",
        "Generated by `make robustness` (`python bench/robustness.py`); do not edit by hand.",
        f"Machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}, "
        f"torch {torch.__version__}; the whole run took {elapsed / 60:.1f} min.",
        "",
        "**What runs.** Digits (scikit-learn's 8x8 handwritten digits, 80/20 split), the `mlp` model (64 hidden),",
        f"SGD (learning rate 0.1, momentum 0.9), 32 samples per peer per round, {rounds} rounds, test accuracy",
        f"every {every} rounds. "
        + ("One run per cell (job seed 0)" if seeds == 1 else f"Every cell is the mean of {seeds} runs (job seeds 0..{seeds - 1})")
        + ": runs with the same seed start from the same model and see the same minibatches.",
        "The attackers are the last f peers; every rule is told the true f (the mean, 0).",
        "Attack parameters are the CRD defaults of `spec.evaluation.attack` (scaling factor 100, gaussian",
        "sigma 1, alie z 1, ipm epsilon 0.1, stale 10 rounds), plus ipm with epsilon 4.",
        "",
        "**How.** The peers are simulated in one process with the peer's own code (see the docstring of",
        "`bench/robustness.py`): real torch gradients of each peer's shard, the real rules of",
        "`p2ptrain/aggregate.py` through the peer's `Replica.aggregate` (centered clipping keeps its center across rounds), the real attacks of",
        "`p2ptrain/attack.py`, the replica's optimizer step and evaluation. The network, the Redis",
        "averaging and the functions are not simulated (they change the numbers by float rounding only);",
        "`tests/integration/test_attack_run.py` runs the real path (5 peers, real Redis and HTTP, one attacker).",
        "",
        "**What the attackers know.** Their own honest gradient; for alie and ipm, every honest gradient of",
        "the round (in the real system an attacker waits, up to half the round deadline, for the honest",
        "gradients that reach it: honest peers broadcast before they aggregate, so normally all of them).",
        "Colluding attackers send the same alie/ipm vector.",
        "",
    ]


def _notes() -> list[str]:
    return [
        "## Reading the results",
        "",
        "- 360 test samples: one point is about 3.6 test samples, so differences of a point or two between",
        "  rules are within noise.",
        "- `silent` removes the attackers' gradients; the rules then see only honest ones, so it costs",
        "  accuracy only through fewer samples per round. Its real cost is time: with `exchange.quorum`",
        "  equal to `peers` (the default) every round waits for the round deadline; set the quorum to",
        "  `peers - byzantine` when peers may fall silent.",
        "- `sign-flip`, `stale` and `ipm e=0.1` keep the gradient's own magnitude or less: against the mean",
        "  the honest majority still points downhill, so they slow it rather than break it. IPM with a",
        "  small epsilon is aimed at Krum-like rules, which pick the attackers' identical vectors.",
        "- Verdicts compare single runs; a gap within a point or two of the threshold is not significant.",
        "",
        "## Chaos runs",
        "",
        "Faults rather than attacks (peers, Redis, functions and the operator killed or failing mid-run, with",
        "exact sample counts checked): [chaos.md](chaos.md), written by `make chaos` (`bench/chaos.py`).",
    ]


if __name__ == "__main__":
    main()

"""Robustness of every aggregation rule under every attack of p2ptrain.attack, on digits.

For f Byzantine peers of n (2 of 7 and 3 of 10), trains the digits MLP once per rule and attack (and
once per rule with no attack, the clean reference) and reports the test accuracy over rounds (PNG
plots) and a rule x attack table of final accuracy. Writes docs/robustness.md and its plots.

The peers are simulated in one process with the peer's own code: each peer's minibatch of its own
shard (``shard_indices``, ``batch_indices``), its real torch gradient (``GradientModel``, what the
gradient function runs), the attackers' ``p2ptrain.attack.Attacker`` (label-flip: the same
``flip_labels``), the rule through ``Replica.aggregate`` (with its centered-clipping state) and the step and evaluation of a
``Replica`` (same model, optimizer, seed). With worker momentum (the **+wm** rows) each peer keeps
its own ``WorkerMomentum``, the state behind ``Replica.published``, and publishes its momentum; the
attackers craft from the honest momenta as ``peer/attacker.py`` does. One replica stands for all honest peers: in the real
system every peer aggregates the same gradients and the replicas stay bit-identical (checked by
parameter hashes). Not simulated: the network, the Redis averaging and the function calls, whose
effect on the numbers is float rounding (tests/integration/test_attack_run.py runs the real path).
Usage: ``python bench/robustness.py [--rounds 100] [--out docs/robustness.md]``.
"""

from __future__ import annotations

import argparse
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
from p2ptrain.models import GradientModel
from p2ptrain.momentum import WorkerMomentum
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
# Worker momentum (spec.aggregation.momentum): every rule again with the peers publishing momenta. Its
# beta is the SGD momentum of the other rows, moved from the replica to the peers (optimizer.momentum 0):
# the same optimizer with the plain mean, so the rows compare the rules, not the step.
WORKER_MOMENTUM = 0.9


def row_name(rule: str, momentum: float) -> str:
    return f"{rule} +wm" if momentum else rule


@dataclass
class Run:
    rule: str
    attack: str
    accuracy: list[tuple[int, float]]  # (round, test accuracy)
    skipped: int  # rounds without an update (non-finite aggregate, or the rule refused)

    @property
    def final(self) -> float:
        return self.accuracy[-1][1]


def job_spec(
    n: int, f: int, rule: str, column: str, rounds: int, every: int, seed: int = 0, momentum: float = 0.0
) -> JobSpec:
    _, attack, parameters = next(c for c in ATTACK_COLUMNS if c[0] == column)
    spec: dict[str, Any] = {
        "peers": n, "functionsPerPeer": 1, "batchSize": 32, "rounds": rounds, "seed": seed,
        "model": {"name": "mlp", "args": {"hidden": 64}}, "dataset": {"name": "digits"},
        "optimizer": {"name": "sgd", "learningRate": 0.1, "momentum": 0.0 if momentum else 0.9},
        # Every rule is told the true f; the plain mean tolerates none and is told 0 (the CRD insists).
        "aggregation": {"rule": rule, "byzantine": 0 if rule == "mean" else f, "momentum": momentum},
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
    computer = GradientModel(replica.model)
    n, attack = spec.peers, spec.evaluation.attack
    shards = [shard_indices(len(data.y_train), n, p, spec.dataset.split_seed) for p in range(n)]
    attackers: dict[int, Attacker] = {}
    if attack is not None:
        attackers = {
            p: Attacker(attack.kind, factor=attack.factor, sigma=attack.sigma, z=attack.z, epsilon=attack.epsilon,
                        stale_rounds=attack.stale_rounds, seed=spec.seed * 1_000_003 + p)  # as p2ptrain.peer.attacker
            for p in attack.peers
        }
    # What each peer publishes: its gradient, or with aggregation.momentum its momentum (as
    # Replica.published in the peer); the attackers craft from the honest peers' published vectors.
    momenta = [WorkerMomentum(spec.aggregation.momentum) for _ in range(n)] if spec.aggregation.momentum else None
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
            _, _, gradient = computer.gradient(params, data.x_train[indices], labels)
            own[p] = gradient.numpy() if momenta is None else momenta[p].step(round_index, gradient.numpy())
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
    return Run(row_name(spec.aggregation.rule, spec.aggregation.momentum), label, accuracy, skipped)


def averaged(runs: list[Run]) -> Run:
    """The seeds' runs as one: mean accuracy at each evaluated round, skipped rounds summed."""
    curves = np.array([[a for _, a in run.accuracy] for run in runs])
    rounds = [r for r, _ in runs[0].accuracy]
    return Run(runs[0].rule, runs[0].attack, list(zip(rounds, curves.mean(axis=0).tolist(), strict=True)),
               sum(run.skipped for run in runs))


def plot(runs: dict[tuple[str, str], Run], n: int, f: int, path: Path, momentum: float = 0.0) -> None:
    columns = 3
    rows = -(-len(ATTACKS) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), sharex=True, sharey=True)
    for ax, attack in zip(axes.flat, ATTACKS, strict=False):
        for rule in RULE_ORDER:
            run = runs.get((row_name(rule, momentum), attack))
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
    with_momentum = f", worker momentum {momentum:g}" if momentum else ""
    figure.suptitle(f"digits, {n} peers of which {f} Byzantine{with_momentum}: test accuracy per rule")
    figure.tight_layout(rect=(0, 0.05, 1, 0.97))
    figure.savefig(path, dpi=90)
    plt.close(figure)


def table(runs: dict[tuple[str, str], Run], n: int, f: int) -> tuple[list[str], list[str]]:
    """The rule x attack table of final accuracy, and the done-when verdict per attack."""
    rows = [row_name(r, m) for m in (0.0, WORKER_MOMENTUM) for r in RULE_ORDER]
    rules = [r for r in rows if (r, "clean") in runs]
    lines = [f"| rule \\ attack ({f} of {n}) | " + " | ".join(ATTACKS) + " |",
             "|---|" + "---:|" * len(ATTACKS)]
    for rule in rows:
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
        # The plain mean is no robust rule, with or without worker momentum.
        best = max((r for r in rules if not r.startswith("mean")), key=lambda r: runs[(r, attack)].final)
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
        for momentum in (0.0, WORKER_MOMENTUM):
            for rule in RULE_ORDER:
                if rule not in RULES or not admissible(rule, n, f):
                    continue
                row = row_name(rule, momentum)
                for attack in ATTACKS:
                    runs[(row, attack)] = averaged([
                        train(job_spec(n, f, rule, attack, args.rounds, args.every, seed, momentum), attack)
                        for seed in range(args.seeds)
                    ])
                    print(f"n={n} f={f} {row:>20} {attack:>10}: {100 * runs[(row, attack)].final:5.1f}%", flush=True)
        image = out.with_name(f"robustness-{n}-peers-{f}-byzantine.png")
        plot(runs, n, f, image)
        momentum_image = out.with_name(f"robustness-{n}-peers-{f}-byzantine-momentum.png")
        plot(runs, n, f, momentum_image, WORKER_MOMENTUM)
        lines, verdicts = table(runs, n, f)
        missing = [r for r in RULE_ORDER if (r, "clean") not in runs]
        sections += [
            f"## {f} Byzantine of {n} peers",
            "",
            f"![accuracy over rounds, {f} of {n}]({image.name})",
            "",
            f"![accuracy over rounds, {f} of {n}, worker momentum {WORKER_MOMENTUM:g}]({momentum_image.name})",
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
        f"Rows marked **+wm** run with worker momentum (`spec.aggregation.momentum: {WORKER_MOMENTUM:g}`,",
        "`optimizer.momentum: 0`): each peer publishes the momentum m = 0.9 m + g of its own gradients, the",
        "rule aggregates those, the replica steps with the aggregate. With the plain mean that is the same",
        "SGD momentum 0.9 as the other rows (the clean mean rows agree), so the rows compare rules only.",
        "Attack parameters are the CRD defaults of `spec.evaluation.attack` (scaling factor 100, gaussian",
        "sigma 1, alie z 1, ipm epsilon 0.1, stale 10 rounds), plus ipm with epsilon 4.",
        "",
        "**How.** The peers are simulated in one process with the peer's own code (see the docstring of",
        "`bench/robustness.py`): real torch gradients of each peer's shard, the real rules of",
        "`p2ptrain/aggregate.py` through the peer's `Replica.aggregate` (centered clipping keeps its center across rounds), the real attacks of",
        "`p2ptrain/attack.py`, the replica's optimizer step and evaluation. The network, the Redis",
        "averaging and the functions are not simulated (they change the numbers by float rounding only);",
        "`tests/integration/test_attack_run.py` runs the real path (5 peers, real Redis and HTTP, one attacker);",
        "`tests/integration/test_alie_momentum.py` runs alie against the mean and centered clipping +wm.",
        "",
        "**What the attackers know.** Their own honest gradient; for alie and ipm, every honest gradient of",
        "the round (in the real system an attacker waits, up to half the round deadline, for the honest",
        "gradients that reach it: honest peers broadcast before they aggregate, so normally all of them).",
        "With worker momentum they know, and craft from, what the honest peers publish: their momenta.",
        "Colluding attackers send the same alie/ipm vector.",
        "",
    ]


def _notes() -> list[str]:
    return [
        "## Worker momentum (`spec.aggregation.momentum`)",
        "",
        "ALIE (Baruch et al. 2019) sends mean - z std of the honest vectors: a vector inside their spread,",
        "which no rule that looks at one round can tell from an honest one, so every rule above lets it",
        "bias each step by about z standard deviations. Worker momentum (El-Mhamdi, Guerraoui, Rouault,",
        "ICLR 2021; Karimireddy, He, Jaggi, ICML 2021) shrinks that room: a peer's momentum averages about",
        "1/(1-beta) rounds of its gradients, so the honest vectors' spread shrinks relative to their mean and",
        "z standard deviations no longer turn the step. The rules themselves are unchanged; the **+wm** rows",
        "show which of them profit. Karimireddy et al. pair it with centered clipping, whose center is the",
        "previous aggregate: `aggregation.radius` (default 10) sets its clipping radius.",
        "",
        "- `aggregation.momentum` is beta in m = beta m + g (torch's SGD momentum, dampening 0); with the",
        "  plain mean it is exactly `optimizer.momentum` moved to the peers, so the CRD refuses both at once",
        "  (set `optimizer.momentum: 0`). With adam/adamw it adds to their own first moment.",
        "- A peer's momentum is state of the run: it is in the checkpoint (`extra.worker.momentum`), restored",
        "  on restart, and adopted with the model on catch-up and resync (the median of the other peers',",
        "  within the honest range like the parameters). With `topology: ps` the aggregator keeps none: the",
        "  peers adopt its model every round and keep their own momenta.",
        "- Centered clipping at radius 10 clips none of the honest momenta of this model (in a clean run at",
        "  2 of 7 they stay within 3.5 of the center): it then acts as the mean of the momenta, which is why",
        "  its +wm row matches `mean +wm` against alie. It holds against alie and, unlike the mean, against",
        "  scaling, but not against ipm with a large epsilon (nor does it without momentum). A smaller",
        "  radius is no cure: at radius 1 it fell to 60.7% (2 of 7) and 83.8% (3 of 10) under alie, the",
        "  alie vectors sitting near the center outweighing the clipped honest ones.",
        "- No single row holds against every attack: pick the rule for the threat (the verdict tables",
        "  name the best per attack). Worker momentum costs at most about a point clean and helps most",
        "  rules under most attacks here (Krum against ipm with a small epsilon most of all); against alie",
        "  it does not help the coordinate-wise median, nor Krum at 2 of 7.",
        "",
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

"""The shipped Grafana dashboard and alert rules against a real Prometheus scraping a real local run.

A real ``prometheus`` (Debian package, installed by hack/install-prometheus.sh) on a free loopback port
discovers the run's peers and gradient function instances from the ``prometheus-targets.json`` that
``p2ptrain run`` writes (file_sd, as the README's Metrics section shows users). While the job
trains, every query of the dashboard is evaluated as Grafana would (range queries, the dashboard's
variables substituted) until each panel that a healthy local run feeds has data; the panels that
cannot have data here are listed with the reason, and their queries must still be accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from p2ptrain import retry
from p2ptrain.autoscale import terminate
from p2ptrain.local import LocalRun, RunOptions
from p2ptrain.redis_server import free_port
from p2ptrain.scrape_targets import TARGETS_FILE
from tests.integration.harness import make_spec

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "p2ptrain" / "dashboards" / "p2ptrain.json"
RULES = ROOT / "charts" / "p2ptrain" / "rules" / "p2ptrain.rules.yaml"
SCRAPE_MS = 500
STEP_MS = 1000
# Grafana's definition: max($__interval + scrape interval, 4 * scrape interval).
RATE_INTERVAL_MS = max(STEP_MS + SCRAPE_MS, 4 * SCRAPE_MS)
DATA_TIMEOUT_SECONDS = 300  # a bound for slow, shared CI machines; a healthy run has data in seconds

# Panels a healthy local run cannot feed, by title, and why. Their queries are still evaluated.
NO_DATA_LOCALLY = {
    "Excluded peer gradients, by reason": "no peer misses a round deadline in a healthy run",
    "Jobs by phase (operator)": "the operator runs only on a cluster",
    "Operator reconcile duration p95": "the operator runs only on a cluster",
    "Function retries by peers": "no gradient function call fails in a healthy run",
    "Operator job outcomes": "the operator runs only on a cluster",
    "Recovery: gradients from outboxes, peers caught up": "no peer restarts or misses an event in a healthy run",
    "Aggregator (topology: ps): round and gradients aggregated": "this run is topology p2p: it has no aggregator",
}


def http_ok(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=2).status_code == 200
    return False


@contextlib.contextmanager
def prometheus(workdir: Path, tsdb: Path) -> Iterator[str]:
    """A real Prometheus scraping what ``workdir``'s targets file lists, as the README shows; always stopped."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is missing: run `bash hack/install-prometheus.sh` (make test does)")
    config = tsdb.parent / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": f"{SCRAPE_MS}ms", "scrape_timeout": f"{SCRAPE_MS}ms"},
        "scrape_configs": [{
            "job_name": "p2ptrain",
            "honor_labels": True,  # keep the metrics' own job (the P2PTrainingJob) and namespace
            "file_sd_configs": [{"files": [str(workdir / TARGETS_FILE)]}],
        }],
    }))
    port = free_port()
    log_path = tsdb.parent / "prometheus.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tsdb}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            retry.wait_until_ready(lambda: http_ok(f"{url}/-/ready"), process, "prometheus", timeout=60)
        except retry.NotReady as exc:
            pytest.fail(f"{exc}: {log_path.read_text()[-2000:]}")
        yield url
    finally:
        terminate(process, timeout=15)


def grafana_regex_escape(value: str) -> str:
    """A variable's value in a regex matcher as Grafana's Prometheus data source writes it into the
    query: a regex metacharacter gets two backslashes (PromQL's string unescapes one), a backslash four.
    (Python's ``re.escape`` also escapes ``-``, and ``\\-`` is no PromQL string escape.)"""
    return re.sub(r"([$^*{}\[\]'+?.()|])", r"\\\\\1", value.replace("\\", "\\" * 4))


def dashboard_queries(job: str, namespace: str) -> list[tuple[str, str, str]]:
    """(panel title, refId, query) for every target, with the variables Grafana would substitute."""
    dashboard = json.loads(DASHBOARD.read_text())
    substitutions = {
        "$__rate_interval": f"{RATE_INTERVAL_MS}ms",
        "$__interval": f"{STEP_MS}ms",
        "$namespace": grafana_regex_escape(namespace),
        "$job": grafana_regex_escape(job),
    }
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in substitutions.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"panel {panel['title']!r} uses a variable this test does not know: {expr}"
            queries.append((panel["title"], target["refId"], expr))
    return queries


def dashboard_variables(job: str, namespace: str) -> dict[str, tuple[str, str]]:
    """name -> (label, series selector) of each ``label_values(selector, label)`` variable."""
    variables = {}
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), *(\w+)\)", variable["query"]["query"])
        assert match, f"variable {variable['name']}: not a label_values() query"
        selector = match[1].replace("$namespace", grafana_regex_escape(namespace)).replace("$job", grafana_regex_escape(job))
        variables[variable["name"]] = (match[2], selector)
    return variables


async def label_values(client: httpx.AsyncClient, label: str, selector: str, start: float, end: float) -> set[str]:
    """What Grafana's label_values() asks Prometheus for a dashboard variable's choices."""
    response = await client.get(f"/api/v1/label/{label}/values", params={"match[]": selector, "start": start, "end": end})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{selector}: {body}"
    return set(body["data"])


async def query_range(client: httpx.AsyncClient, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    response = await client.get("/api/v1/query_range", params={
        "query": expr, "start": start, "end": end, "step": STEP_MS / 1000})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return list(body["data"]["result"])


def finite_values(result: list[dict[str, Any]]) -> list[float]:
    return [float(v) for series in result for _, v in series["values"] if not math.isnan(float(v))]


async def test_every_dashboard_query_has_data_from_a_local_run(tmp_path: Path) -> None:
    spec = make_spec(
        "promtest", peers=2, functionsPerPeer=1, rounds=2000, batchSize=32,
        evaluation={"everyRounds": 2}, function={"minScale": 2, "maxScale": 2, "idleSeconds": 600},
    )
    workdir = tmp_path / "run"
    workdir.mkdir()
    queries = dashboard_queries(spec.name, spec.namespace)
    titles = {title for title, _, _ in queries}
    assert set(NO_DATA_LOCALLY) <= titles, "a panel listed as data-less is no longer on the dashboard"
    expected = [(t, r, q) for t, r, q in queries if t not in NO_DATA_LOCALLY]
    with prometheus(workdir, tmp_path / "tsdb") as url:
        run = LocalRun(spec, RunOptions(workdir=workdir, quiet=True))
        training = asyncio.create_task(run.run())
        started = time.time() - 5
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        try:
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                deadline = time.monotonic() + DATA_TIMEOUT_SECONDS
                while True:
                    assert not training.done(), f"the run ended first: {training.result()}"
                    # An outsider's garbage event, refused by peer 0 (reason "malformed"): the rejected
                    # events panel must show it. Sent until the panel has a non-zero rate.
                    if run.peers:
                        with contextlib.suppress(httpx.HTTPError):
                            await client.post(f"http://127.0.0.1:{run.peers[0].port}/",
                                              content=b"not a cloudevent", headers={"content-type": "application/cloudevents+json"})
                    now = time.time()
                    results = {(t, r): await query_range(client, q, started, now) for t, r, q in expected}
                    missing = [key for key, result in results.items() if not finite_values(result)]
                    rejected = finite_values(results[("Rejected events, by reason", "A")])
                    if not missing and max(rejected) > 0:
                        break
                    assert time.monotonic() < deadline, f"no data after {DATA_TIMEOUT_SECONDS} s for {missing}"
                    await asyncio.sleep(1)
                instances = results[("Function instances", "A")]
                # Every query the dashboard has, the data-less ones included, is accepted by Prometheus.
                for title, _, expr in queries:
                    if title in NO_DATA_LOCALLY:
                        await query_range(client, expr, started, time.time())
                up = await query_range(client, 'count by (component) (up{job="promtest"} == 1)', started, time.time())
                # The chart's alert rules run against the same series: Prometheus accepts each of them.
                for group in yaml.safe_load(RULES.read_text())["groups"]:
                    for rule in group["rules"]:
                        await query_range(client, rule["expr"], started, time.time())
                choices = {name: await label_values(client, label, selector, started, time.time())
                           for name, (label, selector) in dashboard_variables(spec.name, spec.namespace).items()}
                streaks = await query_range(client, 'p2ptrain_peer_excluded_rounds{job="promtest"}', started, time.time())
        finally:
            training.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await training

    # The dashboard's namespace and job pickers offer this run.
    assert choices == {"namespace": {spec.namespace}, "job": {spec.name}}
    assert run.functions is not None and run.functions.stats.max_instances == 2
    assert [series["metric"]["job"] for series in instances] == ["promtest"]
    assert max(finite_values(instances)) == run.functions.stats.max_instances
    scraped = {series["metric"]["component"]: max(finite_values([series])) for series in up}
    assert scraped == {"peer": 2, "gradient-function": 2}
    assert results[("Rejected events, by reason", "A")][0]["metric"]["reason"] == "malformed"
    assert {s["metric"]["peer"] for s in results[("Training loss, by peer", "A")]} == {"0", "1"}
    # Each peer reports, round by round, how long it has gone without each peer's gradient.
    assert {(s["metric"]["peer"], s["metric"]["excluded_peer"]) for s in streaks} == {
        ("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")}

"""``spec.topology``: the CRD field, the runtime config's aggregator addresses, the operator's children
for ``ps``, the ``p2ptrain aggregator`` entry and a peer's bounded wait for the aggregator (real Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import torch

from p2ptrain.cli import main
from p2ptrain.config import ConfigError, RedisAddress, RuntimeConfig, Secrets, cluster_config
from p2ptrain.peer.context import PeerContext
from p2ptrain.peer.errors import PeerError
from p2ptrain.peer.ps_round import AggregatorLink, aggregator_keys
from p2ptrain.ps import Aggregator
from p2ptrain.redis_server import RedisServer
from p2ptrain.spec import SpecError, parse_manifest
from p2ptrain.status import PeerStatus
from p2ptrain.store import checkpoint_round
from p2ptrain_operator.builders import build_children, labels, selector
from p2ptrain_operator.settings import Settings

OWNER = {"metadata": {"name": "digits", "namespace": "ml", "uid": "0b7e0d4e-1111-4a4a-9c9c-123456789abc"}}


def _spec(**extra: object):
    return parse_manifest({
        "apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "metadata": {"name": "digits", "namespace": "ml"},
        "spec": {"peers": 3, "model": {"name": "mlp"}, "dataset": {"name": "digits"}, **extra},
    })


def _local_config(spec, aggregator: RedisAddress | None, peers_redis: RedisAddress | None = None) -> RuntimeConfig:
    """Peers' Redis: ``peers_redis`` for all (different keys), else addresses that answer nothing."""
    return RuntimeConfig(
        spec=spec, peer_urls=tuple(f"http://127.0.0.1:{9000 + i}" for i in range(spec.peers)),
        redis=tuple(peers_redis or RedisAddress("127.0.0.1", 7000 + i) for i in range(spec.peers)),
        function_url="http://127.0.0.1:1/",
        aggregator_url="http://127.0.0.1:9999" if aggregator else None, aggregator_redis=aggregator,
    )


def test_topology_defaults_to_p2p_and_accepts_only_p2p_or_ps() -> None:
    assert _spec().topology == "p2p"
    assert _spec(topology="ps").topology == "ps"
    with pytest.raises(SpecError, match=r"spec\.topology: expected one of \['p2p', 'ps'\], got 'ring'"):
        _spec(topology="ring")


def test_a_ps_runtime_config_carries_the_aggregator_and_refuses_to_lack_it() -> None:
    spec = _spec(topology="ps")
    config = _local_config(spec, RedisAddress("127.0.0.1", 7999))
    again = RuntimeConfig.from_json(config.to_json())
    assert again == config and again.aggregator_redis == RedisAddress("127.0.0.1", 7999)
    with pytest.raises(ConfigError, match="topology ps needs the aggregator's URL and Redis address"):
        _local_config(spec, None)
    p2p = _local_config(_spec(), None)
    assert "aggregator" not in p2p.to_json() and RuntimeConfig.from_json(p2p.to_json()) == p2p


def test_in_a_cluster_the_aggregator_and_its_redis_have_stable_names() -> None:
    config = cluster_config(_spec(topology="ps"))
    assert config.aggregator_url == "http://digits-aggregator-0.digits-aggregator.ml.svc.cluster.local:8080"
    assert config.aggregator_redis == RedisAddress(
        "digits-aggregator-redis-0.digits-aggregator-redis.ml.svc.cluster.local", 6379)
    assert cluster_config(_spec()).aggregator_url is None


def test_the_operator_builds_the_aggregator_and_its_redis_for_ps_only() -> None:
    def children(**extra: object) -> dict[str, dict]:
        objects = build_children(_spec(**extra), OWNER, Settings(image="img:1"), redis_password="pw", signing_key="k")
        return {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}

    p2p, ps = children(), children(topology="ps")
    added = sorted(set(ps) - set(p2p))
    assert added == ["Service/digits-aggregator", "Service/digits-aggregator-redis",
                     "StatefulSet/digits-aggregator", "StatefulSet/digits-aggregator-redis"]
    assert {k: v for k, v in ps.items() if k not in added and k != "ConfigMap/digits-config" and k != "Secret/digits-secrets"} \
        == {k: v for k, v in p2p.items() if k not in ("ConfigMap/digits-config", "Secret/digits-secrets")}
    for component, name in (("aggregator", "digits-aggregator"), ("aggregator-redis", "digits-aggregator-redis")):
        statefulset, service = ps[f"StatefulSet/{name}"], ps[f"Service/{name}"]
        assert statefulset["spec"]["replicas"] == 1 and statefulset["spec"]["serviceName"] == name
        assert statefulset["metadata"]["labels"] == labels("digits", component)
        pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
        # Its own selector, matched by its pods and its Service only: never the peers' or the Redis'.
        assert statefulset["spec"]["selector"]["matchLabels"] == selector("digits", component) == service["spec"]["selector"]
        assert all(pod_labels[k] == v for k, v in selector("digits", component).items())
    container = ps["StatefulSet/digits-aggregator"]["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == "aggregator" and container["args"][:3] == ["aggregator", "--config", "/etc/p2ptrain/job.json"]
    assert ps["StatefulSet/digits-aggregator-redis"]["spec"]["template"]["spec"]["containers"][0]["name"] == "redis"
    # The peers' pods are left as they were: the aggregator copy did not alter them.
    assert ps["StatefulSet/digits-peer"]["spec"]["template"]["spec"]["containers"][0]["args"][0] == "peer"


def test_the_aggregator_command_refuses_a_p2p_job(tmp_path, monkeypatch, capsys) -> None:
    config = tmp_path / "job.json"
    config.write_text(_local_config(_spec(), None).to_json())
    monkeypatch.setenv("P2PTRAIN_REDIS_PASSWORD", "pw")
    monkeypatch.setenv("P2PTRAIN_SIGNING_KEY", "k" * 32)
    assert main(["aggregator", "--config", str(config)]) == 1
    assert "job 'digits' has topology 'p2p': only topology ps has an aggregator" in capsys.readouterr().err


async def test_a_peer_waits_for_the_aggregator_only_up_to_its_bound(redis_server: RedisServer) -> None:
    spec = _spec(topology="ps")
    config = _local_config(spec, RedisAddress(redis_server.host, redis_server.port))
    link = AggregatorLink(PeerContext(config, 0, Secrets(redis_server.password, b"k" * 32), PeerStatus(peer=0)))
    assert link.wait_seconds == spec.exchange.round_deadline_seconds + 120  # the documented bound
    link.wait_seconds = 0.5  # the aggregator's Redis answers, but nothing ever publishes round 1
    started = time.monotonic()
    with pytest.raises(PeerError, match=r"the aggregator published no model for round 1 within 0s .*answered, with an older round"):
        await link._wait_for_round(0)
    assert time.monotonic() - started < 30  # a guard against a hang, not a timing claim


async def test_a_peer_whose_aggregator_checkpoint_vanishes_waits_for_the_next_one(redis_server: RedisServer) -> None:
    """The aggregator's Redis restarted empty between the peer's two reads (the round, then the state):
    the peer waits for the aggregator to publish again (it resumes from the peers' checkpoints) instead of
    failing its run."""
    from p2ptrain.peer.replica import Replica
    from p2ptrain.store import PeerStore

    spec = _spec(topology="ps")
    config = _local_config(spec, RedisAddress(redis_server.host, redis_server.port))
    link = AggregatorLink(PeerContext(config, 0, Secrets(redis_server.password, b"k" * 32), PeerStatus(peer=0)))
    keys = aggregator_keys(spec.name, spec.peers)
    client = redis_server.client()
    client.hset(keys.checkpoint_meta, mapping={"round": 2, "meta": "{}"})  # the round is there, the state is gone
    replica, published = Replica(spec), Replica(spec)
    exchanging = asyncio.ensure_future(link.exchange(2, None, None, replica))  # type: ignore[arg-type]
    await asyncio.sleep(0.5)
    assert not exchanging.done()  # still waiting, not failed
    client.delete(keys.checkpoint_meta)  # the restarted aggregator writes its next round
    store = PeerStore(client, keys, key_ttl_seconds=600)
    assert store.save_checkpoint(3, published.pack({"round": 3}), {"peersUsed": 3})
    assert await asyncio.wait_for(exchanging, timeout=60) == (3, 3)


async def test_an_aggregator_restarted_empty_republishes_the_model_it_adopts_from_the_peers(
        redis_server: RedisServer) -> None:
    """Its Redis came back empty: it adopts the peers' checkpoint after round 4 and writes it as its own
    at once. A peer that was a round behind the others still waits for the model after round 4; without it,
    that peer would wait for round 5's, which waits for that peer's gradient (a lost round deadline)."""
    from p2ptrain.peer.replica import Replica
    from p2ptrain.store import Keys, PeerStore, read_checkpoint

    spec = _spec(topology="ps", exchange={"roundDeadlineSeconds": 60})
    here = RedisAddress(redis_server.host, redis_server.port)
    config = _local_config(spec, here, peers_redis=here)  # the peers' Redis and the aggregator's: one server
    trained = Replica(spec)
    with torch.no_grad():
        for parameter in trained.model.parameters():
            parameter.add_(0.25)
    state = trained.pack({"round": 3})
    client = redis_server.client()
    for peer in range(spec.peers):
        assert PeerStore(client, Keys(spec.name, peer), key_ttl_seconds=600).save_checkpoint(3, state, {})
    aggregator = Aggregator(config, Secrets(redis_server.password, b"k" * 32))
    running = asyncio.ensure_future(aggregator.run())
    try:
        deadline = time.monotonic() + 60
        while checkpoint_round(client, aggregator_keys(spec.name, spec.peers)) is None and time.monotonic() < deadline:
            assert not running.done(), running.result()
            await asyncio.sleep(0.02)
        saved = read_checkpoint(client, aggregator_keys(spec.name, spec.peers))
        assert saved is not None, "the aggregator did not republish the model it adopted"
        assert saved[0] == 3, saved[0]
        published = Replica(spec)
        published.load(saved[1])
        for ours, theirs in zip(published.model.parameters(), trained.model.parameters(), strict=True):
            assert torch.equal(ours, theirs)
        await asyncio.sleep(0.5)
        assert not running.done() and aggregator.status.round == 4  # it waits for round 5's gradients
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        client.close()


async def test_the_aggregator_closes_a_round_without_any_gradient_at_its_deadline(redis_server: RedisServer) -> None:
    # Every peer's fan-out failed (functions still cold): the round has no update, but its checkpoint is
    # written, or the peers would wait for a model that never comes. The peers' Redis addresses in this
    # config answer nothing: their outboxes cannot be read either.
    spec = _spec(topology="ps", exchange={"roundDeadlineSeconds": 1})
    config = _local_config(spec, RedisAddress(redis_server.host, redis_server.port))
    aggregator = Aggregator(config, Secrets(redis_server.password, b"k" * 32))
    report = await asyncio.wait_for(aggregator.run_round(0), timeout=60)  # a guard against a hang
    assert report.peers_used == 0
    assert aggregator.status.skipped_updates == {"too-few-gradients": 1}
    with contextlib.closing(redis_server.client()) as client:
        assert checkpoint_round(client, aggregator_keys("digits", spec.peers)) == 0

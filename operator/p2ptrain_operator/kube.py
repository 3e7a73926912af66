"""The operator's client for its children and jobs, on the official ``kubernetes`` package.

kopf watches and patches the job itself; the children are plain dicts built by ``builders``, sent
through the typed APIs (CoreV1Api, AppsV1Api, BatchV1Api, CustomObjectsApi for Knative Services and
the job). Authentication, TLS and errors are the client's: a failed call raises its ``ApiException``
(409 on create means the child is already there, 404 means it is gone). The client blocks, so every
call runs in a worker thread and the operator's event loop stays free.

The service-account token is read from its file for every request: projected tokens rotate (the
kubelet rewrites the file), and a client that kept the first one would get 401s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

__all__ = ["ApiException", "Connection", "Kube", "TokenFile", "to_model"]

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")

# Typed models of the built-in children: create() sends these (the API's own schema), not raw dicts.
_MODELS: dict[tuple[str, str], Any] = {
    ("v1", "Secret"): client.V1Secret,
    ("v1", "ConfigMap"): client.V1ConfigMap,
    ("v1", "Service"): client.V1Service,
    ("apps/v1", "StatefulSet"): client.V1StatefulSet,
    ("batch/v1", "Job"): client.V1Job,
}
# Custom resources go through CustomObjectsApi: (group, version, plural).
_CUSTOM: dict[tuple[str, str], tuple[str, str, str]] = {
    ("serving.knative.dev/v1", "Service"): ("serving.knative.dev", "v1", "services"),
    ("p2ptrain.dev/v1alpha1", "P2PTrainingJob"): ("p2ptrain.dev", "v1alpha1", "p2ptrainingjobs"),
}
MERGE_PATCH = "application/merge-patch+json"


class TokenFile:
    """A ``refresh_api_key_hook`` that puts the token file's current content on every request.

    The file is read again for every request (a few hundred bytes from a tmpfs; the operator makes a
    handful of calls a second), so a rotated token is used from the very next request, whatever
    way the kubelet rewrote it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __call__(self, configuration: client.Configuration) -> None:
        token = self.path.read_text().strip()
        if not token:
            raise ValueError(f"token file {self.path} is empty: expected a service-account token")
        configuration.api_key["BearerToken"] = f"Bearer {token}"


@dataclass(frozen=True)
class Connection:
    """Where the API server is and how to authenticate; ``in_cluster()`` in a pod, tests build one."""

    server: str
    token_file: str | None = None
    ca_path: str | None = None
    insecure: bool = False

    @classmethod
    def in_cluster(cls) -> Connection:
        probe = client.Configuration()
        config.load_incluster_config(client_configuration=probe)  # host and CA as the client finds them
        return cls(server=probe.host, token_file=str(SERVICE_ACCOUNT / "token"), ca_path=probe.ssl_ca_cert)

    def configuration(self) -> client.Configuration:
        configuration = client.Configuration(host=self.server)
        configuration.verify_ssl = not self.insecure
        if self.ca_path:
            configuration.ssl_ca_cert = self.ca_path
        if self.token_file:
            hook = TokenFile(self.token_file)
            configuration.refresh_api_key_hook = hook  # type: ignore[assignment]  # the stub says None
            hook(configuration)  # fail now, not at the first request, if the file is unreadable
        return configuration

    def token(self) -> str | None:
        """The token as of now (kopf's login handler asks again after a 401)."""
        return Path(self.token_file).read_text().strip() if self.token_file else None


def to_model(obj: dict[str, Any]) -> Any:
    """The typed model of a built-in child, or the dict itself for custom resources."""
    model = _MODELS.get((obj["apiVersion"], obj["kind"]))
    return obj if model is None else model.from_dict(obj)


class Kube:
    """Create, patch, read, list and delete the objects the operator owns; one per process, closed at exit."""

    def __init__(self, connection: Connection, user_agent: str = "p2ptrain-operator") -> None:
        self._api = client.ApiClient(connection.configuration())
        self._api.user_agent = user_agent  # tells the operator's requests from others' in audit logs and tests
        self.core = client.CoreV1Api(self._api)
        self.apps = client.AppsV1Api(self._api)
        self.batch = client.BatchV1Api(self._api)
        self.custom = client.CustomObjectsApi(self._api)

    def close(self) -> None:
        self._api.close()

    def _plain(self, model: Any) -> Any:
        return self._api.sanitize_for_serialization(model)

    async def _run(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(call, *args, **kwargs)

    async def create(self, obj: dict[str, Any]) -> bool:
        """Create ``obj``; False (not an error) when it already exists: creation is replayed."""
        key, namespace = (obj["apiVersion"], obj["kind"]), obj["metadata"]["namespace"]
        calls: dict[tuple[str, str], Callable[..., Any]] = {
            ("v1", "Secret"): self.core.create_namespaced_secret,
            ("v1", "ConfigMap"): self.core.create_namespaced_config_map,
            ("v1", "Service"): self.core.create_namespaced_service,
            ("apps/v1", "StatefulSet"): self.apps.create_namespaced_stateful_set,
            ("batch/v1", "Job"): self.batch.create_namespaced_job,
        }
        try:
            if key in _CUSTOM:
                group, version, plural = _CUSTOM[key]
                await self._run(self.custom.create_namespaced_custom_object, group, version, namespace, plural, obj)
            else:
                await self._run(calls[key], namespace, to_model(obj))
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def serves(self, group: str, version: str, plural: str) -> bool:
        """Whether the cluster serves ``plural`` in ``group/version`` (Knative's ``services``): its
        discovery document, which every authenticated user may read (system:discovery)."""
        try:
            found = await self._run(self.custom.get_api_resources, group, version)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return any(resource.name == plural for resource in found.resources or [])

    async def unserved(self, objects: list[dict[str, Any]]) -> list[str]:
        """The custom resources among ``objects`` that this cluster does not serve (``services.
        serving.knative.dev/v1`` while Knative Serving is not installed): creating them would fail."""
        kinds = {_CUSTOM[key] for obj in objects if (key := (obj["apiVersion"], obj["kind"])) in _CUSTOM}
        return sorted([f"{plural}.{group}/{version}" for group, version, plural in kinds
                       if not await self.serves(group, version, plural)])

    async def scale_stateful_set(self, namespace: str, name: str, replicas: int) -> None:
        await self._run(self.apps.patch_namespaced_stateful_set, name, namespace, {"spec": {"replicas": replicas}},
                        _content_type=MERGE_PATCH)

    async def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A batch/v1 Job as a dict (API field names), or None when it does not exist."""
        try:
            result: dict[str, Any] = self._plain(await self._run(self.batch.read_namespaced_job, name, namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return result

    async def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        pods = await self._run(self.core.list_namespaced_pod, namespace, label_selector=label_selector)
        return [self._plain(pod) for pod in pods.items]

    async def delete_training_job(self, namespace: str, name: str) -> bool:
        """Delete a P2PTrainingJob (its children follow by owner reference); False when already gone."""
        group, version, plural = _CUSTOM[("p2ptrain.dev/v1alpha1", "P2PTrainingJob")]
        try:
            await self._run(self.custom.delete_namespaced_custom_object, group, version, namespace, plural, name,
                            propagation_policy="Background")
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

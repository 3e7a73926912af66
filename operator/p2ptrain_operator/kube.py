"""A small Kubernetes REST client for the children: create (409 = already there), merge-patch, delete.

kopf watches and patches the job itself; the children are plain objects built by ``builders``, so a
generic client keyed by apiVersion/kind is all the operator needs. In a pod it uses the service
account; tests point it at an API emulator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")

PLURALS = {
    ("v1", "Secret"): "secrets",
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("apps/v1", "StatefulSet"): "statefulsets",
    ("batch/v1", "Job"): "jobs",
    ("serving.knative.dev/v1", "Service"): "services",
    ("p2ptrain.dev/v1alpha1", "P2PTrainingJob"): "p2ptrainingjobs",
}


class KubeError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class Connection:
    server: str
    token: str | None = None
    ca_path: str | None = None
    insecure: bool = False

    @classmethod
    def in_cluster(cls) -> Connection:
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        return cls(
            server=f"https://{host}:{port}",
            token=(SERVICE_ACCOUNT / "token").read_text().strip(),
            ca_path=str(SERVICE_ACCOUNT / "ca.crt"),
        )


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    plural = PLURALS[(api_version, kind)]
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{root}/namespaces/{namespace}/{plural}"


class Kube:
    def __init__(self, connection: Connection) -> None:
        headers = {"Authorization": f"Bearer {connection.token}"} if connection.token else {}
        verify: bool | str = False if connection.insecure else (connection.ca_path or True)
        self._client = httpx.AsyncClient(base_url=connection.server, headers=headers, verify=verify, timeout=30)

    async def close(self) -> None:
        await self._client.aclose()

    async def create(self, obj: dict[str, Any]) -> bool:
        """Create ``obj``; False (not an error) when it already exists — creation is replayed."""
        meta = obj["metadata"]
        response = await self._client.post(collection_path(obj["apiVersion"], obj["kind"], meta["namespace"]), json=obj)
        if response.status_code == 409:
            return False
        _check(response)
        return True

    async def patch(self, obj: dict[str, Any], patch: dict[str, Any]) -> None:
        meta = obj["metadata"]
        path = f"{collection_path(obj['apiVersion'], obj['kind'], meta['namespace'])}/{meta['name']}"
        _check(await self._client.patch(path, json=patch, headers={"Content-Type": "application/merge-patch+json"}))

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        response = await self._client.get(f"{collection_path(api_version, kind, namespace)}/{name}")
        if response.status_code == 404:
            return None
        _check(response)
        result: dict[str, Any] = response.json()
        return result

    async def list(self, api_version: str, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        response = await self._client.get(collection_path(api_version, kind, namespace), params={"labelSelector": selector})
        _check(response)
        items: list[dict[str, Any]] = response.json().get("items", [])
        return items

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        response = await self._client.delete(
            f"{collection_path(api_version, kind, namespace)}/{name}", params={"propagationPolicy": "Background"}
        )
        if response.status_code == 404:
            return False
        _check(response)
        return True


def _check(response: httpx.Response) -> None:
    if response.status_code >= 400:
        try:
            message = response.json().get("message", response.text)
        except ValueError:
            message = response.text
        raise KubeError(response.status_code, str(message)[:500])

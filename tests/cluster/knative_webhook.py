"""Knative Serving's own admission webhook (its stock ``cmd/webhook``, built by ``hack/cluster/build.sh``
from ``hack/cluster/knative``) run as a real admission webhook of the test control plane.

It runs as Knative installs it: in ``knative-serving``, as the ServiceAccount ``controller`` with
Knative's own RBAC, reading Knative's own ConfigMaps (as released: every setting at its default), and
keeping the certificate Secret ``webhook-certs``, which is made here so that its certificate also
names 127.0.0.1. Knative's stock webhook configurations are installed too and its own reconcilers fill
in their rules and CA, but they name the in-cluster Service ``webhook.knative-serving``, which the
apiserver cannot reach with no node and no cluster DNS. So they are installed inert (an object
selector no object matches), and ``admitting()`` registers copies of exactly what Knative wrote, with
one change: the webhook's loopback address (``clientConfig.url``) instead of the Service.
``KnativeWebhook`` owns its process and stops it.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import signal
import subprocess
import urllib.error
from collections.abc import Iterator, Mapping
from typing import Any

import yaml

from p2ptrain.redis_server import free_ports
from tests.cluster.controlplane import TOOLS, ControlPlane, ControlPlaneError, Process, wait_for

BINARY = TOOLS / "bin" / "knative-webhook"
# config/core of the webhook's module: namespace, RBAC, ConfigMaps, webhook configurations, Secret.
MANIFESTS = TOOLS / "cluster" / "knative-webhook"
SYSTEM_NAMESPACE = "knative-serving"
SERVICE_ACCOUNT = "controller"
FEATURES = "config-features"
ADMISSION = "/apis/admissionregistration.k8s.io/v1"
# Knative's webhook configurations (config/core/webhooks) and their collections.
STOCK = {
    "webhook.serving.knative.dev": "mutatingwebhookconfigurations",
    "validation.webhook.serving.knative.dev": "validatingwebhookconfigurations",
    "config.webhook.serving.knative.dev": "validatingwebhookconfigurations",
}
LOOPBACK_PREFIX = "loopback."
# No object carries this label: the stock configurations, which name an unreachable Service, are never called.
INERT = {"matchExpressions": [{"key": "p2ptrain.dev/knative-webhook-unreachable-by-service", "operator": "Exists"}]}
# The names Knative's certificate controller would put in the certificate, and the loopback address.
CERT_NAMES = ",".join(["IP:127.0.0.1", "DNS:webhook", f"DNS:webhook.{SYSTEM_NAMESPACE}",
                       f"DNS:webhook.{SYSTEM_NAMESPACE}.svc", f"DNS:webhook.{SYSTEM_NAMESPACE}.svc.cluster.local"])


class KnativeWebhook:
    """Knative's webhook for ``cluster``: ``start()`` installs and runs it, ``admitting()`` makes the
    apiserver call it, ``stop()`` ends it (also after a failed start)."""

    def __init__(self, cluster: ControlPlane) -> None:
        self.cluster = cluster
        self.workdir = cluster.workdir / "knative-webhook"
        self.port = 0
        self.process: Process | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        if not BINARY.exists():
            raise ControlPlaneError(f"{BINARY} is missing: `make cluster-tools` (hack/cluster/build.sh) builds it")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for manifest in ("100-namespace.yaml", "200-serviceaccount.yaml", "200-roles", "configmaps"):
            self.cluster.kubectl("apply", "--server-side", "-f", str(MANIFESTS / manifest))
        self._create_certificate_secret()
        for name, plural in STOCK.items():
            self._apply_inert(name, plural)
        token = self.cluster.service_account_token(SYSTEM_NAMESPACE, SERVICE_ACCOUNT)
        kubeconfig = self.cluster.write_kubeconfig(self.workdir / "kubeconfig", token.read_text())
        self.port, profiling, metrics = free_ports(3)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            # As config/core/deployments/webhook.yaml sets them (POD_NAME from the pod's name).
            "POD_NAME": "webhook-0", "SYSTEM_NAMESPACE": SYSTEM_NAMESPACE,
            "CONFIG_LOGGING_NAME": "config-logging", "CONFIG_OBSERVABILITY_NAME": "config-observability",
            # The stock webhook listens on every interface (":port"); only the apiserver, on loopback, calls it.
            "WEBHOOK_NAME": "webhook", "WEBHOOK_PORT": str(self.port),
            # Its other listeners (profiling, off by default; Prometheus, if metrics are turned on) on
            # free ports instead of the fixed 8008 and 9090.
            "PROFILING_PORT": str(profiling), "METRICS_PROMETHEUS_HOST": "127.0.0.1",
            "METRICS_PROMETHEUS_PORT": str(metrics),
            "KUBECONFIG": str(kubeconfig),
        }
        log = self.workdir / "webhook.log"
        with log.open("wb") as out:
            popen = subprocess.Popen([str(BINARY)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.workdir, env=env, start_new_session=True)
        self.process = Process("knative-webhook", popen, log)
        # Knative's reconcilers (run by the leader) have written the rules and the CA of each stock
        # configuration: the webhook is up, has its certificate, and is what the copies will be made from.
        for name, plural in STOCK.items():
            self._wait(lambda n=name, p=plural: self._reconciled(n, p), 120, f"Knative's webhook to reconcile {name}")

    def stop(self) -> None:
        if self.process is None:
            return
        popen = self.process.popen
        if popen.poll() is None:
            # SIGTERM starts a lame-duck drain of up to 45 s; nothing is admitted through it any more.
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout=5)
        self.process = None

    def check_alive(self) -> None:
        if self.process is not None and self.process.popen.poll() is not None:
            raise ControlPlaneError(f"knative-webhook exited with {self.process.popen.returncode}:\n{self.process.tail()}")

    def tail(self, lines: int = 30) -> str:
        return self.process.tail(lines) if self.process else "<not started>"

    # -- admission -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def admitting(self) -> Iterator[KnativeWebhook]:
        """The apiserver sends Knative's resources (and its ConfigMaps) to this webhook until the end."""
        for name, plural in STOCK.items():
            self.cluster.request("POST", f"{ADMISSION}/{plural}", self._loopback_copy(name, plural))
        try:
            # The apiserver reads webhook configurations from a watch: wait until it calls this one.
            self._wait(self._refuses_a_reserved_port, 60, "the apiserver to call Knative's webhook")
            yield self
        finally:
            for name, plural in STOCK.items():
                with contextlib.suppress(urllib.error.HTTPError):
                    self.cluster.request("DELETE", f"{ADMISSION}/{plural}/{LOOPBACK_PREFIX}{name}")

    @contextlib.contextmanager
    def features(self, flags: Mapping[str, str]) -> Iterator[None]:
        """Knative's ``config-features`` with ``flags`` set, as a cluster admin edits it (through the
        config webhook when admitting); its defaults again at the end. The webhook watches the
        ConfigMap, so callers poll for the new verdict."""
        path = f"/api/v1/namespaces/{SYSTEM_NAMESPACE}/configmaps/{FEATURES}"
        self.cluster.request("PATCH", path, {"data": dict(flags)}, content_type="application/merge-patch+json")
        try:
            yield
        finally:
            self.cluster.request("PATCH", path, {"data": dict.fromkeys(flags)}, content_type="application/merge-patch+json")

    # -- helpers -------------------------------------------------------------------------------------

    def _create_certificate_secret(self) -> None:
        """The Secret Knative's certificate controller keeps while its certificate has more than a day
        left: a CA and a serving certificate for the in-cluster names and 127.0.0.1."""
        w = self.workdir
        run = [("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7", "-subj", "/CN=knative.dev",
                "-keyout", "ca.key", "-out", "ca.crt"),
               ("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=webhook.{SYSTEM_NAMESPACE}.svc",
                "-keyout", "server.key", "-out", "server.csr")]
        for args in run:
            subprocess.run(["openssl", *args], cwd=w, check=True, capture_output=True)
        (w / "server.ext").write_text(f"subjectAltName={CERT_NAMES}\nextendedKeyUsage=serverAuth\n")
        subprocess.run(["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                        "-CAcreateserial", "-days", "7", "-extfile", "server.ext", "-out", "server.crt"],
                       cwd=w, check=True, capture_output=True)
        secret: dict[str, Any] = yaml.safe_load((MANIFESTS / "webhooks" / "secret.yaml").read_text())
        secret["stringData"] = {"server-key.pem": (w / "server.key").read_text(),
                                "server-cert.pem": (w / "server.crt").read_text(),
                                "ca-cert.pem": (w / "ca.crt").read_text()}
        self.cluster.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(secret))

    def _stock(self, name: str) -> dict[str, Any]:
        for path in sorted((MANIFESTS / "webhooks").glob("*.yaml")):
            for document in yaml.safe_load_all(path.read_text()):
                if document and document["metadata"]["name"] == name:
                    found: dict[str, Any] = document
                    return found
        raise ControlPlaneError(f"{MANIFESTS / 'webhooks'} has no webhook configuration {name}")

    def _apply_inert(self, name: str, plural: str) -> None:
        configuration = self._stock(name)
        for hook in configuration["webhooks"]:
            hook["objectSelector"] = INERT
        self.cluster.request("POST", f"{ADMISSION}/{plural}", configuration)

    def _reconciled(self, name: str, plural: str) -> bool:
        self.check_alive()
        hooks = self.cluster.request("GET", f"{ADMISSION}/{plural}/{name}")["webhooks"]
        ca = (self.workdir / "ca.crt").read_bytes()
        return all(h.get("clientConfig", {}).get("caBundle") == base64.b64encode(ca).decode() and h.get("rules")
                   for h in hooks if h["name"] == name)

    def _loopback_copy(self, name: str, plural: str) -> dict[str, Any]:
        """What Knative's reconciler wrote into its own configuration ``name``, under another name,
        with the stock object selector back and the loopback address for the Service."""
        reconciled = self.cluster.request("GET", f"{ADMISSION}/{plural}/{name}")
        stock = {h["name"]: h for h in self._stock(name)["webhooks"]}
        hooks = []
        for hook in reconciled["webhooks"]:
            hook = copy.deepcopy(hook)
            hook.pop("objectSelector", None)
            if "objectSelector" in stock[hook["name"]]:
                hook["objectSelector"] = stock[hook["name"]]["objectSelector"]
            path = hook["clientConfig"]["service"].get("path", "")
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{self.port}{path}", "caBundle": hook["clientConfig"]["caBundle"]}
            hooks.append(hook)
        return {"apiVersion": reconciled["apiVersion"], "kind": reconciled["kind"],
                "metadata": {"name": f"{LOOPBACK_PREFIX}{name}", "labels": reconciled["metadata"].get("labels", {})},
                "webhooks": hooks}

    def _refuses_a_reserved_port(self) -> bool:
        """A dry run of a Service on the queue-proxy's port 8012: only Knative's webhook refuses it."""
        self.check_alive()
        service = {"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                   "metadata": {"name": "webhook-probe", "namespace": SYSTEM_NAMESPACE},
                   "spec": {"template": {"spec": {"containers": [{"image": "probe", "ports": [{"containerPort": 8012}]}]}}}}
        try:
            self.cluster.request("POST", f"/apis/serving.knative.dev/v1/namespaces/{SYSTEM_NAMESPACE}/services?dryRun=All",
                                 service)
        except urllib.error.HTTPError as exc:
            return 'admission webhook "validation.webhook.serving.knative.dev" denied' in refusal_message(exc)
        return False

    def _wait(self, condition: Any, timeout: float, what: str) -> None:
        try:
            wait_for(condition, timeout, what, interval=0.5)
        except TimeoutError as exc:
            raise ControlPlaneError(f"{exc}:\n{self.tail()}") from exc


def refusal_message(exc: urllib.error.HTTPError) -> str:
    """The message of the API server's refusal (its Status), from the HTTPError ``ControlPlane.request``
    raises (the reply's text follows the reason), else the whole text."""
    text = str(exc.reason)
    try:
        message: str = json.loads(text[text.index("{"):])["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {exc.code}: {text}"
    return message

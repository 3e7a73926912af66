"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler, built from upstream modules by ``hack/cluster/build.sh`` into one binary.

The apiserver runs as a typical cluster's does: TLS with a generated CA, token authentication, RBAC
(no one but the test's admin is a superuser), service-account tokens signed by its own key, and the
admission plugins clusters enable (PodSecurity, OwnerReferencesPermissionEnforcement and the default
set). The controller manager runs every default controller with per-controller service accounts, so
garbage collection, StatefulSets, Jobs and service-account tokens behave as on a real cluster. By
default there is no node: pods are created and admitted but never run (``Pending``). With ``address``
set to an address pods can reach (the node tier's bridge, tests/node), the apiserver serves there,
publishes itself as the Service ``kubernetes``, authorizes kubelets (Node authorizer, NodeRestriction)
and has tokens for a kubelet, kube-proxy and CoreDNS. ``ControlPlane`` owns every process it starts
and stops them all, whatever failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from p2ptrain.redis_server import free_ports

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools"
BINARY = TOOLS / "bin" / "p2p-kube"
KUBECTL = TOOLS / "bin" / "kubectl"
HELM = TOOLS / "bin" / "helm"
UPSTREAM_CRDS = TOOLS / "cluster" / "crds"
SERVICE_CIDR = "10.96.0.0/16"
NODE_NAME = "p2ptrain-node"
NODE_USERS = {  # user: groups, for the node's components (bound by the bootstrap RBAC, CoreDNS by tests/node)
    f"system:node:{NODE_NAME}": "system:nodes",
    "system:kube-proxy": "",
    "system:p2ptrain-coredns": "",
}
T = TypeVar("T")


class ControlPlaneError(RuntimeError):
    """The control plane could not be built or started; the message names the component and its log."""


def wait_for(condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``condition`` until it returns a truthy value; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def sign_certificate(directory: Path, name: str, subject: str, extensions: str) -> None:
    """``name.key`` and ``name.crt`` signed by the test CA in ``directory`` (``make_certificates``)."""
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=directory)
    (directory / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=directory)


def make_certificates(directory: Path, address: str = "127.0.0.1") -> None:
    """A CA, the apiserver's serving certificate (for 127.0.0.1, ``address`` and the in-cluster
    names), its client certificate for kubelets, and the service-account signing key pair, with
    openssl (present on every Debian machine)."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=p2ptrain-test-ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=directory)
    names = ",".join([*dict.fromkeys([f"IP:{address}", "IP:127.0.0.1", "IP:10.96.0.1"]), "DNS:localhost",
                      "DNS:kubernetes", "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
                      "DNS:kubernetes.default.svc.cluster.local"])
    sign_certificate(directory, "apiserver", "/CN=kube-apiserver", f"subjectAltName={names}\nextendedKeyUsage=serverAuth\n")
    sign_certificate(directory, "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client",
                     "extendedKeyUsage=clientAuth\n")
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=directory)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=directory)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"


@dataclass
class ControlPlane:
    """Start with ``start()`` (or as a context manager); ``kubeconfig`` is the admin's."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="p2ptrain-cluster-")))
    processes: list[Process] = field(default_factory=list)
    admin_token: str = field(default_factory=lambda: secrets.token_hex(24))
    server: str = ""
    address: str = "127.0.0.1"
    """Where the apiserver serves; an address of the node's (not loopback) makes a node possible."""
    component_tokens: dict[str, str] = field(default_factory=dict)
    """The tokens of the users ``NODE_USERS`` name (with ``address`` set): kubelet, kube-proxy, CoreDNS."""

    @property
    def with_node(self) -> bool:
        return self.address != "127.0.0.1"

    @property
    def ca(self) -> Path:
        return self.workdir / "ca.crt"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    def __enter__(self) -> ControlPlane:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        if not BINARY.exists():
            raise ControlPlaneError(f"{BINARY} is missing: `make cluster-tools` (hack/cluster/build.sh) builds it")
        make_certificates(self.workdir, self.address)
        etcd_client, etcd_peer, apiserver, controller_manager, scheduler = free_ports(5)
        tokens = {
            self.admin_token: ("p2ptrain-test-admin", "system:masters"),
            secrets.token_hex(24): ("system:kube-controller-manager", ""),
            secrets.token_hex(24): ("system:kube-scheduler", ""),
        }
        if self.with_node:
            tokens.update({secrets.token_hex(24): (user, groups) for user, groups in NODE_USERS.items()})
        with (self.workdir / "tokens.csv").open("w") as out:
            for token, (user, groups) in tokens.items():
                out.write(f'{token},{user},{user},"{groups}"\n')
        self.server = f"https://{self.address}:{apiserver}"
        by_user = {user: token for token, (user, _) in tokens.items()}
        self.component_tokens = {user: by_user[user] for user in NODE_USERS if user in by_user}
        self.write_kubeconfig(self.kubeconfig, self.admin_token)
        self.write_kubeconfig(self.workdir / "kcm.kubeconfig", by_user["system:kube-controller-manager"])
        self.write_kubeconfig(self.workdir / "scheduler.kubeconfig", by_user["system:kube-scheduler"])
        self._spawn("etcd", [
            "--name=p2ptrain-test", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_client}", f"--advertise-client-urls=http://127.0.0.1:{etcd_client}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}", f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=p2ptrain-test=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync", "--log-level=warn",  # a throwaway store: durability is not under test
        ])
        w = self.workdir
        node = [  # kubelets: the Node authorizer and admission, and a client certificate for logs and exec
            f"--kubelet-client-certificate={w / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={w / 'apiserver-kubelet-client.key'}", "--kubelet-preferred-address-types=InternalIP",
        ] if self.with_node else [
            # Loopback cannot be an Endpoints address: the default Service `kubernetes` gets none (no pod runs here).
            "--endpoint-reconciler-type=none",
        ]
        self._spawn("kube-apiserver", [
            f"--etcd-servers=http://127.0.0.1:{etcd_client}", f"--bind-address={self.address}",
            f"--advertise-address={self.address}",
            f"--secure-port={apiserver}", f"--cert-dir={w / 'apiserver-certs'}",
            f"--tls-cert-file={w / 'apiserver.crt'}", f"--tls-private-key-file={w / 'apiserver.key'}",
            f"--client-ca-file={w / 'ca.crt'}", f"--token-auth-file={w / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC" if self.with_node else "--authorization-mode=RBAC",
            "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,"
            "PodSecurity,OwnerReferencesPermissionEnforcement,ResourceQuota,MutatingAdmissionWebhook,"
            "ValidatingAdmissionWebhook,ValidatingAdmissionPolicy" + (",NodeRestriction" if self.with_node else ""),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={w / 'sa.pub'}", f"--service-account-signing-key-file={w / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=false", "--profiling=false",
            "--enable-priority-and-fairness=false", *node,
        ])
        self.wait_ready(timeout=120)
        self._spawn("kube-controller-manager", [
            f"--kubeconfig={w / 'kcm.kubeconfig'}", "--leader-elect=false", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={w / 'sa.key'}", f"--root-ca-file={w / 'ca.crt'}",
            f"--secure-port={controller_manager}", "--bind-address=127.0.0.1", "--controllers=*",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--profiling=false",
            "--concurrent-gc-syncs=5", "--concurrent-statefulset-syncs=5",
        ])
        self._spawn("kube-scheduler", [
            f"--kubeconfig={w / 'scheduler.kubeconfig'}", "--leader-elect=false",
            f"--secure-port={scheduler}", "--bind-address=127.0.0.1", "--profiling=false",
        ])
        # The token controller runs in the controller manager: once `default` has a service account,
        # controllers (and the Pods they make, which reference it) are admitted.
        wait_for(lambda: self._default_service_account(), 120, "the controller manager to create service accounts")

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait(timeout=5)
        self.processes.clear()
        if os.environ.get("P2PTRAIN_KEEP_CLUSTER_LOGS"):
            return
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _spawn(self, name: str, args: Sequence[str]) -> None:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen([str(BINARY), name, *args], stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.workdir, start_new_session=True)
        self.processes.append(Process(name, popen, log))

    def check_alive(self) -> None:
        for process in self.processes:
            if process.popen.poll() is not None:
                raise ControlPlaneError(f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}")

    def wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            self.check_alive()
            try:
                return self.request("GET", "/readyz") is not None
            except (urllib.error.URLError, OSError):
                return False

        try:
            wait_for(ready, timeout, "kube-apiserver /readyz", interval=0.5)
        except TimeoutError as exc:
            raise ControlPlaneError(f"{exc}:\n{self.processes[-1].tail()}") from exc

    def _default_service_account(self) -> bool:
        self.check_alive()
        try:
            return bool(self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default"))
        except urllib.error.HTTPError:
            return False

    # -- clients -------------------------------------------------------------------------------------

    def write_kubeconfig(self, path: Path, token: str) -> Path:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.server, "certificate-authority": str(self.ca)}}],
            "users": [{"name": "test", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path

    def request(self, method: str, path: str, body: Any = None, token: str | None = None,
                content_type: str = "application/json") -> Any:
        """One API call as the admin (or ``token``); the decoded reply, HTTPError on a refusal."""
        context = ssl.create_default_context(cafile=str(self.ca))
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.server + path, data=data, method=method, headers={
            "Authorization": f"Bearer {token or self.admin_token}", "Content-Type": content_type,
        })
        try:
            with urllib.request.urlopen(request, context=context, timeout=30) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:  # the server's Status message, not just "422"
            detail = exc.read().decode(errors="replace")
            raise urllib.error.HTTPError(exc.url, exc.code, f"{exc.reason}: {detail}", exc.headers, None) from None
        try:
            return json.loads(payload)
        except ValueError:
            return payload.decode()

    def kubectl(self, *args: str, kubeconfig: Path | None = None, check: bool = True,
                stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(KUBECTL), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
                                input=stdin, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def helm_env(self) -> dict[str, str]:
        """Helm's environment: its caches and settings in the work directory, not the user's."""
        return {**os.environ, **{f"HELM_{kind}_HOME": str(self.workdir / "helm" / kind.lower())
                                 for kind in ("CACHE", "CONFIG", "DATA")}}

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(HELM), f"--kubeconfig={self.kubeconfig}", *args],
                                capture_output=True, text=True, timeout=timeout, env=self.helm_env())
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def service_account_token(self, namespace: str, name: str) -> Path:
        """A token of ``namespace/name`` from the TokenRequest API, in a file (as a pod would mount it)."""
        token = self.kubectl("create", "token", name, "-n", namespace, "--duration=2h").stdout.strip()
        path = self.workdir / f"token-{namespace}-{name}"
        path.write_text(token)
        return path

    @contextlib.contextmanager
    def namespace(self, name: str, labels: dict[str, str] | None = None) -> Iterator[str]:
        """A namespace of the test's (deleted at the end, without waiting for its finalization)."""
        self.request("POST", "/api/v1/namespaces",
                     {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}})
        try:
            yield name
        finally:
            with contextlib.suppress(urllib.error.HTTPError):
                self.request("DELETE", f"/api/v1/namespaces/{name}")

"""One real Kubernetes node beside the cluster tier's control plane: containerd (Debian's) with runc,
the CNI bridge plugin, kubelet and kube-proxy (from ``hack/cluster``'s binary), and CoreDNS (built by
``hack/cluster/build.sh``) as the cluster's DNS. Images come from archives, as ``kind load
image-archive`` loads them: no registry is reachable here.

Everything the node writes lives under its work directory (containerd's root and state, kubelet's
root, pod logs, the CNI configuration and the pods' network namespaces), in a cgroup of its own under
each of the machine's cgroup hierarchies (created, never remounted), on a bridge of its own
(``BRIDGE``), and in kube-proxy's own nftables table. ``stop()`` undoes all of it, whatever failed:
processes, containers, mounts, cgroups, the bridge, the rules.

The machine's facts this is built for: cgroup v1 (hybrid) mounted, which kubelet >= 1.35 refuses unless
its configuration says ``failCgroupV1: false``; no systemd (cgroupfs driver); containerd 1.6 (no
``RuntimeConfig`` call: kubelet 1.37 falls back to its own cgroup driver setting).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from p2ptrain.redis_server import free_ports
from tests.cluster.controlplane import BINARY, NODE_NAME, TOOLS, ControlPlane, Process, wait_for

BRIDGE = "p2ptrain-br0"
POD_CIDR = "10.244.0.0/24"
NODE_ADDRESS = "10.244.0.1"
"""The bridge's address: the node's InternalIP, where the apiserver serves and CoreDNS answers."""
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
COREDNS = TOOLS / "bin" / "coredns"
PAUSE = TOOLS / "bin" / "pause"
CGROUP_NAME = "p2ptrain-node"
CGROUP_ROOT = Path("/sys/fs/cgroup")


class NodeError(RuntimeError):
    """The node could not start; the message names the component and the end of its log."""


def run(*args: str | Path, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise NodeError(f"{' '.join(map(str, args))} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def missing_prerequisites() -> list[str]:
    """What the node needs from the machine and is not there (`make node-tools` installs it)."""
    needed = {"containerd": "containerd", "containerd-shim-runc-v2": "containerd", "ctr": "containerd",
              "runc": "runc", "ip": "iproute2", "nft": "nftables"}
    missing = [f"{tool} (Debian package {package})" for tool, package in needed.items() if shutil.which(tool) is None]
    missing += [f"{path} (Debian package containernetworking-plugins)"
                for path in (Path("/usr/lib/cni/bridge"), Path("/usr/lib/cni/host-local"), Path("/usr/lib/cni/loopback"))
                if not path.exists()]
    missing += [f"{path} (`make cluster-tools`)" for path in (BINARY, COREDNS, PAUSE) if not path.exists()]
    if os.geteuid() != 0:
        missing.append("root (containerd, kubelet and the bridge need it)")
    return missing


def cgroup_hierarchies() -> list[Path]:
    """Every cgroup hierarchy the machine mounts (v1 controllers and the unified one), from mountinfo."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype in ("cgroup", "cgroup2"):
            mounts.append(Path(fields[4]))
    return mounts


def pause_image_archive(path: Path) -> Path:
    """An OCI image archive of ``PAUSE`` (the sandbox image every pod starts with) named ``PAUSE_IMAGE``,
    as ``ctr images import`` takes it."""
    def blob(data: bytes) -> tuple[str, bytes]:
        return "sha256:" + hashlib.sha256(data).hexdigest(), data

    layer_tar = io.BytesIO()
    with tarfile.open(fileobj=layer_tar, mode="w") as tar:
        info = tarfile.TarInfo("pause")
        info.size, info.mode = PAUSE.stat().st_size, 0o755
        with PAUSE.open("rb") as binary:
            tar.addfile(info, binary)
    diff_id, _ = blob(layer_tar.getvalue())
    layer_digest, layer = blob(gzip.compress(layer_tar.getvalue(), mtime=0))
    config_digest, config = blob(json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }).encode())
    manifest_digest, manifest = blob(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": len(layer)}],
    }).encode())
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": len(manifest),
        "annotations": {"io.containerd.image.name": PAUSE_IMAGE, "org.opencontainers.image.ref.name": "3.10"},
    }]}).encode()
    with tarfile.open(path, "w") as out:
        entries = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": index}
        entries.update({f"blobs/sha256/{digest.split(':')[1]}": data for digest, data in
                        ((layer_digest, layer), (config_digest, config), (manifest_digest, manifest))})
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return path


@dataclass
class Node:
    """The node of ``plane`` (a ``ControlPlane`` started with ``address=NODE_ADDRESS``): ``start()``
    after the control plane, ``stop()`` before it. Make the bridge (``make_bridge()``) before the
    control plane starts: the apiserver serves on the bridge's address."""

    plane: ControlPlane
    workdir: Path = field(init=False)
    processes: list[Process] = field(default_factory=list)
    ip_forward: str = ""
    chains_before: set[tuple[str, str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.workdir = self.plane.workdir / "node"

    @property
    def socket(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    # -- the bridge and the cgroups (before the control plane) -------------------------------------------------

    @staticmethod
    def make_bridge() -> None:
        """The pods' bridge with the node's address; a bridge left by a killed run is replaced."""
        if run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
            run("ip", "link", "delete", BRIDGE)
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{NODE_ADDRESS}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")

    def _make_cgroups(self) -> None:
        for hierarchy in cgroup_hierarchies():
            mine = hierarchy / CGROUP_NAME
            _remove_cgroup(mine)
            mine.mkdir(exist_ok=True)
            for name in ("cpuset.cpus", "cpuset.mems"):  # a v1 cpuset starts empty: give it its parent's
                if (hierarchy / name).exists():
                    (mine / name).write_text((hierarchy / name).read_text())

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self, images: Sequence[Path] = ()) -> None:
        missing = missing_prerequisites()
        if missing:
            raise NodeError("the node needs: " + "; ".join(missing))
        self.workdir.mkdir(parents=True, exist_ok=True)
        forward = Path("/proc/sys/net/ipv4/ip_forward")
        self.ip_forward = forward.read_text().strip()
        forward.write_text("1")  # pods reach the apiserver's Service through the node
        self.chains_before = _kube_chains()
        self._make_cgroups()
        self._start_containerd()
        self.load_image(pause_image_archive(self.workdir / "pause.tar"))
        for image in images:
            self.load_image(image)
        self._start_coredns()
        self._start_kubelet()
        self._start_kube_proxy()  # after kubelet: it reads the node's address from the Node object
        wait_for(self._node_ready, 180, f"node {NODE_NAME} to be Ready", interval=1)

    def stop(self) -> None:
        for process in reversed(self.processes):  # kubelet first: it would restart what is killed
            if process.name != "containerd" and process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        for process in self.processes:
            if process.name != "containerd":
                _wait(process)
        if self.socket.exists():
            self._remove_containers()
        for process in self.processes:
            if process.name == "containerd" and process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
                _wait(process)
        self._kill_leftovers()
        self._unmount_all()
        # The runtime's images and the pods' files go whatever is kept for debugging (logs stay): they
        # are gigabytes on a shared disk.
        for bulky in ("containerd", "kubelet", "volumes"):
            shutil.rmtree(self.workdir / bulky, ignore_errors=True)
        for hierarchy in cgroup_hierarchies():
            _remove_cgroup(hierarchy / CGROUP_NAME)
        subprocess.run([str(BINARY), "kube-proxy", "--cleanup"], capture_output=True, timeout=60, check=False)
        _remove_chains(_kube_chains() - self.chains_before)  # kubelet's canary and firewall chains
        run("ip", "link", "delete", BRIDGE, check=False)
        if self.ip_forward:
            Path("/proc/sys/net/ipv4/ip_forward").write_text(self.ip_forward)
        self.processes.clear()

    def check_alive(self) -> None:
        for process in self.processes:
            if process.popen.poll() is not None:
                raise NodeError(f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}")

    def log(self, name: str, lines: int = 60) -> str:
        return next((p.tail(lines) for p in self.processes if p.name == name), f"<no {name}>")

    # -- images ------------------------------------------------------------------------------------------------

    def ctr(self, *args: str | Path, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ctr", f"--address={self.socket}", "--namespace=k8s.io", *args, timeout=timeout, check=check)

    def load_image(self, archive: Path) -> list[str]:
        """Import an image archive (docker-archive or OCI) into the node's runtime and unpack it, as
        ``kind load image-archive`` does; the names it holds. The layers' blobs are dropped once
        unpacked (pods run from the unpacked snapshots; nothing here pushes images): the project's
        image is 5.6 GB, and the machine's disk is shared."""
        free = shutil.disk_usage(self.workdir).free
        if free < 2.2 * archive.stat().st_size:
            raise NodeError(f"{free / 2**30:.1f} GiB free under {self.workdir}: importing {archive} "
                            f"({archive.stat().st_size / 2**30:.1f} GiB) needs about twice its size")
        before = set(self.images())
        self.ctr("images", "import", archive, timeout=1200)
        added = sorted(set(self.images()) - before)
        for image in added:
            self._drop_layer_blobs(image)
        return added

    def _drop_layer_blobs(self, image: str) -> None:
        target = self._image_target(image)
        index = json.loads(self.ctr("content", "get", target).stdout)
        manifests = [m["digest"] for m in index.get("manifests", [])] or [target]
        for digest in manifests:
            manifest = json.loads(self.ctr("content", "get", digest).stdout)
            layers = [layer["digest"] for layer in manifest.get("layers", [])]
            if layers:
                self.ctr("content", "rm", *layers)

    def _image_target(self, image: str) -> str:
        listed = self.ctr("images", "list", f"name=={image}").stdout.splitlines()[1:]
        return listed[0].split()[2]

    def images(self) -> list[str]:
        return self.ctr("images", "list", "--quiet").stdout.split()

    # -- the components ----------------------------------------------------------------------------------------

    def _spawn(self, name: str, args: Sequence[str | Path]) -> Process:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen([str(a) for a in args], stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.workdir, start_new_session=True)
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def _start_containerd(self) -> None:
        w = self.workdir
        (w / "cni").mkdir(exist_ok=True)
        (w / "cni" / "10-p2ptrain.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "p2ptrain",
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_ADDRESS}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(w / "cni" / "ipam")}},
                {"type": "loopback"},
            ],
        }))
        config = w / "containerd.toml"
        runc = os.environ.get("P2PTRAIN_NODE_RUNC")  # a wrapper of runc's, to debug the runtime
        binary = f'\n        BinaryName = "{runc}"' if runc else ""
        config.write_text(f"""version = 2
root = "{w / 'containerd' / 'root'}"
state = "{w / 'containerd' / 'state'}"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{w / 'containerd' / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  netns_mounts_under_state_dir = true
  # This machine refuses an oom_score_adj below the caller's (-998 for sandboxes, -997 for
  # Guaranteed pods): containerd clamps them to its own, as on rootless nodes.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false{binary}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{w / 'cni'}"
""")
        process = self._spawn("containerd", ["containerd", f"--config={config}", "--log-level=info"])

        def serving() -> bool:
            if process.popen.poll() is not None:
                raise NodeError(f"containerd exited with {process.popen.returncode}:\n{process.tail()}")
            return self.socket.exists() and self.ctr("version", check=False).returncode == 0

        wait_for(serving, 60, "containerd to serve", interval=0.5)

    def _kubeconfig(self, user: str) -> Path:
        return self.plane.write_kubeconfig(self.workdir / f"{user.replace(':', '-')}.kubeconfig",
                                           self.plane.component_tokens[user])

    def _start_coredns(self) -> None:
        """CoreDNS on the bridge's address (port 53): kubelet gives pods this address as their DNS.
        A cluster runs it as a Deployment behind the Service kube-dns; here it runs on the node itself,
        as the apiserver does, so no image of it is needed."""
        self.plane.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "p2ptrain-test:coredns"},
             "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"], "verbs": ["list", "watch"]},
                       {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "p2ptrain-test:coredns"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "p2ptrain-test:coredns"},
             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:p2ptrain-coredns"}]},
        ]}))
        health, ready = free_ports(2)
        kubeconfig = self._kubeconfig("system:p2ptrain-coredns")
        corefile = self.workdir / "Corefile"
        corefile.write_text(f""".:53 {{
    bind {NODE_ADDRESS}
    errors
    health 127.0.0.1:{health}
    ready 127.0.0.1:{ready}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} test
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
""")
        self._spawn("coredns", [COREDNS, "-conf", corefile])
        wait_for(lambda: self._http_ok(f"http://127.0.0.1:{ready}/ready"), 60, "CoreDNS to be ready")

    def _start_kube_proxy(self) -> None:
        metrics, health = free_ports(2)
        config = self.workdir / "kube-proxy.yaml"
        config.write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self._kubeconfig("system:kube-proxy"))},
            "hostnameOverride": NODE_NAME, "mode": "nftables", "clusterCIDR": POD_CIDR,
            "metricsBindAddress": f"127.0.0.1:{metrics}", "healthzBindAddress": f"127.0.0.1:{health}",
            # The bridge does not pass pod-to-pod packets through the node's rules by design: masquerading
            # every Service connection sends replies back through kube-proxy's rules.
            "nftables": {"masqueradeAll": True},
            "nodePortAddresses": [f"{NODE_ADDRESS}/32"],
            # Leave the machine's conntrack settings as they are.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        }))
        self._spawn("kube-proxy", [BINARY, "kube-proxy", f"--config={config}"])
        wait_for(lambda: self._http_ok(f"http://127.0.0.1:{health}/healthz"), 90, "kube-proxy to be healthy")

    def _start_kubelet(self) -> None:
        w = self.workdir
        port, health = free_ports(2)
        (w / "resolv.conf").write_text("")  # pods resolve with CoreDNS only (nothing else is reachable)
        config = w / "kubelet.yaml"
        config.write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "failCgroupV1": False, "oomScoreAdj": 0, "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{CGROUP_NAME}",
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "address": NODE_ADDRESS, "port": port, "readOnlyPort": 0, "healthzBindAddress": "127.0.0.1", "healthzPort": health,
            "tlsCertFile": str(self.plane.workdir / "apiserver.crt"), "tlsPrivateKeyFile": str(self.plane.workdir / "apiserver.key"),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.plane.ca)}},
            "authorization": {"mode": "Webhook"},
            "clusterDomain": "cluster.local", "clusterDNS": [NODE_ADDRESS], "resolvConf": str(w / "resolv.conf"),
            "podLogsDir": str(w / "pod-logs"), "failSwapOn": False,
            # The machine's disk is shared: evict only when it is really full, and never collect the
            # imported images (no registry can bring them back).
            "evictionHard": {"memory.available": "200Mi", "nodefs.available": "2%", "imagefs.available": "2%",
                             "nodefs.inodesFree": "1%", "imagefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False, "runtimeRequestTimeout": "10m",
            "syncFrequency": "10s", "fileCheckFrequency": "10s", "nodeStatusUpdateFrequency": "5s",
        }))
        self._spawn("kubelet", [
            BINARY, "kubelet", f"--config={config}", f"--kubeconfig={self._kubeconfig(f'system:node:{NODE_NAME}')}",
            f"--root-dir={w / 'kubelet'}", f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_ADDRESS}", "--v=1",
        ])

    def _http_ok(self, url: str) -> bool:
        self.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _node_ready(self) -> bool:
        self.check_alive()
        try:
            node = self.plane.request("GET", f"/api/v1/nodes/{NODE_NAME}")
        except Exception:
            return False
        return any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", []))

    # -- teardown ----------------------------------------------------------------------------------------------

    def _remove_containers(self) -> None:
        """Every container and sandbox the node's runtime still runs (kubelet is stopped: it would make
        them again)."""
        for kind in ("tasks", "containers"):
            for ident in self.ctr(kind, "list", "--quiet", check=False).stdout.split():
                if kind == "tasks":
                    self.ctr("tasks", "kill", "--signal=SIGKILL", ident, check=False)
                    time.sleep(0.1)
                    self.ctr("tasks", "delete", "--force", ident, check=False)
                else:
                    self.ctr("containers", "delete", ident, check=False)

    def _kill_leftovers(self) -> None:
        """Processes still in the node's cgroup, and the runtime's shims of this node's socket."""
        for hierarchy in cgroup_hierarchies():
            for procs in (hierarchy / CGROUP_NAME).rglob("cgroup.procs"):
                for pid in procs.read_text().split():
                    _kill(int(pid))
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    cmdline = (proc / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if cmdline and cmdline[0].endswith(b"containerd-shim-runc-v2") and str(self.socket).encode() in cmdline:
                    _kill(int(proc.name))

    def _unmount_all(self) -> None:
        """Every mount under the work directory (volumes, rootfs, network namespaces), deepest first."""
        prefix = str(self.workdir) + "/"
        points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for point in sorted({p for p in points if p.startswith(prefix)}, key=len, reverse=True):
            run("umount", "--lazy", point, check=False)


IPTABLES = ("iptables", "ip6tables")
TABLES = ("filter", "nat", "mangle")


def _kube_chains() -> set[tuple[str, str, str]]:
    """(tool, table, chain) of every ``KUBE-`` chain in the machine's iptables (kubelet makes some)."""
    chains = set()
    for tool in IPTABLES:
        for table in TABLES:
            listed = run(tool, "-t", table, "-S", check=False).stdout.splitlines()
            chains |= {(tool, table, line.split()[1]) for line in listed if line.startswith("-N KUBE-")}
    return chains


def _remove_chains(chains: set[tuple[str, str, str]]) -> None:
    """Remove ``chains``: first the rules that jump to them, then their rules, then the chains."""
    for tool, table in {(tool, table) for tool, table, _ in chains}:
        mine = {chain for t, tb, chain in chains if (t, tb) == (tool, table)}
        for line in run(tool, "-t", table, "-S", check=False).stdout.splitlines():
            words = shlex.split(line)
            if words[:1] == ["-A"] and words[1] not in mine and "-j" in words and words[words.index("-j") + 1] in mine:
                run(tool, "-t", table, "-D", *words[1:], check=False)
        for chain in mine:
            run(tool, "-t", table, "-F", chain, check=False)
        for chain in mine:
            run(tool, "-t", table, "-X", chain, check=False)


def _wait(process: Process) -> None:
    try:
        process.popen.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.popen.kill()
        process.popen.wait(timeout=10)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def _remove_cgroup(path: Path) -> None:
    """Remove a cgroup and its children (deepest first); cgroups are removed with rmdir only."""
    if not path.is_dir():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        for _ in range(50):
            try:
                child.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
    with contextlib.suppress(OSError):
        path.rmdir()

"""The Pod Security Standards "restricted" profile (latest), as a checker of a pod spec.

Ported from https://kubernetes.io/docs/concepts/security/pod-security-standards/ (the Baseline
controls, which Restricted includes, then the Restricted ones). No admission controller runs here;
``violations`` returns one message per broken control, naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Object = Mapping[str, Any]

# Baseline "Capabilities": adding beyond this list is refused; Restricted narrows it to NET_BIND_SERVICE.
RESTRICTED_ADD = frozenset({"NET_BIND_SERVICE"})
# Baseline "Sysctls": the safe set.
SAFE_SYSCTLS = frozenset({
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
})
# Restricted "Volume Types".
ALLOWED_VOLUMES = frozenset({
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
})
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
SECCOMP_OK = frozenset({"RuntimeDefault", "Localhost"})


def violations(pod: Object) -> list[str]:
    """Every "restricted" control ``pod`` (a PodSpec) breaks; empty when it complies."""
    found: list[str] = []
    pod_sc = pod.get("securityContext") or {}
    containers = [(f"{kind}[{i}]", c) for kind in ("initContainers", "containers", "ephemeralContainers")
                  for i, c in enumerate(pod.get(kind) or [])]

    # Baseline: Host Namespaces, HostProcess, Host Ports, Privileged, /proc Mount, AppArmor, SELinux, Sysctls.
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(f"spec.{key} must be unset or false")
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        found.append("spec.securityContext.windowsOptions.hostProcess must be unset or false")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            found.append(f"spec.securityContext.sysctls: {sysctl.get('name')} is not a safe sysctl")
    _selinux(found, "spec.securityContext", pod_sc)
    _apparmor(found, "spec.securityContext", pod_sc)
    for path, container in containers:
        sc = container.get("securityContext") or {}
        where = f"spec.{path}"
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{where}.securityContext.windowsOptions.hostProcess must be unset or false")
        if sc.get("privileged"):
            found.append(f"{where}.securityContext.privileged must be unset or false")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                found.append(f"{where}.ports: hostPort must be unset or 0")
        if sc.get("procMount") not in (None, "Default"):
            found.append(f"{where}.securityContext.procMount must be Default")
        _selinux(found, f"{where}.securityContext", sc)
        _apparmor(found, f"{where}.securityContext", sc)

    # Restricted: Volume Types.
    for i, volume in enumerate(pod.get("volumes") or []):
        sources = [k for k in volume if k != "name"]
        for source in sources:
            if source not in ALLOWED_VOLUMES:
                found.append(f"spec.volumes[{i}] ({volume.get('name')}): {source} volumes are not allowed")

    # Restricted: Running as Non-root, Running as Non-root user, Seccomp (pod level or every container).
    pod_nonroot = pod_sc.get("runAsNonRoot")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in SECCOMP_OK:
        found.append(f"spec.securityContext.seccompProfile.type must be RuntimeDefault or Localhost, not {pod_seccomp}")
    if pod_sc.get("runAsUser") == 0:
        found.append("spec.securityContext.runAsUser must not be 0")
    for path, container in containers:
        sc = container.get("securityContext") or {}
        where = f"spec.{path}.securityContext"
        nonroot = sc.get("runAsNonRoot", pod_nonroot)
        if nonroot is not True:
            found.append(f"{where}.runAsNonRoot must be true (here or at pod level)")
        if sc.get("runAsUser") == 0:
            found.append(f"{where}.runAsUser must not be 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in SECCOMP_OK:
            found.append(f"{where}.seccompProfile.type must be RuntimeDefault or Localhost (here or at pod level)")
        # Privilege Escalation (Linux pods): must be explicitly false.
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}.allowPrivilegeEscalation must be false")
        # Capabilities: drop ALL, add at most NET_BIND_SERVICE.
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"{where}.capabilities.drop must include ALL")
        for capability in capabilities.get("add") or []:
            if capability not in RESTRICTED_ADD:
                found.append(f"{where}.capabilities.add: {capability} is not allowed (only NET_BIND_SERVICE)")
    return found


def _selinux(found: list[str], where: str, sc: Object) -> None:
    options = sc.get("seLinuxOptions") or {}
    if options.get("type", "") not in SELINUX_TYPES:
        found.append(f"{where}.seLinuxOptions.type {options['type']} is not allowed")
    for key in ("user", "role"):
        if options.get(key):
            found.append(f"{where}.seLinuxOptions.{key} must be unset")


def _apparmor(found: list[str], where: str, sc: Object) -> None:
    profile = (sc.get("appArmorProfile") or {}).get("type")
    if profile not in (None, "RuntimeDefault", "Localhost"):
        found.append(f"{where}.appArmorProfile.type must be RuntimeDefault or Localhost, not {profile}")

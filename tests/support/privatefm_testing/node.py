"""A real node for the local control plane: containerd and runc, the kubelet, kube-scheduler and a
bridge CNI network, on this machine.

Pods run as real containers from images in containerd's ``k8s.io`` namespace (imported by
``privatefm_testing.images``; nothing is pulled). The pod network is one bridge, ``BRIDGE``, with
the gateway address ``GATEWAY``. The API server and the S3 server listen on that address, so pods
reach them and nothing outside this machine; no kube-proxy runs, so a pod that talks to the API
server is pointed at it by ``KUBERNETES_SERVICE_HOST``/``PORT``.

Everything lives under the node's state directory, except what the components write whatever
they are told (``FIXED_PATHS``: the kubelet's device-plugin directory and pod-log symlinks, the
runc shims' sockets, CNI's result cache, the network namespaces), the kernel settings the kubelet
and the bridge plugin change (``SYSCTLS``), the chains they add to iptables, and the bridge.
``HostSnapshot`` records all of that before the node starts; ``Node.stop`` stops every process,
unmounts, deletes and restores until ``residue`` finds nothing left (a test checks it).

Pitfalls met on this kind of machine, and what is done about each:
- the capability bounding set lacks CAP_SYS_RESOURCE, so containerd runs with
  ``restrict_oom_score_adj`` (otherwise every sandbox fails: "can't get final child's PID");
- the scheduler and the node-lifecycle, deployment, replicaset and endpoint(slice) controllers
  must run (``cluster.NODE_CONTROLLERS``), or pods stay Pending behind the not-ready taint;
- image garbage collection and disk-pressure eviction are turned off: the merge image is large
  and the disk is shared with everything else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BRIDGE = "privatefm0"
POD_SUBNET = "10.217.0.0/24"
GATEWAY = "10.217.0.1"
SANDBOX_IMAGE = "localhost/privatefm/pause:1"
CNI_BIN = Path("/usr/lib/cni")
# Written by the components whatever they are configured to use.
FIXED_PATHS = ("/var/lib/kubelet", "/var/log/containers", "/var/log/pods", "/run/containerd",
               "/var/lib/cni", "/etc/cni", "/run/netns")
# The kubelet sets the first six at start (its "kernel tunables"); the bridge plugin turns on
# forwarding for its gateway.
SYSCTLS = ("vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
           "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes", "net.ipv4.ip_forward",
           f"net.ipv4.conf.{BRIDGE}.forwarding")
OUR_CHAIN_PREFIXES = ("KUBE-", "CNI-")
DEBIAN_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "nftables", "buildah",
                   "mmdebstrap")


def run(args: Sequence[str | Path], check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True, **kw)


def sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctl(name: str) -> str | None:
    try:
        return sysctl_path(name).read_text().strip()
    except OSError:
        return None


def iptables_chains() -> set[str]:
    """Every chain in every table, as ``family:table:chain``."""
    chains = set()
    for family in ("iptables", "ip6tables"):
        if not shutil.which(f"{family}-save"):
            continue
        table = ""
        for line in run([f"{family}-save"], check=False).stdout.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":"):
                chains.add(f"{family}:{table}:{line[1:].split()[0]}")
    return chains


def mounts_under(prefixes: Sequence[str]) -> list[str]:
    """Mount points at or below any of ``prefixes``, deepest first."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == p or point.startswith(p.rstrip("/") + "/") for p in prefixes):
            points.append(point)
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def netns_names() -> set[str]:
    return {p.name for p in Path("/run/netns").iterdir()} if Path("/run/netns").is_dir() else set()


def cgroup_dirs() -> set[str]:
    """Top-level cgroups a node makes (``kubepods``, containerd's ``k8s.io``), per hierarchy."""
    found = set()
    root = Path("/sys/fs/cgroup")
    for hierarchy in [root, *(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []:
        for name in ("kubepods", "kubepods.slice", "k8s.io"):
            if (hierarchy / name).is_dir():
                found.add(str(hierarchy / name))
    return found


@dataclass
class HostSnapshot:
    """What the machine looked like before a node started: what ``Node.stop`` restores."""

    paths: dict[str, bool]
    sysctls: dict[str, str | None]
    chains: list[str]
    netns: list[str]
    cgroups: list[str]
    bridge: bool

    @classmethod
    def take(cls) -> HostSnapshot:
        return cls(paths={p: os.path.lexists(p) for p in FIXED_PATHS},
                   sysctls={s: read_sysctl(s) for s in SYSCTLS}, chains=sorted(iptables_chains()),
                   netns=sorted(netns_names()), cgroups=sorted(cgroup_dirs()), bridge=link_exists(BRIDGE))

    @classmethod
    def load(cls, path: Path) -> HostSnapshot:
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))


def residue(before: HostSnapshot, state_dir: Path, pids: Sequence[int] = ()) -> list[str]:
    """What a node left behind on this machine compared with ``before``: empty when it left
    nothing (processes, mounts, the bridge, iptables chains, network namespaces, cgroups, paths,
    kernel settings)."""
    from privatefm_testing.cluster import pid_alive

    left = [f"process {pid} still running" for pid in pids if pid_alive(pid)]
    left += [f"process {pid} ({name}) of ours still running" for pid, name in our_processes(state_dir)]
    left += [f"mount {m}" for m in mounts_under([str(state_dir), str(socket_dir(state_dir)), *FIXED_PATHS])]
    if link_exists(BRIDGE) and not before.bridge:
        left.append(f"bridge {BRIDGE}")
    left += [f"iptables chain {c}" for c in sorted(iptables_chains() - set(before.chains))]
    left += [f"network namespace {n}" for n in sorted(netns_names() - set(before.netns))]
    left += [f"cgroup {c}" for c in sorted(cgroup_dirs() - set(before.cgroups))]
    left += [f"path {p}" for p, existed in before.paths.items() if not existed and os.path.lexists(p)]
    if socket_dir(state_dir).exists():
        left.append(f"path {socket_dir(state_dir)}")
    left += [f"sysctl {s} is {read_sysctl(s)}, was {v}" for s, v in before.sysctls.items()
             if v is not None and read_sysctl(s) != v]
    return left


def socket_dir(state_dir: Path) -> Path:
    """Where the sockets go (containerd's, and the kubelet's root directory, which holds its own): a
    short path of its own, since a unix socket's path may not pass 104 bytes and a state directory
    under pytest's temporary root is longer. Named after the state directory, so that another
    process finds it."""
    return Path("/tmp") / f"privatefm-node-{hashlib.sha256(str(state_dir).encode()).hexdigest()[:10]}"


def our_processes(state_dir: Path) -> list[tuple[int, str]]:
    """Processes whose command line names the node's state or socket directory (containerd, its
    shims, the kubelet), found by scanning /proc: the shims leave containerd's process group on
    purpose."""
    mine = []
    needles = (str(state_dir).encode(), str(socket_dir(state_dir)).encode())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes()
            if any(needle in cmdline for needle in needles):
                mine.append((int(entry.name), cmdline.split(b"\0", 1)[0].decode(errors="replace")))
    return mine


@dataclass
class NodeConfig:
    """Where a node's components reach the control plane."""

    server: str              # the API server, as the kubelet and scheduler reach it
    admin_kubeconfig: Path   # for the scheduler (and for waiting on the node)
    node_token: str          # the kubelet's bearer token (user system:node:<name>)
    kubelet_ca: Path         # CA of the API server's client certificate for the kubelet API
    apiserver_ca: Path       # CA that signed the API server's serving certificate
    name: str = field(default_factory=socket.gethostname)


class Node:
    """containerd + kubelet + kube-scheduler for one LocalCluster. ``prepare`` (before the API
    server starts: the bridge it listens on), then ``start``; ``stop`` undoes both."""

    def __init__(self, directory: Path, bin_dir: Path, containerd_root: Path) -> None:
        self.dir = directory.resolve()
        self.bin = bin_dir
        self.containerd_root = containerd_root  # kept between runs: imported images stay
        self.sockets = socket_dir(self.dir)
        self.sock = self.sockets / "containerd.sock"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.snapshot_file = self.dir / "host-before.json"

    # ---- host preparation ------------------------------------------------------------------
    def prepare(self) -> None:
        """Records the machine's state, then makes the bridge (CNI's bridge plugin adopts it)."""
        missing = [b for b in ("containerd", "runc", "iptables", "ctr") if not shutil.which(b)]
        if missing or not (CNI_BIN / "bridge").exists():
            raise RuntimeError(f"the node needs Debian's {' '.join(DEBIAN_PACKAGES)} (missing: "
                               f"{' '.join(missing) or CNI_BIN / 'bridge'}); scripts/setup.sh installs them")
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.snapshot_file.exists():
            HostSnapshot.take().save(self.snapshot_file)
        if not link_exists(BRIDGE):
            run(["ip", "link", "add", BRIDGE, "type", "bridge"])
            run(["ip", "addr", "add", f"{GATEWAY}/{POD_SUBNET.split('/')[1]}", "dev", BRIDGE])
            run(["ip", "link", "set", BRIDGE, "up"])

    # ---- start -----------------------------------------------------------------------------
    def start(self, config: NodeConfig, spawn: Callable[[str, Sequence[str | Path]], subprocess.Popen[bytes]],
              timeout: float = 120.0) -> None:
        self.config = config
        self._spawn = spawn
        self._start_containerd(timeout)
        self._start_scheduler(config)
        self._start_kubelet(config)

    def _start_containerd(self, timeout: float) -> None:
        d = self.dir / "containerd"
        (self.dir / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        d.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(mode=0o700, exist_ok=True)
        self.containerd_root.mkdir(parents=True, exist_ok=True)
        (self.dir / "cni" / "net.d" / "10-privatefm.conflist").write_text(json.dumps(cni_config(self.dir), indent=2))
        (d / "config.toml").write_text(containerd_config(self.containerd_root, d, self.sockets, self.dir / "cni"))
        self.procs["containerd"] = self._spawn("containerd", ["containerd", "--config", d / "config.toml"])
        deadline = time.monotonic() + timeout
        while run(["ctr", "--address", self.sock, "version"], check=False).returncode != 0:
            if self.procs["containerd"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start; see {self.dir.parent}/logs/containerd.log")
            time.sleep(0.2)

    def ctr(self, *args: str | Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return run(["ctr", "--address", self.sock, "-n", "k8s.io", *args], check=check, timeout=timeout)

    def _start_scheduler(self, config: NodeConfig) -> None:
        from privatefm_testing.cluster import free_port

        self.procs["kube-scheduler"] = self._spawn("kube-scheduler", [
            self.bin / "kube-scheduler", "--kubeconfig", config.admin_kubeconfig,
            "--authentication-kubeconfig", config.admin_kubeconfig,
            "--authorization-kubeconfig", config.admin_kubeconfig,
            "--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", str(free_port()), "--v", "1",
        ])

    def _start_kubelet(self, config: NodeConfig) -> None:
        from privatefm_testing.cluster import free_port, kubeconfig_yaml

        k = self.dir / "kubelet"
        k.mkdir(parents=True, exist_ok=True)
        kubeconfig = k / "kubelet.kubeconfig"
        kubeconfig.write_text(kubeconfig_yaml(config.server, config.node_token, str(config.apiserver_ca),
                                              name=f"system:node:{config.name}"))
        self.healthz_port = free_port()
        (k / "config.yaml").write_text(json.dumps(kubelet_config(
            self.sock, config.kubelet_ca, self.dir / "pod-logs", port=free_port(), healthz_port=self.healthz_port),
            indent=2))
        self.procs["kubelet"] = self._spawn("kubelet", [
            self.bin / "kubelet", "--config", k / "config.yaml", "--kubeconfig", kubeconfig,
            "--root-dir", self.sockets / "kubelet", "--hostname-override", config.name, "--node-ip", GATEWAY,
            "--v", "1",
        ])

    def wait_ready(self, kubectl: Callable[..., str], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for proc in ("containerd", "kubelet", "kube-scheduler"):
                if self.procs[proc].poll() is not None:
                    raise RuntimeError(f"{proc} exited; see {self.dir.parent}/logs/{proc}.log")
            with contextlib.suppress(subprocess.CalledProcessError):
                last = kubectl("get", "node", self.config.name, "-o",
                               "jsonpath={.status.conditions[?(@.type=='Ready')].status}")
                if last == "True":
                    return
            time.sleep(0.5)
        raise TimeoutError(f"node {self.config.name} not Ready after {timeout}s (Ready={last!r}); "
                           f"see {self.dir.parent}/logs/kubelet.log")

    # ---- stop ------------------------------------------------------------------------------
    def stop(self, pids: dict[str, int], stop_pids: Callable[[Sequence[int], float], None]) -> list[str]:
        """Stops the node and puts the machine back as ``prepare`` found it; returns what is left."""
        for name in ("kubelet", "kube-scheduler"):
            if name in pids:
                stop_pids([pids[name]], 10.0)
        if "containerd" in pids and self.sock.exists():
            self._remove_containers()
        if "containerd" in pids:
            stop_pids([pids["containerd"]], 10.0)
        for pid, _ in our_processes(self.dir):  # shims of containers that would not go
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        before = HostSnapshot.load(self.snapshot_file) if self.snapshot_file.exists() else None
        self._unmount()
        shutil.rmtree(self.sockets, ignore_errors=True)  # after the unmounts: the kubelet's root is there
        if before is not None:
            self._restore(before)
        return residue(before, self.dir) if before is not None else []

    def _remove_containers(self) -> None:
        """Kills every task and deletes every container in containerd (pods and their sandboxes)."""
        containers = self.ctr("containers", "ls", "-q", check=False, timeout=30).stdout.split()
        for cid in containers:
            self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False, timeout=30)
        deadline = time.monotonic() + 15
        for cid in containers:
            # A killed task is deleted once it has exited; a task that never started is not found.
            while self.ctr("tasks", "delete", cid, check=False, timeout=30).returncode != 0 \
                    and cid in self.ctr("tasks", "ls", "-q", check=False, timeout=30).stdout.split() \
                    and time.monotonic() < deadline:
                time.sleep(0.3)
            self.ctr("containers", "delete", cid, check=False, timeout=30)

    def _unmount(self) -> None:
        created_netns = set()
        if self.snapshot_file.exists():
            created_netns = netns_names() - set(HostSnapshot.load(self.snapshot_file).netns)
        for point in mounts_under([str(self.dir), str(self.sockets), str(self.containerd_root), *FIXED_PATHS]):
            if point.startswith("/run/netns/") and Path(point).name not in created_netns:
                continue
            run(["umount", "-l", point], check=False)
        for name in created_netns:
            with contextlib.suppress(OSError):
                Path("/run/netns", name).unlink()

    def _restore(self, before: HostSnapshot) -> None:
        if link_exists(BRIDGE) and not before.bridge:
            run(["ip", "link", "delete", BRIDGE], check=False)
        remove_chains(set(iptables_chains()) - set(before.chains))
        remove_new_tables(before.chains)
        for name, value in before.sysctls.items():
            if value is not None and read_sysctl(name) not in (None, value):
                with contextlib.suppress(OSError):
                    sysctl_path(name).write_text(value)
        for cgroup in sorted(set(cgroup_dirs()) - set(before.cgroups), key=len, reverse=True):
            for sub in sorted(Path(cgroup).glob("**/"), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    sub.rmdir()
        for path, existed in before.paths.items():
            if not existed and os.path.lexists(path):
                shutil.rmtree(path, ignore_errors=True)


def remove_chains(chains: set[str]) -> None:
    """Flushes, unhooks and deletes ``family:table:chain`` chains (ours only)."""
    ours = [c for c in chains if c.split(":")[2].startswith(OUR_CHAIN_PREFIXES)]
    for family_table in sorted({c.rsplit(":", 1)[0] for c in ours}):
        family, table = family_table.split(":")
        names = {c.split(":")[2] for c in ours if c.startswith(family_table + ":")}
        # Rules in other chains that jump to ours go first.
        for line in run([f"{family}-save", "-t", table], check=False).stdout.splitlines():
            parts = line.split()
            if line.startswith("-A ") and "-j" in parts and parts[parts.index("-j") + 1] in names \
                    and parts[1] not in names:
                run([family, "-t", table, "-D", *parts[1:]], check=False)
        for name in names:
            run([family, "-t", table, "-F", name], check=False)
        for name in names:
            run([family, "-t", table, "-X", name], check=False)


def remove_new_tables(before: Sequence[str]) -> None:
    """Deletes the iptables tables that did not exist before the node started and now hold no rule.
    On a fresh machine the first iptables call (the kubelet's, the bridge plugin's) creates its
    table with empty built-in chains, which no iptables command deletes; with the nf_tables backend
    ``nft`` does. (The legacy backend's tables are kernel modules, left loaded.)"""
    if not shutil.which("nft"):
        return
    existed = {c.rsplit(":", 1)[0] for c in before}
    for family, nft_family in (("iptables", "ip"), ("ip6tables", "ip6")):
        if not shutil.which(f"{family}-save") or "nf_tables" not in run([family, "-V"], check=False).stdout:
            continue
        for table in ("filter", "nat", "mangle", "raw", "security"):
            if f"{family}:{table}" in existed:
                continue
            lines = run([f"{family}-save", "-t", table], check=False).stdout.splitlines()
            if any(line.startswith(":") for line in lines) and not any(line.startswith("-A ") for line in lines):
                run(["nft", "delete", "table", nft_family, table], check=False)


def cni_config(directory: Path) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0", "name": "privatefm",
        "plugins": [{
            "type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET, "gateway": GATEWAY}]],
                     "routes": [{"dst": POD_SUBNET}], "dataDir": str(directory / "cni" / "ipam")},
        }],
    }


def containerd_config(root: Path, d: Path, sockets: Path, cni: Path) -> str:
    return f"""version = 2
root = "{root}"
state = "{d / 'state'}"
[grpc]
  address = "{sockets / 'containerd.sock'}"
[ttrpc]
  address = "{sockets / 'containerd.sock.ttrpc'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  # This machine's capability bounding set lacks CAP_SYS_RESOURCE.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{cni / 'net.d'}"
"""


def kubelet_config(sock: Path, client_ca: Path, pod_logs: Path, port: int, healthz_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{sock}",
        "address": GATEWAY, "port": port, "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": healthz_port,
        # Only the API server (its client certificate) may use the kubelet's API.
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                           "x509": {"clientCAFile": str(client_ca)}},
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs", "cgroupsPerQOS": False, "enforceNodeAllocatable": [],
        "failSwapOn": False, "failCgroupV1": False,
        "podLogsDir": str(pod_logs),
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "0%", "imagefs.available": "0%",
                         "nodefs.inodesFree": "0%"},
        "serializeImagePulls": False,
        "nodeStatusUpdateFrequency": "2s", "syncFrequency": "5s",
        "fileCheckFrequency": "5s", "resolvConf": "/etc/resolv.conf",
        # No DNS server runs; pods reach the API server and the store by address. Naming one keeps
        # the kubelet from warning about every pod (MissingClusterDNS); lookups fail fast.
        "clusterDNS": [GATEWAY], "clusterDomain": "cluster.local",
    }

"""A cluster of Ray nodes in Linux network namespaces on this machine, with real addresses and
rate-limited links between them.

Owns: the namespaces, the bridge and the veth links it creates, the ``tc tbf`` limits on them, the
Ray processes started inside, a state file that lets ``down`` remove all of it after a crash, and
the per-link byte counters. Layout of one cluster (id ``ID``, 4 hex digits, unique on the machine):

    netns mtnc-ID-br : bridge ``mbID`` (no address), one veth end per node ``mID-N``
    netns mtnc-ID-nK : veth ``mID-nK`` with 198.18.S.(K+1)/24, ``lo``; a Ray node (n0 = head)
    netns mtnc-ID-cK : veth ``mID-cK`` with 198.18.S.(101+K)/24; no Ray (clients, an S3 server)

Addresses come only from 198.18.0.0/15 (reserved for network benchmarks), one /24 per cluster;
the namespaces have no default route and nothing touches the host namespace's interfaces, so no
traffic can leave the machine. Each link is limited in both directions (egress of both veth
ends) by ``tbf``; the counters of the bridge-side ends are the bytes each node sent and received.

    python scripts/tools/netcluster.py up --nodes 2 --cpus 1 --rate-mbit 100   # prints JSON
    python scripts/tools/netcluster.py exec ID n1 -- python -c "import socket; print(socket.gethostname())"
    python scripts/tools/netcluster.py bytes ID
    python scripts/tools/netcluster.py down ID          # or: down --all
    with NetCluster(nodes=2, cpus_per_node=1) as nc: nc.run("n0", [...])

Ray runs from this checkout's ``.venv`` with ``PYTHONPATH`` set to the checkout. ``down`` ends the
processes inside the cluster's namespaces (every one of them was started by this module: Ray's
daemons, their workers, and what ``exec``/``spawn`` ran there), by PID with SIGKILL, then deletes
the namespaces; it never calls ``ray stop``. Needs root and ``ip netns``; without them
:func:`unavailable_reason` says so in one line (tests skip with it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.helpers import REPO  # noqa: E402

VENV_BIN = REPO / ".venv" / "bin"
STATE_ROOT = Path(os.environ.get("NETCLUSTER_STATE_DIR", "/tmp/mtnc"))  # short: Ray's socket paths
PREFIX = "mtnc-"
SUBNETS = 512  # 198.18.0.0/24 .. 198.19.255.0/24
RAY_PORT, DASHBOARD_PORT = 6379, 8265
OBJECT_STORE_BYTES = 100_000_000
CLIENT_HOST_BASE = 101
TBF_LATENCY = "50ms"
# Dummy credentials of the in-cluster S3 server (moto accepts any); never real ones.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


class NetClusterError(RuntimeError):
    pass


def unavailable_reason() -> str | None:
    """One line saying why namespace clusters cannot run here, or None if they can."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        return "netcluster needs Linux network namespaces"
    if os.geteuid() != 0:
        return "netcluster needs root (ip netns / veth / tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"netcluster needs the '{tool}' command (iproute2)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"'ip netns' does not work here: {probe.stderr.strip()[:200]}"
    if not (VENV_BIN / "ray").exists():
        return f"netcluster needs Ray in {VENV_BIN} (run scripts/setup.sh)"
    return None


@dataclasses.dataclass(frozen=True)
class Node:
    name: str  # n0 (head), n1, ... or c0, c1, ... (clients)
    netns: str
    ifname: str  # inside the node's namespace
    peer_ifname: str  # the bridge-side end, in the bridge namespace
    address: str
    ray: bool
    temp_dir: str  # the Ray node's --temp-dir (and TMPDIR of what runs there)


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    id: str
    subnet: str  # "198.18.S.0/24"
    bridge_netns: str
    bridge_ifname: str
    nodes: tuple[Node, ...]
    cpus_per_node: int
    rate_mbit: float  # 0 = unlimited
    auth: str  # "disabled" | "token"
    token_path: str  # "" unless auth == "token"
    dashboard: bool
    gloo_ifname: bool  # GLOO_SOCKET_IFNAME set by hand on each Ray node to its own interface
    state_dir: str

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def ray_address(self) -> str:
        return f"{self.head.address}:{RAY_PORT}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head.address}:{DASHBOARD_PORT}" if self.dashboard else ""

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise NetClusterError(f"cluster {self.id} has no node {name!r} (it has {[n.name for n in self.nodes]})")

    def ray_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.ray]

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(ray_address=self.ray_address, dashboard_url=self.dashboard_url)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ClusterInfo":
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        d["nodes"] = tuple(Node(**n) for n in d["nodes"])
        return cls(**d)


def _sh(argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise NetClusterError(f"{' '.join(argv)} failed ({p.returncode}): {(p.stderr or p.stdout).strip()[:500]}")
    return p


def _netns_list() -> list[str]:
    return [line.split()[0] for line in _sh(["ip", "netns", "list"]).stdout.splitlines() if line.strip()]


@contextlib.contextmanager
def _state_lock():
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(STATE_ROOT / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _used_subnets() -> set[int]:
    used = set()
    for state in STATE_ROOT.glob("*/state.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            used.add(json.loads(state.read_text())["subnet_index"])
    return used


def _subnet(index: int) -> tuple[str, str]:
    """(prefix "198.18.S" or "198.19.S", the /24 in CIDR) of subnet ``index``."""
    prefix = f"198.{18 + index // 256}.{index % 256}"
    return prefix, f"{prefix}.0/24"


def _burst_bytes(rate_mbit: float) -> int:
    # tbf needs burst >= rate / HZ and >= one GSO super-packet (64 KiB) on veth.
    return max(128 * 1024, int(rate_mbit * 1e6 / 8 / 100))


class NetCluster:
    """``up()`` builds the cluster (or use it as a context manager), ``down()`` removes it."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, rate_mbit: float = 0.0, clients: int = 0,
                 auth: str = "disabled", dashboard: bool = False, gloo_ifname: bool = False,
                 env: dict[str, str] | None = None, system_config: dict | None = None):
        if cpus_per_node < 1:
            raise NetClusterError(f"cpus_per_node ({cpus_per_node}) must be an integer >= 1 (ray start --num-cpus)")
        if nodes < 1 or clients < 0 or nodes + clients > 99:
            raise NetClusterError(f"nodes ({nodes}) must be >= 1 and nodes + clients ({nodes + clients}) <= 99")
        if auth not in ("disabled", "token"):
            raise NetClusterError(f"auth ({auth!r}) must be 'disabled' or 'token'")
        if rate_mbit < 0:
            raise NetClusterError(f"rate_mbit ({rate_mbit}) must be >= 0 (0 = unlimited)")
        self.spec = dict(nodes=nodes, cpus_per_node=cpus_per_node, rate_mbit=rate_mbit, clients=clients,
                         auth=auth, dashboard=dashboard, gloo_ifname=gloo_ifname)
        self.extra_env = dict(env or {})
        self.system_config = dict(system_config or {})  # the head's Ray --system-config (e.g. health checks)
        self.info: ClusterInfo | None = None

    # ---- building -----------------------------------------------------------------------
    def __enter__(self) -> "NetCluster":
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> ClusterInfo:
        reason = unavailable_reason()
        if reason:
            raise NetClusterError(reason)
        with _state_lock():
            existing = {n.split("-")[1] for n in _netns_list() if n.startswith(PREFIX)}
            cid = secrets.token_hex(2)
            while cid in existing or (STATE_ROOT / cid).exists():
                cid = secrets.token_hex(2)
            used = _used_subnets()
            index = next((i for i in range(SUBNETS) if i not in used), None)
            if index is None:
                raise NetClusterError(f"all {SUBNETS} subnets of 198.18.0.0/15 are in use (see {STATE_ROOT})")
            state_dir = STATE_ROOT / cid
            state_dir.mkdir(parents=True)
            self.info = self._plan(cid, index, state_dir)
            self._save(index)
        try:
            self._build_network()
            self._start_ray()
        except BaseException:
            self.down()
            raise
        return self.info

    def _plan(self, cid: str, index: int, state_dir: Path) -> ClusterInfo:
        s = self.spec
        prefix, cidr = _subnet(index)
        nodes = []
        names = [(f"n{k}", f"{prefix}.{k + 1}", True) for k in range(s["nodes"])]
        names += [(f"c{k}", f"{prefix}.{CLIENT_HOST_BASE + k}", False) for k in range(s["clients"])]
        for name, addr, is_ray in names:
            tmp = state_dir / name
            nodes.append(Node(name=name, netns=f"{PREFIX}{cid}-{name}", ifname=f"m{cid}-{name}",
                              peer_ifname=f"m{cid}-{name}b", address=addr, ray=is_ray, temp_dir=str(tmp)))
        token_path = str(state_dir / "auth_token") if s["auth"] == "token" else ""
        return ClusterInfo(id=cid, subnet=cidr, bridge_netns=f"{PREFIX}{cid}-br", bridge_ifname=f"mb{cid}",
                           nodes=tuple(nodes), cpus_per_node=s["cpus_per_node"], rate_mbit=s["rate_mbit"],
                           auth=s["auth"], token_path=token_path, dashboard=s["dashboard"],
                           gloo_ifname=s["gloo_ifname"], state_dir=str(state_dir))

    def _save(self, subnet_index: int) -> None:
        d = self.info.to_json()
        d["subnet_index"] = subnet_index
        d["creator_pid"] = os.getpid()
        path = Path(self.info.state_dir) / "state.json"
        path.with_suffix(".tmp").write_text(json.dumps(d, indent=1))
        path.with_suffix(".tmp").replace(path)

    def _build_network(self) -> None:
        info = self.info
        br, bridge = info.bridge_netns, info.bridge_ifname
        _sh(["ip", "netns", "add", br])
        _sh(["ip", "-n", br, "link", "set", "lo", "up"])
        _sh(["ip", "-n", br, "link", "add", bridge, "type", "bridge"])
        _sh(["ip", "-n", br, "link", "set", bridge, "up"])
        for n in info.nodes:
            _sh(["ip", "netns", "add", n.netns])
            # Both veth ends are created in the bridge namespace / moved into the node's at once:
            # the host namespace never sees them.
            _sh(["ip", "-n", br, "link", "add", n.peer_ifname, "type", "veth", "peer", "name", n.ifname,
                 "netns", n.netns])
            _sh(["ip", "-n", br, "link", "set", n.peer_ifname, "master", bridge])
            _sh(["ip", "-n", br, "link", "set", n.peer_ifname, "up"])
            _sh(["ip", "-n", n.netns, "addr", "add", f"{n.address}/24", "dev", n.ifname])
            _sh(["ip", "-n", n.netns, "link", "set", n.ifname, "up"])
            _sh(["ip", "-n", n.netns, "link", "set", "lo", "up"])
            Path(n.temp_dir).mkdir(parents=True, exist_ok=True)
        if info.rate_mbit:
            self.set_rate(info.rate_mbit)
        if info.auth == "token":
            Path(info.token_path).write_text(secrets.token_hex(32))
            os.chmod(info.token_path, 0o600)

    def set_rate(self, rate_mbit: float) -> None:
        """Limit every link to ``rate_mbit`` in both directions (0 removes the limits)."""
        for n in self.info.nodes:
            for ns, dev in ((n.netns, n.ifname), (self.info.bridge_netns, n.peer_ifname)):
                _sh(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
                if rate_mbit:
                    _sh(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate_mbit:g}mbit",
                         "burst", str(_burst_bytes(rate_mbit)), "latency", TBF_LATENCY])
        self.info = dataclasses.replace(self.info, rate_mbit=rate_mbit)

    # ---- processes ----------------------------------------------------------------------
    def env(self, node: str) -> dict[str, str]:
        """The environment of processes in ``node``: this checkout's venv and code, the cluster's
        auth mode (and token), the Ray address, TMPDIR in the node's folder, no cloud probes."""
        info, n = self.info, self.info.node(node)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_", "GLOO_SOCKET_IFNAME"))}
        env.pop("RAY_ADDRESS", None)
        env.update(PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}", VIRTUAL_ENV=str(VENV_BIN.parent),
                   PYTHONPATH=str(REPO), TMPDIR=n.temp_dir, RAY_TMPDIR=n.temp_dir, RAY_AUTH_MODE=info.auth,
                   RAY_USAGE_STATS_ENABLED="0", AWS_EC2_METADATA_DISABLED="true", NETCLUSTER_NODE=n.name)
        if info.auth == "token":
            env["RAY_AUTH_TOKEN_PATH"] = info.token_path
        if info.gloo_ifname and n.ray:
            env["GLOO_SOCKET_IFNAME"] = n.ifname
        env.update(self.extra_env)
        return env

    def _argv(self, node: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.info.node(node).netns, *argv]

    def run(self, node: str, argv: list[str], env: dict[str, str] | None = None, timeout: float | None = None,
            check: bool = False, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` in ``node``'s namespace and wait; output captured as text."""
        full_env = {**self.env(node), **(env or {})}
        p = subprocess.run(self._argv(node, argv), env=full_env, capture_output=True, text=True, timeout=timeout,
                           cwd=cwd or REPO)
        if check and p.returncode != 0:
            raise NetClusterError(f"[{node}] {' '.join(argv)} exited {p.returncode}: "
                                  f"{(p.stderr or p.stdout).strip()[-2000:]}")
        return p

    def spawn(self, node: str, argv: list[str], log_path: str | os.PathLike, env: dict[str, str] | None = None,
              cwd: str | os.PathLike | None = None) -> subprocess.Popen:
        """Start ``argv`` in ``node``'s namespace in the background, output to ``log_path``
        (``down`` ends it with the namespace)."""
        log = open(log_path, "wb")  # never a pipe: a full pipe would block the process
        try:
            return subprocess.Popen(self._argv(node, argv), env={**self.env(node), **(env or {})}, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=cwd or REPO, start_new_session=True)
        finally:
            log.close()

    def _ray_start_argv(self, n: Node) -> list[str]:
        info = self.info
        argv = [str(VENV_BIN / "ray"), "start", "--node-ip-address", n.address, "--temp-dir", n.temp_dir,
                "--object-store-memory", str(OBJECT_STORE_BYTES), "--num-cpus", str(info.cpus_per_node),
                "--disable-usage-stats"]
        if n is info.head:
            argv += ["--head", "--port", str(RAY_PORT), "--include-dashboard", str(info.dashboard).lower()]
            if self.system_config:
                argv += ["--system-config", json.dumps(self.system_config)]
            if info.dashboard:
                argv += ["--dashboard-host", n.address, "--dashboard-port", str(DASHBOARD_PORT)]
        else:
            argv += ["--address", info.ray_address]
        return argv

    def _start_ray(self, timeout_s: float = 120.0) -> None:
        info = self.info
        self.run(info.head.name, self._ray_start_argv(info.head), timeout=timeout_s, check=True)
        workers = [n for n in info.ray_nodes() if n is not info.head]
        procs = [(n, subprocess.Popen(self._argv(n.name, self._ray_start_argv(n)), env=self.env(n.name),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO))
                 for n in workers]
        for n, p in procs:
            out, _ = p.communicate(timeout=timeout_s)
            if p.returncode != 0:
                raise NetClusterError(f"[{n.name}] ray start exited {p.returncode}: {out.strip()[-1500:]}")
        self.wait_for_nodes(len(info.ray_nodes()), timeout_s)

    def wait_for_nodes(self, count: int, timeout_s: float = 60.0) -> None:
        """Wait until the head's GCS lists ``count`` alive Ray nodes."""
        code = ("import sys, time, ray\n"
                "from ray._raylet import GcsClient\n"
                f"c = GcsClient(address={self.info.ray_address!r})\n"
                f"end = time.time() + {timeout_s}\n"
                "while True:\n"
                "    alive = sum(1 for n in c.get_all_node_info().values() if n.state == 0)\n"
                f"    if alive == {count} or time.time() > end: print(alive); break\n"
                "    time.sleep(0.2)\n")
        p = self.run(self.info.head.name, [str(VENV_BIN / "python"), "-c", code], timeout=timeout_s + 30, check=True)
        alive = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "?"
        if alive != str(count):
            raise NetClusterError(f"cluster {self.info.id}: {alive} Ray node(s) alive after {timeout_s:g} s, "
                                  f"expected {count}")

    def start_s3(self, node: str, bucket: str, port: int = 9000, timeout_s: float = 30.0) -> str:
        """Start an S3-protocol server (moto, objects in RAM) in ``node``'s namespace on its
        address, create ``bucket``; returns the endpoint URL. Credentials are the dummy
        ``testing`` keys: pass them to the cluster with ``env=S3_ENV``."""
        n = self.info.node(node)
        log = Path(n.temp_dir) / "moto.log"
        self.spawn(node, [str(VENV_BIN / "moto_server"), "-H", n.address, "-p", str(port)], log, env=S3_ENV)
        endpoint = f"http://{n.address}:{port}"
        code = ("import time, boto3\n"
                f"c = boto3.client('s3', endpoint_url={endpoint!r}, region_name='us-east-1')\n"
                f"end = time.time() + {timeout_s}\n"
                "while True:\n"
                "    try:\n"
                f"        c.create_bucket(Bucket={bucket!r}); break\n"
                "    except Exception:\n"
                "        if time.time() > end: raise\n"
                "        time.sleep(0.2)\n")
        self.run(node, [str(VENV_BIN / "python"), "-c", code], env=S3_ENV, timeout=timeout_s + 30, check=True)
        return endpoint

    def kill_node(self, node: str) -> int:
        """Kill every process in ``node``'s namespace at once (SIGKILL): the node is lost, its
        network stays. Returns how many processes were killed."""
        return _kill_netns(self.info.node(node).netns)

    def restart_node(self, node: str, timeout_s: float = 120.0) -> None:
        """Start a worker node's Ray again (after :meth:`kill_node`): a new raylet on the same
        address joins the head."""
        n = self.info.node(node)
        if not n.ray or n is self.info.head:
            raise NetClusterError(f"only a worker node can be restarted, not {node!r}")
        self.run(node, self._ray_start_argv(n), timeout=timeout_s, check=True)

    # ---- counters -----------------------------------------------------------------------
    def bytes(self) -> dict[str, dict[str, int]]:
        """Per node link: {"sent": bytes the node sent onto its link, "received": bytes it got},
        read from the bridge-side veth counters."""
        p = _sh(["ip", "-n", self.info.bridge_netns, "-s", "-j", "link", "show"])
        by_if = {d["ifname"]: d["stats64"] for d in json.loads(p.stdout) if "stats64" in d}
        out = {}
        for n in self.info.nodes:
            st = by_if[n.peer_ifname]
            out[n.name] = {"sent": int(st["rx"]["bytes"]), "received": int(st["tx"]["bytes"])}
        return out

    def down(self) -> None:
        if self.info is not None:
            down(self.info.id)
            self.info = None


def _netns_pids(ns: str) -> list[int]:
    p = _sh(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in p.stdout.split()] if p.returncode == 0 else []


def _kill_netns(ns: str, timeout_s: float = 20.0) -> int:
    """SIGKILL every process in namespace ``ns`` until none is left (Ray daemons fork workers,
    so repeat). Returns the number of processes killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while True:
        pids = _netns_pids(ns)
        if not pids:
            return len(killed)
        if time.monotonic() > deadline:
            raise NetClusterError(f"processes {pids} in {ns} survived SIGKILL for {timeout_s:g} s")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(0.1)


def down(cluster_id: str) -> list[str]:
    """Remove cluster ``cluster_id``: end the processes in its namespaces, delete the namespaces
    (their veths and bridge go with them) and its state folder. Works from the namespace names
    alone, so a crashed ``up`` or a lost state file is cleaned too; goes on past a namespace it
    cannot clean and raises at the end naming it. Returns the namespaces removed."""
    ours = [ns for ns in _netns_list() if ns.startswith(f"{PREFIX}{cluster_id}-")]
    # Node namespaces first (they hold the processes), the bridge last.
    ours.sort(key=lambda ns: ns.endswith("-br"))
    removed, errors = [], []
    for ns in ours:
        try:
            _kill_netns(ns)
            _sh(["ip", "netns", "del", ns])
            removed.append(ns)
        except NetClusterError as exc:
            errors.append(str(exc))
    if errors:
        raise NetClusterError(f"cluster {cluster_id} not fully removed: {'; '.join(errors)}")
    shutil.rmtree(STATE_ROOT / cluster_id, ignore_errors=True)
    return removed


def cluster_ids() -> list[str]:
    """Ids of the clusters that exist (from namespaces and state folders)."""
    ids = {ns[len(PREFIX):].split("-")[0] for ns in _netns_list() if ns.startswith(PREFIX)}
    if STATE_ROOT.exists():
        ids |= {p.name for p in STATE_ROOT.iterdir() if p.is_dir()}
    return sorted(ids)


def attach(cluster_id: str) -> NetCluster:
    """A :class:`NetCluster` handle on an existing cluster (from its state file)."""
    path = STATE_ROOT / cluster_id / "state.json"
    if not path.exists():
        raise NetClusterError(f"no cluster {cluster_id!r} (no {path}); clusters here: {cluster_ids()}")
    nc = NetCluster()
    nc.info = ClusterInfo.from_json(json.loads(path.read_text()))
    return nc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="build a cluster, print its JSON description")
    u.add_argument("--nodes", type=int, default=2)
    u.add_argument("--cpus", type=int, default=1, help="--num-cpus of each Ray node")
    u.add_argument("--rate-mbit", type=float, default=0.0, help="tbf limit per link and direction (0 = none)")
    u.add_argument("--clients", type=int, default=0, help="namespaces on the bridge without Ray")
    u.add_argument("--auth", choices=("disabled", "token"), default="disabled")
    u.add_argument("--dashboard", action="store_true", help="dashboard + job API on the head's address")
    u.add_argument("--gloo-ifname", action="store_true",
                   help="set GLOO_SOCKET_IFNAME on each node to its interface (for checkouts that do not bind gloo themselves)")
    d = sub.add_parser("down", help="remove a cluster (also after a crash)")
    d.add_argument("id", nargs="?")
    d.add_argument("--all", action="store_true")
    e = sub.add_parser("exec", help="run a command in a node's namespace: exec ID NODE -- CMD")
    e.add_argument("id")
    e.add_argument("node")
    e.add_argument("command", nargs=argparse.REMAINDER)
    b = sub.add_parser("bytes", help="per-link byte counters (JSON)")
    b.add_argument("id")
    sub.add_parser("list", help="ids of the clusters on this machine")
    args = ap.parse_args(argv)
    try:
        if args.cmd != "list":
            reason = unavailable_reason()
            if reason:
                print(f"netcluster: {reason}", file=sys.stderr)
                return 2
        if args.cmd == "up":
            nc = NetCluster(nodes=args.nodes, cpus_per_node=args.cpus, rate_mbit=args.rate_mbit, clients=args.clients,
                            auth=args.auth, dashboard=args.dashboard, gloo_ifname=args.gloo_ifname)
            print(json.dumps(nc.up().to_json()))
        elif args.cmd == "down":
            if not args.id and not args.all:
                ap.error("down needs an id or --all")
            for cid in (cluster_ids() if args.all else [args.id]):
                print(json.dumps({"id": cid, "removed": down(cid)}))
        elif args.cmd == "exec":
            cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not cmd:
                ap.error("exec needs a command after --")
            nc = attach(args.id)
            return subprocess.call(nc._argv(args.node, cmd), env=nc.env(args.node))
        elif args.cmd == "bytes":
            print(json.dumps(attach(args.id).bytes()))
        else:
            print(json.dumps(cluster_ids()))
    except NetClusterError as exc:
        print(f"netcluster: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

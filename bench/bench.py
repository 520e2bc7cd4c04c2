#!/usr/bin/env python3
"""ringrift-supervisor side by side with supervisord, s6 and runit (issue 5).

Run through bench/run.sh. Everything runs in a temporary directory; every process the benchmark
starts is its descendant (it makes itself a child subreaper, so even daemonised supervisors and
orphaned grandchildren are reparented to it), and all of them are killed on exit, on error, on
SIGINT/SIGTERM and when the time limit (BENCH_TIMEOUT, default 840 s) runs out.

Environment:
  BENCH_IDLE_SECS    idle measurement length (default 60)
  BENCH_N            daemons per supervisor (default 30)
  BENCH_COLD_REPS    cold-start repetitions (default 5)
  BENCH_KILLS        restart-latency samples (default 20)
  BENCH_STATUS_REPS  status round trips (default 20)
  BENCH_FLOOD_LINES  lines for the log test (default 1000000)
  BENCH_KILL_GAP     seconds between two kills of the restart test (default 1.2, > the 1 s
                     throttle of runsv and s6-supervise)
  BENCH_ONLY         comma list of supervisors to run (ours,supervisord,s6,runit); default all
  BENCH_TIMEOUT      overall limit in seconds (default 840)
"""

import ctypes
import datetime
import glob
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

N = int(os.environ.get("BENCH_N", "30"))
IDLE_SECS = float(os.environ.get("BENCH_IDLE_SECS", "60"))
COLD_REPS = int(os.environ.get("BENCH_COLD_REPS", "5"))
KILLS = int(os.environ.get("BENCH_KILLS", "20"))
STATUS_REPS = int(os.environ.get("BENCH_STATUS_REPS", "20"))
FLOOD_LINES = int(os.environ.get("BENCH_FLOOD_LINES", "1000000"))
KILL_GAP = float(os.environ.get("BENCH_KILL_GAP", "1.2"))
TIMEOUT = int(os.environ.get("BENCH_TIMEOUT", "840"))
ONLY = [s for s in os.environ.get("BENCH_ONLY", "").split(",") if s]

CLK_TCK = os.sysconf("SC_CLK_TCK")
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_CHILD_SUBREAPER = 36

NAMES = [f"d{i:02d}" for i in range(1, N + 1)]
WORKER_NAMES = [f"w{i:02d}" for i in range(1, N + 1)]
STUB_SCRIPT = """#!/bin/sh
# A stubborn daemon: ignores SIGTERM, leaves a background grandchild in its process group.
trap '' TERM
sleep 1000 &
while :; do sleep 1; done
"""


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Timeout(Exception):
    pass


# ----------------------------------------------------------------------------------- /proc helpers


def read(path, default=None):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return default


def children(pid):
    out = []
    for t in glob.glob(f"/proc/{pid}/task/*/children"):
        data = read(t, b"")
        out.extend(int(x) for x in data.split())
    return out


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children(p):
            out.append(c)
            todo.append(c)
    return out


def stat_fields(pid):
    data = read(f"/proc/{pid}/stat")
    if not data:
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    return rest  # rest[0] = state (field 3)


def comm(pid):
    data = read(f"/proc/{pid}/comm")
    return data.decode().strip() if data else None


def cmdline(pid):
    data = read(f"/proc/{pid}/cmdline")
    return [x.decode(errors="replace") for x in data.split(b"\0") if x] if data else []


def alive(pid):
    f = stat_fields(pid)
    return f is not None and f[0] not in (b"Z", b"X")


def ident(pid):
    """(pid, start time): survives pid reuse."""
    f = stat_fields(pid)
    return (pid, int(f[19])) if f else None


def still_there(idents):
    left = []
    for pid, start in idents:
        f = stat_fields(pid)
        if f and int(f[19]) == start and f[0] not in (b"Z", b"X"):
            left.append(pid)
    return left


def cpu_ns(pid):
    """Time on CPU in ns (/proc/<pid>/schedstat): the fine-grained companion of the tick counts."""
    data = read(f"/proc/{pid}/schedstat")
    return int(data.split()[0]) if data else 0


def cpu_ticks(pid):
    f = stat_fields(pid)
    return int(f[11]) + int(f[12]) if f else 0  # utime + stime (fields 14, 15)


def rss_kib(pid):
    data = read(f"/proc/{pid}/status", b"")
    for line in data.split(b"\n"):
        if line.startswith(b"VmRSS:"):
            return int(line.split()[1])
    return 0


def pgid_members(pgid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = stat_fields(int(d))
            if f and int(f[2]) == pgid and f[0] not in (b"Z", b"X"):
                out.append(int(d))
    return out


def reap_zombies():
    """Reap exited children we do not wait for otherwise (orphans reparented to us)."""
    for c in children(os.getpid()):
        f = stat_fields(c)
        if f and f[0] == b"Z":
            try:
                os.waitpid(c, os.WNOHANG)
            except ChildProcessError:
                pass


def kill_everything_we_started():
    """SIGKILL every descendant of this process (all were started by the benchmark), then reap."""
    me = os.getpid()
    for _ in range(20):
        ds = [d for d in descendants(me) if alive(d)]
        if not ds:
            break
        for d in ds:
            try:
                os.kill(d, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
        reap_zombies()
    reap_zombies()


def wait_gone(pid, secs):
    end = time.monotonic() + secs
    while time.monotonic() < end:
        reap_zombies()
        if not alive(pid):
            return True
        time.sleep(0.01)
    return False


def pct(values, p):
    s = sorted(values)
    if not s:
        return None
    k = (len(s) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def med(values):
    return statistics.median(values) if values else None


# ------------------------------------------------------------------------------------- supervisors


class Sup:
    """One supervisor instance in its own directory. Subclasses fill in the specifics."""

    key = "?"
    child_comm = "bchild"

    def __init__(self, env, d):
        self.env = env
        self.dir = d
        os.makedirs(d, exist_ok=True)
        self.root_pid = None

    # services: name -> ("child" | "worker" | "stub" | "fault_stub" | "flood", extra)
    def prepare(self, services):
        raise NotImplementedError

    def boot(self, names):
        """Starts the supervisor. Ours returns once all `names` are RUNNING; peers return at once."""
        raise NotImplementedError

    def parent_of(self, name):
        """The process that spawns `name`'s process."""
        return self.root_pid

    def service_pid(self, name):
        raise NotImplementedError

    def wait_ready(self, timeout=20):
        return True

    def overhead_pids(self):
        """(supervisor pid, helper pids) for the CPU and RSS figures."""
        return [self.root_pid], []

    def status_argv(self, one):
        raise NotImplementedError

    def stop_argv(self, name):
        raise NotImplementedError

    def log_file(self, name):
        raise NotImplementedError

    def start_service_argv(self, name):
        raise NotImplementedError

    def teardown(self):
        if self.root_pid and alive(self.root_pid):
            os.kill(self.root_pid, signal.SIGTERM)
            wait_gone(self.root_pid, 5)
        kill_everything_we_started()

    def up_count(self, comm_name=None):
        comm_name = comm_name or self.child_comm
        return sum(1 for p in descendants(self.root_pid) if comm(p) == comm_name)

    def wait_up(self, count, comm_name=None, timeout=20.0, sleep=0.0005):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.up_count(comm_name) >= count:
                return True
            time.sleep(sleep)
        return False


def service_argv(env, kind, extra):
    if kind == "child":
        return [env["bchild"]]
    if kind == "stub":
        return [env["stub"]]
    if kind == "fault_stub":
        return [env["worker"], "fault", "--no-protocol", "--ignore-sigterm", "--grandchild"]
    if kind == "flood":
        return [env["bchild"], "stamp", extra, env["worker"], "fault", "--no-protocol", "--flood", str(FLOOD_LINES)]
    raise ValueError(kind)


class Ours(Sup):
    key = "ours"

    def prepare(self, services):
        self.services = services
        os.makedirs(os.path.join(self.dir, "config"), exist_ok=True)
        lines = [
            "http: {enabled: false}",
            "logs: {max_bytes: 200000000, max_files: 2}",
            "defaults:",
            "  backoff_initial: 0",
            "  max_restarts: 1000",
            "  restart_window: 60",
            "  heartbeat_interval: 5",
            "  grace_period: 1",
            "daemons:",
        ]
        for name, (kind, extra) in services.items():
            if kind == "worker":
                cmd = [self.env["worker"], "fault"]
                lines.append(f"  {name}: {{command: {json.dumps(cmd)}, protocol: true}}")
            else:
                cmd = service_argv(self.env, kind, extra)
                lines.append(f"  {name}: {{command: {json.dumps(cmd)}}}")
        with open(os.path.join(self.dir, "config", "unified_loop.yaml"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def cli(self, *args):
        return [self.env["sup"], "--root", self.dir, *args]

    def boot(self, names):
        r = subprocess.run(self.cli("start", *names), capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"ours: start failed ({r.returncode}): {r.stdout} {r.stderr}")
        self.root_pid = int(open(os.path.join(self.dir, "run", "supervisor.pid")).read().split()[0])

    def teardown(self):
        if self.root_pid and alive(self.root_pid):
            try:
                subprocess.run(self.cli("shutdown"), capture_output=True, timeout=15)
            except subprocess.TimeoutExpired:
                pass
            wait_gone(self.root_pid, 5)
        kill_everything_we_started()

    def status_json(self):
        r = subprocess.run(self.cli("status", "--json"), capture_output=True, text=True, timeout=10)
        return json.loads(r.stdout)

    def service_pid(self, name):
        for d in self.status_json()["daemons"]:
            if d["name"] == name:
                return d["pid"]
        return None

    def overhead_pids(self):
        return [self.root_pid], []

    def worker_pids(self):
        return [c for c in children(self.root_pid) if comm(c) == "ringrift-worker"]

    def status_argv(self, one):
        return self.cli("status", *([one] if one else []))

    def stop_argv(self, name):
        return self.cli("stop", name)

    def start_service_argv(self, name):
        return self.cli("start", "--no-wait", name)

    def log_file(self, name):
        return os.path.join(self.dir, "logs", f"{name}.log")


class Supervisord(Sup):
    key = "supervisord"

    def prepare(self, services):
        self.conf = os.path.join(self.dir, "supervisord.conf")
        os.makedirs(os.path.join(self.dir, "childlogs"), exist_ok=True)
        out = [
            "[unix_http_server]",
            f"file={self.dir}/supervisor.sock",
            "[supervisord]",
            f"logfile={self.dir}/supervisord.log",
            f"pidfile={self.dir}/supervisord.pid",
            f"childlogdir={self.dir}/childlogs",
            "nodaemon=true",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "[supervisorctl]",
            f"serverurl=unix://{self.dir}/supervisor.sock",
        ]
        for name, (kind, extra) in services.items():
            argv = service_argv(self.env, kind, extra)
            out += [
                f"[program:{name}]",
                "command=" + " ".join(argv),
                "autostart=" + ("false" if kind == "flood" else "true"),
                "autorestart=true",
                "startsecs=0",
                "startretries=1000000",
                "stopsignal=TERM",
                "stopwaitsecs=1",
                "stopasgroup=true",
                "killasgroup=true",
            ]
            if kind == "flood":
                out += [f"stdout_logfile={self.dir}/{name}.log", "stdout_logfile_maxbytes=0",
                        "stdout_logfile_backups=0"]
        with open(self.conf, "w") as f:
            f.write("\n".join(out) + "\n")

    def boot(self, names):
        p = subprocess.Popen(["supervisord", "-n", "-c", self.conf], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        self.popen = p
        self.root_pid = p.pid

    def ctl(self, *args):
        return ["supervisorctl", "-c", self.conf, *args]

    def wait_ready(self, timeout=20):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if os.path.exists(f"{self.dir}/supervisor.sock"):
                r = subprocess.run(self.ctl("pid"), capture_output=True, text=True)
                if r.returncode == 0 and r.stdout.strip().isdigit():
                    return True
            time.sleep(0.05)
        return False

    def service_pid(self, name):
        r = subprocess.run(self.ctl("pid", name), capture_output=True, text=True)
        return int(r.stdout.strip())

    def status_argv(self, one):
        return self.ctl("status", *([one] if one else []))

    def stop_argv(self, name):
        return self.ctl("stop", name)

    def start_service_argv(self, name):
        return self.ctl("start", name)

    def log_file(self, name):
        return f"{self.dir}/{name}.log"

    def teardown(self):
        if self.root_pid and alive(self.root_pid):
            os.kill(self.root_pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
        kill_everything_we_started()


class S6(Sup):
    key = "s6"
    child_comm = "run"  # ./run is a symlink to bchild: the kernel names the process after the link

    def wait_ready(self, timeout=20):
        return wait_files([os.path.join(self.scan, n, "supervise", "status") for n in self.names], timeout)

    def prepare(self, services):
        self.names = list(services)
        self.scan = os.path.join(self.dir, "scan")
        os.makedirs(self.scan, exist_ok=True)
        for name, (kind, extra) in services.items():
            sd = os.path.join(self.scan, name)
            os.makedirs(sd)
            argv = service_argv(self.env, kind, extra)
            if len(argv) == 1:
                os.symlink(argv[0], os.path.join(sd, "run"))  # the run file IS the child: no shell
            else:
                write_exec(os.path.join(sd, "run"), "#!/bin/sh\nexec " + " ".join(argv) + "\n")
            with open(os.path.join(sd, "timeout-kill"), "w") as f:
                f.write("1000\n")  # SIGKILL 1 s after the down signal
            if kind == "flood":
                open(os.path.join(sd, "down"), "w").close()
                os.makedirs(os.path.join(sd, "log"))
                os.makedirs(os.path.join(self.dir, f"{name}-log"))
                write_exec(os.path.join(sd, "log", "run"),
                           f"#!/bin/sh\nexec s6-log -b n2 s200000000 T {self.dir}/{name}-log\n")

    def boot(self, names):
        p = subprocess.Popen(["s6-svscan", self.scan], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.popen = p
        self.root_pid = p.pid

    def supervise_of(self, name):
        for c in children(self.root_pid):
            cl = cmdline(c)
            if len(cl) >= 2 and cl[0].endswith("s6-supervise") and cl[1] == name:
                return c
        return None

    def parent_of(self, name):
        return self.supervise_of(name)

    def service_pid(self, name):
        sv = self.supervise_of(name)
        cs = children(sv) if sv else []
        return cs[0] if cs else None

    def overhead_pids(self):
        return [self.root_pid], [c for c in children(self.root_pid) if comm(c) == "s6-supervise"]

    def status_argv(self, one):
        if one:
            return ["s6-svstat", os.path.join(self.scan, one)]
        return None  # s6-svstat takes one service directory

    def stop_argv(self, name):
        return ["s6-svc", "-wD", "-T", "10000", "-d", os.path.join(self.scan, name)]

    def start_service_argv(self, name):
        return ["s6-svc", "-u", os.path.join(self.scan, name)]

    def log_file(self, name):
        return f"{self.dir}/{name}-log/current"

    def teardown(self):
        if self.root_pid and alive(self.root_pid):
            subprocess.run(["s6-svscanctl", "-t", self.scan], capture_output=True, timeout=10)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        kill_everything_we_started()


class Runit(Sup):
    key = "runit"
    child_comm = "run"

    def wait_ready(self, timeout=20):
        return wait_files([os.path.join(self.svdir, n, "supervise", "ok") for n in self.names], timeout)

    def prepare(self, services):
        self.names = list(services)
        self.svdir = os.path.join(self.dir, "service")
        os.makedirs(self.svdir, exist_ok=True)
        for name, (kind, extra) in services.items():
            sd = os.path.join(self.svdir, name)
            os.makedirs(sd)
            argv = service_argv(self.env, kind, extra)
            if len(argv) == 1:
                os.symlink(argv[0], os.path.join(sd, "run"))
            else:
                write_exec(os.path.join(sd, "run"), "#!/bin/sh\nexec " + " ".join(argv) + "\n")
            if kind == "flood":
                open(os.path.join(sd, "down"), "w").close()
                os.makedirs(os.path.join(sd, "log"))
                ld = os.path.join(self.dir, f"{name}-log")
                os.makedirs(ld)
                with open(os.path.join(ld, "config"), "w") as f:
                    f.write("s200000000\nn2\n")
                write_exec(os.path.join(sd, "log", "run"), f"#!/bin/sh\nexec svlogd -tt {ld}\n")

    def boot(self, names):
        p = subprocess.Popen(["runsvdir", "-P", self.svdir], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        self.popen = p
        self.root_pid = p.pid

    def runsv_of(self, name, log=False):
        for c in children(self.root_pid):
            cl = cmdline(c)
            if len(cl) >= 2 and cl[0].startswith("runsv") and cl[1] == name:
                if not log:
                    return c
                for g in children(c):
                    if comm(g) == "runsv":
                        return g
        return None

    def parent_of(self, name):
        return self.runsv_of(name)

    def service_pid(self, name):
        rs = self.runsv_of(name)
        cs = [c for c in (children(rs) if rs else []) if comm(c) != "runsv"]
        return cs[0] if cs else None

    def overhead_pids(self):
        helpers = [d for d in descendants(self.root_pid) if comm(d) == "runsv"]
        return [self.root_pid], helpers

    def status_argv(self, one):
        if one:
            return ["sv", "status", os.path.join(self.svdir, one)]
        return ["sv", "status"] + [os.path.join(self.svdir, n) for n in NAMES]

    def stop_argv(self, name):
        return ["sv", "-w", "1", "force-stop", os.path.join(self.svdir, name)]

    def start_service_argv(self, name):
        return ["sv", "up", os.path.join(self.svdir, name)]

    def log_file(self, name):
        return f"{self.dir}/{name}-log/current"

    def teardown(self):
        if self.root_pid and alive(self.root_pid):
            os.kill(self.root_pid, signal.SIGHUP)  # runsvdir: TERM to every runsv, then exit
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        kill_everything_we_started()


def wait_files(paths, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(os.path.exists(p) for p in paths):
            return True
        time.sleep(0.01)
    return False


def write_exec(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)


PEERS = {"supervisord": Supervisord, "s6": S6, "runit": Runit}


# ---------------------------------------------------------------------------------------- the tests


class Bench:
    def __init__(self, env, work):
        self.env = env
        self.work = work
        self.seq = 0
        self.r = {"metrics": {}, "notes": []}

    def newdir(self, tag):
        self.seq += 1
        return os.path.join(self.work, f"{self.seq:03d}-{tag}")

    def put(self, metric, col, value):
        self.r["metrics"].setdefault(metric, {})[col] = value

    def save_partial(self):
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "partial.json"), "w") as f:
            json.dump(self.r, f, indent=1)

    # 1. cold start ----------------------------------------------------------------------------
    def cold_start(self, cols):
        for col in cols:
            samples = []
            for rep in range(COLD_REPS):
                if col in ("ours", "ours_workers"):
                    s = Ours(self.env, self.newdir(col))
                    names = NAMES if col == "ours" else WORKER_NAMES
                    s.prepare({n: ("child" if col == "ours" else "worker", None) for n in names})
                    time.sleep(1.1)
                    t0 = time.monotonic()
                    s.boot(names)  # returns once every daemon is RUNNING
                    dt = time.monotonic() - t0
                    up = s.up_count("bchild" if col == "ours" else "ringrift-worker")
                else:
                    s = PEERS[col](self.env, self.newdir(col))
                    s.prepare({n: ("child", None) for n in NAMES})
                    # runsvdir postpones its scan by 1 s while the directory's mtime is the current
                    # second: let the freshly written service directories age first (for everyone).
                    time.sleep(1.1)
                    t0 = time.monotonic()
                    s.boot(NAMES)
                    ok = s.wait_up(N)
                    dt = time.monotonic() - t0
                    up = s.up_count()
                    if not ok:
                        self.r["notes"].append(f"{col}: cold start rep {rep}: only {up}/{N} up in 20 s")
                s.teardown()
                if up < N:
                    raise RuntimeError(f"{col}: only {up}/{N} children up")
                samples.append(dt * 1000)
            self.put("cold_start_ms", col, {"median": med(samples), "samples": samples})
            log(f"cold start {col}: median {med(samples):.1f} ms  {[round(x, 1) for x in samples]}")
            self.save_partial()

    # 2. restart latency -----------------------------------------------------------------------
    def restart(self, cols):
        for col in cols:
            if col == "ours_workers":
                self.restart_workers()
                continue
            s = Ours(self.env, self.newdir(col)) if col == "ours" else PEERS[col](self.env, self.newdir(col))
            s.prepare({n: ("child", None) for n in NAMES})
            s.boot(NAMES)
            if not s.wait_up(N):
                raise RuntimeError(f"{col}: not up for the restart test")
            time.sleep(KILL_GAP)
            samples, name = [], NAMES[4]
            try:
                for i in range(KILLS):
                    parent = s.parent_of(name)
                    before = set(children(parent))
                    mine = [c for c in before if comm(c) == s.child_comm]
                    if not mine:
                        raise RuntimeError(f"{col}: no child of {name}")
                    victim = sorted(mine)[0]
                    t0 = time.monotonic()
                    os.kill(victim, signal.SIGKILL)
                    end = t0 + 10
                    new = None
                    while time.monotonic() < end:
                        # Cheap per round: one /proc read, comm only for pids not seen before.
                        for c in set(children(parent)) - before:
                            if comm(c) == s.child_comm:
                                new = c
                                break
                        if new:
                            break
                    t1 = time.monotonic()
                    if not new:
                        raise RuntimeError(f"{col}: no replacement within 10 s")
                    samples.append((t1 - t0) * 1000)
                    time.sleep(KILL_GAP)
            finally:
                s.teardown()
            self.put("restart_new_pid_ms", col, {"median": med(samples), "p95": pct(samples, 95),
                                                 "samples": samples})
            log(f"restart {col}: median {med(samples):.2f} ms p95 {pct(samples, 95):.2f} ms")
            self.save_partial()

    def restart_workers(self):
        s = Ours(self.env, self.newdir("ours_workers"))
        s.prepare({n: ("worker", None) for n in WORKER_NAMES})
        s.boot(WORKER_NAMES)
        name = WORKER_NAMES[4]
        new_pid_ms, running_ms = [], []
        s_before = set(children(s.root_pid))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.path.join(s.dir, "run", "supervisor.sock"))
            f = sock.makefile("rwb")

            def ask(frame):
                f.write(json.dumps(frame).encode() + b"\n")
                f.flush()
                return json.loads(f.readline())

            ask({"type": "hello", "protocol": 1, "role": "cli"})

            def state():
                rep = ask({"type": "status", "name": name})
                for d in rep.get("daemons", []):
                    if d["name"] == name:
                        return d["state"], d["pid"]
                raise RuntimeError(f"status answer without {name}: {rep}")

            time.sleep(KILL_GAP)
            for i in range(KILLS):
                st, old = state()
                if st != "RUNNING":
                    raise RuntimeError(f"{name} is {st} before kill {i}")
                t0 = time.monotonic()
                os.kill(old, signal.SIGKILL)
                t_pid = t_run = None
                end = t0 + 10
                while time.monotonic() < end:
                    if t_pid is None:
                        for c in set(children(s.root_pid)) - s_before:
                            if comm(c) == "ringrift-worker":
                                t_pid = time.monotonic()
                                break
                    st, pid = state()
                    if st == "RUNNING" and pid != old:
                        t_run = time.monotonic()
                        if t_pid is None:
                            t_pid = t_run
                        break
                if t_run is None:
                    raise RuntimeError(f"{name} not RUNNING again within 10 s")
                new_pid_ms.append((t_pid - t0) * 1000)
                running_ms.append((t_run - t0) * 1000)
                time.sleep(KILL_GAP)
                s_before.clear()
                s_before.update(c for c in children(s.root_pid))
        finally:
            sock.close()
            s.teardown()
        self.put("restart_new_pid_ms", "ours_workers", {"median": med(new_pid_ms), "p95": pct(new_pid_ms, 95),
                                                        "samples": new_pid_ms})
        self.put("restart_running_ms", "ours_workers", {"median": med(running_ms), "p95": pct(running_ms, 95),
                                                        "samples": running_ms})
        log(f"restart ours_workers: new pid median {med(new_pid_ms):.2f} ms; RUNNING median "
            f"{med(running_ms):.2f} ms p95 {pct(running_ms, 95):.2f} ms")
        self.save_partial()

    # 3 + 5. idle overhead (all side by side) and status round trip --------------------------------
    def idle_and_status(self, cols):
        sups = {}
        try:
            for col in cols:
                if col in ("ours", "ours_workers"):
                    s = Ours(self.env, self.newdir(col))
                    names = NAMES if col == "ours" else WORKER_NAMES
                    s.prepare({n: ("child" if col == "ours" else "worker", None) for n in names})
                    s.boot(names)
                else:
                    s = PEERS[col](self.env, self.newdir(col))
                    s.prepare({n: ("child", None) for n in NAMES})
                    s.boot(NAMES)
                    if not s.wait_up(N):
                        raise RuntimeError(f"{col}: not up for the idle test")
                    s.wait_ready()
                sups[col] = s
            time.sleep(3)  # let start-up work finish

            def groups(col, s):
                sup, helpers = s.overhead_pids()
                g = {"supervisor": sup, "helpers": helpers}
                if col == "ours_workers":
                    g["workers"] = s.worker_pids()
                return g

            before = {}
            for col, s in sups.items():
                g = groups(col, s)
                before[col] = {k: {p: (cpu_ticks(p), cpu_ns(p)) for p in v} for k, v in g.items()}
            t0 = time.monotonic()
            log(f"idle: {len(sups)} supervisors side by side, {IDLE_SECS:.0f} s")
            time.sleep(IDLE_SECS)
            secs = time.monotonic() - t0
            for col, s in sups.items():
                res = {}
                for k, pids in before[col].items():
                    if not pids:
                        continue
                    ticks = sum(cpu_ticks(p) - t for p, (t, _) in pids.items())
                    ns = sum(cpu_ns(p) - n for p, (_, n) in pids.items())
                    rss = sum(rss_kib(p) for p in pids)
                    res[k] = {"ticks": ticks, "cpu_ms": ns / 1e6,
                              "cpu_pct_of_core": ns / 1e9 / secs * 100,
                              "rss_kib": rss, "processes": len(pids)}
                self.put("idle", col, res | {"secs": secs})
                log(f"idle {col}: {res}")
            self.save_partial()

            # 5. status round trip, with the same 30 daemons running. Round robin: each round runs every
            # command once (and /bin/true, the fork+exec floor), so load from elsewhere hits all alike.
            cmds = []
            for col, s in sups.items():
                if col == "ours_workers":
                    continue
                for which, one in (("one", NAMES[0]), ("all", None)):
                    argv = s.status_argv(one)
                    if argv is not None:
                        cmds.append((col, which, argv))
            cmds.append(("baseline", "true", ["/bin/true"]))
            times = {(c, w): [] for c, w, _ in cmds}
            codes = {(c, w): set() for c, w, _ in cmds}
            for _ in range(STATUS_REPS):
                for col, which, argv in cmds:
                    out = subprocess.run([self.env["bchild"], "time", "1", *argv], capture_output=True,
                                         text=True, timeout=60).stdout.split()
                    times[(col, which)].append(int(out[0]) / 1e6)
                    codes[(col, which)].add(int(out[1]))
            for col, which, argv in cmds:
                ms = times[(col, which)]
                if col == "baseline":
                    self.r["status_baseline_true_ms"] = med(ms)
                    continue
                self.put(f"status_{which}_ms", col, {"median": med(ms), "p95": pct(ms, 95), "min": min(ms),
                                                     "exit_codes": sorted(codes[(col, which)]), "argv": argv[:3]})
                log(f"status {which} {col}: median {med(ms):.2f} ms (exit {sorted(codes[(col, which)])})")
            log(f"status baseline /bin/true: median {self.r['status_baseline_true_ms']:.2f} ms")
            self.save_partial()
        finally:
            for s in sups.values():
                s.teardown()

    # 4. log throughput -----------------------------------------------------------------------------
    def flood(self, cols):
        for col in cols:
            if col == "ours_workers":
                continue
            s = Ours(self.env, self.newdir(col)) if col == "ours" else PEERS[col](self.env, self.newdir(col))
            stamp = os.path.join(s.dir, "flood.t0")
            services = {"flood": ("flood", stamp)}
            if col == "ours":
                services = {"idle": ("child", None)} | services
            s.prepare(services)
            try:
                if col == "ours":
                    s.boot(["idle"])
                else:
                    s.boot([])
                    s.wait_ready()
                    time.sleep(0.5)
                writer_comms = ("bchild", "ringrift-worker", "run")

                def cost_pids():
                    return [s.root_pid] + [d for d in descendants(s.root_pid) if comm(d) not in writer_comms]

                pids0 = cost_pids()
                ticks0 = {p: cpu_ticks(p) for p in pids0}
                ns0 = {p: cpu_ns(p) for p in pids0}
                r = subprocess.run(s.start_service_argv("flood"), capture_output=True, text=True, timeout=60)
                if r.returncode != 0:
                    raise RuntimeError(f"{col}: cannot start flood: {r.stdout} {r.stderr}")
                path = s.log_file("flood")
                end = time.monotonic() + 180
                done = False
                while time.monotonic() < end:
                    try:
                        with open(path, "rb") as f:
                            f.seek(0, 2)
                            size = f.tell()
                            if size > 64:
                                f.seek(size - 64)
                                if f.read().endswith(b"flood done\n"):
                                    done = True
                                    break
                    except FileNotFoundError:
                        pass
                    time.sleep(0.002)
                t1 = time.time()
                ticks = sum(cpu_ticks(p) - ticks0.get(p, 0) for p in cost_pids())
                ns = sum(cpu_ns(p) - ns0.get(p, 0) for p in cost_pids())
                t0 = int(open(stamp).read()) / 1e9
                if not done:
                    raise RuntimeError(f"{col}: flood not complete within 180 s")
                check = verify_flood(os.path.dirname(path) if col in ("s6", "runit") else path, col)
                res = {"secs": t1 - t0, "supervisor_cpu_ms": ns / 1e6, "supervisor_ticks": ticks,
                       "processes_counted": [comm(p) for p in cost_pids()], **check}
                self.put("flood", col, res)
                log(f"flood {col}: {res['secs']:.3f} s, cpu {res['supervisor_cpu_ms']:.0f} ms, "
                    f"lines {check['lines_ok']}/{FLOOD_LINES}, lost {check['lost']}")
            finally:
                s.teardown()
            self.save_partial()

    # 6. stop of a stubborn daemon with a grandchild --------------------------------------------
    def stop_stubborn(self, cols):
        variants = []
        for col in cols:
            if col == "ours_workers":
                continue
            if col == "ours":
                variants += [("ours", "fault_stub"), ("ours_same_script", "stub")]
            else:
                variants.append((col, "stub"))
        for col, kind in variants:
            key = "ours" if col.startswith("ours") else col
            s = Ours(self.env, self.newdir(col)) if key == "ours" else PEERS[key](self.env, self.newdir(col))
            s.prepare({"stub": (kind, None)})
            try:
                s.boot(["stub"])
                s.wait_ready()
                time.sleep(1.5)  # the script's sleeps are running
                spid = s.service_pid("stub")
                # The service, its descendants, and its process group if it leads one (the fault
                # worker's grandchild is orphaned at once, so only its process group finds it).
                f = stat_fields(spid)
                members = {spid, *descendants(spid)}
                if f and int(f[2]) == spid:
                    members |= set(pgid_members(spid))
                members = sorted(members)
                tree = [ident(p) for p in members if ident(p)]
                names = sorted(comm(p) for p in members)
                t0 = time.monotonic()
                r = subprocess.run(s.stop_argv("stub"), capture_output=True, text=True, timeout=30)
                dt = time.monotonic() - t0
                left_now = still_there(tree)
                left_names = sorted(comm(p) or "?" for p in left_now)
                time.sleep(1.0)
                left_later = still_there(tree)
                res = {"secs": dt, "exit": r.returncode, "tree": names,
                       "left_at_return": left_names,
                       "left_1s_later": sorted(comm(p) or "?" for p in left_later),
                       "output": (r.stdout + r.stderr).strip()[-200:]}
                for p in left_later:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.put("stop_stubborn", col, res)
                log(f"stop {col}: {dt:.3f} s, tree {names}, left {left_names} / later {res['left_1s_later']}")
            finally:
                s.teardown()
            self.save_partial()


def verify_flood(path, col):
    """Every line 1..N exactly once, in order, intact, then `flood done`."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "@*"))) + [os.path.join(path, "current")]
    else:
        files = sorted(glob.glob(path + ".*"), reverse=True) + [path]
    expect, bad, total, done, size = 1, 0, 0, False, 0
    for fn in files:
        with open(fn, "rb") as f:
            data = f.read()
        size += len(data)
        for line in data.split(b"\n"):
            if not line:
                continue
            i = line.find(b"line ")
            if i < 0:
                if line.endswith(b"flood done"):
                    done = True
                continue
            payload = line[i:]
            total += 1
            try:
                num = int(payload[5:].rstrip(b"x"))
            except ValueError:
                bad += 1
                continue
            want = (b"line %d" % num).ljust(99, b"x")
            if payload != want or num != expect:
                bad += 1
            expect = num + 1
    return {"lines_seen": total, "lines_ok": total - bad, "lost": FLOOD_LINES - (total - bad),
            "flood_done_seen": done, "log_bytes": size, "files": [os.path.basename(f) for f in files]}


# ------------------------------------------------------------------------------------------- report


def machine():
    cpu = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = open("/proc/meminfo").readline().split()[1]

    def ver(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return "?"

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_total_kib": int(mem),
        "kernel": platform.release(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "clk_tck": CLK_TCK,
        "versions": {
            "supervisor": ver(["dpkg-query", "-W", "-f=${Version}", "supervisor"]),
            "s6": ver(["dpkg-query", "-W", "-f=${Version}", "s6"]),
            "runit": ver(["dpkg-query", "-W", "-f=${Version}", "runit"]),
        },
    }


def ensure_peers(notes):
    want = {"supervisord": ("supervisor", ["supervisord", "supervisorctl"]),
            "s6": ("s6", ["s6-svscan", "s6-supervise", "s6-svstat", "s6-svc", "s6-log"]),
            "runit": ("runit", ["runsvdir", "runsv", "sv", "svlogd"])}
    have = []
    for key, (pkg, bins) in want.items():
        if ONLY and key not in ONLY:
            continue
        if not all(shutil.which(b) for b in bins):
            log(f"installing {pkg} ...")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            # Only install the binaries: keep the package's own service from starting.
            cmd = ["apt-get", "install", "-y", "--no-install-recommends", pkg]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
            if r.returncode != 0:
                subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=300)
                r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
            if r.returncode != 0 or not all(shutil.which(b) for b in bins):
                notes.append(f"{key}: skipped, `apt-get install -y {pkg}` failed: {r.stderr.strip()[-300:]}")
                log(notes[-1])
                continue
        have.append(key)
    return have


def main():
    def on_signal(sig, frame):
        raise Timeout(f"signal {sig}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm(TIMEOUT)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log("warning: cannot become a child subreaper; orphans may escape the clean-up")

    work = tempfile.mkdtemp(prefix="ringrift-bench.")
    env = {}
    bench = None
    started = time.monotonic()
    try:
        # Snapshot the binaries: other builds in the shared target dir must not swap them mid-run.
        bindir = os.path.join(work, "bin")
        os.makedirs(bindir)
        for b in ("ringrift-supervisor", "ringrift-worker"):
            src = os.path.join(os.environ.get("BENCH_TARGET", os.path.join(REPO, "target", "release")), b)
            shutil.copy2(src, os.path.join(bindir, b))
        env["sup"] = os.path.join(bindir, "ringrift-supervisor")
        env["worker"] = os.path.join(bindir, "ringrift-worker")
        env["bchild"] = os.path.join(bindir, "bchild")
        subprocess.run(["cc", "-O2", "-o", env["bchild"], os.path.join(HERE, "bchild.c")], check=True)
        env["stub"] = os.path.join(bindir, "stub.sh")
        write_exec(env["stub"], STUB_SCRIPT)

        bench = Bench(env, work)
        bench.r["machine"] = machine()
        bench.r["machine"]["versions"]["ringrift-supervisor"] = subprocess.run(
            [env["sup"], "--version"], capture_output=True, text=True).stdout.strip()
        bench.r["machine"]["loadavg_at_start"] = open("/proc/loadavg").read().split()[:3]
        bench.r["settings"] = {"N": N, "idle_secs": IDLE_SECS, "cold_reps": COLD_REPS, "kills": KILLS,
                               "status_reps": STATUS_REPS, "flood_lines": FLOOD_LINES, "kill_gap_s": KILL_GAP}
        peers = ensure_peers(bench.r["notes"])
        cols = ([] if ONLY and "ours" not in ONLY else ["ours", "ours_workers"]) + peers
        log(f"columns: {cols}; work dir {work}")

        steps = [("cold start", bench.cold_start), ("restart", bench.restart),
                 ("idle + status", bench.idle_and_status), ("log flood", bench.flood),
                 ("stubborn stop", bench.stop_stubborn)]
        for label, fn in steps:
            try:
                fn(cols)
            except Timeout:
                raise
            except Exception as e:  # keep going: a broken step must not lose the others
                bench.r["notes"].append(f"{label}: error: {e!r}")
                log(f"ERROR in {label}: {e!r}")
                kill_everything_we_started()
        bench.r["elapsed_secs"] = time.monotonic() - started
        bench.r["machine"]["loadavg_at_end"] = open("/proc/loadavg").read().split()[:3]
        write_results(bench.r)
    except Timeout as e:
        log(f"stopped: {e}; partial results in bench/results/partial.json")
        if bench:
            bench.r["notes"].append(f"aborted: {e}")
            bench.save_partial()
        return 1
    finally:
        signal.alarm(0)
        kill_everything_we_started()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def write_results(r):
    import report  # bench/report.py: the table and TABLE.md

    os.makedirs(RESULTS, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in ("latest.json", f"{stamp}.json"):
        with open(os.path.join(RESULTS, name), "w") as f:
            json.dump(r, f, indent=1)
    try:
        os.remove(os.path.join(RESULTS, "partial.json"))
    except FileNotFoundError:
        pass
    table = report.render(r)
    print(table)
    report.write_table_md(r, os.path.join(HERE, "TABLE.md"))
    log(f"wrote bench/results/latest.json, bench/results/{stamp}.json and bench/TABLE.md")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main())

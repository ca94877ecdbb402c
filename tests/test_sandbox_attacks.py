"""The attack suite: hostile programs against the bubblewrap-isolated pool.

Every attack runs in one ``check_many`` batch beside well-behaved programs that
must still pass. Each attack must come back as a failure (it never passes its
test, "print twice the input"), within its timeout + 1 s, and leave no process
behind; the host (this test process, a server on its loopback, files in a run
directory, its environment) must be untouched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import HAVE_CC

from coderlplus.execution import Sandbox, SandboxUnavailable

TIMEOUT_S = 1.0
SECRET = "s3cr3t-token-do-not-leak"
TEST = [{"input": "21\n", "output": "42\n"}]
GOOD = "print(int(input()) * 2)"


@pytest.fixture(scope="module")
def secret_env():
    old = os.environ.get("WANDB_API_KEY")
    os.environ["WANDB_API_KEY"] = SECRET  # set in the trainer before the pool starts
    yield SECRET
    if old is None:
        os.environ.pop("WANDB_API_KEY", None)
    else:
        os.environ["WANDB_API_KEY"] = old


@pytest.fixture(scope="module", params=["native", "python"])
def pool(secret_env, request):
    """The attack suite runs on both fork loops of the servers (forkrun.c and Python)."""
    native = request.param == "native"
    sb = Sandbox(
        timeout_s=TIMEOUT_S,
        memory_mb=512,
        workers=2,
        isolation="bwrap",
        require_isolation=True,
        native=native,
    )
    assert sb.native == (native and HAVE_CC)  # the C loop really runs where it can be built
    yield sb
    sb.close()


def _settled_processes(sb: Sandbox, expected: int, wait_s: float = 3.0) -> int:
    """Number of the pool's processes once killed ones are gone (polls up to ``wait_s``)."""
    end = time.monotonic() + wait_s
    while True:
        n = len(sb.processes())
        if n == expected or time.monotonic() > end:
            return n
        time.sleep(0.05)


def attack(sb: Sandbox, code: str, statuses: set[str]):
    """Run ``code`` among good programs; check containment; return its CheckResult."""
    baseline = len(sb.processes())
    assert baseline >= 2 * sb.workers  # bwrap + server (+ bwrap's init) per worker
    code = textwrap.dedent(code)
    t0 = time.monotonic()
    checks = sb.check_many([(GOOD, TEST), (code, TEST), (GOOD, TEST), (GOOD, TEST)])
    elapsed = time.monotonic() - t0
    hostile = checks[1]
    assert [checks[i].passed for i in (0, 2, 3)] == [True] * 3, "good programs in the batch were affected"
    assert not hostile.passed
    assert hostile.status in statuses, (hostile.status, hostile.results[0])
    assert elapsed < TIMEOUT_S + 1.0 + 0.5, f"took {elapsed:.2f} s"  # +0.5: a server restart
    assert _settled_processes(sb, baseline) == baseline, "processes left behind"
    assert sb.check(GOOD, TEST).passed, "the pool does not work after the attack"
    return hostile


def test_isolation_facts(pool):
    r = pool.run(
        "import os, socket\n"
        "print(os.getuid(), os.getgid(), socket.gethostname())\n"
        "print(sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]))\n"
        "print(len([p for p in os.listdir('/proc') if p.isdigit()]))\n"
    )
    assert r.status == "ok", r.stderr
    ids, interfaces, n_pids = r.stdout.splitlines()
    assert ids == "65534 65534 sandbox"
    assert interfaces == "['lo']"  # only its own loopback
    assert int(n_pids) <= 4  # bwrap's init, the server, the program: not the host's processes
    # Outside, on the host, the sandbox's processes run as uid 65534 too.
    for pid in pool.processes():
        with open(f"/proc/{pid}/status") as f:
            uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
        assert uids == ["65534"] * 4 or os.geteuid() != 0, uids


def test_infinite_loop(pool):
    attack(pool, "while True:\n    pass", {"timeout"})


def test_sleep_forever(pool):
    attack(pool, "import time\ntime.sleep(10**6)", {"timeout"})


def test_memory_bomb(pool):
    # 100 MB blocks that are never written: the address-space limit, not the time it takes to
    # zero-fill pages (~1 s for 512 MB on a slow VM, as long as the timeout), ends it. Without
    # the limit it would run into the timeout and fail here.
    attack(pool, "x = []\nwhile True:\n    x.append(bytes(10**8))", {"memory"})


def test_fork_bomb(pool):
    # Unbounded in the program; bounded by RLIMIT_NPROC in the sandbox's user namespace.
    attack(
        pool,
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        {"timeout"},
    )


def test_fork_bomb_is_refused_more_processes(pool):
    r = pool.run(
        """
import os, time
n = 0
try:
    for _ in range(500):
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        n += 1
except OSError as e:
    print("refused after", n, type(e).__name__)
"""
    )
    assert r.stdout.startswith("refused after"), r
    assert int(r.stdout.split()[2]) < 100


def test_setsid_child_left_sleeping(pool):
    code = """
    import os, time
    if os.fork() == 0:
        os.setsid()
        time.sleep(10**6)
    print("parent exits")
    """
    hostile = attack(pool, code, {"wrong"})
    assert hostile.results[0].stdout == "parent exits\n"


def test_huge_file_write(pool):
    code = """
    with open("big", "wb") as f:
        for _ in range(10 * 1024):
            f.write(b"0" * 2**20)
    """
    assert "File too large" in attack(pool, code, {"error"}).results[0].stderr


def test_many_files_fill_tmp(pool):
    code = """
    i = 0
    while True:
        with open(f"f{i}", "wb") as f:
            f.write(b"0" * 9 * 2**20)
        i += 1
    """
    assert "No space left" in attack(pool, code, {"error"}).results[0].stderr


def test_stdout_flood(pool):
    hostile = attack(pool, "import sys\nsys.stdout.write('x' * 10**8)", {"output_limit"})
    assert len(hostile.results[0].stdout) <= 65536


def test_socket_to_host_server(pool):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    got = []
    done = threading.Event()

    def accept():
        while not done.is_set():
            with contextlib.suppress(OSError):
                got.append(server.accept())

    t = threading.Thread(target=accept)
    t.start()
    code = f"""
    import socket
    s = socket.create_connection(("127.0.0.1", {port}), timeout=0.5)
    s.sendall(b"stolen")
    print(42)
    """
    hostile = attack(pool, code, {"error"})
    time.sleep(0.3)  # a connection that got through would be accepted by now
    done.set()
    t.join()
    server.close()
    assert got == [], "the sandbox reached the host's loopback"
    assert "Connection refused" in hostile.results[0].stderr or "Network" in hostile.results[0].stderr


def test_environment_secret(pool, secret_env):
    code = """
    import os
    print(dict(os.environ))
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                print(open(f"/proc/{pid}/environ", "rb").read())
            except OSError as e:
                print("denied", pid)
    """
    hostile = attack(pool, code, {"wrong"})
    out = hostile.results[0].stdout + hostile.results[0].stderr
    assert secret_env not in out and "WANDB" not in out


def test_run_directory_and_home(pool, tmp_path):
    run_dir = tmp_path / "outputs" / "run"
    run_dir.mkdir(parents=True)
    ckpt = run_dir / "checkpoint.pt"
    ckpt.write_text("SECRET-WEIGHTS")
    code = f"""
    import os
    for path in [{str(ckpt)!r}, os.path.expanduser("~/.netrc"), "/root/.bashrc", {os.getcwd()!r}]:
        try:
            print(path, open(path).read()[:50])
        except OSError as e:
            print(path, type(e).__name__)
    print(os.listdir("/root") if os.path.isdir("/root") else "no /root")
    open({str(ckpt)!r}, "w").write("overwritten")
    """
    hostile = attack(pool, code, {"error"})
    assert "SECRET-WEIGHTS" not in hostile.results[0].stdout
    assert ckpt.read_text() == "SECRET-WEIGHTS"
    assert "FileNotFoundError" in hostile.results[0].stderr


def test_write_to_system_folders(pool):
    code = """
    import sys
    try:
        open("/usr/evil", "w")
    except OSError as e:
        print(type(e).__name__, e.errno)
    open(sys.prefix + "/lib/evil.py", "w")
    """
    hostile = attack(pool, code, {"error"})
    assert "Read-only file system" in hostile.results[0].stderr


def test_kill_parent(pool):
    hostile = attack(pool, "import os\nos.kill(os.getppid(), 9)\nimport time\ntime.sleep(5)", {"killed"})
    assert "server process died" in hostile.results[0].stderr


def test_kill_every_visible_process(pool):
    code = """
    import os
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) != os.getpid():
            try:
                os.kill(int(p), 9)
            except OSError:
                pass
    os.kill(-1, 9)
    """
    attack(pool, code, {"killed"})
    assert os.getppid() > 1  # this test process and its parent are alive


def test_ctypes_segfault(pool):
    attack(pool, "import ctypes\nctypes.string_at(0)", {"killed"})


def test_deep_recursion(pool):
    attack(pool, "def f(n):\n    return f(n + 1)\nf(0)", {"error"})


def test_deep_recursion_without_limit(pool):
    code = "import sys\nsys.setrecursionlimit(10**7)\ndef f(n):\n    return f(n + 1) + 1\nf(0)"
    attack(pool, code, {"killed", "memory", "error", "timeout"})


def test_sys_exit(pool):
    hostile = attack(pool, "import sys\nsys.exit(3)", {"error"})
    assert hostile.results[0].returncode == 3


def test_closed_stdout(pool):
    attack(pool, "import os\nos.close(1)\nprint(42)", {"wrong", "error"})


def test_thread_outliving_main(pool):
    code = "import threading, time\nthreading.Thread(target=time.sleep, args=(10**6,)).start()\nprint(42)"
    attack(pool, code, {"timeout"})


def test_reads_stdin_forever(pool):
    attack(pool, "import sys\nwhile True:\n    sys.stdin.read()", {"timeout"})


def test_non_utf8_output(pool):
    hostile = attack(pool, "import sys\nsys.stdout.buffer.write(b'\\xff\\xfe42\\n')", {"wrong"})
    assert hostile.results[0].stdout == "\ufffd\ufffd42\n"


# --------------------------------------------------------------------------- life cycle


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_close_leaves_no_process():
    sb = Sandbox(timeout_s=TIMEOUT_S, workers=2, isolation="bwrap", require_isolation=True)
    sb.run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint(1)")
    pids = sb.processes()
    assert pids
    sb.close()
    time.sleep(0.2)
    assert [p for p in pids if _alive(p)] == []


@pytest.mark.parametrize("isolation", ["bwrap", "rlimit"])
def test_trainer_killed_leaves_no_process(isolation, tmp_path):
    """SIGKILL of the process that owns the pool: every server and program dies with it."""
    script = f"""
import sys, time
from coderlplus.execution import Sandbox
sb = Sandbox(timeout_s=30, workers=2, isolation={isolation!r}, require_isolation=True)
import threading
threading.Thread(target=sb.run, args=("import time\\ntime.sleep(60)",), daemon=True).start()
time.sleep(0.5)
print(" ".join(map(str, sb.processes())), flush=True)
time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) >= 3  # servers and the sleeping program
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    end = time.monotonic() + 5
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.05)
    assert [p for p in pids if _alive(p)] == []


def test_fallback_when_bwrap_cannot_start(tmp_path, monkeypatch):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create a new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CODERLPLUS_BWRAP", str(fake))
    with pytest.raises(SandboxUnavailable, match="No permissions to create a new namespace"):
        Sandbox(timeout_s=TIMEOUT_S, workers=1, isolation="bwrap", require_isolation=True)
    with pytest.warns(RuntimeWarning, match="WITHOUT namespaces"):
        sb = Sandbox(timeout_s=TIMEOUT_S, workers=1, isolation="bwrap")
    try:
        assert sb.isolation == "rlimit"
        assert sb.check(GOOD, TEST).passed
    finally:
        sb.close()

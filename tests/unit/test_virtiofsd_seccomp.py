"""The set-id filter and its supervisor, on a stand-in for virtiofsd that makes the calls
virtiofsd 7.2 makes for a guest (measured with strace: fchmodat on its /proc/self/fd, openat
with the mode for creates, mknodat for nodes), as root on the host."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import pytest

from vmrun.common import bpf
from vmrun.hypervisor import seccomp
from vmrun.hypervisor.mode_supervisor import ModeSupervisor
from vmrun.proc import stdlib_module_command

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="makes device nodes and setuid files: needs root")

STAND_IN = r'''
import errno, os, stat, sys
d = sys.argv[1]
procfd = os.open("/proc/self/fd", os.O_PATH)  # virtiofsd's lo.proc_self_fd

def attempt(name, call):
    try:
        call()
        print(name, "ok")
    except OSError as exc:
        print(name, errno.errorcode[exc.errno])

f = os.open(d + "/file", os.O_CREAT | os.O_WRONLY, 0o644)
attempt("chmod 4755 by its fd", lambda: os.chmod(str(f), 0o4755, dir_fd=procfd))
attempt("chmod 2755 by its fd", lambda: os.chmod(str(f), 0o2755, dir_fd=procfd))
attempt("chmod 0700 by its fd", lambda: os.chmod(str(f), 0o700, dir_fd=procfd))
attempt("chmod 4755 by path", lambda: os.chmod(d + "/file", 0o4755))
attempt("fchmod 4755", lambda: os.fchmod(f, 0o4755))
attempt("create 4755", lambda: os.open(d + "/created", os.O_CREAT | os.O_WRONLY, 0o4755))
attempt("mknod kvm", lambda: os.mknod(d + "/kvm", stat.S_IFCHR | 0o666, os.makedev(10, 232)))
attempt("mknod loop", lambda: os.mknod(d + "/loop", stat.S_IFBLK | 0o666, os.makedev(7, 0)))
attempt("mknod whiteout", lambda: os.mknod(d + "/whiteout", stat.S_IFCHR, 0))
attempt("mkfifo", lambda: os.mkfifo(d + "/fifo"))
os.mkdir(d + "/dir")
dirfd = os.open(d + "/dir", os.O_PATH)
attempt("chmod 2775 dir by its fd", lambda: os.chmod(str(dirfd), 0o2775, dir_fd=procfd))
'''


def run_stand_in(directory):
    ours, theirs = socket.socketpair()
    argv, env = stdlib_module_command("vmrun.hypervisor.seccomp_exec", str(theirs.fileno()),
                                      sys.executable, "-S", "-c", STAND_IN, str(directory))
    supervisor = ModeSupervisor("stand-in")
    with subprocess.Popen(argv, env=env, pass_fds=(theirs.fileno(),), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as child:
        theirs.close()
        supervisor.serve(ours, child.pid)
        out, err = child.communicate(timeout=30)
    supervisor.join(5)
    assert child.returncode == 0, err.decode()
    return dict(line.rsplit(" ", 1) for line in out.decode().splitlines()), supervisor


def test_set_id_chmods_are_applied_without_the_bits_and_nodes_refused(tmp_path):
    results, supervisor = run_stand_in(tmp_path)
    assert results == {
        "chmod 4755 by its fd": "ok",
        "chmod 2755 by its fd": "ok",
        "chmod 0700 by its fd": "ok",
        "chmod 4755 by path": "EPERM",  # not virtiofsd's way: refused, not guessed at
        "fchmod 4755": "ok",
        "create 4755": "EPERM",
        "mknod kvm": "EPERM",
        "mknod loop": "EPERM",
        "mknod whiteout": "ok",
        "mkfifo": "ok",
        "chmod 2775 dir by its fd": "ok",
    }
    assert stat.S_IMODE((tmp_path / "file").stat().st_mode) == 0o755  # the last call: fchmod 4755
    assert not (tmp_path / "created").exists()
    assert not (tmp_path / "kvm").exists() and not (tmp_path / "loop").exists()
    assert stat.S_IMODE((tmp_path / "dir").stat().st_mode) == 0o2775  # setgid directories stay
    assert supervisor.stripped == 4


def test_the_filter_refuses_other_abis_and_openat2():
    program = seccomp.set_id_filter(seccomp.ARCHES["x86_64"])
    insns = [program[i:i + 8] for i in range(0, len(program), 8)]
    returns = {int.from_bytes(i[4:], "little") for i in insns if i[0] == 0x06}
    assert returns == {bpf.RET_ALLOW, bpf.RET_USER_NOTIF, bpf.RET_KILL_PROCESS, bpf.ret_errno(1), bpf.ret_errno(38)}
    assert len(insns) < 256


def test_a_helper_that_cannot_start_says_why(tmp_path):
    ours, theirs = socket.socketpair()
    argv, env = stdlib_module_command("vmrun.hypervisor.seccomp_exec", str(theirs.fileno()), "/nonexistent")
    result = subprocess.run(argv, env=env, pass_fds=(theirs.fileno(),), capture_output=True, timeout=30)
    theirs.close()
    ours.close()
    assert result.returncode == 126 and b"No such file" in result.stderr


def test_virtiofsds_pid_file_is_named_after_its_socket():
    from pathlib import Path

    from vmrun.hypervisor.virtiofsd import pid_file_for

    assert pid_file_for(Path("/tmp/vmrun-t1/run/vm/ab12/virtiofsd.sock")) == \
        Path("/var/run/virtiofsd/.tmp.vmrun-t1.run.vm.ab12.virtiofsd.sock.pid")

/* Tries every way a container process has to get an AF_VSOCK socket, the only kind that
 * reaches the host's vsock ports, and prints one line per way: "NAME allowed" or
 * "NAME ERRNO-NAME". Built static and without PIE (tests/security/test_container_vsock.py),
 * so that its data lies below 4 GiB, where the 32-bit calls can point.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/io_uring.h>
#include <linux/vm_sockets.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static const char *errno_name(int e)
{
    switch (e) {
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case ENOSYS: return "ENOSYS";
    case EINVAL: return "EINVAL";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    case ENODEV: return "ENODEV";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    default: return strerror(e);
    }
}

static void report(const char *name, long result)
{
    if (result >= 0)
        printf("%s allowed\n", name);
    else
        printf("%s %s\n", name, errno_name((int)-result));
    fflush(stdout);
}

/* -errno, as the kernel returns it */
static long sys(long nr, long a, long b, long c)
{
    long r = syscall(nr, a, b, c);
    return r < 0 ? -errno : r;
}

/* A 32-bit system call from this 64-bit process: what a static i386 binary does. */
static long int80(long nr, long a, long b, long c)
{
    long r;
    __asm__ volatile("int $0x80" : "=a"(r) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    return r;
}

/* socketcall's arguments: 32-bit words, below 4 GiB (a non-PIE static binary's data). */
static uint32_t socketcall_args[3] = {AF_VSOCK, SOCK_STREAM, 0};

/* IORING_OP_SOCKET (Linux 5.19): the socket is made by the kernel, not by socket(2). */
static long io_uring_socket(void)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    long fd = sys(__NR_io_uring_setup, 4, (long)&p, 0);
    if (fd < 0)
        return fd;
    size_t sq_size = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
    size_t cq_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (cq_size > sq_size)
        sq_size = cq_size;  /* IORING_FEAT_SINGLE_MMAP: one mapping holds both rings */
    char *sq = mmap(NULL, sq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    struct io_uring_sqe *sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                                     MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (sq == MAP_FAILED || sqes == MAP_FAILED)
        return -errno;
    uint32_t *tail = (uint32_t *)(sq + p.sq_off.tail);
    uint32_t index = *tail & *(uint32_t *)(sq + p.sq_off.ring_mask);
    struct io_uring_sqe *sqe = &sqes[index];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = IORING_OP_SOCKET;
    sqe->fd = AF_VSOCK;
    sqe->off = SOCK_STREAM;
    ((uint32_t *)(sq + p.sq_off.array))[index] = index;
    __atomic_store_n(tail, *tail + 1, __ATOMIC_RELEASE);
    long entered = syscall(__NR_io_uring_enter, fd, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0);
    if (entered < 0)
        return -errno;
    char *cq = sq;
    uint32_t head = *(uint32_t *)(cq + p.cq_off.head);
    uint32_t mask = *(uint32_t *)(cq + p.cq_off.ring_mask);
    struct io_uring_cqe *cqe = &((struct io_uring_cqe *)(cq + p.cq_off.cqes))[head & mask];
    return cqe->res;
}

int main(void)
{
    long fd = sys(__NR_socket, AF_VSOCK, SOCK_STREAM, 0);
    report("socket", fd);
    if (fd >= 0) {
        /* Only to show what an allowed socket reaches: the host (CID 2). */
        struct sockaddr_vm host = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = 1024};
        report("connect-to-host", connect((int)fd, (struct sockaddr *)&host, sizeof host) ? -errno : 0);
    }
    /* The kernel reads the domain as an int: bits above 32 must not get past the filter. */
    report("socket-high-bits", sys(__NR_socket, (1L << 32) | AF_VSOCK, SOCK_STREAM, 0));
    int pair[2];
    report("socketpair", syscall(__NR_socketpair, AF_VSOCK, SOCK_STREAM, 0, pair) ? -errno : 0);
    report("i386-socket", int80(359, AF_VSOCK, SOCK_STREAM, 0));
    report("i386-socketcall", int80(102, 1 /* SYS_SOCKET */, (long)(uintptr_t)socketcall_args, 0));
    report("io_uring-socket", io_uring_socket());
    /* Other sockets are not this guard's business. */
    report("unix-socket", sys(__NR_socket, AF_UNIX, SOCK_STREAM, 0));
    report("inet-socket", sys(__NR_socket, AF_INET, SOCK_DGRAM, 0));
    return 0;
}

/*
 * statx() that retries without AT_NO_AUTOMOUNT when the kernel refuses that flag.
 *
 * gVisor's Sentry as packaged by Debian bookworm (runsc 0.0~20221219) answers
 * statx() with EINVAL whenever AT_NO_AUTOMOUNT is in the flags, whatever the
 * mask; AT_SYMLINK_NOFOLLOW, AT_EMPTY_PATH and the AT_STATX_*_SYNC flags are
 * accepted. GNU coreutils 9.1 passes AT_NO_AUTOMOUNT on every statx() of ls
 * and stat, so both fail on every path ("cannot access '/': Invalid argument").
 *
 * The sandbox image lists this library in /etc/ld.so.preload, so every
 * dynamically linked program of the sandbox gets it whatever its environment.
 * Under runc the first call succeeds and nothing changes. Dropping the flag is
 * harmless: a container has no automount points, and stat()/lstat() never
 * trigger automounts either (since Linux 4.11).
 *
 * Only syscall() and errno are used, so the library depends on nothing newer
 * than glibc 2.2.5 whatever glibc the host that compiles it has.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *buf)
{
    long r = syscall(SYS_statx, dirfd, path, flags, mask, buf);
    if (r == -1 && errno == EINVAL && (flags & AT_NO_AUTOMOUNT))
        r = syscall(SYS_statx, dirfd, path, flags & ~AT_NO_AUTOMOUNT, mask, buf);
    return (int)r;
}

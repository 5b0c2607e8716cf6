/*
 * fsflag_shim - LD_PRELOAD library that makes libqb believe the flag file
 * /etc/libqb/force-filesystem-sockets exists, so that a server or client
 * can be switched to filesystem sockets (/tmp/NAME on Debian) without
 * creating the file system-wide (which would affect every libqb program on
 * the machine, and needs root).
 *
 * Debian's libqb 2.0.6 checks the flag with stat@GLIBC_2.33 (see
 * `nm -D libqb.so.100`).  stat64 and the pre-2.33 __xstat/__xstat64 entry
 * points are covered as well so that the shim keeps working for libqb
 * builds against other glibc versions.  Every other path is forwarded to
 * the next definition (normally glibc's) untouched.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define FLAG_PATH "/etc/libqb/force-filesystem-sockets"

/*
 * The pre-2.33 entry points are not declared by modern headers; their
 * signatures are part of glibc's ABI.
 */
int __xstat(int ver, const char *path, struct stat *buf);
int __xstat64(int ver, const char *path, struct stat64 *buf);

typedef int (*stat_fn) (const char *, struct stat *);
typedef int (*stat64_fn) (const char *, struct stat64 *);
typedef int (*xstat_fn) (int, const char *, struct stat *);
typedef int (*xstat64_fn) (int, const char *, struct stat64 *);

static int
is_flag_path(const char *path)
{
	return path != NULL && strcmp(path, FLAG_PATH) == 0;
}

/*
 * A plausible result for the flag file: an empty regular file owned by
 * root.  libqb only looks at the return value, but callers that inspect the
 * buffer should not see garbage.
 */
#define FAKE_FLAG_STAT(buf) do {				\
		memset((buf), 0, sizeof(*(buf)));		\
		(buf)->st_mode = S_IFREG | 0644;		\
		(buf)->st_nlink = 1;				\
		(buf)->st_blksize = 4096;			\
	} while (0)

/*
 * Find the next definition of a symbol.  Compat-only symbols such as
 * __xstat in glibc >= 2.33 have no default version, so a plain dlsym()
 * may miss them; fall back to the x86-64 base version then.  The lookup is
 * repeated on every call rather than cached: stat may be called from
 * several threads and the lookup is cheap compared to the syscall.
 */
static void *
next_symbol(const char *name)
{
	void *sym = dlsym(RTLD_NEXT, name);

#if defined(__x86_64__)
	if (sym == NULL) {
		sym = dlvsym(RTLD_NEXT, name, "GLIBC_2.2.5");
	}
#endif
	return sym;
}

int
stat(const char *path, struct stat *buf)
{
	stat_fn real;

	if (is_flag_path(path)) {
		FAKE_FLAG_STAT(buf);
		return 0;
	}
	real = (stat_fn) next_symbol("stat");
	if (real == NULL) {
		errno = ENOSYS;
		return -1;
	}
	return real(path, buf);
}

int
stat64(const char *path, struct stat64 *buf)
{
	stat64_fn real;

	if (is_flag_path(path)) {
		FAKE_FLAG_STAT(buf);
		return 0;
	}
	real = (stat64_fn) next_symbol("stat64");
	if (real == NULL) {
		errno = ENOSYS;
		return -1;
	}
	return real(path, buf);
}

int
__xstat(int ver, const char *path, struct stat *buf)
{
	xstat_fn real;

	if (is_flag_path(path)) {
		FAKE_FLAG_STAT(buf);
		return 0;
	}
	real = (xstat_fn) next_symbol("__xstat");
	if (real == NULL) {
		errno = ENOSYS;
		return -1;
	}
	return real(ver, path, buf);
}

int
__xstat64(int ver, const char *path, struct stat64 *buf)
{
	xstat64_fn real;

	if (is_flag_path(path)) {
		FAKE_FLAG_STAT(buf);
		return 0;
	}
	real = (xstat64_fn) next_symbol("__xstat64");
	if (real == NULL) {
		errno = ENOSYS;
		return -1;
	}
	return real(ver, path, buf);
}

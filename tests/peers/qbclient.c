/*
 * qbclient - a scripted libqb IPC client used as a reference peer by the
 * txqb test suite.  It talks to a service through the unmodified libqb
 * client API and reports what it saw as one stdout line per command.
 *
 * Usage:
 *   qbclient NAME [--max BYTES] [--fcmax N] [--async 1] [--cycles N]
 *                 CMD ARGS... [CMD ARGS...]...
 *
 * --cycles N first connects and disconnects N times and prints
 * CYCLES ok=<n> fail=<n> errno=<last errno>; with no commands it then
 * exits (0).  --async 1 connects with qb_ipcc_connect_async, a poll on the
 * returned fd and qb_ipcc_connect_continue (libqb's async-connect case).
 * First line: CONNECTED <negotiated size>, or CONNECT_FAIL <errno> (exit 2).
 * Then, per command (request ids as in qbserver.c; timeouts 10 s):
 *   echo SIZE         ECHO <SIZE> ok          round trip, payload compared
 *   echos N SIZE      ECHOS <N> ok            N echoes, pattern varies
 *   sweep STEP        SWEEP <count> ok        sizes 0, STEP, ... bufsize-24
 *   oversize          OVERSIZE <rc>           bufsize+1 bytes: -EMSGSIZE
 *   events COUNT SIZE EVENTS <COUNT> ok       events checked, then response
 *   stall COUNT SIZE MS  STALL <COUNT> ok     as events, reading nothing for MS
 *   evresp N          EVRESP <N> ok           response first, then N events
 *   auth              AUTH <pid> <uid> <gid>  the server's credentials
 *   feed MS           FEED <error>            id 10: server self-feeds for MS
 *   invalid ID        INVALID <ID> <error>    the response's error field
 *   fc ID MS          FC eagain=<count>       flow control (ID 2 or 3)
 *   kick              KICKED <rc>             server disconnects us
 *   die               DIED <rc> connected=<0|1>
 *   waitclose MS      CLOSEDBYPEER <rc> | STILLOPEN
 *   send ID SIZE      SENT <rc>               raw qb_ipcc_send
 *   recv MS           RECV <rc> <id> <error>  raw qb_ipcc_recv
 *   evrecv MS         EVRECV <rc> <id> <error>
 *   sleep MS          (nothing)
 *   hang              HANGING, then waits to be killed
 * A failed check prints FAIL <cmd> <detail> and exits 1; after the last
 * command the client disconnects, prints DONE and exits 0.  Nothing else is
 * written to stdout; set QBPEER_LOG=1 for libqb's debug log on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <qb/qbdefs.h>
#include <qb/qbipc_common.h>
#include <qb/qbipcc.h>
#include <qb/qblog.h>

#include "peer_common.h"

enum {
	MSG_ECHO = 0,
	MSG_EVENTS = 1,
	MSG_KICK = 4,
	MSG_DIE = 5,
	MSG_EVENTS_THEN_RESPONSE = 6,
};

#define REQ_HDR_SIZE sizeof(struct qb_ipc_request_header)
#define RES_HDR_SIZE sizeof(struct qb_ipc_response_header)
#define DEFAULT_TIMEOUT_MS 10000
#define FC_LIMIT_MS 20000
/* Largest payload the raw "send" command will build; far above any buffer. */
#define MAX_RAW_PAYLOAD (64L * 1024 * 1024)

struct command;

/* One parsed script entry: a command and its numeric arguments. */
struct step {
	const struct command *cmd;
	long args[3];
};

static qb_ipcc_connection_t *conn;
static int32_t bufsize;		/* negotiated max message size */
static uint8_t *rbuf;		/* receive buffer of exactly bufsize bytes */
static struct step *steps;	/* the parsed script */

/* ---- small utilities ---- */

static void
usage(void)
{
	fprintf(stderr,
		"usage: qbclient NAME [--max BYTES] [--fcmax N] CMD ARGS... ...\n");
	exit(64);
}

static void
cleanup(void)
{
	if (conn != NULL) {
		qb_ipcc_disconnect(conn);
		conn = NULL;
	}
	free(rbuf);
	rbuf = NULL;
	free(steps);
	steps = NULL;
}

/* Report a failed check and stop; the disconnect keeps /dev/shm tidy. */
static void __attribute__((noreturn, format(printf, 2, 3)))
fail(const char *cmd, const char *fmt, ...)
{
	va_list ap;

	printf("FAIL %s ", cmd);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	cleanup();
	exit(1);
}

static int
parse_long(const char *s, long min, long max, long *out)
{
	char *end;
	long v;

	if (s == NULL || *s == '\0') {
		return -1;
	}
	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || *end != '\0' || v < min || v > max) {
		return -1;
	}
	*out = v;
	return 0;
}

static uint64_t
monotonic_ms(void)
{
	struct timespec ts;

	/* CLOCK_MONOTONIC cannot fail on Linux with a valid pointer. */
	(void)clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000ULL + (uint64_t)ts.tv_nsec / 1000000ULL;
}

static void
fill_pattern(uint8_t *p, size_t len, unsigned seed)
{
	size_t i;

	for (i = 0; i < len; i++) {
		p[i] = (uint8_t)(i * 7 + seed);
	}
}

/* The received message's header fields (rc must be >= RES_HDR_SIZE). */
static const struct qb_ipc_response_header *
rhdr(void)
{
	return (const struct qb_ipc_response_header *)rbuf;
}

/*
 * Allocate a request (header + len payload bytes) in one buffer.  Callers
 * fill the payload; the header's padding words stay zero.
 */
static uint8_t *
new_request(const char *cmd, int32_t id, size_t len)
{
	struct qb_ipc_request_header *hdr;
	uint8_t *msg = calloc(1, REQ_HDR_SIZE + len);

	if (msg == NULL) {
		fail(cmd, "out-of-memory");
	}
	hdr = (struct qb_ipc_request_header *)msg;
	hdr->id = id;
	hdr->size = (int32_t)(REQ_HDR_SIZE + len);
	return msg;
}

/*
 * qb_ipcc_send, retried while it reports -EAGAIN for up to limit_ms.  The
 * send side only returns -EAGAIN before anything was sent (flow control or
 * a full SHM request ring, which happens right after a large request whose
 * chunk the server has not reclaimed yet), so retrying never duplicates.
 */
static ssize_t
send_retrying(const void *msg, size_t len, uint64_t limit_ms)
{
	uint64_t deadline = monotonic_ms() + limit_ms;
	ssize_t rc;

	for (;;) {
		rc = qb_ipcc_send(conn, msg, len);
		if (rc != -EAGAIN || monotonic_ms() >= deadline) {
			return rc;
		}
		usleep(1000);
	}
}

/*
 * One request/response round trip through qb_ipcc_sendv_recv.  Its receive
 * loop swallows -EAGAIN while connected, so -EAGAIN with the connection
 * still up means "not sent" (see send_retrying) and is retried.
 */
static ssize_t
round_trip(int32_t id, const void *payload, size_t len, int32_t timeout_ms)
{
	struct qb_ipc_request_header hdr;
	struct iovec iov[2];
	uint64_t deadline = monotonic_ms() + DEFAULT_TIMEOUT_MS;
	ssize_t rc;

	memset(&hdr, 0, sizeof(hdr));
	hdr.id = id;
	hdr.size = (int32_t)(REQ_HDR_SIZE + len);
	iov[0].iov_base = &hdr;
	iov[0].iov_len = sizeof(hdr);
	iov[1].iov_base = (void *)payload;
	iov[1].iov_len = len;
	for (;;) {
		rc = qb_ipcc_sendv_recv(conn, iov, len > 0 ? 2 : 1, rbuf,
					(size_t)bufsize, timeout_ms);
		if (rc != -EAGAIN || !qb_ipcc_is_connected(conn) ||
		    monotonic_ms() >= deadline) {
			return rc;
		}
		usleep(1000);
	}
}

/*
 * Check that rc is a well-formed message with the expected header (and,
 * if size >= 0, that size).  Returns NULL if so, else a description of what
 * arrived, in a static buffer.
 */
static const char *
check_message(const char *what, ssize_t rc, int32_t id, int32_t error,
	      ssize_t size)
{
	static char detail[160];

	if (rc < 0) {
		snprintf(detail, sizeof(detail), "%s rc=%zd", what, rc);
	} else if (rc < (ssize_t)RES_HDR_SIZE) {
		snprintf(detail, sizeof(detail), "%s short=%zd", what, rc);
	} else if (rhdr()->id != id || rhdr()->error != error ||
		   rhdr()->size != rc || (size >= 0 && rc != size)) {
		snprintf(detail, sizeof(detail),
			 "%s rc=%zd id=%d error=%d size=%d", what, rc,
			 rhdr()->id, rhdr()->error, rhdr()->size);
	} else {
		return NULL;
	}
	return detail;
}

static void
expect_message(const char *cmd, const char *what, ssize_t rc, int32_t id,
	       int32_t error, ssize_t size)
{
	const char *detail = check_message(what, rc, id, error, size);

	if (detail != NULL) {
		fail(cmd, "%s", detail);
	}
}

static void
echo_once(const char *cmd, size_t size, unsigned seed)
{
	const char *detail;
	uint8_t *payload;
	int mismatch;
	ssize_t rc;

	/* The response is 8 bytes longer than the request and must fit rbuf. */
	if (size > (size_t)bufsize - RES_HDR_SIZE) {
		fail(cmd, "size=%zu exceeds bufsize-24=%zu", size,
		     (size_t)bufsize - RES_HDR_SIZE);
	}
	payload = calloc(1, size > 0 ? size : 1);
	if (payload == NULL) {
		fail(cmd, "out-of-memory");
	}
	fill_pattern(payload, size, seed);
	rc = round_trip(MSG_ECHO, payload, size, DEFAULT_TIMEOUT_MS);
	detail = check_message("response", rc, MSG_ECHO, 0,
			       (ssize_t)(RES_HDR_SIZE + size));
	mismatch = detail == NULL &&
	    memcmp(rbuf + RES_HDR_SIZE, payload, size) != 0;
	free(payload);
	if (detail != NULL) {
		fail(cmd, "size=%zu %s", size, detail);
	}
	if (mismatch) {
		fail(cmd, "size=%zu payload-mismatch", size);
	}
}

static int
is_timeout(ssize_t rc)
{
	return rc == -EAGAIN || rc == -ETIMEDOUT;
}

/*
 * Wait until the server drops the connection.  Both a disconnect error
 * from a receive call and qb_ipcc_is_connected() turning 0 count; timeouts
 * (-EAGAIN from event_recv, -ETIMEDOUT) do not.  Events that still arrive
 * are consumed.  Returns 1 when closed, with *last_rc = the last negative
 * return value seen.
 */
static int
wait_for_close(uint64_t limit_ms, ssize_t *last_rc)
{
	uint64_t deadline = monotonic_ms() + limit_ms;
	ssize_t rc;

	*last_rc = 0;
	for (;;) {
		if (!qb_ipcc_is_connected(conn)) {
			/*
			 * is_connected() may notice the hang-up before any receive
			 * call did; ask once more so that the error the API reports
			 * for a closed connection is what gets printed.
			 */
			if (*last_rc == 0 || is_timeout(*last_rc)) {
				rc = qb_ipcc_event_recv(conn, rbuf,
							(size_t)bufsize, 0);
				if (rc < 0) {
					*last_rc = rc;
				}
			}
			return 1;
		}
		rc = qb_ipcc_event_recv(conn, rbuf, (size_t)bufsize, 100);
		if (rc < 0) {
			*last_rc = rc;
			if (!is_timeout(rc)) {
				return 1;
			}
		}
		if (monotonic_ms() >= deadline) {
			return 0;
		}
	}
}

/* ---- commands ---- */

typedef void (*cmd_fn)(const char *cmd, const long *args);

static void
cmd_echo(const char *cmd, const long *args)
{
	echo_once(cmd, (size_t)args[0], (unsigned)args[0]);
	printf("ECHO %ld ok\n", args[0]);
}

static void
cmd_echos(const char *cmd, const long *args)
{
	long i;

	for (i = 0; i < args[0]; i++) {
		echo_once(cmd, (size_t)args[1], (unsigned)(args[1] + i));
	}
	printf("ECHOS %ld ok\n", args[0]);
}

static void
cmd_sweep(const char *cmd, const long *args)
{
	size_t step = (size_t)args[0];
	size_t top = (size_t)bufsize - RES_HDR_SIZE;
	size_t size;
	long count = 0;

	for (size = 0; size < top; size += step) {
		echo_once(cmd, size, (unsigned)size);
		count++;
	}
	echo_once(cmd, top, (unsigned)top);	/* the largest size, always */
	count++;
	printf("SWEEP %ld ok\n", count);
}

static void
cmd_oversize(const char *cmd, const long *args)
{
	size_t len = (size_t)bufsize + 1;
	uint8_t *msg = new_request(cmd, MSG_ECHO, len - REQ_HDR_SIZE);
	ssize_t rc;

	(void)args;
	rc = qb_ipcc_send(conn, msg, len);
	free(msg);
	if (rc != -EMSGSIZE) {
		fail(cmd, "rc=%zd", rc);
	}
	printf("OVERSIZE %zd\n", rc);
}

static void cmd_sleep(const char *cmd, const long *args);

/* Request COUNT events of SIZE bytes; read nothing for stall_ms; check all. */
static void
events_checked(const char *cmd, uint32_t count, uint32_t size, long stall_ms)
{
	uint8_t *msg = new_request(cmd, MSG_EVENTS, 8);
	const uint8_t *body = rbuf + RES_HDR_SIZE;
	uint32_t seq, i;
	ssize_t rc;

	if (size < 4 || size > (uint32_t)bufsize - RES_HDR_SIZE) {
		free(msg);
		fail(cmd, "size=%" PRIu32 " out of range", size);
	}
	put_le32(msg + REQ_HDR_SIZE, count);
	put_le32(msg + REQ_HDR_SIZE + 4, size);
	rc = send_retrying(msg, REQ_HDR_SIZE + 8, DEFAULT_TIMEOUT_MS);
	free(msg);
	if (rc < 0) {
		fail(cmd, "send rc=%zd", rc);
	}
	if (stall_ms > 0) {
		cmd_sleep(cmd, &stall_ms);
	}

	for (seq = 0; seq < count; seq++) {
		rc = qb_ipcc_event_recv(conn, rbuf, (size_t)bufsize,
					DEFAULT_TIMEOUT_MS);
		expect_message(cmd, "event", rc, MSG_EVENTS, 0,
			       (ssize_t)(RES_HDR_SIZE + size));
		if (get_le32(body) != seq) {
			fail(cmd, "event seq=%" PRIu32 " expected=%" PRIu32,
			     get_le32(body), seq);
		}
		for (i = 4; i < size; i++) {
			if (body[i] != (uint8_t)(seq + i)) {
				fail(cmd, "event seq=%" PRIu32 " byte=%" PRIu32
				     " pattern-mismatch", seq, i);
			}
		}
	}

	rc = qb_ipcc_recv(conn, rbuf, (size_t)bufsize, DEFAULT_TIMEOUT_MS);
	expect_message(cmd, "response", rc, MSG_EVENTS, 0, RES_HDR_SIZE + 4);
	if (get_le32(body) != count) {
		fail(cmd, "response count=%" PRIu32, get_le32(body));
	}
}

static void
cmd_events(const char *cmd, const long *args)
{
	events_checked(cmd, (uint32_t)args[0], (uint32_t)args[1], 0);
	printf("EVENTS %ld ok\n", args[0]);
}

static void
cmd_stall(const char *cmd, const long *args)
{
	events_checked(cmd, (uint32_t)args[0], (uint32_t)args[1], args[2]);
	printf("STALL %ld ok\n", args[0]);
}

static void
cmd_evresp(const char *cmd, const long *args)
{
	uint32_t n = (uint32_t)args[0], seq;
	uint8_t *msg = new_request(cmd, MSG_EVENTS_THEN_RESPONSE, 4);
	ssize_t rc;

	put_le32(msg + REQ_HDR_SIZE, n);
	rc = send_retrying(msg, REQ_HDR_SIZE + 4, DEFAULT_TIMEOUT_MS);
	free(msg);
	if (rc < 0) {
		fail(cmd, "send rc=%zd", rc);
	}
	/* The events were sent first; they wait in their own channel. */
	rc = qb_ipcc_recv(conn, rbuf, (size_t)bufsize, DEFAULT_TIMEOUT_MS);
	expect_message(cmd, "response", rc, MSG_EVENTS_THEN_RESPONSE, 0,
		       RES_HDR_SIZE);
	for (seq = 0; seq < n; seq++) {
		rc = qb_ipcc_event_recv(conn, rbuf, (size_t)bufsize,
					DEFAULT_TIMEOUT_MS);
		expect_message(cmd, "event", rc, MSG_EVENTS_THEN_RESPONSE, 0,
			       RES_HDR_SIZE + 4);
		if (get_le32(rbuf + RES_HDR_SIZE) != seq) {
			fail(cmd, "event seq=%" PRIu32 " expected=%" PRIu32,
			     get_le32(rbuf + RES_HDR_SIZE), seq);
		}
	}
	printf("EVRESP %" PRIu32 " ok\n", n);
}

static void
cmd_auth(const char *cmd, const long *args)
{
	pid_t pid;
	uid_t uid;
	gid_t gid;
	int32_t rc;

	(void)args;
	rc = qb_ipcc_auth_get(conn, &pid, &uid, &gid);
	if (rc != 0) {
		fail(cmd, "rc=%d", rc);
	}
	printf("AUTH %ld %lu %lu\n", (long)pid, (unsigned long)uid,
	       (unsigned long)gid);
}

static void
cmd_invalid(const char *cmd, const long *args)
{
	int32_t id = (int32_t)args[0];
	ssize_t rc = round_trip(id, NULL, 0, DEFAULT_TIMEOUT_MS);

	if (rc < 0) {
		fail(cmd, "rc=%zd", rc);
	}
	if (rc < (ssize_t)RES_HDR_SIZE || rhdr()->id != id) {
		fail(cmd, "rc=%zd id=%d", rc,
		     rc >= (ssize_t)RES_HDR_SIZE ? rhdr()->id : -1);
	}
	printf("INVALID %d %d\n", id, rhdr()->error);
}

static void
cmd_fc(const char *cmd, const long *args)
{
	int32_t id = (int32_t)args[0];
	uint8_t ms[4];
	uint8_t *echo;
	const char *detail;
	uint64_t deadline;
	long eagain = 0;
	int mismatch;
	ssize_t rc;

	put_le32(ms, (uint32_t)args[1]);
	rc = round_trip(id, ms, sizeof(ms), DEFAULT_TIMEOUT_MS);
	expect_message(cmd, "fc-response", rc, id, 0, RES_HDR_SIZE);

	/* Count how often flow control turns the send away. */
	echo = new_request(cmd, MSG_ECHO, 8);
	fill_pattern(echo + REQ_HDR_SIZE, 8, 8);
	deadline = monotonic_ms() + FC_LIMIT_MS;
	for (;;) {
		rc = qb_ipcc_send(conn, echo, REQ_HDR_SIZE + 8);
		if (rc != -EAGAIN || monotonic_ms() >= deadline) {
			break;
		}
		eagain++;
		usleep(1000);
	}
	if (rc < 0) {
		free(echo);
		fail(cmd, "send rc=%zd eagain=%ld", rc, eagain);
	}

	/*
	 * With OFF_2 and the default fc_enable_max of 1 the send goes through
	 * at once and the server only answers once the limit is lifted.
	 */
	deadline = monotonic_ms() + FC_LIMIT_MS;
	do {
		rc = qb_ipcc_recv(conn, rbuf, (size_t)bufsize, FC_LIMIT_MS);
	} while ((rc == -EAGAIN || rc == -ETIMEDOUT) &&
		 monotonic_ms() < deadline);
	detail = check_message("echo-response", rc, MSG_ECHO, 0,
			       RES_HDR_SIZE + 8);
	mismatch = detail == NULL &&
	    memcmp(rbuf + RES_HDR_SIZE, echo + REQ_HDR_SIZE, 8) != 0;
	free(echo);
	if (detail != NULL) {
		fail(cmd, "%s eagain=%ld", detail, eagain);
	}
	if (mismatch) {
		fail(cmd, "echo payload-mismatch");
	}
	printf("FC eagain=%ld\n", eagain);
}

static void
cmd_feed(const char *cmd, const long *args)
{
	uint8_t ms[4];
	ssize_t rc;

	put_le32(ms, (uint32_t)args[0]);
	rc = round_trip(10, ms, sizeof(ms), DEFAULT_TIMEOUT_MS);
	if (rc < (ssize_t)RES_HDR_SIZE) {
		fail(cmd, "rc=%zd", rc);
	}
	printf("FEED %d\n", rhdr()->error);
}

static void
cmd_kick(const char *cmd, const long *args)
{
	uint8_t *msg = new_request(cmd, MSG_KICK, 0);
	ssize_t rc, last;

	(void)args;
	rc = send_retrying(msg, REQ_HDR_SIZE, DEFAULT_TIMEOUT_MS);
	free(msg);
	if (rc < 0) {
		fail(cmd, "send rc=%zd", rc);
	}
	if (!wait_for_close(DEFAULT_TIMEOUT_MS, &last)) {
		fail(cmd, "still-connected last=%zd", last);
	}
	printf("KICKED %zd\n", last);
}

static void
cmd_die(const char *cmd, const long *args)
{
	ssize_t rc = round_trip(MSG_DIE, NULL, 0, DEFAULT_TIMEOUT_MS);

	(void)cmd;
	(void)args;
	printf("DIED %zd connected=%d\n", rc, qb_ipcc_is_connected(conn));
}

static void
cmd_waitclose(const char *cmd, const long *args)
{
	ssize_t last;

	(void)cmd;
	if (wait_for_close((uint64_t)args[0], &last)) {
		printf("CLOSEDBYPEER %zd\n", last);
	} else {
		printf("STILLOPEN\n");
	}
}

static void
cmd_send(const char *cmd, const long *args)
{
	size_t len = (size_t)args[1];
	uint8_t *msg = new_request(cmd, (int32_t)args[0], len);
	ssize_t rc;

	fill_pattern(msg + REQ_HDR_SIZE, len, (unsigned)len);
	rc = qb_ipcc_send(conn, msg, REQ_HDR_SIZE + len);
	free(msg);
	printf("SENT %zd\n", rc);
}

/* Print rc and, when a header arrived, its id and error. */
static void
print_received(const char *tag, ssize_t rc)
{
	if (rc >= (ssize_t)RES_HDR_SIZE) {
		printf("%s %zd %d %d\n", tag, rc, rhdr()->id, rhdr()->error);
	} else {
		printf("%s %zd -1 -1\n", tag, rc);
	}
}

static void
cmd_recv(const char *cmd, const long *args)
{
	(void)cmd;
	print_received("RECV", qb_ipcc_recv(conn, rbuf, (size_t)bufsize,
					    (int32_t)args[0]));
}

static void
cmd_evrecv(const char *cmd, const long *args)
{
	(void)cmd;
	print_received("EVRECV", qb_ipcc_event_recv(conn, rbuf,
						    (size_t)bufsize,
						    (int32_t)args[0]));
}

static void
cmd_sleep(const char *cmd, const long *args)
{
	struct timespec ts = {
		.tv_sec = args[0] / 1000,
		.tv_nsec = (args[0] % 1000) * 1000000L,
	};

	(void)cmd;
	/* nanosleep rather than usleep: usleep is unspecified above 1 s. */
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
		continue;
	}
}

static void
cmd_hang(const char *cmd, const long *args)
{
	(void)cmd;
	(void)args;
	printf("HANGING\n");
	for (;;) {
		pause();
	}
}

struct command {
	const char *name;
	int nargs;
	long min[3], max[3];	/* accepted range of each argument */
	cmd_fn fn;
};

static const struct command commands[] = {
	{"echo", 1, {0}, {INT32_MAX}, cmd_echo},
	{"echos", 2, {0, 0}, {INT32_MAX, INT32_MAX}, cmd_echos},
	{"sweep", 1, {1}, {INT32_MAX}, cmd_sweep},
	{"oversize", 0, {0}, {0}, cmd_oversize},
	{"events", 2, {0, 4}, {INT32_MAX, INT32_MAX}, cmd_events},
	{"stall", 3, {0, 4, 0}, {INT32_MAX, INT32_MAX, INT32_MAX}, cmd_stall},
	{"evresp", 1, {0}, {INT32_MAX}, cmd_evresp},
	{"auth", 0, {0}, {0}, cmd_auth},
	{"invalid", 1, {INT32_MIN}, {INT32_MAX}, cmd_invalid},
	{"fc", 2, {2, 0}, {3, INT32_MAX}, cmd_fc},
	{"feed", 1, {0}, {INT32_MAX}, cmd_feed},
	{"kick", 0, {0}, {0}, cmd_kick},
	{"die", 0, {0}, {0}, cmd_die},
	{"waitclose", 1, {0}, {INT32_MAX}, cmd_waitclose},
	{"send", 2, {INT32_MIN, 0}, {INT32_MAX, MAX_RAW_PAYLOAD}, cmd_send},
	{"recv", 1, {-1}, {INT32_MAX}, cmd_recv},
	{"evrecv", 1, {-1}, {INT32_MAX}, cmd_evrecv},
	{"sleep", 1, {0}, {INT32_MAX}, cmd_sleep},
	{"hang", 0, {0}, {0}, cmd_hang},
};

static const struct command *
find_command(const char *name)
{
	size_t i;

	for (i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		if (strcmp(commands[i].name, name) == 0) {
			return &commands[i];
		}
	}
	return NULL;
}

/*
 * Parse the whole script before connecting, so that a typo in a test is a
 * usage error (exit 64) rather than a half-run conversation.
 */
static size_t
parse_script(int argc, char **argv, int first)
{
	size_t n = 0;
	int i = first, a;

	steps = calloc((size_t)(argc - first) + 1, sizeof(*steps));
	if (steps == NULL) {
		perror("calloc");
		exit(1);
	}
	while (i < argc) {
		const struct command *cmd = find_command(argv[i]);

		if (cmd == NULL || i + cmd->nargs >= argc) {
			fprintf(stderr, "qbclient: bad command at '%s'\n",
				argv[i]);
			cleanup();
			usage();
		}
		for (a = 0; a < cmd->nargs; a++) {
			if (parse_long(argv[i + 1 + a], cmd->min[a], cmd->max[a],
				       &steps[n].args[a]) != 0) {
				fprintf(stderr, "qbclient: bad argument '%s' to %s\n",
					argv[i + 1 + a], cmd->name);
				cleanup();
				usage();
			}
		}
		steps[n].cmd = cmd;
		n++;
		i += 1 + cmd->nargs;
	}
	return n;
}

/* qb_ipcc_connect_async, then wait for the fd, then connect_continue. */
static qb_ipcc_connection_t *
connect_async(const char *name, size_t max)
{
	struct pollfd pfd = {.events = POLLIN};
	qb_ipcc_connection_t *c;
	int rc;

	c = qb_ipcc_connect_async(name, max, &pfd.fd);
	if (c == NULL) {
		return NULL;
	}
	do {
		rc = poll(&pfd, 1, DEFAULT_TIMEOUT_MS);
	} while (rc < 0 && errno == EINTR);
	if (rc != 1) {
		qb_ipcc_disconnect(c);
		errno = rc == 0 ? ETIMEDOUT : errno;
		return NULL;
	}
	rc = qb_ipcc_connect_continue(c);
	if (rc != 0) {
		/* connect_continue frees the connection when it fails. */
		errno = -rc;
		return NULL;
	}
	return c;
}

static qb_ipcc_connection_t *
connect_once(const char *name, size_t max, int async)
{
	return async ? connect_async(name, max) : qb_ipcc_connect(name, max);
}

/* libqb's connection-churn case, counted: connect and disconnect N times. */
static void
run_cycles(const char *name, size_t max, int async, long n)
{
	long ok = 0, failed = 0, i;
	int last = 0;

	for (i = 0; i < n; i++) {
		qb_ipcc_connection_t *c = connect_once(name, max, async);

		if (c == NULL) {
			failed++;
			last = errno;
		} else {
			ok++;
			qb_ipcc_disconnect(c);
		}
	}
	printf("CYCLES ok=%ld fail=%ld errno=%d\n", ok, failed, last);
}

int
main(int argc, char **argv)
{
	const char *name;
	long max = 65536, fcmax = -1, async = 0, cycles = 0;
	size_t nsteps, i;
	int first = 2;
	int32_t rc;

	if (setvbuf(stdout, NULL, _IOLBF, 0) != 0) {
		perror("setvbuf");
		return 1;
	}
	if (argc < 2 || argv[1][0] == '-') {
		usage();
	}
	name = argv[1];
	while (first + 1 < argc && argv[first][0] == '-') {
		if (strcmp(argv[first], "--max") == 0) {
			if (parse_long(argv[first + 1], 1, INT32_MAX, &max) != 0) {
				usage();
			}
		} else if (strcmp(argv[first], "--async") == 0) {
			if (parse_long(argv[first + 1], 0, 1, &async) != 0) {
				usage();
			}
		} else if (strcmp(argv[first], "--cycles") == 0) {
			if (parse_long(argv[first + 1], 0, INT32_MAX, &cycles) != 0) {
				usage();
			}
		} else if (strcmp(argv[first], "--fcmax") == 0) {
			if (parse_long(argv[first + 1], 0, 2, &fcmax) != 0) {
				usage();
			}
		} else {
			usage();
		}
		first += 2;
	}
	nsteps = parse_script(argc, argv, first);
	setup_logging("qbclient");

	/* A server that vanishes mid-write must be an error code, not a kill. */
	if (signal(SIGPIPE, SIG_IGN) == SIG_ERR) {
		perror("signal");
		cleanup();
		return 1;
	}

	if (cycles > 0) {
		run_cycles(name, (size_t)max, (int)async, cycles);
		if (nsteps == 0) {
			cleanup();
			return 0;
		}
	}
	conn = connect_once(name, (size_t)max, (int)async);
	if (conn == NULL) {
		printf("CONNECT_FAIL %d\n", errno);
		cleanup();
		return 2;
	}
	bufsize = qb_ipcc_get_buffer_size(conn);
	if (bufsize < (int32_t)RES_HDR_SIZE) {
		fail("connect", "bufsize=%d", bufsize);
	}
	rbuf = malloc((size_t)bufsize);
	if (rbuf == NULL) {
		fail("connect", "out-of-memory");
	}
	printf("CONNECTED %d\n", bufsize);
	if (fcmax >= 0) {
		rc = qb_ipcc_fc_enable_max_set(conn, (uint32_t)fcmax);
		if (rc != 0) {
			fail("fcmax", "rc=%d", rc);
		}
	}

	for (i = 0; i < nsteps; i++) {
		steps[i].cmd->fn(steps[i].cmd->name, steps[i].args);
	}

	cleanup();
	printf("DONE\n");
	return 0;
}

/*
 * qbserver - a scripted libqb IPC server used as a reference peer by the
 * txqb test suite.  It is deliberately a plain libqb application: the
 * service is driven by libqb's own main loop (qb_loop) so that everything a
 * txqb client sees on the wire comes from unmodified libqb code paths.
 *
 * Usage:
 *   qbserver NAME [--transport socket|shm] [--enforce BYTES]
 *                 [--refuse ERRNO] [--auth UID:GID:MODE]
 *                 [--event-on-created 1]
 *
 * Every line written to stdout is a protocol line that the tests parse
 * (READY, ACCEPT, REFUSE, CREATED, CLOSED, DESTROYED, FCON, FCOFF, KICK,
 * DYING, EVENTFAIL, BYE); diagnostics go to stderr.  Set QBPEER_LOG=1 to
 * get libqb's own debug log on stderr.
 *
 * Request ids understood by msg_process (payload integers are uint32 LE):
 *   0 echo              1 COUNT SIZE: send events   2/3 MS: flow control
 *   4 server disconnect 5 die in the handler        6 N: events then response
 *   7 oversize event probe                          8 answered by an event only
 *   9 bulk: oversize try, 1 event, queue lengths (BULKQUEUE), response,
 *     9 more events
 *   10 MS: a high-priority self-feeding job runs for MS milliseconds
 *   11 held: never answered
 *  20 CLEAR: this connection's qb_ipcs_connection_stats_2, cleared after
 *     reading when CLEAR is non-zero: nine u64 LE fields in the struct's
 *     order (client_pid, requests, responses, events, send_retries,
 *     recv_retries, flow_control_state, flow_control_count, event_q_length)
 *  21 CLEAR: qb_ipcs_stats_get: two u64 (active, closed connections)
 *  22 RATE: qb_ipcs_request_rate_limit(service, RATE), kept until changed
 *                                                   * anything else: -EINVAL
 * With --event-on-created 1 every new connection first gets a header-only
 * event id 12 from inside connection_created.
 * Events go out with a 20 s retry budget while the client's queue is full;
 * if it runs out, EVENTFAIL <rc> is printed and the response carries
 * error = rc and (id 1) the number of events actually sent.  Event sizes
 * that would not fit the client's buffer are refused with -EMSGSIZE.
 * A kick (id 4) disconnects from a loop job right after msg_process; see
 * kick_job for why.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
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
#include <qb/qbipcs.h>
#include <qb/qblog.h>

#include "peer_common.h"
#include <qb/qbloop.h>

enum {
	MSG_ECHO = 0,
	MSG_EVENTS = 1,
	MSG_FC_OFF = 2,
	MSG_FC_OFF_2 = 3,
	MSG_KICK = 4,
	MSG_DIE = 5,
	MSG_EVENTS_THEN_RESPONSE = 6,
	MSG_OVERSIZE_EVENT = 7,
	MSG_DISPATCH = 8,
	MSG_BULK = 9,
	MSG_SELF_FEED = 10,
	MSG_HOLD = 11,
	EVENT_ON_CREATED = 12,
	MSG_CONN_STATS = 20,
	MSG_SERVICE_STATS = 21,
	MSG_RATE = 22,
};

/* libqb's bulk-events case: one event before the response, nine after. */
#define BULK_EVENTS 10

/* How long the event senders keep retrying a full event queue. */
#define EVENT_RETRY_LIMIT_NS (20ULL * 1000000000ULL)
#define EVENT_RETRY_SLEEP_US 200

struct options {
	const char *name;
	enum qb_ipc_type transport;
	int enforce_set;
	uint32_t enforce;
	int refuse;		/* errno to refuse connections with, 0 = accept */
	int auth_set;
	uid_t auth_uid;
	gid_t auth_gid;
	mode_t auth_mode;
	int event_on_created;
};

/*
 * libqb's callbacks carry no user pointer for the poll adaptors, so the loop,
 * the service and the options are process globals.  The process serves a
 * single service, which keeps that honest.
 */
static struct options opts;
static qb_loop_t *loop;
static qb_ipcs_service_t *service;

/* Per-connection state, attached with qb_ipcs_context_set. */
struct peer_conn {
	int closed;		/* connection_closed has run */
};

/* At most one flow-control timer is pending; a new request re-arms it. */
static qb_loop_timer_handle fc_timer;
static int fc_timer_armed;

static void
usage(void)
{
	fprintf(stderr,
		"usage: qbserver NAME [--transport socket|shm] [--enforce BYTES]\n"
		"                     [--refuse ERRNO] [--auth UID:GID:MODE]\n"
		"                     [--event-on-created 1]\n");
	exit(64);
}

/* Strict unsigned parser: the whole string must be a number in range. */
static int
parse_ulong(const char *s, int base, unsigned long max, unsigned long *out)
{
	char *end;
	unsigned long v;

	if (s == NULL || *s == '\0' || *s == '-') {
		return -1;
	}
	errno = 0;
	v = strtoul(s, &end, base);
	if (errno != 0 || *end != '\0' || v > max) {
		return -1;
	}
	*out = v;
	return 0;
}

static int
parse_auth(char *s)
{
	char *uid_s = strtok(s, ":");
	char *gid_s = strtok(NULL, ":");
	char *mode_s = strtok(NULL, ":");
	unsigned long uid, gid, mode;

	if (strtok(NULL, ":") != NULL ||
	    parse_ulong(uid_s, 10, UINT32_MAX, &uid) != 0 ||
	    parse_ulong(gid_s, 10, UINT32_MAX, &gid) != 0 ||
	    parse_ulong(mode_s, 8, 07777, &mode) != 0) {
		return -1;
	}
	opts.auth_set = 1;
	opts.auth_uid = (uid_t)uid;
	opts.auth_gid = (gid_t)gid;
	opts.auth_mode = (mode_t)mode;
	return 0;
}

static void
parse_args(int argc, char **argv)
{
	unsigned long v;
	int i;

	if (argc < 2 || argv[1][0] == '-') {
		usage();
	}
	opts.name = argv[1];
	opts.transport = QB_IPC_SOCKET;
	for (i = 2; i < argc; i++) {
		const char *opt = argv[i];
		char *arg = (i + 1 < argc) ? argv[i + 1] : NULL;

		if (arg == NULL) {
			usage();
		}
		i++;
		if (strcmp(opt, "--transport") == 0) {
			if (strcmp(arg, "socket") == 0) {
				opts.transport = QB_IPC_SOCKET;
			} else if (strcmp(arg, "shm") == 0) {
				opts.transport = QB_IPC_SHM;
			} else {
				usage();
			}
		} else if (strcmp(opt, "--enforce") == 0) {
			if (parse_ulong(arg, 10, UINT32_MAX, &v) != 0) {
				usage();
			}
			opts.enforce_set = 1;
			opts.enforce = (uint32_t)v;
		} else if (strcmp(opt, "--refuse") == 0) {
			if (parse_ulong(arg, 10, 4095, &v) != 0 || v == 0) {
				usage();
			}
			opts.refuse = (int)v;
		} else if (strcmp(opt, "--event-on-created") == 0) {
			if (parse_ulong(arg, 10, 1, &v) != 0) {
				usage();
			}
			opts.event_on_created = (int)v;
		} else if (strcmp(opt, "--auth") == 0) {
			if (parse_auth(arg) != 0) {
				usage();
			}
		} else {
			usage();
		}
	}
}

static uint64_t
monotonic_ns(void)
{
	struct timespec ts;

	/* CLOCK_MONOTONIC cannot fail on Linux with a valid pointer. */
	(void)clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/*
 * Client pid as libqb recorded it from SCM_CREDENTIALS.
 *
 * qb_ipcs_connection_stats_get_2() is not usable here: it also asks the
 * transport for the event queue length, and during connection_accept the
 * socket transport's control file is not mapped yet, so libqb 2.0.6
 * dereferences NULL and crashes.  The version-1 call only copies counters.
 */
static long
client_pid(qb_ipcs_connection_t *c)
{
	struct qb_ipcs_connection_stats st;

	if (qb_ipcs_connection_stats_get(c, &st, QB_FALSE) != 0) {
		return -1;
	}
	return st.client_pid;
}

/* ---- poll adaptors: hand libqb's IPC fds and jobs to our qb_loop ---- */

static int32_t
adaptor_job_add(enum qb_loop_priority p, void *data,
		qb_loop_job_dispatch_fn fn)
{
	return qb_loop_job_add(loop, p, data, fn);
}

static int32_t
adaptor_dispatch_add(enum qb_loop_priority p, int32_t fd, int32_t events,
		     void *data, qb_ipcs_dispatch_fn_t fn)
{
	return qb_loop_poll_add(loop, p, fd, events, data, fn);
}

static int32_t
adaptor_dispatch_mod(enum qb_loop_priority p, int32_t fd, int32_t events,
		     void *data, qb_ipcs_dispatch_fn_t fn)
{
	return qb_loop_poll_mod(loop, p, fd, events, data, fn);
}

static int32_t
adaptor_dispatch_del(int32_t fd)
{
	return qb_loop_poll_del(loop, fd);
}

/* ---- sending helpers ---- */

static void
send_response(qb_ipcs_connection_t *c, int32_t id, int32_t error,
	      const void *payload, size_t len)
{
	struct qb_ipc_response_header hdr;
	struct iovec iov[2];
	ssize_t rc;

	memset(&hdr, 0, sizeof(hdr));	/* zero the padding words too */
	hdr.id = id;
	hdr.size = (int32_t)(sizeof(hdr) + len);
	hdr.error = error;
	iov[0].iov_base = &hdr;
	iov[0].iov_len = sizeof(hdr);
	iov[1].iov_base = (void *)payload;
	iov[1].iov_len = len;
	rc = qb_ipcs_response_sendv(c, iov, len > 0 ? 2 : 1);
	if (rc < 0) {
		fprintf(stderr, "qbserver: response %d failed: %zd\n", id, rc);
	}
}

/*
 * Send one event, retrying while the client's event queue is full.  The
 * retry happens inside msg_process, i.e. with the server loop blocked: the
 * client drains its queue independently, and a blocked loop is exactly what
 * a simple libqb application would do.
 */
static ssize_t
send_event_retrying(qb_ipcs_connection_t *c, const struct iovec *iov,
		    size_t iov_len, uint64_t deadline_ns)
{
	ssize_t rc;

	for (;;) {
		rc = qb_ipcs_event_sendv(c, iov, iov_len);
		if (rc >= 0 || (rc != -EAGAIN && rc != -ENOBUFS) ||
		    monotonic_ns() >= deadline_ns) {
			return rc;
		}
		usleep(EVENT_RETRY_SLEEP_US);
	}
}

/* ---- request handlers ---- */

static void
handle_events(qb_ipcs_connection_t *c, const uint8_t *payload, size_t len)
{
	struct qb_ipc_response_header hdr;
	struct iovec iov[2];
	uint32_t count, size, seq, i;
	uint64_t deadline;
	uint8_t *body;
	uint8_t reply[4];
	int32_t error = 0;
	ssize_t rc;

	if (len < 8) {
		send_response(c, MSG_EVENTS, -EINVAL, NULL, 0);
		return;
	}
	count = get_le32(payload);
	size = get_le32(payload + 4);
	/*
	 * qb_ipcs_event_sendv does not check the negotiated size, and an event
	 * larger than the client's buffer corrupts or kills the client; refuse
	 * instead of producing one.
	 */
	if (size < 4 ||
	    (uint64_t)size + sizeof(hdr) >
	    (uint64_t)qb_ipcs_connection_get_buffer_size(c)) {
		send_response(c, MSG_EVENTS, size < 4 ? -EINVAL : -EMSGSIZE,
			      NULL, 0);
		return;
	}
	body = malloc(size);
	if (body == NULL) {
		send_response(c, MSG_EVENTS, -ENOMEM, NULL, 0);
		return;
	}

	memset(&hdr, 0, sizeof(hdr));
	hdr.id = MSG_EVENTS;
	hdr.size = (int32_t)(sizeof(hdr) + size);
	iov[0].iov_base = &hdr;
	iov[0].iov_len = sizeof(hdr);
	iov[1].iov_base = body;
	iov[1].iov_len = size;

	deadline = monotonic_ns() + EVENT_RETRY_LIMIT_NS;
	for (seq = 0; seq < count; seq++) {
		put_le32(body, seq);
		for (i = 4; i < size; i++) {
			body[i] = (uint8_t)(seq + i);
		}
		rc = send_event_retrying(c, iov, 2, deadline);
		if (rc < 0) {
			printf("EVENTFAIL %zd\n", rc);
			error = (int32_t)rc;
			break;
		}
	}
	free(body);

	/* The response reports how many events actually went out. */
	put_le32(reply, seq);
	send_response(c, MSG_EVENTS, error, reply, sizeof(reply));
}

static void
fc_timer_expired(void *data)
{
	(void)data;
	fc_timer_armed = 0;
	if (service != NULL) {
		qb_ipcs_request_rate_limit(service, QB_IPCS_RATE_NORMAL);
	}
	printf("FCOFF\n");
}

static void
handle_flow_control(qb_ipcs_connection_t *c, int32_t id,
		    const uint8_t *payload, size_t len)
{
	uint32_t ms;
	int32_t rc;

	if (len < 4) {
		send_response(c, id, -EINVAL, NULL, 0);
		return;
	}
	ms = get_le32(payload);

	/* Rate limiting is per service: it flags every connection. */
	qb_ipcs_request_rate_limit(service, id == MSG_FC_OFF ?
				   QB_IPCS_RATE_OFF : QB_IPCS_RATE_OFF_2);
	send_response(c, id, 0, NULL, 0);

	if (fc_timer_armed) {
		(void)qb_loop_timer_del(loop, fc_timer);
		fc_timer_armed = 0;
	}
	rc = qb_loop_timer_add(loop, QB_LOOP_HIGH, (uint64_t)ms * 1000000ULL,
			       NULL, fc_timer_expired, &fc_timer);
	if (rc != 0) {
		/* Without the timer the service would stay blocked forever. */
		fprintf(stderr, "qbserver: timer_add failed: %d\n", rc);
		qb_ipcs_request_rate_limit(service, QB_IPCS_RATE_NORMAL);
		return;
	}
	fc_timer_armed = 1;
	printf("FCON\n");
}

static void
handle_events_then_response(qb_ipcs_connection_t *c, const uint8_t *payload,
			    size_t len)
{
	struct qb_ipc_response_header hdr;
	struct iovec iov[2];
	uint8_t body[4];
	uint32_t n, seq;
	uint64_t deadline;
	int32_t error = 0;
	ssize_t rc;

	if (len < 4) {
		send_response(c, MSG_EVENTS_THEN_RESPONSE, -EINVAL, NULL, 0);
		return;
	}
	n = get_le32(payload);

	memset(&hdr, 0, sizeof(hdr));
	hdr.id = MSG_EVENTS_THEN_RESPONSE;
	hdr.size = (int32_t)(sizeof(hdr) + sizeof(body));
	iov[0].iov_base = &hdr;
	iov[0].iov_len = sizeof(hdr);
	iov[1].iov_base = body;
	iov[1].iov_len = sizeof(body);

	deadline = monotonic_ns() + EVENT_RETRY_LIMIT_NS;
	for (seq = 0; seq < n; seq++) {
		put_le32(body, seq);
		rc = send_event_retrying(c, iov, 2, deadline);
		if (rc < 0) {
			printf("EVENTFAIL %zd\n", rc);
			error = (int32_t)rc;
			break;
		}
	}
	send_response(c, MSG_EVENTS_THEN_RESPONSE, error, NULL, 0);
}

static void
handle_oversize_event(qb_ipcs_connection_t *c)
{
	struct qb_ipc_response_header *hdr;
	int32_t bufsize = qb_ipcs_connection_get_buffer_size(c);
	size_t size;
	ssize_t rc;

	if (bufsize <= 0) {
		send_response(c, MSG_OVERSIZE_EVENT, bufsize < 0 ? bufsize :
			      -EINVAL, NULL, 0);
		return;
	}
	/* A well-formed event, only far too big for the connection. */
	size = (size_t)bufsize * 10;
	hdr = calloc(1, size);
	if (hdr == NULL) {
		send_response(c, MSG_OVERSIZE_EVENT, -ENOMEM, NULL, 0);
		return;
	}
	hdr->id = MSG_OVERSIZE_EVENT;
	hdr->size = (int32_t)size;
	rc = qb_ipcs_event_send(c, hdr, size);
	free(hdr);
	send_response(c, MSG_OVERSIZE_EVENT, (int32_t)rc, NULL, 0);
}

static void
put_le64(uint8_t *p, uint64_t v)
{
	put_le32(p, (uint32_t)v);
	put_le32(p + 4, (uint32_t)(v >> 32));
}

static void
handle_conn_stats(qb_ipcs_connection_t *c, const uint8_t *payload, size_t len)
{
	struct qb_ipcs_connection_stats_2 *st;
	uint8_t reply[9 * 8];

	if (len < 4) {
		send_response(c, MSG_CONN_STATS, -EINVAL, NULL, 0);
		return;
	}
	st = qb_ipcs_connection_stats_get_2(c, get_le32(payload) != 0);
	if (st == NULL) {
		send_response(c, MSG_CONN_STATS, -errno, NULL, 0);
		return;
	}
	put_le64(reply, (uint64_t)(int64_t)st->client_pid);
	put_le64(reply + 8, st->requests);
	put_le64(reply + 16, st->responses);
	put_le64(reply + 24, st->events);
	put_le64(reply + 32, st->send_retries);
	put_le64(reply + 40, st->recv_retries);
	put_le64(reply + 48, (uint64_t)(int64_t)st->flow_control_state);
	put_le64(reply + 56, st->flow_control_count);
	put_le64(reply + 64, st->event_q_length);
	free(st);
	send_response(c, MSG_CONN_STATS, 0, reply, sizeof(reply));
}

static void
handle_service_stats(qb_ipcs_connection_t *c, const uint8_t *payload,
		     size_t len)
{
	struct qb_ipcs_stats st;
	uint8_t reply[2 * 8];
	int32_t rc;

	if (len < 4) {
		send_response(c, MSG_SERVICE_STATS, -EINVAL, NULL, 0);
		return;
	}
	rc = qb_ipcs_stats_get(service, &st, get_le32(payload) != 0);
	if (rc != 0) {
		send_response(c, MSG_SERVICE_STATS, rc, NULL, 0);
		return;
	}
	put_le64(reply, st.active_connections);
	put_le64(reply + 8, st.closed_connections);
	send_response(c, MSG_SERVICE_STATS, 0, reply, sizeof(reply));
}

static void
handle_rate(qb_ipcs_connection_t *c, const uint8_t *payload, size_t len)
{
	uint32_t rate;

	if (len < 4 || (rate = get_le32(payload)) > QB_IPCS_RATE_OFF_2) {
		send_response(c, MSG_RATE, -EINVAL, NULL, 0);
		return;
	}
	if (fc_timer_armed) {
		(void)qb_loop_timer_del(loop, fc_timer);
		fc_timer_armed = 0;
	}
	qb_ipcs_request_rate_limit(service, (enum qb_ipcs_rate_limit)rate);
	send_response(c, MSG_RATE, 0, NULL, 0);
	printf("RATE %u\n", rate);
}

/* A header-only event: the DISPATCH answer and the created-time event. */
static ssize_t
send_bare_event(qb_ipcs_connection_t *c, int32_t id)
{
	struct qb_ipc_response_header hdr;

	memset(&hdr, 0, sizeof(hdr));
	hdr.id = id;
	hdr.size = (int32_t)sizeof(hdr);
	return qb_ipcs_event_send(c, &hdr, sizeof(hdr));
}

static int32_t
event_queue_length(qb_ipcs_connection_t *c, uint32_t *out)
{
	struct qb_ipcs_connection_stats_2 *st;

	st = qb_ipcs_connection_stats_get_2(c, QB_FALSE);
	if (st == NULL) {
		return -errno;
	}
	*out = st->event_q_length;
	free(st);
	return 0;
}

/*
 * libqb's BULK_EVENTS reaction: a 10x oversize event must be refused, one
 * event must raise the queue length by one, then the response, then nine
 * more events.  The response's error says which check failed (0: none).
 */
static void
handle_bulk(qb_ipcs_connection_t *c)
{
	struct qb_ipc_response_header *big;
	int32_t bufsize = qb_ipcs_connection_get_buffer_size(c);
	uint64_t deadline = monotonic_ns() + EVENT_RETRY_LIMIT_NS;
	struct iovec iov;
	uint32_t before = 0, after = 0;
	int32_t error = 0;
	ssize_t rc;
	int i;

	big = calloc(1, (size_t)bufsize * 10);
	if (big == NULL) {
		send_response(c, MSG_BULK, -ENOMEM, NULL, 0);
		return;
	}
	big->id = MSG_BULK;
	big->size = bufsize * 10;
	rc = qb_ipcs_event_send(c, big, (size_t)bufsize * 10);
	free(big);
	if (rc != -EMSGSIZE) {
		printf("BULKFAIL oversize %zd\n", rc);
		error = -EPROTO;
	}
	/*
	 * A client that reads events while it waits for the response (txqb
	 * does) may take the event between the two counts, so the queue
	 * lengths are reported, not judged.
	 */
	if (event_queue_length(c, &before) != 0 ||
	    send_bare_event(c, MSG_BULK) < 0 ||
	    event_queue_length(c, &after) != 0) {
		printf("BULKFAIL queue\n");
		error = -EPROTO;
	}
	printf("BULKQUEUE %" PRIu32 " %" PRIu32 "\n", before, after);
	send_response(c, MSG_BULK, error, NULL, 0);
	for (i = 1; i < BULK_EVENTS; i++) {
		struct qb_ipc_response_header hdr;

		memset(&hdr, 0, sizeof(hdr));
		hdr.id = MSG_BULK;
		hdr.size = (int32_t)sizeof(hdr);
		iov.iov_base = &hdr;
		iov.iov_len = sizeof(hdr);
		rc = send_event_retrying(c, &iov, 1, deadline);
		if (rc < 0) {
			printf("EVENTFAIL %zd\n", rc);
			return;
		}
	}
}

/*
 * The starvation generator of libqb's prio-deadlock cases: a pipe whose
 * reader, at high priority, always writes the next byte, so it is ready
 * on every loop iteration.  The service is dropped to low priority
 * (QB_IPCS_RATE_SLOW); new connections must still be accepted.
 */
static int feed_pipe[2] = {-1, -1};
static uint64_t feed_deadline_ns;
static unsigned long feed_rounds;

static void
feed_stop(void)
{
	(void)qb_loop_poll_del(loop, feed_pipe[0]);
	close(feed_pipe[0]);
	close(feed_pipe[1]);
	feed_pipe[0] = feed_pipe[1] = -1;
	if (service != NULL) {
		qb_ipcs_request_rate_limit(service, QB_IPCS_RATE_NORMAL);
	}
	printf("FEEDEND %lu\n", feed_rounds);
}

static int32_t
feed_dispatch(int32_t fd, int32_t revents, void *data)
{
	char byte;

	(void)revents;
	(void)data;
	if (read(fd, &byte, 1) != 1 || monotonic_ns() >= feed_deadline_ns) {
		feed_stop();
		return -1;	/* tells qb_loop the source is gone */
	}
	feed_rounds++;
	if (write(feed_pipe[1], &byte, 1) != 1) {
		feed_stop();
		return -1;
	}
	return 0;
}

static void
handle_self_feed(qb_ipcs_connection_t *c, const uint8_t *payload, size_t len)
{
	char byte = 'x';

	if (len < 4 || feed_pipe[0] != -1) {
		send_response(c, MSG_SELF_FEED, len < 4 ? -EINVAL : -EBUSY, NULL, 0);
		return;
	}
	if (pipe(feed_pipe) != 0) {
		send_response(c, MSG_SELF_FEED, -errno, NULL, 0);
		return;
	}
	feed_deadline_ns = monotonic_ns() + (uint64_t)get_le32(payload) * 1000000ULL;
	feed_rounds = 0;
	qb_ipcs_request_rate_limit(service, QB_IPCS_RATE_SLOW);
	if (qb_loop_poll_add(loop, QB_LOOP_HIGH, feed_pipe[0], POLLIN, NULL,
			     feed_dispatch) != 0 ||
	    write(feed_pipe[1], &byte, 1) != 1) {
		feed_stop();
		send_response(c, MSG_SELF_FEED, -EIO, NULL, 0);
		return;
	}
	printf("FEEDING\n");
	send_response(c, MSG_SELF_FEED, 0, NULL, 0);
}

/*
 * Calling qb_ipcs_disconnect() from inside msg_process is unsafe in libqb
 * 2.0.6: it drops the last reference and frees the connection, and the
 * dispatcher that called msg_process then keeps using it (valgrind shows
 * the reads after free; now and then the server aborts).  So the
 * disconnect runs from a loop job once the dispatcher is done, and a
 * reference keeps the connection alive until then.  If the client hung up
 * in the meantime libqb has already closed the connection, and a second
 * disconnect would drop a reference that is not libqb's to drop.
 */
static void
kick_job(void *data)
{
	qb_ipcs_connection_t *c = data;
	struct peer_conn *pc = qb_ipcs_context_get(c);

	if (pc != NULL && !pc->closed) {
		qb_ipcs_disconnect(c);
	}
	qb_ipcs_connection_unref(c);	/* may free c (DESTROYED) */
}

static void
schedule_kick(qb_ipcs_connection_t *c)
{
	int32_t rc;

	qb_ipcs_connection_ref(c);
	rc = qb_loop_job_add(loop, QB_LOOP_HIGH, c, kick_job);
	if (rc != 0) {
		fprintf(stderr, "qbserver: job_add failed: %d\n", rc);
		qb_ipcs_connection_unref(c);
	}
}

/* ---- service callbacks ---- */

static int32_t
on_accept(qb_ipcs_connection_t *c, uid_t uid, gid_t gid)
{
	printf("ACCEPT %ld %lu %lu\n", client_pid(c), (unsigned long)uid,
	       (unsigned long)gid);
	if (opts.auth_set) {
		/* Only effective here: libqb creates the files after accept. */
		qb_ipcs_connection_auth_set(c, opts.auth_uid, opts.auth_gid,
					    opts.auth_mode);
	}
	if (opts.refuse != 0) {
		printf("REFUSE %d\n", opts.refuse);
		return -opts.refuse;
	}
	return 0;
}

static void
on_created(qb_ipcs_connection_t *c)
{
	struct peer_conn *pc = calloc(1, sizeof(*pc));

	/* Without the context a kick simply cannot be scheduled safely. */
	if (pc == NULL) {
		fprintf(stderr, "qbserver: out of memory for connection state\n");
	}
	qb_ipcs_context_set(c, pc);
	printf("CREATED %ld\n", client_pid(c));
	if (opts.event_on_created) {
		printf("CREATEDEVENT %zd\n", send_bare_event(c, EVENT_ON_CREATED));
	}
}

static int32_t
on_closed(qb_ipcs_connection_t *c)
{
	struct peer_conn *pc = qb_ipcs_context_get(c);

	if (pc != NULL) {
		pc->closed = 1;
	}
	printf("CLOSED\n");
	return 0;		/* non-zero would make libqb call us again */
}

static void
on_destroyed(qb_ipcs_connection_t *c)
{
	/* Refused connections never had a context: free(NULL) is fine. */
	free(qb_ipcs_context_get(c));
	qb_ipcs_context_set(c, NULL);
	printf("DESTROYED\n");
}

static int32_t
on_msg(qb_ipcs_connection_t *c, void *data, size_t size)
{
	const struct qb_ipc_request_header *req = data;
	const uint8_t *payload = (const uint8_t *)data + sizeof(*req);
	size_t len;

	/*
	 * libqb passes hdr.size from the request, not what it received; trust
	 * neither more than the other and never read outside the message.
	 */
	if (size < sizeof(*req)) {
		fprintf(stderr, "qbserver: runt request (%zu bytes)\n", size);
		return 0;
	}
	len = size - sizeof(*req);

	switch (req->id) {
	case MSG_ECHO:
		send_response(c, MSG_ECHO, 0, payload, len);
		break;
	case MSG_EVENTS:
		handle_events(c, payload, len);
		break;
	case MSG_FC_OFF:
	case MSG_FC_OFF_2:
		handle_flow_control(c, req->id, payload, len);
		break;
	case MSG_KICK:
		printf("KICK\n");
		if (qb_ipcs_context_get(c) != NULL) {
			schedule_kick(c);
		}
		break;
	case MSG_DIE:
		printf("DYING\n");
		_exit(0);
	case MSG_EVENTS_THEN_RESPONSE:
		handle_events_then_response(c, payload, len);
		break;
	case MSG_OVERSIZE_EVENT:
		handle_oversize_event(c);
		break;
	case MSG_CONN_STATS:
		handle_conn_stats(c, payload, len);
		break;
	case MSG_SERVICE_STATS:
		handle_service_stats(c, payload, len);
		break;
	case MSG_RATE:
		handle_rate(c, payload, len);
		break;
	case MSG_DISPATCH:
		if (send_bare_event(c, MSG_DISPATCH) < 0) {
			printf("EVENTFAIL dispatch\n");
		}
		break;
	case MSG_BULK:
		handle_bulk(c);
		break;
	case MSG_SELF_FEED:
		handle_self_feed(c, payload, len);
		break;
	case MSG_HOLD:
		printf("HOLDING\n");
		break;
	default:
		send_response(c, req->id, -EINVAL, NULL, 0);
		break;
	}
	return 0;
}

/* ---- shutdown ---- */

/*
 * Runs from the loop (qb_loop turns the signal into a pipe wake-up), so it
 * may call anything.
 */
static int32_t
on_terminate(int32_t sig, void *data)
{
	(void)sig;
	(void)data;
	if (fc_timer_armed) {
		(void)qb_loop_timer_del(loop, fc_timer);
		fc_timer_armed = 0;
	}
	if (feed_pipe[0] != -1) {
		feed_stop();
	}
	if (service != NULL) {
		qb_ipcs_destroy(service);
		service = NULL;
	}
	qb_loop_stop(loop);
	return 0;
}

int
main(int argc, char **argv)
{
	struct qb_ipcs_service_handlers handlers = {
		.connection_accept = on_accept,
		.connection_created = on_created,
		.msg_process = on_msg,
		.connection_closed = on_closed,
		.connection_destroyed = on_destroyed,
	};
	struct qb_ipcs_poll_handlers poll_handlers = {
		.job_add = adaptor_job_add,
		.dispatch_add = adaptor_dispatch_add,
		.dispatch_mod = adaptor_dispatch_mod,
		.dispatch_del = adaptor_dispatch_del,
	};
	qb_loop_signal_handle sig_term, sig_int;
	int32_t rc;

	/* The tests read stdout through a pipe and wait for single lines. */
	if (setvbuf(stdout, NULL, _IOLBF, 0) != 0) {
		perror("setvbuf");
		return 1;
	}
	parse_args(argc, argv);
	setup_logging("qbserver");

	/* A client vanishing mid-write must not kill us with SIGPIPE. */
	if (signal(SIGPIPE, SIG_IGN) == SIG_ERR) {
		perror("signal");
		return 1;
	}

	loop = qb_loop_create();
	if (loop == NULL) {
		perror("qb_loop_create");
		return 1;
	}
	rc = qb_loop_signal_add(loop, QB_LOOP_HIGH, SIGTERM, NULL, on_terminate,
				&sig_term);
	if (rc == 0) {
		rc = qb_loop_signal_add(loop, QB_LOOP_HIGH, SIGINT, NULL,
					on_terminate, &sig_int);
	}
	if (rc != 0) {
		fprintf(stderr, "qbserver: qb_loop_signal_add: %s\n",
			strerror(-rc));
		qb_loop_destroy(loop);
		return 1;
	}

	service = qb_ipcs_create(opts.name, 0, opts.transport, &handlers);
	if (service == NULL) {
		perror("qb_ipcs_create");
		qb_loop_destroy(loop);
		return 1;
	}
	if (opts.enforce_set) {
		qb_ipcs_enforce_buffer_size(service, opts.enforce);
	}
	qb_ipcs_poll_handlers_set(service, &poll_handlers);
	rc = qb_ipcs_run(service);
	if (rc != 0) {
		fprintf(stderr, "qbserver: qb_ipcs_run: %s\n", strerror(-rc));
		qb_ipcs_destroy(service);
		qb_loop_destroy(loop);
		return 1;
	}
	printf("READY %ld\n", (long)getpid());

	qb_loop_run(loop);

	printf("BYE\n");
	qb_loop_destroy(loop);
	return 0;
}

/*
 * benchserver - the C libqb side of txqb's benchmarks: a plain libqb
 * service on qb_loop speaking the protocol of bench.h.
 *
 * Usage: benchserver NAME socket|shm
 * Prints "READY <pid>" once listening; SIGTERM stops it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>

#include <qb/qbdefs.h>
#include <qb/qbipc_common.h>
#include <qb/qbipcs.h>
#include <qb/qbloop.h>

#include "bench.h"

struct conn_state {
	uint32_t sinks;
	uint32_t bad;
};

static qb_loop_t *loop;
static qb_ipcs_service_t *service;

static int32_t
job_add(enum qb_loop_priority p, void *data, qb_loop_job_dispatch_fn fn)
{
	return qb_loop_job_add(loop, p, data, fn);
}

static int32_t
dispatch_add(enum qb_loop_priority p, int32_t fd, int32_t events, void *data,
	     qb_ipcs_dispatch_fn_t fn)
{
	return qb_loop_poll_add(loop, p, fd, events, data, fn);
}

static int32_t
dispatch_mod(enum qb_loop_priority p, int32_t fd, int32_t events, void *data,
	     qb_ipcs_dispatch_fn_t fn)
{
	return qb_loop_poll_mod(loop, p, fd, events, data, fn);
}

static int32_t
dispatch_del(int32_t fd)
{
	return qb_loop_poll_del(loop, fd);
}

static void
respond(qb_ipcs_connection_t *c, int32_t id, const void *payload, size_t len)
{
	struct qb_ipc_response_header hdr;
	struct iovec iov[2];
	ssize_t rc;

	memset(&hdr, 0, sizeof(hdr));
	hdr.id = id;
	hdr.size = (int32_t)(sizeof(hdr) + len);
	iov[0].iov_base = &hdr;
	iov[0].iov_len = sizeof(hdr);
	iov[1].iov_base = (void *)payload;
	iov[1].iov_len = len;
	rc = qb_ipcs_response_sendv(c, iov, len > 0 ? 2 : 1);
	if (rc < 0) {
		fprintf(stderr, "benchserver: response %d: %s\n", id, strerror((int)-rc));
	}
}

/* N events, retrying a full queue as a simple libqb service does. */
static void
send_events(qb_ipcs_connection_t *c, uint32_t count, uint32_t size)
{
	struct qb_ipc_response_header hdr;
	uint8_t seq[4];
	struct iovec iov[3];
	uint32_t i;
	uint8_t reply[4];

	if (size < 4 || size > BENCH_MAX_PAYLOAD) {
		count = 0;
	}
	memset(&hdr, 0, sizeof(hdr));
	hdr.id = BENCH_EVENTS;
	hdr.size = (int32_t)(sizeof(hdr) + size);
	iov[0].iov_base = &hdr;
	iov[0].iov_len = sizeof(hdr);
	iov[1].iov_base = seq;
	iov[1].iov_len = 4;
	iov[2].iov_base = bench_pattern + 4;
	iov[2].iov_len = size - 4;
	for (i = 0; i < count; i++) {
		ssize_t rc;

		bench_put32(seq, i);
		while ((rc = qb_ipcs_event_sendv(c, iov, 3)) == -EAGAIN) {
			usleep(20);
		}
		if (rc < 0) {
			fprintf(stderr, "benchserver: event: %s\n", strerror((int)-rc));
			break;
		}
	}
	bench_put32(reply, i);
	respond(c, BENCH_EVENTS, reply, 4);
}

static int32_t
on_msg(qb_ipcs_connection_t *c, void *data, size_t size)
{
	const struct qb_ipc_request_header *req = data;
	const uint8_t *payload = (const uint8_t *)data + sizeof(*req);
	struct conn_state *st = qb_ipcs_context_get(c);
	size_t len;
	uint8_t stats[8];

	if (size < sizeof(*req) || st == NULL) {
		return 0;
	}
	len = size - sizeof(*req);
	switch (req->id) {
	case BENCH_ECHO:
		respond(c, BENCH_ECHO, payload, len);
		break;
	case BENCH_SINK:
		if (!bench_payload_ok(payload, len, st->sinks)) {
			st->bad++;
		}
		st->sinks++;
		break;
	case BENCH_STATS:
		bench_put32(stats, st->sinks);
		bench_put32(stats + 4, st->bad);
		st->sinks = st->bad = 0;
		respond(c, BENCH_STATS, stats, 8);
		break;
	case BENCH_EVENTS:
		send_events(c, len == 8 ? bench_get32(payload) : 0,
			    len == 8 ? bench_get32(payload + 4) : 0);
		break;
	default:
		respond(c, req->id, NULL, 0);
		break;
	}
	return 0;
}

static int32_t
on_accept(qb_ipcs_connection_t *c, uid_t uid, gid_t gid)
{
	(void)c;
	(void)uid;
	(void)gid;
	return 0;
}

static void
on_created(qb_ipcs_connection_t *c)
{
	qb_ipcs_context_set(c, calloc(1, sizeof(struct conn_state)));
}

static void
on_destroyed(qb_ipcs_connection_t *c)
{
	free(qb_ipcs_context_get(c));
	qb_ipcs_context_set(c, NULL);
}

static int32_t
on_closed(qb_ipcs_connection_t *c)
{
	(void)c;
	return 0;
}

static int32_t
on_terminate(int32_t sig, void *data)
{
	(void)sig;
	(void)data;
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
	struct qb_ipcs_poll_handlers poll = {
		.job_add = job_add,
		.dispatch_add = dispatch_add,
		.dispatch_mod = dispatch_mod,
		.dispatch_del = dispatch_del,
	};
	qb_loop_signal_handle sig;
	enum qb_ipc_type type;

	if (argc != 3) {
		fprintf(stderr, "usage: benchserver NAME socket|shm\n");
		return 64;
	}
	type = strcmp(argv[2], "shm") == 0 ? QB_IPC_SHM : QB_IPC_SOCKET;
	bench_pattern_init();
	(void)signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);
	loop = qb_loop_create();
	if (loop == NULL ||
	    qb_loop_signal_add(loop, QB_LOOP_HIGH, SIGTERM, NULL, on_terminate, &sig) != 0) {
		perror("benchserver: loop");
		return 1;
	}
	service = qb_ipcs_create(argv[1], 0, type, &handlers);
	if (service == NULL) {
		perror("benchserver: qb_ipcs_create");
		return 1;
	}
	qb_ipcs_poll_handlers_set(service, &poll);
	if (qb_ipcs_run(service) != 0) {
		perror("benchserver: qb_ipcs_run");
		return 1;
	}
	printf("READY %ld\n", (long)getpid());
	qb_loop_run(loop);
	qb_loop_destroy(loop);
	return 0;
}

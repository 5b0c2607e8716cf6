/*
 * benchclient - the C libqb client side of txqb's benchmarks (protocol in
 * bench.h).
 *
 * Usage: benchclient NAME SERVER_PID CELL...
 * where CELL is W1:SIZE:COUNT (round trips), W2:SIZE:COUNT (one-way sends,
 * then STATS), W3:SIZE:COUNT (events), W4:SIZE:ROUNDS:CLIENTS (that many
 * connections, each with one request out per round) or W0 (connect, one
 * 64-byte round trip, disconnect: for one-shot process timing).
 *
 * Prints one JSON line per cell: workload, size, count (messages that
 * crossed), elapsed seconds, client and server CPU seconds, ok.  Exits 1
 * if any cell failed its checks.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>

#include <qb/qbdefs.h>
#include <qb/qbipc_common.h>
#include <qb/qbipcc.h>

#include "bench.h"

#define BIG_MAX (BENCH_MAX_PAYLOAD + 4096)
#define SMALL_MAX 65536

static const char *name;
static long server_pid;
static uint8_t *rbuf;
static uint8_t *sbuf;

static qb_ipcc_connection_t *
open_conn(int32_t max)
{
	qb_ipcc_connection_t *c = qb_ipcc_connect(name, max);

	if (c == NULL) {
		fprintf(stderr, "benchclient: qb_ipcc_connect %s: %s\n", name, strerror(errno));
		exit(1);
	}
	return c;
}

static void
request_header(struct qb_ipc_request_header *h, int32_t id, size_t len)
{
	memset(h, 0, sizeof(*h));
	h->id = id;
	h->size = (int32_t)(sizeof(*h) + len);
}

static void
must_send(qb_ipcc_connection_t *c, int32_t id, const void *payload, size_t len)
{
	struct qb_ipc_request_header h;
	struct iovec iov[2];
	ssize_t rc;

	request_header(&h, id, len);
	iov[0].iov_base = &h;
	iov[0].iov_len = sizeof(h);
	iov[1].iov_base = (void *)payload;
	iov[1].iov_len = len;
	while ((rc = qb_ipcc_sendv(c, iov, len > 0 ? 2 : 1)) == -EAGAIN) {
		usleep(10);
	}
	if (rc < 0) {
		fprintf(stderr, "benchclient: send %d: %s\n", id, strerror((int)-rc));
		exit(1);
	}
}

/* Receive a response; returns its payload length, or -1. */
static ssize_t
must_recv(qb_ipcc_connection_t *c, int32_t id)
{
	const struct qb_ipc_response_header *h = (const void *)rbuf;
	ssize_t rc = qb_ipcc_recv(c, rbuf, BIG_MAX, -1);

	if (rc < (ssize_t)sizeof(*h) || h->id != id || h->error != 0) {
		fprintf(stderr, "benchclient: response to %d: %zd\n", id, rc);
		return -1;
	}
	return rc - (ssize_t)sizeof(*h);
}

static void
report(const char *w, long size, long count, double t0, double c0, double s0, int ok)
{
	double t = bench_clock(CLOCK_MONOTONIC) - t0;
	double c = bench_clock(CLOCK_PROCESS_CPUTIME_ID) - c0;
	double s = bench_proc_cpu(server_pid) - s0;

	printf("{\"workload\": \"%s\", \"size\": %ld, \"count\": %ld, \"elapsed\": %.9f,"
	       " \"client_cpu\": %.9f, \"server_cpu\": %.6f, \"ok\": %s}\n",
	       w, size, count, t, c, s, ok ? "true" : "false");
	fflush(stdout);
}

#define START() \
	double t0 = bench_clock(CLOCK_MONOTONIC), \
	       c0 = bench_clock(CLOCK_PROCESS_CPUTIME_ID), \
	       s0 = bench_proc_cpu(server_pid)

static int
w1(qb_ipcc_connection_t *c, size_t size, long count)
{
	const struct qb_ipc_response_header *rh = (const void *)rbuf;
	long i;
	int ok = 1;

	START();
	for (i = 0; i < count && ok; i++) {
		/*
		 * qb_ipcc_sendv_recv would fail with -EAGAIN whenever the server
		 * has answered but not yet reclaimed the previous request's
		 * chunk (a near-full ring at 1 MiB): send with retries instead.
		 */
		bench_put32(sbuf, (uint32_t)i);
		must_send(c, BENCH_ECHO, sbuf, size);
		ok = must_recv(c, BENCH_ECHO) == (ssize_t)size &&
		     memcmp(rbuf + sizeof(*rh), sbuf, size) == 0;
	}
	report("W1", (long)size, i, t0, c0, s0, ok);
	return ok;
}

static int
w2(qb_ipcc_connection_t *c, size_t size, long count)
{
	long i;
	int ok;

	START();
	for (i = 0; i < count; i++) {
		bench_put32(sbuf, (uint32_t)i);
		must_send(c, BENCH_SINK, sbuf, size);
	}
	must_send(c, BENCH_STATS, NULL, 0);
	ok = must_recv(c, BENCH_STATS) == 8 &&
	     bench_get32(rbuf + sizeof(struct qb_ipc_response_header)) == (uint32_t)count &&
	     bench_get32(rbuf + sizeof(struct qb_ipc_response_header) + 4) == 0;
	report("W2", (long)size, count, t0, c0, s0, ok);
	return ok;
}

static int
w3(qb_ipcc_connection_t *c, size_t size, long count)
{
	const struct qb_ipc_response_header *rh = (const void *)rbuf;
	const uint8_t *p = rbuf + sizeof(*rh);
	uint8_t req[8];
	long i;
	int ok = 1;

	bench_put32(req, (uint32_t)count);
	bench_put32(req + 4, (uint32_t)size);
	START();
	must_send(c, BENCH_EVENTS, req, 8);
	for (i = 0; i < count && ok; i++) {
		ssize_t rc = qb_ipcc_event_recv(c, rbuf, BIG_MAX, -1);

		ok = rc == (ssize_t)(sizeof(*rh) + size) && rh->id == BENCH_EVENTS &&
		     bench_payload_ok(p, size, (uint32_t)i);
	}
	ok = ok && must_recv(c, BENCH_EVENTS) == 4 && bench_get32(p) == (uint32_t)count;
	report("W3", (long)size, i, t0, c0, s0, ok);
	return ok;
}

static int
w4(size_t size, long rounds, long clients)
{
	const struct qb_ipc_response_header *rh = (const void *)rbuf;
	qb_ipcc_connection_t **conns = calloc((size_t)clients, sizeof(*conns));
	long r, k;
	int ok = 1;

	for (k = 0; k < clients; k++) {
		conns[k] = open_conn(SMALL_MAX);
	}
	START();
	for (r = 0; r < rounds && ok; r++) {
		for (k = 0; k < clients; k++) {
			bench_put32(sbuf, (uint32_t)(r * clients + k));
			must_send(conns[k], BENCH_ECHO, sbuf, size);
		}
		for (k = 0; k < clients && ok; k++) {
			bench_put32(sbuf, (uint32_t)(r * clients + k));
			ok = must_recv(conns[k], BENCH_ECHO) == (ssize_t)size &&
			     memcmp(rbuf + sizeof(*rh), sbuf, size) == 0;
		}
	}
	report("W4", (long)size, r * clients, t0, c0, s0, ok);
	for (k = 0; k < clients; k++) {
		qb_ipcc_disconnect(conns[k]);
	}
	free(conns);
	return ok;
}

int
main(int argc, char **argv)
{
	qb_ipcc_connection_t *c = NULL;
	int i, ok = 1;

	if (argc < 4) {
		fprintf(stderr, "usage: benchclient NAME SERVER_PID CELL...\n");
		return 64;
	}
	name = argv[1];
	server_pid = strtol(argv[2], NULL, 10);
	bench_pattern_init();
	rbuf = malloc(BIG_MAX);
	sbuf = malloc(BENCH_MAX_PAYLOAD);
	memcpy(sbuf, bench_pattern, BENCH_MAX_PAYLOAD);
	for (i = 3; i < argc && ok; i++) {
		char w[8];
		long size = 0, n = 0, m = 0;

		if (strcmp(argv[i], "W0") == 0) {
			c = c ? c : open_conn(SMALL_MAX);
			must_send(c, BENCH_ECHO, sbuf, 64);
			ok = must_recv(c, BENCH_ECHO) == 64;
			continue;
		}
		if (sscanf(argv[i], "%7[^:]:%ld:%ld:%ld", w, &size, &n, &m) < 3 ||
		    size < 4 || size > BENCH_MAX_PAYLOAD) {
			fprintf(stderr, "benchclient: bad cell %s\n", argv[i]);
			return 64;
		}
		if (strcmp(w, "W4") == 0) {
			ok = w4((size_t)size, n, m > 0 ? m : 100);
			continue;
		}
		c = c ? c : open_conn(BIG_MAX);
		if (strcmp(w, "W1") == 0) {
			ok = w1(c, (size_t)size, n);
		} else if (strcmp(w, "W2") == 0) {
			ok = w2(c, (size_t)size, n);
		} else if (strcmp(w, "W3") == 0) {
			ok = w3(c, (size_t)size, n);
		} else {
			fprintf(stderr, "benchclient: bad cell %s\n", argv[i]);
			return 64;
		}
	}
	if (c != NULL) {
		qb_ipcc_disconnect(c);
	}
	return ok ? 0 : 1;
}

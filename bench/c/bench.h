/*
 * The benchmark protocol shared by bench/c/benchserver.c and
 * bench/c/benchclient.c (and mirrored in bench/protocol.py).
 *
 * Request ids (payload integers are uint32 little-endian):
 *   10 ECHO            response 10 carrying the request's payload
 *   11 SINK            no response; the server checks the payload
 *   12 STATS           response 12: u32 sinks, u32 bad sinks, then resets
 *   13 EVENTS N SIZE   N events of id 13, then a response 13 carrying N
 *
 * Every SINK payload and every event is "u32 sequence number, then byte
 * i = i & 0xff for i >= 4", so both ends can check integrity with memcmp.
 */
#ifndef TXQB_BENCH_H
#define TXQB_BENCH_H

#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum {
	BENCH_ECHO = 10,
	BENCH_SINK = 11,
	BENCH_STATS = 12,
	BENCH_EVENTS = 13,
};

#define BENCH_MAX_PAYLOAD (1024 * 1024)

static uint8_t bench_pattern[BENCH_MAX_PAYLOAD];

static inline void
bench_pattern_init(void)
{
	size_t i;

	for (i = 0; i < sizeof(bench_pattern); i++) {
		bench_pattern[i] = (uint8_t)(i & 0xff);
	}
}

static inline uint32_t
bench_get32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
	       (uint32_t)p[3] << 24;
}

static inline void
bench_put32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
	p[2] = (uint8_t)(v >> 16);
	p[3] = (uint8_t)(v >> 24);
}

/* Whether a SINK payload or an event is number seq, intact. */
static inline int
bench_payload_ok(const uint8_t *p, size_t len, uint32_t seq)
{
	return len >= 4 && len <= BENCH_MAX_PAYLOAD && bench_get32(p) == seq &&
	       memcmp(p + 4, bench_pattern + 4, len - 4) == 0;
}

static inline double
bench_clock(clockid_t id)
{
	struct timespec ts;

	(void)clock_gettime(id, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Seconds of CPU (user + system) process pid has used, from /proc. */
static inline double
bench_proc_cpu(long pid)
{
	char path[64], buf[1024], *p;
	unsigned long utime, stime;
	FILE *f;
	size_t n;

	(void)snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
	f = fopen(path, "r");
	if (f == NULL) {
		return -1.0;
	}
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	p = strrchr(buf, ')');
	if (p == NULL ||
	    sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu",
		   &utime, &stime) != 2) {
		return -1.0;
	}
	return (double)(utime + stime) / (double)sysconf(_SC_CLK_TCK);
}

#endif

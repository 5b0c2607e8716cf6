/*
 * A fast libqb ring writer for txqb's ring tests.
 *
 * Usage: qbrbwriter NAME COUNT
 *
 * Opens the process-shared ring NAME (created by the test through libqb)
 * and writes COUNT chunks as fast as libqb allows: bursts of 3000 chunks of
 * 56 bytes, then 5 chunks of 64 KiB, each starting with its sequence number
 * as a 32-bit integer.  A full ring (-EAGAIN) is retried after 200 us, as a
 * C server's event loop would.  A fast writer against a reader that sleeps
 * when the ring is empty is what exposes torn or transiently-zero stores of
 * the reader's pointer: the writer then overwrites chunks not yet read.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <qb/qbrb.h>

static int write_chunk(qb_ringbuffer_t *rb, const void *data, size_t len)
{
	ssize_t rc;

	while ((rc = qb_rb_chunk_write(rb, data, len)) < 0) {
		if (rc != -EAGAIN) {
			fprintf(stderr, "qbrbwriter: write failed: %zd\n", rc);
			return -1;
		}
		usleep(200);
	}
	return 0;
}

int main(int argc, char **argv)
{
	static char big[65536];
	char small[56];
	qb_ringbuffer_t *rb;
	uint32_t seq = 0;
	long count;

	if (argc != 3) {
		fprintf(stderr, "usage: qbrbwriter NAME COUNT\n");
		return 64;
	}
	count = atol(argv[2]);
	rb = qb_rb_open(argv[1], 65549, QB_RB_FLAG_SHARED_PROCESS, 0);
	if (rb == NULL) {
		perror("qbrbwriter: qb_rb_open");
		return 1;
	}
	while (seq < count) {
		for (int k = 0; k < 3000 && seq < count; k++, seq++) {
			memset(small, 0, sizeof(small));
			memcpy(small, &seq, sizeof(seq));
			if (write_chunk(rb, small, sizeof(small)) < 0)
				return 1;
		}
		for (int k = 0; k < 5 && seq < count; k++, seq++) {
			memcpy(big, &seq, sizeof(seq));
			if (write_chunk(rb, big, sizeof(big)) < 0)
				return 1;
		}
	}
	qb_rb_close(rb);
	return 0;
}

/*
 * Helpers shared by the C reference peers (qbserver.c, qbclient.c):
 * little-endian payload integers and libqb's optional debug log.
 * Header-only, so that each peer stays one compilation unit.
 */
#ifndef TXQB_PEER_COMMON_H
#define TXQB_PEER_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>

#include <qb/qbdefs.h>
#include <qb/qblog.h>

static inline uint32_t
get_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | ((uint32_t)p[1] << 8) |
	    ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline void
put_le32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
	p[2] = (uint8_t)(v >> 16);
	p[3] = (uint8_t)(v >> 24);
}

/* QBPEER_LOG=1 turns on libqb's own debug log on stderr. */
static inline void
setup_logging(const char *progname)
{
	const char *env = getenv("QBPEER_LOG");

	/* Without qb_log_init libqb logs nothing at all, which is the default. */
	if (env == NULL || strcmp(env, "1") != 0) {
		return;
	}
	qb_log_init(progname, LOG_USER, LOG_DEBUG);
	(void)qb_log_ctl(QB_LOG_SYSLOG, QB_LOG_CONF_ENABLED, QB_FALSE);
	(void)qb_log_filter_ctl(QB_LOG_STDERR, QB_LOG_FILTER_ADD,
				QB_LOG_FILTER_FILE, "*", LOG_DEBUG);
	(void)qb_log_ctl(QB_LOG_STDERR, QB_LOG_CONF_ENABLED, QB_TRUE);
}

#endif

/* C half of the nbdclient binding: every wait on a libnbd handle happens in
 * one C call that polls the handle's socket and a cancel eventfd, so that
 *  - errors (nbd_get_error/nbd_get_errno are thread-local) are read in the
 *    same C call that failed, before the goroutine can change threads;
 *  - a Go buffer handed to nbd_aio_pread is never referenced by libnbd after
 *    the call returns: when a call must give up with commands in flight
 *    (timeout, cancel, dead server) it closes the handle before returning.
 */
#ifndef NBDMOVER_NBD_H
#define NBDMOVER_NBD_H

#include <stdint.h>
#include <libnbd.h>

/* Return codes of the nbdm_* calls. */
enum {
	NBDM_OK = 0,
	NBDM_ERR = -1,       /* libnbd or server error; handle still usable unless closed */
	NBDM_TIMEOUT = -2,   /* no progress on the socket for timeout_ms */
	NBDM_CANCELLED = -3, /* the cancel fd became readable */
};

struct nbdm_err {
	int errnum;        /* errno as libnbd reported it, 0 if none */
	int closed;        /* 1 if the call closed the handle */
	uint64_t offset;   /* offset of the failed request, if any */
	char msg[512];
};

/* A growable list of (length, flags) pairs from one meta context. */
struct nbdm_ctx_extents {
	const char *name;     /* context name to collect; NULL = unused */
	uint64_t offset;      /* offset the server described from */
	uint32_t *pairs;      /* length, flags, length, flags, ... */
	size_t n;             /* number of uint32 values in pairs */
	size_t cap;
	int seen;
};

struct nbdm_status {
	struct nbdm_ctx_extents ctx[2];
	int oom;
};

struct nbdm_info {
	int64_t size;
	int64_t min_block, preferred_block, max_block;
	int multi_conn;
};

int nbdm_info(struct nbd_handle *h, struct nbdm_info *info, struct nbdm_err *e);

int nbdm_connect(struct nbd_handle *h, const char *uri, const char *sock,
                 const char *export_name, int cancel_fd, int timeout_ms,
                 struct nbdm_err *e);

/* One contiguous range of a read or write: len bytes at disk_off, to or
 * from buf + buf_off. */
struct nbdm_seg {
	uint64_t buf_off;
	uint64_t disk_off;
	uint64_t len;
};

/* Read (write=0) or write (write=1) the segments, each split in pieces of
 * at most piece bytes, with up to max_inflight requests in flight across
 * all of them. */
int nbdm_rw(struct nbd_handle **hp, int write, void *buf, const struct nbdm_seg *segs,
            int nsegs, uint64_t piece, int max_inflight,
            int cancel_fd, int timeout_ms, struct nbdm_err *e);

int nbdm_flush(struct nbd_handle **hp, int cancel_fd, int timeout_ms, struct nbdm_err *e);

int nbdm_block_status(struct nbd_handle **hp, uint64_t count, uint64_t offset,
                      struct nbdm_status *st, int cancel_fd, int timeout_ms,
                      struct nbdm_err *e);

void nbdm_status_free(struct nbdm_status *st);

int nbdm_eventfd(void);

#endif

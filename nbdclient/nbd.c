#include "nbd.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>

#define MAX_INFLIGHT 64

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void set_msg(struct nbdm_err *e, int errnum, uint64_t offset, const char *msg)
{
	e->errnum = errnum;
	e->offset = offset;
	snprintf(e->msg, sizeof e->msg, "%s", msg);
}

/* Record libnbd's thread-local error for the call that just failed. */
static void set_nbd_err(struct nbdm_err *e, uint64_t offset)
{
	const char *msg = nbd_get_error();
	set_msg(e, nbd_get_errno(), offset, msg ? msg : "unknown libnbd error");
}

/* Wait once for the socket or the cancel fd and advance libnbd's state
 * machine. *last is the time of the last progress on the socket. */
static int poll_once(struct nbd_handle *h, int cancel_fd, int64_t *last,
                     int timeout_ms, uint64_t offset, struct nbdm_err *e)
{
	if (nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1) {
		set_msg(e, ENOTCONN, offset, "connection to the NBD server is dead");
		return NBDM_ERR;
	}
	int fd = nbd_aio_get_fd(h);
	if (fd == -1) {
		set_nbd_err(e, offset);
		return NBDM_ERR;
	}
	unsigned dir = nbd_aio_get_direction(h);
	struct pollfd fds[2] = {
		{ .fd = fd, .events = 0 },
		{ .fd = cancel_fd, .events = POLLIN },
	};
	if (dir & LIBNBD_AIO_DIRECTION_READ)
		fds[0].events |= POLLIN;
	if (dir & LIBNBD_AIO_DIRECTION_WRITE)
		fds[0].events |= POLLOUT;

	int64_t remain = timeout_ms - (now_ms() - *last);
	if (remain <= 0) {
		char msg[128];
		snprintf(msg, sizeof msg, "NBD server made no progress for %d ms", timeout_ms);
		set_msg(e, ETIMEDOUT, offset, msg);
		return NBDM_TIMEOUT;
	}
	if (remain > INT_MAX)
		remain = INT_MAX;
	int r = poll(fds, cancel_fd >= 0 ? 2 : 1, (int)remain);
	if (r < 0) {
		if (errno == EINTR)
			return NBDM_OK;
		set_msg(e, errno, offset, "poll on the NBD socket failed");
		return NBDM_ERR;
	}
	if (r == 0)
		return NBDM_OK; /* the next call reports the timeout */
	if (cancel_fd >= 0 && (fds[1].revents & POLLIN)) {
		set_msg(e, ECANCELED, offset, "cancelled");
		return NBDM_CANCELLED;
	}
	if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
		*last = now_ms();
		if (nbd_aio_notify_read(h) == -1) {
			set_nbd_err(e, offset);
			return NBDM_ERR;
		}
	} else if (fds[0].revents & POLLOUT) {
		*last = now_ms();
		if (nbd_aio_notify_write(h) == -1) {
			set_nbd_err(e, offset);
			return NBDM_ERR;
		}
	}
	return NBDM_OK;
}

/* Give up on a handle that may still hold references to caller memory. */
static int abandon(struct nbd_handle **hp, int rc, struct nbdm_err *e)
{
	nbd_close(*hp);
	*hp = NULL;
	e->closed = 1;
	return rc;
}

int nbdm_connect(struct nbd_handle *h, const char *uri, const char *sock,
                 const char *export_name, int cancel_fd, int timeout_ms,
                 struct nbdm_err *e)
{
	int r;
	if (uri) {
		r = nbd_aio_connect_uri(h, uri);
	} else {
		r = nbd_set_export_name(h, export_name);
		if (r != -1)
			r = nbd_aio_connect_unix(h, sock);
	}
	if (r == -1) {
		set_nbd_err(e, 0);
		return NBDM_ERR;
	}
	int64_t last = now_ms();
	while (nbd_aio_is_connecting(h) == 1) {
		r = poll_once(h, cancel_fd, &last, timeout_ms, 0, e);
		if (r != NBDM_OK)
			return r;
	}
	if (nbd_aio_is_ready(h) != 1) {
		set_msg(e, ENOTCONN, 0, "NBD handshake did not complete");
		return NBDM_ERR;
	}
	return NBDM_OK;
}

int nbdm_info(struct nbd_handle *h, struct nbdm_info *info, struct nbdm_err *e)
{
	info->size = nbd_get_size(h);
	if (info->size == -1) {
		if (nbd_get_error() == NULL) {
			set_msg(e, EFBIG, 0, "the export's size does not fit 63 bits: a misbehaving server?");
		} else {
			set_nbd_err(e, 0);
		}
		return NBDM_ERR;
	}
	/* 0 means the server did not say; -1 cannot happen once connected. */
	info->min_block = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
	info->preferred_block = nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED);
	info->max_block = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
	info->multi_conn = nbd_can_multi_conn(h) == 1;
	return NBDM_OK;
}

int nbdm_rw(struct nbd_handle **hp, int write, void *buf, const struct nbdm_seg *segs,
            int nsegs, uint64_t piece, int max_inflight,
            int cancel_fd, int timeout_ms, struct nbdm_err *e)
{
	struct nbd_handle *h = *hp;
	int64_t cookies[MAX_INFLIGHT];
	uint64_t offs[MAX_INFLIGHT];
	int n = 0, failed = 0;
	int seg = 0;       /* segment being issued */
	uint64_t done = 0; /* bytes of segs[seg] issued */
	int64_t last = now_ms();

	if (max_inflight < 1)
		max_inflight = 1;
	if (max_inflight > MAX_INFLIGHT)
		max_inflight = MAX_INFLIGHT;

	for (;;) {
		while (!failed && seg < nsegs && n < max_inflight) {
			const struct nbdm_seg *sg = &segs[seg];
			uint64_t len = sg->len - done;
			if (piece && len > piece)
				len = piece;
			char *p = (char *)buf + sg->buf_off + done;
			uint64_t off = sg->disk_off + done;
			int64_t c = write
				? nbd_aio_pwrite(h, p, len, off, NBD_NULL_COMPLETION, 0)
				: nbd_aio_pread(h, p, len, off, NBD_NULL_COMPLETION, 0);
			if (c == -1) {
				set_nbd_err(e, off);
				failed = 1;
				break;
			}
			cookies[n] = c;
			offs[n] = off;
			n++;
			done += len;
			if (done == sg->len) {
				seg++;
				done = 0;
			}
		}
		for (int i = 0; i < n;) {
			int r = nbd_aio_command_completed(h, cookies[i]);
			if (r == 0) {
				i++;
				continue;
			}
			if (r == -1 && !failed) {
				set_nbd_err(e, offs[i]);
				failed = 1;
			}
			n--;
			cookies[i] = cookies[n];
			offs[i] = offs[n];
		}
		if (n == 0 && (failed || seg >= nsegs))
			return failed ? NBDM_ERR : NBDM_OK;
		if (n == 0)
			continue;
		struct nbdm_err pe = { 0 };
		int r = poll_once(h, cancel_fd, &last, timeout_ms, offs[0], &pe);
		if (r != NBDM_OK) {
			if (!failed)
				*e = pe;
			return abandon(hp, failed ? NBDM_ERR : r, e);
		}
	}
}

/* Wait for one command; abandon the handle if we must stop waiting, since the
 * command may still reference caller memory. */
static int wait_cookie(struct nbd_handle **hp, int64_t cookie, int cancel_fd,
                       int timeout_ms, uint64_t offset, struct nbdm_err *e)
{
	int64_t last = now_ms();
	for (;;) {
		int r = nbd_aio_command_completed(*hp, cookie);
		if (r == 1)
			return NBDM_OK;
		if (r == -1) {
			set_nbd_err(e, offset);
			return NBDM_ERR;
		}
		r = poll_once(*hp, cancel_fd, &last, timeout_ms, offset, e);
		if (r != NBDM_OK)
			return abandon(hp, r, e);
	}
}

int nbdm_flush(struct nbd_handle **hp, int cancel_fd, int timeout_ms, struct nbdm_err *e)
{
	int64_t cookie = nbd_aio_flush(*hp, NBD_NULL_COMPLETION, 0);
	if (cookie == -1) {
		set_nbd_err(e, 0);
		return NBDM_ERR;
	}
	return wait_cookie(hp, cookie, cancel_fd, timeout_ms, 0, e);
}

static int extent_cb(void *user_data, const char *metacontext, uint64_t offset,
                     uint32_t *entries, size_t nr_entries, int *error)
{
	struct nbdm_status *st = user_data;
	(void)error;
	for (int i = 0; i < 2; i++) {
		struct nbdm_ctx_extents *c = &st->ctx[i];
		if (!c->name || strcmp(c->name, metacontext) != 0 || c->seen)
			continue;
		c->seen = 1;
		c->offset = offset;
		if (nr_entries > c->cap) {
			uint32_t *p = realloc(c->pairs, nr_entries * sizeof *p);
			if (!p) {
				st->oom = 1;
				return 0;
			}
			c->pairs = p;
			c->cap = nr_entries;
		}
		memcpy(c->pairs, entries, nr_entries * sizeof *entries);
		c->n = nr_entries;
	}
	return 0;
}

int nbdm_block_status(struct nbd_handle **hp, uint64_t count, uint64_t offset,
                      struct nbdm_status *st, int cancel_fd, int timeout_ms,
                      struct nbdm_err *e)
{
	struct nbd_handle *h = *hp;
	for (int i = 0; i < 2; i++) {
		st->ctx[i].seen = 0;
		st->ctx[i].n = 0;
	}
	st->oom = 0;
	nbd_extent_callback cb = { .callback = extent_cb, .user_data = st };
	int64_t cookie = nbd_aio_block_status(h, count, offset, cb, NBD_NULL_COMPLETION, 0);
	if (cookie == -1) {
		set_nbd_err(e, offset);
		return NBDM_ERR;
	}
	int r = wait_cookie(hp, cookie, cancel_fd, timeout_ms, offset, e);
	if (r != NBDM_OK)
		return r;
	if (st->oom) {
		set_msg(e, ENOMEM, offset, "out of memory collecting extents");
		return NBDM_ERR;
	}
	return NBDM_OK;
}

void nbdm_status_free(struct nbdm_status *st)
{
	for (int i = 0; i < 2; i++) {
		free(st->ctx[i].pairs);
		st->ctx[i].pairs = NULL;
		st->ctx[i].n = st->ctx[i].cap = 0;
	}
}

int nbdm_eventfd(void)
{
	return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

// SPDX-License-Identifier: MIT
/*
 * warn.c - the WARN log ("dmesg"): a ring of fixed-size records inside the
 * arena, written by whichever process hit the WARN and readable by all.
 *
 * A writer claims its record by a CAS of the record's sequence word to
 * "seq | BUSY", fills it, and publishes it by a CAS from exactly that claim
 * back to seq.  A record found BUSY belongs to a live writer and is left
 * alone (the newcomer drops its WARN and counts it in warn_dropped), unless
 * the claim is over a second old: then its writer died halfway and the
 * record is taken over.  A reader keeps a copy only if the sequence word was
 * the same, and not BUSY, before and after copying.
 */
#define _GNU_SOURCE
#include "vfio_emu.h"

#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define REC_BUSY (1ULL << 63)
#define STALE_CLAIM_NS 1000000000LL

static const char *const refcount_texts[] = {
	[VFIO_WARN_ADD_NOT_ZERO_OVF] = "refcount_t: saturated; leaking memory.",
	[VFIO_WARN_ADD_OVF] = "refcount_t: saturated; leaking memory.",
	[VFIO_WARN_ADD_UAF] = "refcount_t: addition on 0; use-after-free.",
	[VFIO_WARN_SUB_UAF] = "refcount_t: underflow; use-after-free.",
	[VFIO_WARN_DEC_LEAK] = "refcount_t: decrement hit 0; leaking memory.",
};

const char *vfio_warn_text(uint32_t kind)
{
	if (kind >= VFIO_WARN_ADD_NOT_ZERO_OVF && kind <= VFIO_WARN_DEC_LEAK)
		return refcount_texts[kind];
	return "";
}

static void copy_str(char *dst, size_t size, const char *src)
{
	size_t n = src ? strnlen(src, size - 1) : 0;

	memcpy(dst, src ? src : "", n);
	memset(dst + n, 0, size - n);
}

/* Claim r for writing record 'seq'; 0 if a newer or a live writer has it. */
static int claim(struct vfio_warn_rec *r, uint64_t seq)
{
	uint64_t cur = atomic_load_explicit(&r->seq, memory_order_relaxed);

	for (;;) {
		if ((cur & ~REC_BUSY) >= seq)
			return 0;
		if ((cur & REC_BUSY) &&
		    vfio_monotonic_ns() - atomic_load_explicit(&r->claim_ns, memory_order_relaxed) <
		    STALE_CLAIM_NS)
			return 0;
		if (atomic_compare_exchange_weak_explicit(&r->seq, &cur, seq | REC_BUSY,
							  memory_order_acquire,
							  memory_order_relaxed))
			break;
	}
	atomic_store_explicit(&r->claim_ns, vfio_monotonic_ns(), memory_order_relaxed);
	return 1;
}

/* Publish 'seq'; fails only if the claim was taken over meanwhile. */
static int publish(struct vfio_warn_rec *r, uint64_t seq)
{
	uint64_t busy = seq | REC_BUSY;

	return atomic_compare_exchange_strong_explicit(&r->seq, &busy, seq,
						       memory_order_release,
						       memory_order_relaxed);
}

/* Record one WARN; returns its sequence number (0 if it had to be dropped). */
uint64_t vfio_warn_record(struct vfio_arena *a, uint32_t kind, const vfio_handle_t *h,
			  int32_t old, int32_t new, const char *text)
{
	struct vfio_arena_hdr *hdr = a->hdr;
	struct vfio_warn_rec *r;
	uint64_t seq;

	if (a->closed)
		return 0;
	seq = atomic_fetch_add_explicit(&hdr->warn_head, 1, memory_order_relaxed) + 1;
	r = &a->ring[(seq - 1) % a->warn_capacity];
	if (!claim(r, seq))
		goto dropped;
	r->time_ns = vfio_monotonic_ns();
	r->kind = kind;
	r->pid = (uint32_t)getpid();
	r->tid = (uint32_t)syscall(SYS_gettid);
	r->obj_index = h ? (uint32_t)(h->slot - a->slots) : UINT32_MAX;
	r->obj_gen = h ? h->gen : 0;
	r->obj_kind = h ? atomic_load_explicit(&h->slot->kind, memory_order_relaxed) : 0;
	r->old = old;
	r->new = new;
	copy_str(r->text, sizeof(r->text), text ? text : vfio_warn_text(kind));
	copy_str(r->label, sizeof(r->label), h ? h->slot->label : NULL);
	r->stack[0] = 0;
	if (publish(r, seq))
		return seq;
dropped:
	atomic_fetch_add_explicit(&hdr->warn_dropped, 1, memory_order_relaxed);
	return 0;
}

/* A WARN raised by a higher layer (Python), with its own text. */
int64_t vfio_warn_emit(vfio_arena_t *a, vfio_handle_t *h, uint32_t kind, const char *text)
{
	if (a->closed)
		return VFIO_E_STALE;
	if (h && !vfio_handle_ok(h))
		return VFIO_E_STALE;
	return (int64_t)vfio_warn_record(a, kind, h, 0, 0, text);
}

/* Copy record 'seq' out; VFIO_E_STALE if it was overwritten or never written. */
int vfio_warn_read(const vfio_arena_t *a, uint64_t seq, vfio_warn_entry_t *out)
{
	struct vfio_warn_rec *r;
	uint64_t s1, s2;

	if (a->closed)
		return VFIO_E_STALE;
	if (!seq)
		return VFIO_E_RANGE;
	r = &a->ring[(seq - 1) % a->warn_capacity];
	s1 = atomic_load_explicit(&r->seq, memory_order_acquire);
	if (s1 != seq)
		return VFIO_E_STALE;	/* overwritten, dropped, or being written */
	out->seq = seq;
	out->time_ns = r->time_ns;
	out->kind = r->kind;
	out->pid = r->pid;
	out->tid = r->tid;
	out->obj_index = r->obj_index;
	out->obj_gen = r->obj_gen;
	out->obj_kind = r->obj_kind;
	out->old = r->old;
	out->new = r->new;
	memcpy(out->text, r->text, sizeof(out->text));
	memcpy(out->label, r->label, sizeof(out->label));
	memcpy(out->stack, r->stack, sizeof(out->stack));
	atomic_thread_fence(memory_order_acquire);
	s2 = atomic_load_explicit(&r->seq, memory_order_relaxed);
	if (s2 != seq)
		return VFIO_E_STALE;
	out->text[sizeof(out->text) - 1] = 0;
	out->label[sizeof(out->label) - 1] = 0;
	out->stack[sizeof(out->stack) - 1] = 0;
	return VFIO_OK;
}

/*
 * Attach the caller's Python stack to the records from 'first' on (within
 * the ring) that this thread wrote and that have no stack yet: one call may
 * WARN several times.  Returns how many records got it.
 */
int vfio_warn_set_stack(vfio_arena_t *a, uint64_t first, const char *stack)
{
	uint32_t pid = (uint32_t)getpid(), tid = (uint32_t)syscall(SYS_gettid);
	uint64_t head, seq, oldest;
	int n = 0;

	if (a->closed)
		return VFIO_E_STALE;
	head = atomic_load_explicit(&a->hdr->warn_head, memory_order_acquire);
	oldest = head >= a->warn_capacity ? head - a->warn_capacity + 1 : 1;
	for (seq = first > oldest ? first : oldest; seq <= head; seq++) {
		struct vfio_warn_rec *r = &a->ring[(seq - 1) % a->warn_capacity];
		uint64_t cur = seq;

		/* Cheap unlocked look first, so other writers' records are left alone. */
		if (r->pid != pid || r->tid != tid || r->stack[0])
			continue;
		if (!atomic_compare_exchange_strong_explicit(&r->seq, &cur, seq | REC_BUSY,
							     memory_order_acquire,
							     memory_order_relaxed))
			continue;
		atomic_store_explicit(&r->claim_ns, vfio_monotonic_ns(), memory_order_relaxed);
		if (r->pid == pid && r->tid == tid && !r->stack[0]) {
			copy_str(r->stack, sizeof(r->stack), stack);
			n++;
		}
		publish(r, seq);
	}
	return n;
}

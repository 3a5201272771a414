// SPDX-License-Identifier: MIT
/*
 * completion.c - struct completion (kernel/sched/completion.c, v6.1) across
 * processes.
 *
 * 'done' is the shared futex word itself (no FUTEX_PRIVATE_FLAG, so sleepers
 * in any process that maps the arena are woken).  'waiters' counts sleepers
 * so complete() makes a syscall only when someone sleeps.  A wait sleeps for
 * at most one slice and returns, so the caller's signal handlers run between
 * slices; the kernel's loop over schedule_timeout() lives in Python.
 *
 * Deviation: the kernel queues exclusive waiters FIFO; here a woken sleeper
 * races any newcomer for the count.  Counting stays exact, fairness does not.
 */
#define _GNU_SOURCE
#include "vfio_emu.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define DONE_ALL UINT_MAX

static int futex_wait(_Atomic uint32_t *word, uint32_t expected, int64_t timeout_ns)
{
	struct timespec ts = {
		.tv_sec = timeout_ns / 1000000000LL,
		.tv_nsec = timeout_ns % 1000000000LL,
	};

	return (int)syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, expected, &ts, NULL, 0);
}

void vfio_futex_wake(_Atomic uint32_t *word, int n)
{
	syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, n, NULL, NULL, 0);
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield");
#endif
}

/* Take one count if there is one; *consumed says whether 'done' moved. */
static inline int try_consume(struct vfio_slot *s, uint32_t *consumed)
{
	uint32_t d = atomic_load_explicit(&s->done, memory_order_acquire);

	while (d) {
		if (d == DONE_ALL) {
			*consumed = 0;
			return 1;
		}
		if (atomic_compare_exchange_weak_explicit(&s->done, &d, d - 1,
							  memory_order_acq_rel,
							  memory_order_acquire)) {
			*consumed = 1;
			return 1;
		}
	}
	return 0;
}

/* init_completion / reinit_completion: done = 0, waiters untouched. */
int64_t vfio_completion_reinit(vfio_handle_t *h)
{
	VFIO_CHECK_HANDLE(h);
	atomic_store_explicit(&h->slot->done, 0, memory_order_release);
	return 0;
}

int64_t vfio_completion_complete(vfio_handle_t *h)
{
	struct vfio_slot *s = h->slot;
	uint32_t d;

	VFIO_CHECK_HANDLE(h);
	d = atomic_load_explicit(&s->done, memory_order_relaxed);
	while (d != DONE_ALL &&
	       !atomic_compare_exchange_weak_explicit(&s->done, &d, d + 1, memory_order_seq_cst,
						      memory_order_relaxed))
		;
	/* seq_cst pairs with the waiter's waiters++ then FUTEX_WAIT check of done. */
	if (atomic_load_explicit(&s->waiters, memory_order_seq_cst))
		vfio_futex_wake(&s->done, 1);
	return 0;
}

int64_t vfio_completion_complete_all(vfio_handle_t *h)
{
	struct vfio_slot *s = h->slot;

	VFIO_CHECK_HANDLE(h);
	atomic_store_explicit(&s->done, DONE_ALL, memory_order_seq_cst);
	if (atomic_load_explicit(&s->waiters, memory_order_seq_cst))
		vfio_futex_wake(&s->done, INT_MAX);
	return 0;
}

int64_t vfio_completion_try_wait(vfio_handle_t *h)
{
	uint32_t consumed;

	VFIO_CHECK_HANDLE(h);
	return try_consume(h->slot, &consumed);
}

int64_t vfio_completion_done(vfio_handle_t *h)
{
	VFIO_CHECK_HANDLE(h);
	return atomic_load_explicit(&h->slot->done, memory_order_acquire) != 0;
}

int64_t vfio_completion_read(vfio_handle_t *h)
{
	VFIO_CHECK_HANDLE(h);
	return atomic_load_explicit(&h->slot->done, memory_order_acquire);
}

int64_t vfio_completion_waiters(vfio_handle_t *h)
{
	VFIO_CHECK_HANDLE(h);
	return atomic_load_explicit(&h->slot->waiters, memory_order_acquire);
}

/*
 * One slice of wait_for_completion*(): returns 1 once a count was taken
 * (*consumed = 1; 0 after complete_all), 0 when the slice ran out first,
 * VFIO_E_TIMEDOUT at the deadline (CLOCK_MONOTONIC ns, < 0 for none),
 * VFIO_E_INTR when a signal interrupted the sleep, VFIO_E_STALE if the
 * completion was freed meanwhile.  As in the kernel, a count that lands
 * together with the timeout or the signal is still taken.  With spin set it
 * first spins up to the arena's spin_ns, a signal during which goes unseen.
 */
static int64_t completion_wait(vfio_handle_t *h, int64_t deadline_ns, int64_t slice_ns,
			       int spin, uint32_t *consumed)
{
	struct vfio_slot *s = h->slot;
	int64_t now, end, spin_end;
	int64_t rc;

	*consumed = 0;
	VFIO_CHECK_HANDLE(h);
	if (try_consume(s, consumed))
		return 1;

	now = vfio_monotonic_ns();
	if (deadline_ns >= 0 && now >= deadline_ns)
		return VFIO_E_TIMEDOUT;
	/*
	 * Not while a signal must be seen: only a sleeping waiter gets EINTR.
	 * Never past the slice (signal handlers wait for it) or the deadline.
	 */
	if (slice_ns <= 0)
		slice_ns = 1000000;
	spin_end = now + (h->arena->spin_ns < slice_ns ? h->arena->spin_ns : slice_ns);
	if (deadline_ns >= 0 && deadline_ns < spin_end)
		spin_end = deadline_ns;
	while (spin && h->arena->spin_ns) {
		for (int i = 0; i < 16; i++) {
			cpu_relax();
			if (atomic_load_explicit(&s->done, memory_order_relaxed) &&
			    try_consume(s, consumed))
				return 1;
		}
		if ((now = vfio_monotonic_ns()) >= spin_end)
			break;
	}

	end = now + slice_ns;
	if (deadline_ns >= 0 && deadline_ns < end)
		end = deadline_ns;
	atomic_fetch_add_explicit(&s->waiters, 1, memory_order_seq_cst);
	for (;;) {
		if (!vfio_handle_ok(h)) {
			rc = VFIO_E_STALE;
			break;
		}
		if (try_consume(s, consumed)) {
			rc = 1;
			break;
		}
		now = vfio_monotonic_ns();
		if (now >= end) {
			rc = deadline_ns >= 0 && now >= deadline_ns ? VFIO_E_TIMEDOUT : 0;
			break;
		}
		if (futex_wait(&s->done, 0, end - now) < 0 && errno == EINTR) {
			rc = try_consume(s, consumed) ? 1 : VFIO_E_INTR;
			break;
		}
	}
	atomic_fetch_sub_explicit(&s->waiters, 1, memory_order_seq_cst);
	/* A wake meant for a sleeper that left empty-handed goes to the next one. */
	if (rc != 1 && atomic_load_explicit(&s->done, memory_order_seq_cst) &&
	    atomic_load_explicit(&s->waiters, memory_order_seq_cst))
		vfio_futex_wake(&s->done, 1);
	return rc;
}

/* The wait runs as a slow-path call of its arena: close() waits for it (one slice at most). */
int64_t vfio_completion_wait(vfio_handle_t *h, int64_t deadline_ns, int64_t slice_ns,
			     int spin, uint32_t *consumed)
{
	int64_t rc;

	*consumed = 0;
	if (!vfio_arena_enter(h->arena))
		return VFIO_E_STALE;
	rc = completion_wait(h, deadline_ns, slice_ns, spin, consumed);
	vfio_arena_exit(h->arena);
	return rc;
}

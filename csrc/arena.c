// SPDX-License-Identifier: MIT
/*
 * arena.c - the shared-memory segment: header, 128-byte slots, the lock-free
 * slot allocator and handles.
 *
 * Nothing in the segment is trusted: every index read from it or passed in
 * is bounds-checked, and a process killed at any point leaves it usable
 * (there are no locks; at worst one slot is lost to the free list).
 */
#define _GNU_SOURCE
#include "vfio_emu.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int64_t vfio_monotonic_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static uint64_t layout_size(uint32_t capacity, uint32_t warn_capacity)
{
	return VFIO_HDR_SIZE + (uint64_t)capacity * VFIO_SLOT_SIZE +
	       (uint64_t)warn_capacity * VFIO_WARN_REC_SIZE;
}

/* Spinning before a futex sleep only pays when the waker can run meanwhile. */
static int64_t default_spin_ns(void)
{
	cpu_set_t set;

	if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) < 2)
		return 0;
	return sysconf(_SC_NPROCESSORS_ONLN) > 1 ? 5000 : 0;
}

/* ---- a segment that shrinks under us -----------------------------------
 *
 * A process of the same user can truncate the segment; the next access to a
 * page past the new end raises SIGBUS, which would kill every process that
 * maps it.  The mappings of this process are registered here, and a SIGBUS
 * inside one of them maps private zero pages over that arena (as close()
 * does) and marks it lost: the faulting access then reads generation 0,
 * which no handle has, and fails as a use of a closed arena.  A SIGBUS
 * anywhere else goes to whoever handled SIGBUS before (or kills, as it
 * would have).
 */
#define MAX_MAPS 1024

static struct {
	_Atomic uintptr_t base;		/* 0 = free entry; stored last (release) */
	_Atomic size_t size;
	struct vfio_arena *_Atomic arena;
} maps[MAX_MAPS];
static pthread_mutex_t maps_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction prev_bus;

static void on_sigbus(int sig, siginfo_t *si, void *ctx)
{
	uintptr_t addr = (uintptr_t)si->si_addr;

	for (int i = 0; i < MAX_MAPS; i++) {
		uintptr_t base = atomic_load_explicit(&maps[i].base, memory_order_acquire);
		size_t size = atomic_load_explicit(&maps[i].size, memory_order_relaxed);
		struct vfio_arena *a = atomic_load_explicit(&maps[i].arena, memory_order_relaxed);
		int saved = errno;

		if (!base || addr - base >= size)
			continue;
		if (mmap((void *)base, size, PROT_READ | PROT_WRITE,
			 MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) == MAP_FAILED) {
			errno = saved;
			break;
		}
		errno = saved;
		atomic_store_explicit(&a->lost, 1, memory_order_relaxed);
		atomic_store_explicit(&a->closed, 1, memory_order_release);
		return;	/* the access is retried on zero pages */
	}
	if ((prev_bus.sa_flags & SA_SIGINFO) && prev_bus.sa_sigaction) {
		prev_bus.sa_sigaction(sig, si, ctx);
	} else if (prev_bus.sa_handler != SIG_DFL && prev_bus.sa_handler != SIG_IGN) {
		prev_bus.sa_handler(sig);
	} else {
		signal(SIGBUS, SIG_DFL);	/* the access faults again, fatally */
	}
}

/* Install the handler if it is not (or no longer, e.g. after faulthandler) in place. */
static void sigbus_install(void)
{
	struct sigaction cur, sa;

	if (sigaction(SIGBUS, NULL, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) &&
	    cur.sa_sigaction == on_sigbus)
		return;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_sigbus;
	sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGBUS, &sa, &prev_bus);
}

static void maps_add(struct vfio_arena *a)
{
	pthread_mutex_lock(&maps_lock);
	sigbus_install();
	for (int i = 0; i < MAX_MAPS; i++) {
		if (atomic_load_explicit(&maps[i].base, memory_order_relaxed))
			continue;
		atomic_store_explicit(&maps[i].size, a->size, memory_order_relaxed);
		atomic_store_explicit(&maps[i].arena, a, memory_order_relaxed);
		atomic_store_explicit(&maps[i].base, (uintptr_t)a->base, memory_order_release);
		break;	/* none free: this arena keeps the default SIGBUS behaviour */
	}
	pthread_mutex_unlock(&maps_lock);
}

static void maps_remove(struct vfio_arena *a)
{
	pthread_mutex_lock(&maps_lock);
	for (int i = 0; i < MAX_MAPS; i++)
		if (atomic_load_explicit(&maps[i].base, memory_order_relaxed) &&
		    atomic_load_explicit(&maps[i].arena, memory_order_relaxed) == a)
			atomic_store_explicit(&maps[i].base, 0, memory_order_release);
	pthread_mutex_unlock(&maps_lock);
}

/* A process's start time (clock ticks after boot): with its pid, tells it from a reuse. */
uint64_t vfio_proc_start_time(uint32_t pid)
{
	char path[32], buf[1024];
	unsigned long long start = 0;
	size_t n;
	FILE *f;
	char *p;

	snprintf(path, sizeof(path), "/proc/%u/stat", pid);
	f = fopen(path, "re");
	if (!f)
		return 0;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = 0;
	p = strrchr(buf, ')');	/* the command name may hold spaces and parentheses */
	if (!p)
		return 0;
	/* Fields 3 (state) to 21 follow the name; 22 is starttime. */
	for (int field = 2; field < 22 && p; field++)
		p = strchr(p + 1, ' ');
	if (p)
		start = strtoull(p + 1, NULL, 10);
	return start;
}

static uint64_t new_incarnation(void)
{
	uint64_t id = 0;

	if (getrandom(&id, sizeof(id), 0) != (ssize_t)sizeof(id) || !id)
		id = ((uint64_t)vfio_monotonic_ns() << 20) ^ (uint64_t)getpid() ^ 0x9e3779b97f4a7c15ULL;
	return id;
}

static int clock_ok(uint32_t hz, double time_scale)
{
	return hz && hz <= VFIO_HZ_MAX && isfinite(time_scale) &&
	       time_scale >= VFIO_TIME_SCALE_MIN && time_scale <= VFIO_TIME_SCALE_MAX;
}

/* capacity and warn_capacity are validated copies, never re-read from the segment. */
static struct vfio_arena *arena_new(const char *name, char *base, size_t size, int owner,
				    uint32_t capacity, uint32_t warn_capacity)
{
	struct vfio_arena *a = calloc(1, sizeof(*a));

	if (!a)
		return NULL;
	a->base = base;
	a->size = size;
	a->hdr = (struct vfio_arena_hdr *)base;
	a->slots = (struct vfio_slot *)(base + VFIO_HDR_SIZE);
	a->ring = (struct vfio_warn_rec *)(base + VFIO_HDR_SIZE +
					   (uint64_t)capacity * VFIO_SLOT_SIZE);
	a->capacity = capacity;
	a->warn_capacity = warn_capacity;
	a->owner = owner;
	a->spin_ns = default_spin_ns();
	strncpy(a->name, name, sizeof(a->name) - 1);
	maps_add(a);
	return a;
}

int vfio_arena_create(const char *name, uint32_t capacity, uint32_t warn_capacity,
		      uint32_t hz, double time_scale, vfio_arena_t **out, int *err)
{
	struct vfio_arena_hdr *hdr;
	uint64_t size;
	char *base;
	int fd, rc;

	*out = NULL;
	*err = 0;
	if (!capacity || capacity > VFIO_CAPACITY_MAX || !warn_capacity ||
	    warn_capacity > VFIO_WARN_CAPACITY_MAX || !clock_ok(hz, time_scale) ||
	    strlen(name) > VFIO_NAME_MAX)
		return VFIO_E_INVAL;
	size = layout_size(capacity, warn_capacity);

	fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
	if (fd < 0) {
		*err = errno;
		return errno == EEXIST ? VFIO_E_EXIST : VFIO_E_SYS;
	}
	/*
	 * Reserve every page now: a sparse segment on a full tmpfs would only
	 * fail later, as SIGBUS in whichever process first touches a page.
	 */
	rc = posix_fallocate(fd, 0, (off_t)size);
	if (rc) {
		errno = rc;
		goto fail_unlink;
	}
	base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (base == MAP_FAILED)
		goto fail_unlink;
	close(fd);

	hdr = (struct vfio_arena_hdr *)base;
	hdr->version = VFIO_ARENA_VERSION;
	hdr->slot_size = VFIO_SLOT_SIZE;
	hdr->capacity = capacity;
	hdr->warn_capacity = warn_capacity;
	hdr->warn_rec_size = VFIO_WARN_REC_SIZE;
	hdr->hdr_size = VFIO_HDR_SIZE;
	hdr->total_size = size;
	hdr->slots_offset = VFIO_HDR_SIZE;
	hdr->ring_offset = VFIO_HDR_SIZE + (uint64_t)capacity * VFIO_SLOT_SIZE;
	hdr->created_ns = vfio_monotonic_ns();
	hdr->time_scale = time_scale;
	hdr->hz = hz;
	hdr->creator_pid = (uint32_t)getpid();
	hdr->creator_start = vfio_proc_start_time(hdr->creator_pid);
	hdr->incarnation = new_incarnation();

	/* Every slot starts free (gen 0, even) and linked in index order. */
	struct vfio_slot *slots = (struct vfio_slot *)(base + hdr->slots_offset);
	for (uint32_t i = 0; i < capacity; i++)
		atomic_store_explicit(&slots[i].next_free, i + 2 <= capacity ? i + 2 : 0,
				      memory_order_relaxed);
	atomic_store_explicit(&hdr->free_head, 1, memory_order_relaxed);
	atomic_store_explicit((_Atomic uint64_t *)&hdr->magic, VFIO_ARENA_MAGIC,
			      memory_order_release);

	*out = arena_new(name, base, size, 1, capacity, warn_capacity);
	if (!*out) {
		munmap(base, size);
		shm_unlink(name);
		*err = ENOMEM;
		return VFIO_E_SYS;
	}
	return VFIO_OK;

fail_unlink:
	*err = errno;
	close(fd);
	shm_unlink(name);
	return VFIO_E_SYS;
}

/*
 * Check every header field against the others and against the file size,
 * reading each once: what is returned is what was checked.
 */
static int check_header(const struct vfio_arena_hdr *hdr, uint64_t file_size,
			uint32_t *capacity, uint32_t *warn_capacity)
{
	uint64_t magic = atomic_load_explicit((_Atomic uint64_t *)&hdr->magic,
					      memory_order_acquire);
	const volatile struct vfio_arena_hdr *h = hdr;
	uint32_t cap = h->capacity, wcap = h->warn_capacity, hz = h->hz;
	uint64_t total = h->total_size;
	double scale = h->time_scale;
	uint64_t warn_head = atomic_load_explicit(&((struct vfio_arena_hdr *)hdr)->warn_head,
						  memory_order_relaxed);
	uint32_t top = (uint32_t)atomic_load_explicit(&((struct vfio_arena_hdr *)hdr)->free_head,
						      memory_order_relaxed);

	if (magic != VFIO_ARENA_MAGIC)
		return VFIO_E_FOREIGN;
	if (h->version != VFIO_ARENA_VERSION)
		return VFIO_E_VERSION;
	if (h->slot_size != VFIO_SLOT_SIZE || h->warn_rec_size != VFIO_WARN_REC_SIZE ||
	    h->hdr_size != VFIO_HDR_SIZE || !cap || cap > VFIO_CAPACITY_MAX || !wcap ||
	    wcap > VFIO_WARN_CAPACITY_MAX || !clock_ok(hz, scale) ||
	    total != layout_size(cap, wcap) || h->slots_offset != VFIO_HDR_SIZE ||
	    h->ring_offset != VFIO_HDR_SIZE + (uint64_t)cap * VFIO_SLOT_SIZE ||
	    warn_head > VFIO_WARN_SEQ_MAX || top > cap || !h->incarnation)
		return VFIO_E_CORRUPT;
	if (file_size < total)
		return VFIO_E_TRUNCATED;
	if (file_size != total)
		return VFIO_E_CORRUPT;
	*capacity = cap;
	*warn_capacity = wcap;
	return VFIO_OK;
}

int vfio_arena_attach(const char *name, vfio_arena_t **out, int *err)
{
	uint32_t capacity, warn_capacity;
	struct stat st;
	char *base;
	int fd, rc;

	*out = NULL;
	*err = 0;
	if (strlen(name) > VFIO_NAME_MAX)
		return VFIO_E_INVAL;
	fd = shm_open(name, O_RDWR, 0);
	if (fd < 0) {
		*err = errno;
		return errno == ENOENT ? VFIO_E_NOENT : VFIO_E_SYS;
	}
	if (fstat(fd, &st) < 0) {
		*err = errno;
		close(fd);
		return VFIO_E_SYS;
	}
	/* Only a segment private to this user: anyone else could shrink it under us. */
	if (st.st_uid != geteuid() || (st.st_mode & 07777) != 0600) {
		close(fd);
		return VFIO_E_OWNER;
	}
	if (st.st_size < (off_t)sizeof(uint64_t)) {
		close(fd);
		return VFIO_E_FOREIGN;	/* no room even for the magic */
	}
	base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	*err = errno;
	close(fd);
	if (base == MAP_FAILED)
		return VFIO_E_SYS;
	/* Ours (by its magic) but shorter than a header: truncated; else foreign. */
	if ((uint64_t)st.st_size < VFIO_HDR_SIZE) {
		rc = atomic_load_explicit((_Atomic uint64_t *)base, memory_order_acquire) ==
		     VFIO_ARENA_MAGIC ? VFIO_E_TRUNCATED : VFIO_E_FOREIGN;
		munmap(base, (size_t)st.st_size);
		*err = 0;
		return rc;
	}
	rc = check_header((struct vfio_arena_hdr *)base, (uint64_t)st.st_size, &capacity,
			  &warn_capacity);
	if (rc != VFIO_OK) {
		munmap(base, (size_t)st.st_size);
		*err = 0;
		return rc;
	}
	*out = arena_new(name, base, (size_t)st.st_size, 0, capacity, warn_capacity);
	if (!*out) {
		munmap(base, (size_t)st.st_size);
		*err = ENOMEM;
		return VFIO_E_SYS;
	}
	*err = 0;
	return VFIO_OK;
}

/*
 * Close this process's view.  The shared mapping is replaced in place by
 * private zero pages, so a handle still pointing into it reads generation 0
 * (never valid) and fails cleanly instead of faulting.  The address range
 * itself is returned by vfio_arena_release() once nothing can reference it.
 */
int vfio_arena_close(vfio_arena_t *a, int unlink_it, int *err)
{
	int rc = VFIO_OK;

	*err = 0;
	/* New slow-path calls now fail; those in flight (a wait: one slice) finish first. */
	atomic_store_explicit(&a->closing, 1, memory_order_seq_cst);
	while (atomic_load_explicit(&a->users, memory_order_seq_cst))
		sched_yield();
	if (!atomic_load_explicit(&a->closed, memory_order_acquire)) {
		if (mmap(a->base, a->size, PROT_READ | PROT_WRITE,
			 MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) == MAP_FAILED) {
			*err = errno;
			atomic_store_explicit(&a->closing, 0, memory_order_seq_cst);
			return VFIO_E_SYS;
		}
		atomic_store_explicit(&a->closed, 1, memory_order_release);
	}
	if (unlink_it && !a->unlinked) {
		a->unlinked = 1;
		if (shm_unlink(a->name) < 0) {
			*err = errno;
			rc = VFIO_E_SYS;
		}
	}
	return rc;
}

void vfio_arena_release(vfio_arena_t *a)
{
	if (!a)
		return;
	maps_remove(a);
	munmap(a->base, a->size);
	free(a);
}

int vfio_shm_unlink(const char *name, int *err)
{
	*err = 0;
	if (shm_unlink(name) == 0)
		return VFIO_OK;
	*err = errno;
	return errno == ENOENT ? VFIO_E_NOENT : VFIO_E_SYS;
}

void vfio_arena_info(const vfio_arena_t *a, vfio_arena_info_t *out)
{
	const struct vfio_arena_hdr *h = a->hdr;

	memset(out, 0, sizeof(*out));
	/* Closing counts as closed: the calls it refuses must say why. */
	out->closed = atomic_load_explicit(&a->closed, memory_order_acquire) ||
		      atomic_load_explicit(&a->closing, memory_order_acquire);
	out->lost = atomic_load_explicit(&a->lost, memory_order_relaxed);
	out->owner = a->owner;
	out->spin_ns = a->spin_ns;
	out->capacity = a->capacity;
	out->warn_capacity = a->warn_capacity;
	if (out->closed)
		return;
	out->incarnation = h->incarnation;
	out->creator_start = h->creator_start;
	out->hz = h->hz;
	out->time_scale = h->time_scale;
	out->created_ns = h->created_ns;
	out->creator_pid = h->creator_pid;
	out->warn_head = atomic_load_explicit(&((struct vfio_arena_hdr *)h)->warn_head,
					      memory_order_acquire);
	out->warn_dropped = atomic_load_explicit(&((struct vfio_arena_hdr *)h)->warn_dropped,
						 memory_order_relaxed);
}

void vfio_arena_set_spin(vfio_arena_t *a, int64_t spin_ns)
{
	a->spin_ns = spin_ns < 0 ? 0 : spin_ns;
}

/*
 * Objects allocated now: the slots whose generation is odd.  Counted, not
 * kept in a counter, so a process killed between the free-list CAS and the
 * count cannot make it drift (at worst that slot is lost to the free list).
 */
uint32_t vfio_arena_in_use(const vfio_arena_t *a)
{
	uint32_t n = 0;

	if (atomic_load_explicit(&((vfio_arena_t *)a)->closed, memory_order_acquire))
		return 0;
	for (uint32_t i = 0; i < a->capacity; i++)
		n += atomic_load_explicit(&a->slots[i].gen, memory_order_relaxed) & 1;
	return n;
}

/* ---- slots ------------------------------------------------------------ */

static int slot_alloc(vfio_arena_t *a, uint32_t kind, const char *label, vfio_handle_t *h)
{
	struct vfio_arena_hdr *hdr = a->hdr;
	struct vfio_slot *s;
	uint64_t head, next_head;
	uint32_t top, gen;

	head = atomic_load_explicit(&hdr->free_head, memory_order_acquire);
	do {
		top = (uint32_t)head;
		if (!top)
			return VFIO_E_FULL;
		if (top > a->capacity)
			return VFIO_E_CORRUPT;
		s = &a->slots[top - 1];
		/* The tag in the upper half makes a stale 'next' fail the CAS. */
		next_head = ((head >> 32) + 1) << 32 |
			    atomic_load_explicit(&s->next_free, memory_order_relaxed);
	} while (!atomic_compare_exchange_weak_explicit(&hdr->free_head, &head, next_head,
							 memory_order_acq_rel,
							 memory_order_acquire));

	gen = atomic_load_explicit(&s->gen, memory_order_relaxed);
	if (gen & 1)
		return VFIO_E_CORRUPT;	/* a live slot was on the free list: leave it alone */
	atomic_store_explicit(&s->kind, kind, memory_order_relaxed);
	atomic_store_explicit(&s->refs, 0, memory_order_relaxed);
	atomic_store_explicit(&s->done, 0, memory_order_relaxed);
	/*
	 * 'waiters' is left alone: sleepers woken by the free of the previous
	 * object may not have left yet, and their decrements must balance.
	 */
	atomic_store_explicit(&s->owner_pid, (uint32_t)getpid(), memory_order_relaxed);
	memset(s->label, 0, sizeof(s->label));
	if (label)
		strncpy(s->label, label, sizeof(s->label) - 1);
	gen += 1;	/* even (free) -> odd (allocated) */
	atomic_store_explicit(&s->gen, gen, memory_order_release);

	h->slot = s;
	h->arena = a;
	h->index = top - 1;
	h->gen = gen;
	return VFIO_OK;
}

int vfio_slot_alloc(vfio_arena_t *a, uint32_t kind, const char *label, vfio_handle_t *h)
{
	int rc;

	if (kind < VFIO_KIND_REFCOUNT || kind > VFIO_KIND_MAX)
		return VFIO_E_INVAL;
	if (!vfio_arena_enter(a))
		return VFIO_E_STALE;
	rc = atomic_load_explicit(&a->closed, memory_order_acquire) ? VFIO_E_STALE :
	     slot_alloc(a, kind, label, h);
	vfio_arena_exit(a);
	return rc;
}

static int slot_free(vfio_handle_t *h)
{
	struct vfio_arena *a = h->arena;
	struct vfio_slot *s = h->slot;
	/* From the slot pointer, not h->index: Python can write the latter. */
	uint32_t index = (uint32_t)(s - a->slots);
	uint32_t gen = h->gen;
	uint64_t head, new_head;

	/* Only one free of this generation can win; the loser is a double free. */
	if (!atomic_compare_exchange_strong_explicit(&s->gen, &gen, h->gen + 1,
						     memory_order_acq_rel,
						     memory_order_relaxed))
		return VFIO_E_STALE;
	atomic_store_explicit(&s->kind, VFIO_KIND_FREE, memory_order_relaxed);
	/* Anyone still asleep on a freed completion wakes up to a stale handle. */
	if (atomic_load_explicit(&s->waiters, memory_order_seq_cst))
		vfio_futex_wake(&s->done, INT32_MAX);
	head = atomic_load_explicit(&a->hdr->free_head, memory_order_relaxed);
	do {
		atomic_store_explicit(&s->next_free, (uint32_t)head, memory_order_relaxed);
		new_head = ((head >> 32) + 1) << 32 | (index + 1);
	} while (!atomic_compare_exchange_weak_explicit(&a->hdr->free_head, &head, new_head,
							 memory_order_release,
							 memory_order_relaxed));
	return VFIO_OK;
}

int vfio_slot_free(vfio_handle_t *h)
{
	struct vfio_arena *a = h->arena;
	int rc;

	if (!vfio_arena_enter(a))
		return VFIO_E_STALE;
	rc = atomic_load_explicit(&a->closed, memory_order_acquire) ? VFIO_E_STALE : slot_free(h);
	vfio_arena_exit(a);
	return rc;
}

/* Rebuild a handle from (index, gen, kind), as carried by a token or pickle. */
int vfio_handle_open(vfio_arena_t *a, uint32_t index, uint32_t gen, uint32_t kind,
		     vfio_handle_t *h)
{
	struct vfio_slot *s;

	if (atomic_load_explicit(&((vfio_arena_t *)a)->closed, memory_order_acquire))
		return VFIO_E_STALE;
	if (index >= a->capacity)
		return VFIO_E_RANGE;
	s = &a->slots[index];
	if (!(gen & 1) || atomic_load_explicit(&s->gen, memory_order_acquire) != gen)
		return VFIO_E_STALE;
	if (atomic_load_explicit(&s->kind, memory_order_relaxed) != kind)
		return VFIO_E_KIND;
	h->slot = s;
	h->arena = a;
	h->index = index;
	h->gen = gen;
	return VFIO_OK;
}

/* A snapshot of one slot, for diagnostics and leak listings. */
int vfio_slot_info(const vfio_arena_t *a, uint32_t index, vfio_slot_info_t *out)
{
	struct vfio_slot *s;

	if (atomic_load_explicit(&((vfio_arena_t *)a)->closed, memory_order_acquire))
		return VFIO_E_STALE;
	if (index >= a->capacity)
		return VFIO_E_RANGE;
	s = &a->slots[index];
	out->gen = atomic_load_explicit(&s->gen, memory_order_acquire);
	out->kind = atomic_load_explicit(&s->kind, memory_order_relaxed);
	out->refs = atomic_load_explicit(&s->refs, memory_order_relaxed);
	out->done = atomic_load_explicit(&s->done, memory_order_relaxed);
	out->waiters = atomic_load_explicit(&s->waiters, memory_order_relaxed);
	out->owner_pid = atomic_load_explicit(&s->owner_pid, memory_order_relaxed);
	memcpy(out->label, s->label, sizeof(out->label));
	out->label[sizeof(out->label) - 1] = 0;
	return VFIO_OK;
}

/*
 * Allocator self-test at C speed: n rounds of (alloc two slots, stamp them
 * with this thread's id, check the stamps, free them in alternating order).
 * Holding two slots and pushing one back while others pop is what exposes
 * ABA on the free list.  Returns how many times another thread was found in
 * a slot this one owned (0 unless a slot was handed out twice), or a status.
 */
int64_t vfio_slot_churn(vfio_arena_t *a, int64_t n)
{
	int32_t me = (int32_t)syscall(SYS_gettid);
	vfio_handle_t h[2];
	int64_t bad = 0;
	int rc, got;

	for (int64_t i = 0; i < n; i++) {
		for (got = 0; got < 2; got++) {
			rc = vfio_slot_alloc(a, VFIO_KIND_REFCOUNT, NULL, &h[got]);
			if (rc == VFIO_E_FULL)
				break;
			if (rc)
				return rc;
			atomic_store_explicit(&h[got].slot->refs, me, memory_order_relaxed);
		}
		for (int k = 0; k < 16; k++)
			for (int j = 0; j < got; j++)
				if (atomic_load_explicit(&h[j].slot->refs, memory_order_relaxed) != me)
					bad++;
		for (int j = 0; j < got; j++)
			if (vfio_slot_free(&h[(i & 1) ? got - 1 - j : j]))
				bad++;
	}
	return bad;
}

/* The baseline every benchmark ratio is measured against. */
__attribute__((visibility("default"))) int64_t vfio_noop(vfio_handle_t *h)
{
	(void)h;
	return 0;
}

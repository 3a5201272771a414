// SPDX-License-Identifier: MIT
/*
 * warn_storm.c - a WARN storm on one arena, for ThreadSanitizer: writers raise
 * refcount WARNs and attach stacks, readers copy records out, all at once.
 * Built with -fsanitize=thread against csrc/ by tests/shm/test_sanitizers.py;
 * any data race TSan sees makes it exit non-zero.
 */
#include "vfio_emu.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define WRITERS 4
#define READERS 2
#define ROUNDS 3000

static vfio_arena_t *arena;
static _Atomic int writers_left = WRITERS;

static void *writer(void *arg)
{
	vfio_handle_t h;
	char stack[64];

	snprintf(stack, sizeof(stack), "  File \"storm.py\", line %ld, in writer\n", (long)arg);
	if (vfio_slot_alloc(arena, VFIO_KIND_REFCOUNT, "storm", &h))
		return NULL;
	for (int i = 0; i < ROUNDS; i++) {
		int64_t r;

		vfio_refcount_set(&h, 0);
		r = vfio_refcount_inc(&h);	/* addition on 0: a WARN */
		if (r & VFIO_RET_WARN)
			vfio_warn_set_stack(arena, (uint64_t)r >> VFIO_RET_SEQ_SHIFT, stack);
		vfio_warn_emit(arena, &h, VFIO_WARN_OTHER, "storm");
	}
	vfio_slot_free(&h);
	atomic_fetch_sub(&writers_left, 1);
	return NULL;
}

static void *reader(void *arg)
{
	vfio_warn_entry_t e;
	vfio_arena_info_t info;
	long seen = 0;

	(void)arg;
	while (atomic_load(&writers_left)) {
		vfio_arena_info(arena, &info);
		for (uint64_t seq = info.warn_head > 16 ? info.warn_head - 16 : 1;
		     seq <= info.warn_head; seq++)
			if (vfio_warn_read(arena, seq, &e) == VFIO_OK && e.text[0])
				seen++;
	}
	return (void *)seen;
}

int main(void)
{
	pthread_t t[WRITERS + READERS];
	char name[64];
	int err;

	snprintf(name, sizeof(name), "/vfio-emu-storm-%d", (int)getpid());
	if (vfio_arena_create(name, 64, 16, 250, 1.0, &arena, &err)) {
		fprintf(stderr, "create failed: %s\n", strerror(err));
		return 2;
	}
	for (long i = 0; i < WRITERS; i++)
		pthread_create(&t[i], NULL, writer, (void *)i);
	for (int i = 0; i < READERS; i++)
		pthread_create(&t[WRITERS + i], NULL, reader, NULL);
	for (int i = 0; i < WRITERS + READERS; i++)
		pthread_join(t[i], NULL);
	vfio_arena_close(arena, 1, &err);
	vfio_arena_release(arena);
	printf("storm done\n");
	return 0;
}

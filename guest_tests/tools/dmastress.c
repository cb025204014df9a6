/*
 * dmastress: DMA through the block layer with data verification.
 *
 *   dmastress -d DEV [-t threads] [-n ops per thread] [-s size,size,...]
 *             [-S seed] [-m both|write|verify] [-r region bytes per thread]
 *
 * Each thread owns a region of DEV and does O_DIRECT writes of a pattern
 * derived from (seed, byte offset), then reads each block back into a
 * different buffer and compares. Buffers start at odd multiples of 512
 * bytes into a page, and the default sizes cross pages and 2 KiB swiotlb
 * slots, so bounce buffering is exercised at its edges. `-m write` then
 * `-m verify` split the two halves (to check a device behind our back).
 *
 * Prints one "CORRUPT offset=0x... expected=0x... got=0x..." line per bad
 * 8-byte word (the first 16), and a summary line:
 *   dmastress: dev=... threads=T ops=N bytes=B corrupt=C errors=E seconds=S MBps=M
 * A thread stops after 8 I/O errors in a row (its device is gone).
 * Exit status: 0 clean, 1 corruption or I/O errors, 2 usage/open failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *dev;
static int threads = 2, ops = 64, mode_write = 1, mode_verify = 1;
static uint64_t seed = 0x5eed, region = 8 << 20;
static size_t sizes[32] = { 512, 4096, 4608, 6144, 65536, 266240 };
static int nsizes = 6;
static long corrupt_words, io_errors, reported;
static unsigned long long bytes_done;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static uint64_t word(uint64_t off)
{
	uint64_t x = (off >> 3) ^ seed * 0x9E3779B97F4A7C15ull;
	x ^= x >> 31; x *= 0xBF58476D1CE4E5B9ull; x ^= x >> 29;
	return x;
}

static void fill(uint64_t *buf, size_t len, uint64_t off)
{
	for (size_t i = 0; i < len / 8; i++)
		buf[i] = word(off + i * 8);
}

static void check(const uint64_t *buf, size_t len, uint64_t off)
{
	for (size_t i = 0; i < len / 8; i++) {
		uint64_t want = word(off + i * 8);
		if (buf[i] != want) {
			pthread_mutex_lock(&lock);
			corrupt_words++;
			if (reported++ < 16)
				printf("CORRUPT offset=0x%llx expected=0x%016llx got=0x%016llx\n",
				       (unsigned long long)(off + i * 8), (unsigned long long)want,
				       (unsigned long long)buf[i]);
			pthread_mutex_unlock(&lock);
		}
	}
}

static void *worker(void *arg)
{
	long id = (long)arg;
	int fd = open(dev, O_RDWR | O_DIRECT);
	if (fd < 0) {
		fprintf(stderr, "dmastress: open %s: %s\n", dev, strerror(errno));
		__atomic_add_fetch(&io_errors, 1, __ATOMIC_SEQ_CST);
		return NULL;
	}
	size_t max = 0;
	for (int i = 0; i < nsizes; i++)
		if (sizes[i] > max)
			max = sizes[i];
	uint8_t *wraw, *rraw;
	if (posix_memalign((void **)&wraw, 4096, max + 8192) || posix_memalign((void **)&rraw, 4096, max + 8192)) {
		fprintf(stderr, "dmastress: out of memory\n");
		exit(2);
	}
	uint64_t base = (uint64_t)id * region, pos = 0;
	int failed_in_a_row = 0;
	for (int op = 0; op < ops && failed_in_a_row < 8; op++) {
		size_t len = sizes[(op + id) % nsizes];
		if (pos + len > region)
			pos = 0;
		uint64_t off = base + pos;
		/* Odd multiples of 512 into the page: buffers straddle page boundaries. */
		uint64_t *wbuf = (uint64_t *)(wraw + 512 * (1 + 2 * (op % 4)));
		uint64_t *rbuf = (uint64_t *)(rraw + 512 * (1 + 2 * ((op + 1) % 4)));
		if (mode_write) {
			fill(wbuf, len, off);
			if (pwrite(fd, wbuf, len, (off_t)off) != (ssize_t)len) {
				fprintf(stderr, "dmastress: write %zu at 0x%llx: %s\n", len, (unsigned long long)off,
					strerror(errno));
				__atomic_add_fetch(&io_errors, 1, __ATOMIC_SEQ_CST);
				failed_in_a_row++;
				pos += len;
				continue;
			}
		}
		if (mode_verify) {
			memset(rbuf, 0xA5, len);
			if (pread(fd, rbuf, len, (off_t)off) != (ssize_t)len) {
				fprintf(stderr, "dmastress: read %zu at 0x%llx: %s\n", len, (unsigned long long)off,
					strerror(errno));
				__atomic_add_fetch(&io_errors, 1, __ATOMIC_SEQ_CST);
				failed_in_a_row++;
			} else {
				failed_in_a_row = 0;
				check(rbuf, len, off);
			}
		}
		__atomic_add_fetch(&bytes_done, len, __ATOMIC_SEQ_CST);
		pos += len;
	}
	free(wraw);
	free(rraw);
	close(fd);
	return NULL;
}

int main(int argc, char **argv)
{
	int c;
	while ((c = getopt(argc, argv, "d:t:n:s:S:m:r:")) != -1) {
		switch (c) {
		case 'd': dev = optarg; break;
		case 't': threads = atoi(optarg); break;
		case 'n': ops = atoi(optarg); break;
		case 'S': seed = strtoull(optarg, NULL, 0); break;
		case 'r': region = strtoull(optarg, NULL, 0); break;
		case 'm':
			mode_write = strcmp(optarg, "verify") != 0;
			mode_verify = strcmp(optarg, "write") != 0;
			break;
		case 's': {
			nsizes = 0;
			for (char *tok = strtok(optarg, ","); tok && nsizes < 32; tok = strtok(NULL, ","))
				sizes[nsizes++] = strtoull(tok, NULL, 0);
			break;
		}
		default:
			return 2;
		}
	}
	if (!dev || threads < 1 || threads > 64 || ops < 1 || nsizes < 1) {
		fprintf(stderr, "usage: dmastress -d DEV [-t threads] [-n ops] [-s size,...] [-S seed] "
			"[-m both|write|verify] [-r region]\n");
		return 2;
	}
	for (int i = 0; i < nsizes; i++)
		if (sizes[i] % 512 || sizes[i] == 0 || sizes[i] > region) {
			fprintf(stderr, "dmastress: size %zu must be a non-zero multiple of 512 within the region\n",
				sizes[i]);
			return 2;
		}
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	pthread_t tid[64];
	for (long i = 0; i < threads; i++)
		pthread_create(&tid[i], NULL, worker, (void *)i);
	for (int i = 0; i < threads; i++)
		pthread_join(tid[i], NULL);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double secs = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
	printf("dmastress: dev=%s threads=%d ops=%d bytes=%llu corrupt=%ld errors=%ld seconds=%.3f MBps=%.1f\n",
	       dev, threads, ops, bytes_done, corrupt_words, io_errors, secs,
	       secs > 0 ? bytes_done / secs / 1e6 : 0.0);
	return corrupt_words || io_errors ? 1 : 0;
}

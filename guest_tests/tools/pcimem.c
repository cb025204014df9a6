/*
 * pcimem: read and write a PCI BAR through its sysfs resource file.
 *
 *   pcimem { sysfile } { offset } [ type*count [ data ] ]
 *
 * type is b, h, w or d (1, 2, 4 or 8 bytes; default w); numbers take 0x.
 * Reads print "0x<offset>: 0x<value>" per item; writes print
 * "Written 0x<value>; readback 0x<value>" per item. Unlike the classic tool,
 * with *count and data every item is written (not only the last one).
 * Exit status: 0 ok, 1 usage, 2 open/mmap failure.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int width_of(char t)
{
	switch (t) {
	case 'b': return 1;
	case 'h': return 2;
	case 'w': return 4;
	case 'd': return 8;
	}
	return 0;
}

static uint64_t rd(volatile void *p, int w)
{
	switch (w) {
	case 1: return *(volatile uint8_t *)p;
	case 2: return *(volatile uint16_t *)p;
	case 4: return *(volatile uint32_t *)p;
	default: return *(volatile uint64_t *)p;
	}
}

static void wr(volatile void *p, int w, uint64_t v)
{
	switch (w) {
	case 1: *(volatile uint8_t *)p = (uint8_t)v; break;
	case 2: *(volatile uint16_t *)p = (uint16_t)v; break;
	case 4: *(volatile uint32_t *)p = (uint32_t)v; break;
	default: *(volatile uint64_t *)p = v; break;
	}
}

int main(int argc, char **argv)
{
	int width = 4, count = 1, have_data = argc > 4;
	uint64_t data = 0;
	char *end;

	if (argc < 3 || argc > 5) {
		fprintf(stderr, "usage: %s { sysfile } { offset } [ type*count [ data ] ]\n"
			"\ttype: b (1 byte), h (2), w (4, default), d (8)\n", argv[0]);
		return 1;
	}
	errno = 0;
	off_t target = (off_t)strtoull(argv[2], &end, 0);
	if (errno || *end) {
		fprintf(stderr, "pcimem: bad offset '%s'\n", argv[2]);
		return 1;
	}
	if (argc > 3) {
		width = width_of(argv[3][0]);
		if (!width) {
			fprintf(stderr, "pcimem: bad type '%s' (b, h, w or d)\n", argv[3]);
			return 1;
		}
		char *star = strchr(argv[3], '*');
		if (star) {
			count = atoi(star + 1);
			if (count < 1) {
				fprintf(stderr, "pcimem: bad count '%s'\n", star + 1);
				return 1;
			}
		}
	}
	if (have_data) {
		errno = 0;
		data = strtoull(argv[4], &end, 0);
		if (errno || *end) {
			fprintf(stderr, "pcimem: bad data '%s'\n", argv[4]);
			return 1;
		}
	}
	if (target % width) {
		fprintf(stderr, "pcimem: offset 0x%llx not aligned to %d bytes\n", (unsigned long long)target, width);
		return 1;
	}
	int fd = open(argv[1], O_RDWR | O_SYNC);
	if (fd < 0) {
		fprintf(stderr, "pcimem: open %s: %s\n", argv[1], strerror(errno));
		return 2;
	}
	long page = sysconf(_SC_PAGESIZE);
	off_t base = target & ~(off_t)(page - 1);
	size_t span = (size_t)(target - base) + (size_t)width * count;
	size_t len = (span + page - 1) & ~(size_t)(page - 1);
	void *map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, base);
	if (map == MAP_FAILED) {
		fprintf(stderr, "pcimem: mmap %s at 0x%llx: %s\n", argv[1], (unsigned long long)base, strerror(errno));
		close(fd);
		return 2;
	}
	for (int i = 0; i < count; i++) {
		off_t off = target + (off_t)i * width;
		volatile uint8_t *p = (volatile uint8_t *)map + (off - base);
		if (have_data) {
			wr(p, width, data);
			printf("Written 0x%0*llX; readback 0x%0*llX\n", width * 2, (unsigned long long)data,
			       width * 2, (unsigned long long)rd(p, width));
		} else {
			printf("0x%04llX: 0x%0*llX\n", (unsigned long long)off, width * 2,
			       (unsigned long long)rd(p, width));
		}
	}
	fflush(stdout);
	munmap(map, len);
	close(fd);
	return 0;
}

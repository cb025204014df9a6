// SPDX-License-Identifier: GPL-2.0-only
/*
 * Fake tree: a stand-in for kernel/dma/swiotlb.c, which the test series patch.
 */

#include <linux/debugfs.h>
#include <linux/swiotlb.h>

static struct io_tlb_mem io_tlb_default_mem;

static void swiotlb_create_debugfs_files(struct io_tlb_mem *mem, const char *dirname)
{
	mem->debugfs = debugfs_create_dir(dirname, io_tlb_default_mem.debugfs);
	debugfs_create_ulong("io_tlb_nslabs", 0400, mem->debugfs, &mem->nslabs);
}

static int __init swiotlb_create_default_debugfs(void)
{
	swiotlb_create_debugfs_files(&io_tlb_default_mem, "swiotlb");
	return 0;
}

late_initcall(swiotlb_create_default_debugfs);

// SPDX-License-Identifier: GPL-2.0-only
/*
 * Fake tree: a small module, so that a fragment can ask for one (=m).
 */

#include <linux/module.h>

static int __init harness_demo_init(void)
{
	pr_info("harness_demo: loaded\n");
	return 0;
}

module_init(harness_demo_init);
MODULE_LICENSE("GPL");

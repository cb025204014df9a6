// SPDX-License-Identifier: GPL-2.0-only
/*
 * Fake tree: a stand-in for init/main.c. Only #error and #warning lines mean
 * anything to the fake compiler; the rest is there to be patched.
 */

#include <linux/init.h>
#include <linux/printk.h>

asmlinkage __visible void __init start_kernel(void)
{
	pr_notice("%s", linux_banner);
	rest_init();
}

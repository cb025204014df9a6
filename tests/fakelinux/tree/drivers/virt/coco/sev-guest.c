// SPDX-License-Identifier: GPL-2.0-only
/*
 * Fake tree: a stand-in for the SEV guest driver; built only when its
 * dependency is met.
 */

#include <linux/module.h>

MODULE_DESCRIPTION("AMD SEV Guest Driver (fake tree)");
MODULE_LICENSE("GPL");

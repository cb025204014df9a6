"""A test harness for Linux kernels in confidential-computing guests."""

__version__ = "0.1.0"

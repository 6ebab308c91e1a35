"""Thin wrapper: the benchmark lives in the installed package (`empssl bench tcr --help`)."""

import sys

from empssl.bench.tcr import main

if __name__ == "__main__":
    sys.exit(main())

"""Thin wrapper: the benchmark lives in the installed package (`empssl bench augment --help`)."""

import sys

from empssl.bench.augment import main

if __name__ == "__main__":
    sys.exit(main())

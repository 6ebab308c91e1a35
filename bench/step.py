"""Thin wrapper: the benchmark lives in the installed package (`empssl bench step --help`)."""

import sys

from empssl.bench.step import main

if __name__ == "__main__":
    sys.exit(main())

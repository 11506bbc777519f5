"""``python -m benchmarks.uci``."""

from .cli import main

main()

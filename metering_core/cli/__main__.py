"""`python -m metering_core.cli`."""

from metering_core.cli import main

main()

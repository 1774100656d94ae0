"""`python -m leanserve.server` is the `leanserve` command."""

from leanserve.server.cli import main

main()

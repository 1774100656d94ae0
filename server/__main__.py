"""`python -m leanserve.server` is the `leanserve` command."""

from leanserve.server.api.cli import main

main()

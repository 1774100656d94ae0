"""`python -m server` is the `leanserve` command."""

from server.cli import main

main()

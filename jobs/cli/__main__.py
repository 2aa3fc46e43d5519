"""`python -m jobs.cli ...` is `ctfactory ...`."""

from jobs.cli import main

main()

"""Entry points: the job scripts that `ray job submit` runs, their specs, and
the `ctfactory` command line. Nothing imports this package."""

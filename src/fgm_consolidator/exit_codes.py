"""Exit codes a script or a probe acts on, one meaning each across the commands: `recover`,
`run --once` and `status` all exit 3 when a person must decide, so a cron job or a runbook
tests one number whichever of them it ran."""

EXIT_HEALTHY = 0
EXIT_NEEDS_PERSON = 3
EXIT_STALE = 4
EXIT_NEVER_RAN = 5

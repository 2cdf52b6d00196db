"""Exit codes of the CLI and the daemon, one set for both (scripts and service managers read
them)."""

EXIT_OK = 0
EXIT_FAILURE = 1  # the database or the CA cannot be used
EXIT_USAGE = 2  # bad input or configuration (a bad value, an address in use); nothing was changed

"""The node's front ends and wiring: configuration, the daemon, status reporting and the CLI."""

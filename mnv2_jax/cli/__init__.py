"""The `mnv2` command and its subcommands."""

"""The `relaynat` command line: options, subcommands and the demo."""

"""Subcommands of `rs` that are ours (not LightningCLI): each module exposes `main(argv) -> int`."""

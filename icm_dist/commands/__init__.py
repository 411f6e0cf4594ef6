"""The icm-dist subcommands: train and the tools that read, compare and reuse finished runs."""

"""scfm_launch: the `launch` command line. Imports nothing heavy at module level."""

"""One thin module per subcommand: options, one call into core, rendering."""

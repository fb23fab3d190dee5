"""One module per subcommand: parse options, call one library function, print the result."""

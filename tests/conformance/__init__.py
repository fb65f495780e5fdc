"""One behaviour contract, checked against every channel layer backend."""

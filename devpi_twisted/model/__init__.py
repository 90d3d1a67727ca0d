"""Pure code, no I/O: names, configs, inheritance and permission decisions."""

"""The CLI verbs, one module each: `register(subparsers, common)` and `main(args) -> int`."""

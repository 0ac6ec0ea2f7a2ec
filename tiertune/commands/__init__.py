"""CLI verbs, one module each; `register(subparsers)` adds the verb's parser with `func` set."""

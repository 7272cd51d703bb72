"""The bundled demo: a deterministic synthetic corpus, a loopback server for it, and
the `curate demo` job that crawls and curates it."""

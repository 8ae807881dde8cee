"""Structured output: grammars that constrain what a row may generate.

One job per module, so each is tested alone:

- ``spec``: ``GrammarSpec``, what a request asks for (kind and text), library-free;
- ``backend``: the grammar library (llguidance): the tokenizer's index and the compile of a
  spec into a template matcher, its errors and limits;
- ``matcher``: ``CompiledGrammar`` (a compiled spec, shared by requests) and ``RowMatcher``
  (one row's position in it: fill its mask, accept its token, finished?);
- ``compiler``: ``GrammarCompiler``, the daemon's compile service: its own threads (never
  the event loop nor the engine thread), an LRU cache by (kind, text) bounded in entries and
  bytes, in-flight sharing and a time limit;
- ``probe``: ``CompileProbe``, each new spec compiled first in a child process, so that a
  grammar that crashes the native library, or costs too much a token, is refused and the
  daemon lives;
- ``heap``: the C heap where the library keeps compiled grammars (their weight; freed pages
  given back after an eviction);
- ``bitmask``: the mask buffers and their vectorized application to logits.

Nothing is imported here, so that importing ``spec`` (validation does) pulls in neither
torch nor the library.
"""

"""`fastbert serve`: a TEI-compatible HTTP server that packs concurrent requests into padding-free batches.

Install with `pip install fastbert[serve]`. The pieces:
  options.py   ServeOptions (the command-line settings) and their validation
  loading.py   the model (fastbert's Auto classes), its tokenizer and sentence-transformers config
  pooling.py   sentence-transformers pooling modes on the encoder output
  engine.py    tokenization (thread-local fast tokenizers) and one forward over a list of sequences
  batcher.py   the bounded queue and the single inference thread that packs waiting sequences
  app.py       the FastAPI app (TEI's endpoints, OpenAI's /v1/embeddings, /health, /info, /metrics)
  cli.py       `fastbert serve` arguments (TEI's flags and variables too) and uvicorn; workers.py pins
               --workers replicas to cores
  ray.py       a Ray Serve deployment of the same app (pip install fastbert[serve-ray])
Nothing here imports FastAPI at `import fastbert.serve` time, so the CLI can report a missing extra.
"""
from fastbert.serve.options import ServeConfigError, ServeOptions

__all__ = ["ServeConfigError", "ServeOptions", "create_app"]


def create_app(options: ServeOptions, **kwargs):
    """The FastAPI app for `options` (the model loads when the app starts: lifespan startup)."""
    from fastbert.serve.app import create_app as _create_app

    return _create_app(options, **kwargs)

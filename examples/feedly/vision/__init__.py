"""Database-independent computations of the Feedly ad pipeline stages.

Each module is a set of pure-ish functions on Pillow images and JSON-able dicts, so a
pipeline stage handler can call them with a file path and the previous stages' results.
Heavy or optional backends (Ultralytics YOLO, LLaVA via transformers, OpenAI-compatible
HTTP servers) are imported lazily and selected through :mod:`.backends`.
"""
